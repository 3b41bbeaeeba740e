"""The one-pass fused preference loss: hidden states -> loss and metrics, without logits.

    pygpo.FusedPreferenceLoss(loss="dpo", **hparams)(hidden, weight, labels, response_index, ...)
"""

from .layout import ResponseIndexError, ResponseLayout
from .module import FusedPreferenceLoss
from .output import FusedPreferenceOutput
from .reference_inputs import ReferenceInputError

__all__ = ["FusedPreferenceLoss", "FusedPreferenceOutput", "ReferenceInputError", "ResponseIndexError", "ResponseLayout"]
