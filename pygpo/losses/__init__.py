"""The DPO-family loss registry (LOSSES.md): every loss behind one API.

    pygpo.losses.names()                  # every key, LOSSES.md order
    pygpo.losses.get("dpo")               # LossSpec: .paper, .formula, .inputs, .defaults, .ranges
    pygpo.losses.preference_loss("dpo", policy_logps, ref_logps, beta=0.1)
        -> PreferenceLossOutput(loss, per_example, metrics)
    pygpo.losses.reduce("mean", token_logps, mask)   # section-1 reducers
    pygpo.losses.BetaDPOLoss(), BCOPairLoss(), BCOLoss(), GroupRobustLoss(G)   # stateful losses
    pygpo.losses.markdown_table()         # the docs table
"""

from . import _all_heads  # noqa: F401  (registers every key)
from .api import PreferenceLossOutput, preference_loss, validate
from .docs import markdown_table
from .errors import (
    HyperParameterError,
    HyperParameterTypeError,
    InputShapeError,
    InputValueError,
    MissingInputError,
    NonFiniteError,
    PreferenceLossError,
    UnexpectedArgumentError,
    UnknownLossError,
)
from .reducers import reduce, reduce_pair, sampled_mask
from .registry import HeadResult, LossInput, LossSpec, get, names
from .stateful import BCOLoss, BCOPairLoss, BetaDPOLoss, GroupRobustLoss
from .token_weights import bmc_token_weights, dmpo_token_weights, suffix_mask, tgdpo_token_weights

__all__ = [
    "names",
    "get",
    "preference_loss",
    "PreferenceLossOutput",
    "validate",
    "reduce",
    "reduce_pair",
    "sampled_mask",
    "markdown_table",
    "LossSpec",
    "LossInput",
    "HeadResult",
    "BCOPairLoss",
    "BCOLoss",
    "BetaDPOLoss",
    "GroupRobustLoss",
    "bmc_token_weights",
    "dmpo_token_weights",
    "suffix_mask",
    "tgdpo_token_weights",
    "PreferenceLossError",
    "UnknownLossError",
    "MissingInputError",
    "UnexpectedArgumentError",
    "InputShapeError",
    "HyperParameterError",
    "HyperParameterTypeError",
    "NonFiniteError",
    "InputValueError",
]
