"""Inverse problems: measurement operators and posterior samplers (DPS, MCG, FlowDPS, DDNM, PiGDM, TMPD).

    op = gf.inverse.super_resolution(2)
    y = gf.inverse.GaussianNoise(0.05).sample(key, op(x_true))
    x, info = gf.inverse.posterior_sample(fn, path, x1, y, op, prediction="eps", method="dps", key=key)

``gf.inverse.linear_gaussian_posterior`` gives the exact posterior of a Gaussian prior under a
linear operator with Gaussian noise, against which the samplers are tested.
"""

from genflow.inverse.operators import (
    AvgPool, Blur, GaussianNoise, Identity, Mask, Matrix, Operator, PoissonNoise, box_inpainting,
    compressed_sensing, denoising, gaussian_blur, kernel_blur, motion_blur, random_inpainting, super_resolution,
)
from genflow.inverse.oracle import linear_gaussian_posterior, operator_matrix
from genflow.inverse.samplers import (
    DEFAULTS, METHODS, PosteriorInfo, PosteriorModel, posterior_model, posterior_sample, prior_sample,
)

__all__ = [
    "Operator", "Mask", "AvgPool", "Blur", "Matrix", "Identity", "random_inpainting", "box_inpainting",
    "super_resolution", "gaussian_blur", "kernel_blur", "motion_blur", "compressed_sensing", "denoising", "GaussianNoise",
    "PoissonNoise", "posterior_sample", "prior_sample", "posterior_model", "PosteriorModel", "PosteriorInfo", "METHODS", "DEFAULTS",
    "linear_gaussian_posterior", "operator_matrix",
]
