"""pygpo: fused kernels, prefix sharing and a complete loss registry for DPO-family preference optimization."""

from . import losses, prefix
from .fused import FusedPreferenceLoss, FusedPreferenceOutput
from .losses import PreferenceLossOutput, preference_loss
from .ops import (
    BackendUnavailableError,
    LogProbs,
    PolicyRefLogProbs,
    PolicyRefOutputs,
    fused_linear_cross_entropy,
    fused_linear_kl,
    fused_linear_logprobs,
    selective_log_softmax,
)
from .prefix import prefix_attention

__version__ = "0.1.0.dev0"

__all__ = [
    "BackendUnavailableError",
    "FusedPreferenceLoss",
    "FusedPreferenceOutput",
    "LogProbs",
    "PolicyRefLogProbs",
    "PolicyRefOutputs",
    "PreferenceLossOutput",
    "fused_linear_cross_entropy",
    "fused_linear_kl",
    "fused_linear_logprobs",
    "losses",
    "preference_loss",
    "prefix",
    "prefix_attention",
    "selective_log_softmax",
]
