"""The policy and reference models of a run: the demo Llama, or a local Hugging Face model directory.

The reference is a frozen copy of the initial policy (``reference: copy``), another model directory
(``reference: <path>``), the policy's initial scores cached once (``cache``: the copy is used for the
cache and dropped), or absent (``none``, reference-free losses).

Precision (``dtype``): the policy's parameters, its gradients and the optimizer state are float32
whatever ``dtype`` says; ``bf16`` runs the forwards (and so the backward) under
``torch.autocast(<device>, bfloat16)`` (:func:`precision_context`): mixed precision with float32
master weights, so an update smaller than bf16's resolution of a weight (``lr = 5e-7`` on weights of
size ~0.02) still moves it, where a bf16 parameter would round it away. Checkpoints therefore hold
float32 weights. The reference takes no gradient; it runs under the same autocast and is stored in
float32 or bf16 (:func:`reference_dtype`).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: The dtype of the policy's parameters, gradients and optimizer state (the master weights), for any ``dtype``.
MASTER_DTYPE = torch.float32


class ModelPathError(FileNotFoundError):
    """A model path that does not hold a Hugging Face model."""


def check_model_dir(path: str, what: str) -> Path:
    """``Path(path)`` if it is a local Hugging Face model directory (holds ``config.json``); else
    :class:`ModelPathError` naming the option ``what`` and the path."""
    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file()):
        found = "no such directory" if not p.exists() else ("not a directory" if not p.is_dir() else "no config.json in it")
        raise ModelPathError(
            f"{what}: {path!r} is not a local Hugging Face model directory ({found}; expected a folder with "
            "config.json and weights, as written by save_pretrained); use model: demo for the built-in demo"
        )
    return p


def check_model_paths(cfg: TrainConfig) -> None:
    """Fail fast, before the tokenizer or any data is loaded, on a model or reference path that is not a model."""
    if not cfg.is_demo:
        check_model_dir(cfg.model, "model")
    if cfg.needs_reference() and cfg.reference not in ("copy", "cache", "none"):
        check_model_dir(cfg.reference, "reference")


def _load_pretrained(path: str, what: str, dtype: torch.dtype) -> nn.Module:
    p = check_model_dir(path, what)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)


def demo_model(cfg: TrainConfig, tokenizer: Any) -> nn.Module:
    """A random-init Llama over the tokenizer's vocabulary, sized by ``cfg.demo_model`` (seeded by ``cfg.seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attention_dropout=0.0, **cfg.demo_model,
    )
    return LlamaForCausalLM(config)


def precision_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """A fresh context to run forwards in: ``torch.autocast(device.type, bfloat16)`` for ``dtype: bf16``
    (matmuls in bf16 from the float32 weights), nothing for ``fp32``. The backward runs outside it."""
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[cfg.dtype])


def reference_dtype(cfg: TrainConfig) -> torch.dtype:
    """Storage dtype of the reference model. Under ``bf16`` it takes no gradient, so no master copy: bf16 (half
    the memory; its matmuls run in bf16 either way, its scores differ from float32 weights' by bf16 rounding)
    for a reference that only scores (``cache``: the copy that fills the cache; another model directory),
    and float32 where it must compute exactly as the float32 policy does:

    * ``copy``: the initial policy itself, scored identically at step 0 (margins exactly 0, ties in the
      reward accuracy) only with the policy's weights under the same autocast; bf16 storage would turn
      those ties into rounding noise;
    * TR-DPO (``sync_ref_every``) moves it by ``alpha * (theta - theta_ref)``, an update bf16 would round away
      as it would a small optimizer step;
    * a loss reading the token KL (TDPO, SparsePO, RRPO, PMPO) scores both models in one fused pass, which
      takes the policy's dtype (its hidden states are float32 under autocast: the residual stream follows
      the float32 embeddings).
    """
    from pygpo.losses import get

    if (cfg.dtype == "fp32" or cfg.reference == "copy" or cfg.sync_ref_every
            or any("kl" in get(k).input_names for k in cfg.loss_components())):
        return MASTER_DTYPE
    return DTYPES[cfg.dtype]


def build_policy(cfg: TrainConfig, tokenizer: Any) -> nn.Module:
    """The policy with float32 parameters (the master weights; ``dtype`` is the compute dtype, see the module
    docstring): a model saved in bf16 is upcast exactly."""
    model = demo_model(cfg, tokenizer) if cfg.is_demo else _load_pretrained(cfg.model, "model", MASTER_DTYPE)
    model = model.to(MASTER_DTYPE)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def build_reference(cfg: TrainConfig, policy: nn.Module) -> Optional[nn.Module]:
    """The frozen reference model (``None`` for ``none``; for ``cache`` the copy that fills the cache)."""
    if not cfg.needs_reference() or cfg.reference == "none":
        return None
    dtype = reference_dtype(cfg)
    if cfg.reference in ("copy", "cache"):
        ref = copy.deepcopy(policy).to(dtype)
    else:
        ref = _load_pretrained(cfg.reference, "reference", dtype).to(dtype)
    ref.eval().requires_grad_(False)
    return ref


@torch.no_grad()
def sync_reference(ref: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al., 2024): ``theta_ref <- alpha * theta + (1 - alpha) * theta_ref``."""
    for r, p in zip(ref.parameters(), policy.parameters()):
        r.mul_(1.0 - alpha).add_(p.detach().to(r.dtype), alpha=alpha)


def model_identity(cfg: TrainConfig, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match on resume: the model source, its architecture config and the
    ``dtype`` option (the compute precision the run trains in)."""
    arch = model.config.to_dict()
    keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
    return {"model": cfg.model, "config": {k: arch.get(k) for k in keep}, "dtype": cfg.dtype}
