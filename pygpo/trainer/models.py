"""The policy and reference models of a run: the demo Llama, or a local Hugging Face model directory.

The reference is a frozen copy of the initial policy (``reference: copy``), another model directory
(``reference: <path>``), the policy's initial scores cached once (``cache``: the copy is used for the
cache and dropped), or absent (``none``, reference-free losses).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def build_policy(cfg: TrainConfig, tokenizer: Any) -> nn.Module:
    dtype = DTYPES[cfg.dtype]
    model = demo_model(cfg, tokenizer) if cfg.is_demo else _load_pretrained(cfg.model, "model", dtype)
    model = model.to(dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def build_reference(cfg: TrainConfig, policy: nn.Module) -> Optional[nn.Module]:
    """The frozen reference model (``None`` for ``none``; for ``cache`` the copy that fills the cache)."""
    if not cfg.needs_reference() or cfg.reference == "none":
        return None
    if cfg.reference in ("copy", "cache"):
        ref = copy.deepcopy(policy)
    else:
        ref = _load_pretrained(cfg.reference, "reference", DTYPES[cfg.dtype]).to(DTYPES[cfg.dtype])
    ref.eval().requires_grad_(False)
    return ref


@torch.no_grad()
def sync_reference(ref: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al., 2024): ``theta_ref <- alpha * theta + (1 - alpha) * theta_ref``."""
    for r, p in zip(ref.parameters(), policy.parameters()):
        r.mul_(1.0 - alpha).add_(p.detach().to(r.dtype), alpha=alpha)


def model_identity(cfg: TrainConfig, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match on resume: the model source and its architecture config."""
    arch = model.config.to_dict()
    keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
    return {"model": cfg.model, "config": {k: arch.get(k) for k in keep}}
