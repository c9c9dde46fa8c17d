"""Datasets: toy 2-D distributions (jittable samplers), bundled offline images, and
tensorflow-datasets image pipelines (``tfds.data_source`` + grain).

Toy samplers are pure ``f(key, n) -> [n, 2]`` float32 functions, usable inside ``jit`` and
``lax.scan`` (the training loop samples them on device). ``load_digits`` returns scikit-learn's
bundled 8x8 digits (1797 real images, no download) scaled to [-1, 1]. ``image_loader`` gives a
shuffled, batched, per-host-sharded, resumable iterator over ``"digits"`` or any tfds image
dataset by name.
"""

from genflow.data._images import DIGITS, image_dataset, image_loader, load_digits
from genflow.data._toy import (TOY, checkerboard, circles, eight_gaussians, moons, pinwheel, spirals, swiss_roll, toy,
                               toy_sampler)

__all__ = ["TOY", "toy", "toy_sampler", "load_digits", "image_dataset", "image_loader", "DIGITS",
           "moons", "eight_gaussians", "checkerboard", "swiss_roll", "spirals", "pinwheel", "circles"]
