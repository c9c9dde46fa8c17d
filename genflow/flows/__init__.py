"""Normalizing flows: invertible layers (pure forward / inverse / log-det), Glow and RealNVP,
EBFlow's score-matching training, and FFJORD continuous normalizing flows.

    flow = gf.flows.glow((8, 8, 1), levels=2, steps_per_level=4)
    params = flow.init(key, x_batch)
    loss_fn = gf.flows.flow_objective(flow, "ml")       # or "ssm" / "dsm" (EBFlow)
    logp = flow.log_prob(params, x)
"""

from genflow.flows._cnf import cnf_log_prob, cnf_sample, ffjord_loss, ffjord_objective
from genflow.flows._flow import OBJECTIVES, Flow, dsm_loss, flow_objective, glow, nll_loss, realnvp, ssm_loss
from genflow.flows._layers import (ActNorm, AdditiveCoupling, AffineCoupling, Chain, CouplingNet, FactorOut,
                                   Invertible1x1Conv, Layer, Squeeze, Unsqueeze, coupling_mask)

__all__ = [
    "Layer", "ActNorm", "Invertible1x1Conv", "AffineCoupling", "AdditiveCoupling", "Squeeze", "Unsqueeze",
    "FactorOut", "Chain", "CouplingNet", "coupling_mask",
    "Flow", "glow", "realnvp", "nll_loss", "ssm_loss", "dsm_loss", "flow_objective", "OBJECTIVES",
    "cnf_log_prob", "cnf_sample", "ffjord_loss", "ffjord_objective",
]
