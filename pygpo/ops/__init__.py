"""Drop-in autograd ops: fused linear -> token log-probs / cross-entropy, and backend dispatch."""

from .cross_entropy import fused_linear_cross_entropy
from .dispatch import BackendUnavailableError, resolve_backend
from .logprobs import LogProbs, fused_linear_logprobs
from .loss_head import PairwiseHeadOutput, fused_pairwise_loss_head
from .policy_ref import PolicyRefLogProbs, PolicyRefOutputs, fused_linear_kl
from .selective import selective_log_softmax

__all__ = [
    "BackendUnavailableError",
    "LogProbs",
    "PairwiseHeadOutput",
    "PolicyRefLogProbs",
    "PolicyRefOutputs",
    "fused_linear_cross_entropy",
    "fused_linear_kl",
    "fused_linear_logprobs",
    "fused_pairwise_loss_head",
    "resolve_backend",
    "selective_log_softmax",
]
