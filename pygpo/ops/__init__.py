"""Drop-in autograd ops: fused linear -> token log-probs / cross-entropy, and backend dispatch."""

from .cross_entropy import fused_linear_cross_entropy
from .dispatch import BackendUnavailableError, resolve_backend
from .logprobs import LogProbs, fused_linear_logprobs
from .policy_ref import PolicyRefLogProbs, PolicyRefOutputs, fused_linear_kl
from .selective import selective_log_softmax

__all__ = [
    "BackendUnavailableError",
    "LogProbs",
    "PolicyRefLogProbs",
    "PolicyRefOutputs",
    "fused_linear_cross_entropy",
    "fused_linear_kl",
    "fused_linear_logprobs",
    "resolve_backend",
    "selective_log_softmax",
]
