"""pygpo: fused kernels, prefix sharing and a complete loss registry for DPO-family preference optimization."""

from . import losses, prefix, ref_cache
from .fingerprint import fingerprint_config, fingerprint_examples, fingerprint_model
from .fused import FusedPreferenceLoss, FusedPreferenceOutput
from .losses import PreferenceLossOutput, preference_loss
from .ops import (
    BackendUnavailableError,
    LogProbs,
    PairwiseHeadOutput,
    PolicyRefLogProbs,
    PolicyRefOutputs,
    fused_linear_cross_entropy,
    fused_linear_kl,
    fused_linear_logprobs,
    fused_pairwise_loss_head,
    selective_log_softmax,
)
from .prefix import prefix_attention
from .ref_cache import (CorruptCacheError, FingerprintMismatchError, ReferenceCache, ReferenceCacheError,
                        compute_reference_cache, open_reference_cache)

__version__ = "0.1.0.dev0"

__all__ = [
    "BackendUnavailableError",
    "CorruptCacheError",
    "FingerprintMismatchError",
    "FusedPreferenceLoss",
    "FusedPreferenceOutput",
    "LogProbs",
    "PairwiseHeadOutput",
    "PolicyRefLogProbs",
    "PolicyRefOutputs",
    "PreferenceLossOutput",
    "ReferenceCache",
    "ReferenceCacheError",
    "compute_reference_cache",
    "fingerprint_examples",
    "fingerprint_model",
    "fingerprint_config",
    "open_reference_cache",
    "ref_cache",
    "fused_linear_cross_entropy",
    "fused_linear_kl",
    "fused_linear_logprobs",
    "fused_pairwise_loss_head",
    "losses",
    "preference_loss",
    "prefix",
    "prefix_attention",
    "selective_log_softmax",
]
