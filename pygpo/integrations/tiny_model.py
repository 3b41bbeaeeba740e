"""A tiny random copy of a transformers architecture, built from its config alone (``pygpo check-model``).

:func:`load_config` reads the config a model argument names (a local Hugging Face directory, a
``config.json``, or a ``model_type`` name such as ``llama`` or ``gpt_oss``; local files only),
:func:`causal_lm_class` picks its causal LM class (for a multimodal model, its text decoder's),
:func:`tiny_config` shrinks the config and :func:`build_tiny_model` builds it with random float32 weights
and eager attention; :func:`make_tiny_model` does the last two. The checks that run on the copy are in
:mod:`pygpo.integrations.model_check`.

What the tiny copy shrinks (:func:`tiny_config`; the attribute tables below): widths (hidden,
intermediate, expert and embedding sizes, one scale for a config and its sub-configs, the hidden size
becoming 64), attention heads (key/value heads keep the model's kind: multi-head, multi-query, or grouped
with the ratio capped at 4), head dimensions (all scaled by one factor, so MLA's query/key and value
widths keep their relation and partial rotary dimensions stay partial), low-rank and state sizes, expert
counts (4) and top-k (2), the vocabulary (96 tokens, special token ids moved inside it), context lengths
(clamped to [64, 256]; LongRoPE's factor lists resampled to the new rotary width), final logit softcaps
(cut to 2, so that they bind on logits of order 1), and the layer count. Layers are *selected*, not
truncated: the tiny copy keeps one layer of every kind the full model has (every distinct combination of
its per-layer lists such as ``layer_types``, ``no_rope_layers``, ``mlp_layer_types``, of its index lists
such as ``mlp_only_layers``, of the "first/last k layers" counts such as ``first_k_dense_replace``, and of
``per_layer_config`` overrides), with those lists and counts remapped; layer periods are capped at the new
layer count. Sliding windows are cut to 4 tokens, so that they bind on the check's sequences (8 to 13
tokens). Dropouts and router jitter are zeroed. The weights are drawn with standard deviation
``fan_in ** -0.5`` (attention scores of order 1), and parameters that start constant (norms, biases,
sinks) get noise.

What it keeps: every switch of the architecture (rope type and its parameters, partial rotary factors,
final logit softcaps and logit scales, attention sinks, QK norms, bias flags, tied embeddings, MLA ranks
being set or not, shared experts, per-layer heterogeneity). Two things are kept from binding, because
pygpo checks them at run time against the real config's limits: Llama 4's attention chunk and
temperature-tuning floor, and length-dependent RoPE (dynamic NTK, LongRoPE) past the original context.

Run-time choices a config may leave unset are supplied (:data:`_RUN_TIME_CHOICES`): X-MOD's
``default_language`` becomes the first of its ``languages``, whose adapter the copy then runs.

Input that names no usable config raises :class:`ModelSpecError`: no such directory or ``model_type``, a
type without a causal LM class, a config transformers cannot build, a decoder every layer of which reads
key/value states of another model (a speculative-decoding assistant: it does not run on its own), or a
causal LM that predicts several token streams at each position (MusicGen's audio codebooks: pygpo's
log-probs and packed batches take one stream per row).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

#: Shapes of the tiny copy.
HIDDEN, VOCAB, WINDOW, CONTEXT = 64, 96, 4, (64, 256)
#: Final logit softcaps are cut to this, so that they bind on the tiny model's logits (of order 1).
SOFTCAP = 2.0
MAX_HEADS, MAX_GQA, EXPERTS, TOP_K, RANK = 8, 4, 4, 2, 8
#: Largest number of layers the tiny copy keeps to cover every kind of layer.
MAX_LAYERS = 8


class ModelSpecError(ValueError):
    """Bad input to :func:`~pygpo.integrations.model_check.check_model`: a model argument that names no readable or buildable config (an
    unknown ``model_type``, an unreadable directory), or a bad ``layers``/``backend``."""


def _one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (its type's name when it has none), for one-line reports and errors."""
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


# -- reading the config ---------------------------------------------------------------------------------


def load_config(spec: str | os.PathLike) -> Any:
    """The transformers config named by ``spec``: a local model directory, a ``config.json`` file, or a
    ``model_type`` of ``transformers.CONFIG_MAPPING`` (its default config). Reads local files only.

    Raises :class:`ModelSpecError` when ``spec`` is neither, or the config cannot be read.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            return _config_from_json(path)
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{text} is a directory without a config.json")
        try:
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read it is the user's input to fix
            raise ModelSpecError(f"cannot read the config in {text}: {_one_line(exc)}") from None
    if text in CONFIG_MAPPING:
        try:
            return CONFIG_MAPPING[text]()
        except Exception as exc:  # noqa: BLE001 - a transformers default config that does not validate
            raise ModelSpecError(f"transformers cannot build the default {text} config: {_one_line(exc)}") from None
    if os.sep in text or text.endswith(".json"):
        raise ModelSpecError(f"no such file or directory: {text} (check-model reads local configs only)")
    import difflib

    close = difflib.get_close_matches(text, list(CONFIG_MAPPING.keys()), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelSpecError(f"{text!r} is neither a local model directory nor a transformers model_type{hint}")


def _config_from_json(path: Path) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"cannot read {path}: {_one_line(exc)}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise ModelSpecError(f"{path} names model_type {model_type!r}, which this transformers does not know")
    try:
        return CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as exc:  # noqa: BLE001
        raise ModelSpecError(f"cannot read {path}: {_one_line(exc)}") from None


def causal_lm_class(config: Any) -> tuple[Any, type]:
    """``(text config, *ForCausalLM class)`` for ``config``; a multimodal config gives its text decoder.

    Raises :class:`ModelSpecError` for a model type without a causal LM class in transformers.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        text = config.get_text_config(decoder=True)
    except ValueError:  # several text configs (e.g. an audio model's): take the config itself
        text = config
    # a nested text config of its own type (a multimodal model's decoder) first; an encoder-decoder's flat
    # config comes back as a renamed copy of the same type, and its causal LM reads the config itself
    candidates = (text, config) if text.model_type != config.model_type else (config,)
    for candidate in candidates:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(candidate.model_type)
        if name is None or not hasattr(transformers, name):
            continue
        model_class = getattr(transformers, name)
        # the class of a multimodal type may take the text config only (Mllama's causal LM)
        wanted = getattr(model_class, "config_class", None)
        if isinstance(wanted, type) and not isinstance(candidate, wanted) and isinstance(text, wanted):
            candidate = text
        return candidate, model_class
    raise ModelSpecError(f"model_type {config.model_type!r} has no causal LM class in transformers "
                         "(MODEL_FOR_CAUSAL_LM_MAPPING); check-model checks decoder causal LMs")


# -- shrinking ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TinyConfig:
    """A shrunk config: ``config``, the attributes it changed (``name -> (old, new)``) and notes."""

    config: Any
    changed: dict[str, tuple[Any, Any]]
    notes: list[str]


def tiny_config(config: Any, *, layers: int = 2) -> TinyConfig:
    """A tiny copy of ``config`` (same class, same switches; module docstring): ``layers`` layers, or
    more when the model has more kinds of layers (at most :data:`MAX_LAYERS`)."""
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"layers must be a positive integer, got {layers!r}")
    cls = type(config)
    kwargs = _config_kwargs(config)
    shrink = _Shrink(kwargs, layers)
    new = shrink.run()
    if "is_decoder" in new:  # encoder-family classes are causal LMs only as decoders
        new["is_decoder"] = True
    for name, options in _RUN_TIME_CHOICES.items():
        if name in new and new[name] is None and isinstance(new.get(options), (list, tuple)) and new[options]:
            new[name] = new[options][0]
            shrink.notes.append(f"{name} is unset: the tiny copy runs with the first of {options}, {new[name]!r}")
    tiny = cls(**new)
    changed = {k: (kwargs.get(k), v) for k, v in new.items() if kwargs.get(k) != v}
    return TinyConfig(tiny, changed, shrink.notes)


def _config_kwargs(config: Any) -> dict:
    """Keyword arguments that rebuild ``config``: its fields as the model reads them (a field that differs
    per layer, which the config refuses to read globally, as serialized), plus the serialized attributes
    that are neither fields nor computed from them (a stale computed value, such as MLA's ``qk_head_dim``,
    would override the one the shrunk config computes)."""
    cls = type(config)
    raw = config.to_dict()
    fields = {}
    for field in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        if not field.init:
            continue
        try:
            value = getattr(config, field.name)
        except Exception:  # noqa: BLE001 - a per-layer attribute of a heterogeneous config
            value = raw.get(field.name)
        fields[field.name] = value.to_dict() if callable(getattr(value, "to_dict", None)) else value
    try:
        computed = set(cls(**fields).to_dict()) - set(fields)
    except Exception:  # noqa: BLE001 - then keep every serialized attribute
        computed = set()
    extras = {k: v for k, v in raw.items() if k not in fields and k not in computed}
    kwargs = {**fields, **extras}
    for key in ("transformers_version", "architectures", "auto_map", "_name_or_path", "dtype", "torch_dtype"):
        kwargs.pop(key, None)
    return kwargs


# The attribute tables: which config attributes :class:`_Shrink` maps, and how.
#: Widths that scale with the hidden size (multiples of 8, at least 8; 0 and ``None`` stay).
_WIDTHS = (
    "hidden_size", "d_model", "n_embd", "emb_dim", "embedding_dim", "embedding_size", "word_embed_proj_dim",
    "input_embedding_size", "output_embedding_size", "lru_width", "intermediate_size", "ffn_dim", "dff",
    "d_inner", "n_inner", "ffn_hidden_size", "decoder_ffn_dim", "encoder_ffn_dim", "dim_ff", "intermediate_size_mlp",
    "dense_intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size", "shared_intermediate_size",
    "expert_ffn_hidden_size", "feed_forward_size", "router_hidden_size", "attention_hidden_size", "mamba_d_ssm",
    "hidden_size_per_layer_input", "ple_embed_dim", "backbone_hidden_size", "axial_pos_embds_dim",
    "hidden_size_global",
)
#: The model width, first found.
_HIDDEN = ("hidden_size", "d_model", "n_embd", "emb_dim", "embedding_dim")
#: Query-head counts and key/value-head counts (mapped together, see :func:`_head_counts`).
_HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads", "attention_heads",
          "encoder_attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads",
          "num_attention_heads_per_layer", "swa_num_attention_heads", "index_n_heads", "indexer_n_heads",
          "linear_num_value_heads", "linear_num_heads", "mamba_n_heads", "mamba_num_heads", "n_mamba_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "kv_n_heads", "num_query_groups", "swa_num_key_value_heads",
             "multi_query_group_num", "linear_num_key_heads")
#: Per-head widths, all scaled by one factor (even, at least 2).
_HEAD_DIMS = ("head_dim", "attention_head_dim", "kv_channels", "d_head", "dim_head", "attention_head_size",
              "swa_head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "rotary_dim",
              "query_pre_attn_scalar", "index_head_dim", "indexer_head_dim", "linear_key_head_dim",
              "linear_value_head_dim", "linear_head_dim", "mamba_d_head", "mamba_headdim", "mamba_head_dim", "d_rel")
#: Low-rank widths and state sizes, capped at :data:`RANK` (``None``, "no low-rank projection", stays).
_RANKS = ("kv_lora_rank", "q_lora_rank", "o_lora_rank", "adapter_rank", "laurel_rank", "gated_norm_rank",
          "loop_gate_rank", "hc_lowrank", "time_step_rank", "mamba_dt_rank", "mamba_d_state", "state_size",
          "ssm_state_size", "index_topk", "mamba_chunk_size", "chunk_size")
#: Expert counts, experts per token, shared experts and expert groups.
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "moe_top_k", "top_k")
_SHARED_EXPERTS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "zero_expert_num")
_EXPERT_GROUPS = ("n_group", "num_expert_group")
#: Context lengths, clamped to :data:`CONTEXT`.
_CONTEXTS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions",
             "context_length", "model_max_length", "original_max_position_embeddings")
#: Attention windows, cut to :data:`WINDOW` tokens so that they bind on the check's sequences.
_WINDOWS = ("sliding_window", "sliding_window_size", "attention_window_size", "window_size", "local_attention",
            "local_attention_window_len", "keep_window_size")
#: Lengths past which pygpo refuses a layout at run time (Llama 4): kept above the check's rows.
_RUN_TIME_LIMITS = ("attention_chunk_size", "floor_scale")
#: Layer structure: counts, index lists, "first k" / "last k" layer counts, an inclusive last index, periods
#: and offsets into them.
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_blocks",
                 "num_decoder_layers", "encoder_layers", "num_encoder_layers")
_LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers", "hybrid_layer_ids", "full_attn_idxs", "ple_layer_ids",
                      "cross_attention_layers")
_FIRST_LAYERS = ("first_k_dense_replace", "num_dense_layers", "max_window_layers", "moe_layer_start_index",
                 "n_input_layers")
_LAST_LAYERS = ("num_kv_shared_layers", "n_output_layers")
#: Layer counts of the middle part, between a "first" and a "last" count (Dory's looped layers).
_MIDDLE_LAYERS = {"n_recurrent_layers": ("n_input_layers", "n_output_layers")}
_LAST_INDEX = ("moe_layer_end_index",)
_LAYER_PERIODS = ("decoder_sparse_step", "interleave_moe_layer_step", "no_rope_layer_interval", "layer_group_size",
                  "global_attn_every_n_layers", "sliding_window_pattern", "_sliding_window_pattern",
                  "moe_layer_interval", "expert_layer_period", "attn_layer_period", "n_layers_per_attn_res_block")
_LAYER_OFFSETS = {"attn_layer_offset": "attn_layer_period", "expert_layer_offset": "expert_layer_period"}
#: State-space heads ``(count, width, expansion)`` whose product is ``expansion * hidden_size``.
_SSM_HEADS = (("mamba_n_heads", "mamba_d_head", "mamba_expand"), ("num_heads", "head_dim", "expand"),
              ("mamba_num_heads", "mamba_head_dim", "mamba_expand"))
#: Widths that are the sum of others (MLA's query/key head: no-position part + rotary part).
_SUMS = {"qk_head_dim": ("qk_nope_head_dim", "qk_rope_head_dim")}
#: Groups of state-space heads, set to one (they must divide the shrunk head count).
_SSM_GROUPS = ("n_groups", "mamba_n_groups", "mamba_ngroups")
#: Stochastic terms, zeroed (the checks compare deterministic forwards).
_NOISE = ("router_jitter_noise", "input_jitter_noise", "layerdrop", "decoder_layerdrop")
#: Choices the forward needs and a config may leave unset (``name: list of options``), set to the first option.
_RUN_TIME_CHOICES = {"default_language": "languages"}
#: "Last k layers reuse the key/value states of earlier ones" counts; k = all layers leaves none computing them.
_SHARED_KV_LAYERS = ("num_kv_shared_layers",)
#: Vocabulary sizes tied to the token vocabulary.
_VOCABS = ("vocab_size", "decoder_vocab_size", "vocab_size_per_layer_input", "encoder_hash_byte_group_vocab")


def _even(x: float, low: int = 2) -> int:
    return max(low, 2 * int(round(x / 2)))


class _Shrink:
    """Applies the attribute tables to a config's keyword arguments (one pass; see :func:`tiny_config`)."""

    def __init__(self, kwargs: dict, layers: int, parent: Optional["_Shrink"] = None) -> None:
        self.kw = copy.deepcopy(kwargs)
        self.layers = layers
        self.notes: list[str] = parent.notes if parent is not None else []
        hidden = self._first(_HIDDEN)
        hidden = hidden or (parent._old_hidden if parent is not None else None)
        self._old_hidden = hidden
        # one scale for the config and its sub-configs, so that widths shared between them still agree (BLT's
        # encoder reads its global model's width as hidden_size_global)
        widest = _widest(kwargs)
        self.width_scale = parent.width_scale if parent is not None else min(1.0, HIDDEN / widest) if widest else 1.0
        self.heads = self._first(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                                  "attention_heads")) or (parent.heads if parent is not None else None)
        # DBRX keeps its key/value heads in a sub-config (attn_config): the ratio is the whole model's
        kv = self._first(_KV_HEADS[:-1], nested=True) or (parent.kv if parent is not None else None)
        self.kv = kv if kv else self.heads
        self.new_heads, self.new_kv = _head_counts(self.heads, self.kv)
        derived = hidden // self.heads if hidden and self.heads else None
        if "head_dim" in self.kw and self.kw["head_dim"] is None and derived:
            self.kw["head_dim"] = derived  # "None: hidden_size // num_attention_heads", spelled out
        head_dim = self.kw.get("head_dim")
        new_derived = max(1, int(round(hidden * self.width_scale))) // self.new_heads if hidden and self.heads else None
        if isinstance(head_dim, int) and derived and head_dim != derived:  # keep "wider/narrower than hidden/heads"
            new_head_dim = 2 * new_derived if head_dim > derived else max(4, new_derived // 2)
        else:
            new_head_dim = new_derived
        old_head_dim = head_dim if isinstance(head_dim, int) else derived
        self.dim_scale = old_head_dim / new_head_dim if old_head_dim and new_head_dim else 1.0
        self.new_head_dim = new_head_dim if isinstance(head_dim, int) else None
        vocab = self.kw.get("vocab_size")
        self.vocab = min(int(vocab), VOCAB) if isinstance(vocab, int) and vocab > 0 else VOCAB

    def _first(self, names: Sequence[str], *, nested: bool = False) -> Optional[int]:
        """The first positive integer among ``names`` (with ``nested``, in sub-configs too)."""
        dicts = [self.kw] + ([v for v in self.kw.values() if isinstance(v, dict) and _looks_like_config(v)]
                             if nested else [])
        for d in dicts:
            value = next((d[name] for name in names if _positive_int(d.get(name))), None)
            if value is not None:
                return value
        return None

    def run(self) -> dict:
        old = dict(self.kw)
        self._select_layers()
        self.kw = self._shrink_dict(self.kw)
        hidden = self._first(("hidden_size", "d_model"))
        for heads, width, expand in _SSM_HEADS:  # keep heads * width == expand * hidden
            h, w, e = (old.get(k) for k in (heads, width, expand))
            if (all(_positive_int(v) for v in (h, w, e, hidden, self._old_hidden, self.kw.get(heads)))
                    and h * w == e * self._old_hidden):
                self.kw[width] = max(1, e * hidden // self.kw[heads])
        for total, parts in _SUMS.items():
            if _positive_int(old.get(total)) and old[total] == sum(old.get(p) or 0 for p in parts):
                self.kw[total] = sum(self.kw.get(p) or 0 for p in parts)
        return self.kw

    # ---- values by attribute name

    def _value(self, name: str, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and name not in _LAYER_INDEX_LISTS and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            rule = self._rule(name)
            return type(value)(rule(v) for v in value) if rule is not None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        rule = self._rule(name)
        return value if rule is None else rule(value)

    def _rule(self, name: str) -> Optional[Callable[[Any], Any]]:
        if name in _WIDTHS:
            return lambda v: v if v <= 0 else (max(8, 8 * int(round(v * self.width_scale / 8))) if v >= 8 else v)
        if name in _HEADS:
            return lambda v: self._map_heads(v)
        if name in _KV_HEADS:
            return lambda v: self._map_heads(v)
        if name == "head_dim" and self.new_head_dim is not None:
            return lambda v: self.new_head_dim
        if name in _HEAD_DIMS:
            return lambda v: _even(v / self.dim_scale) if v > 0 else v
        if name in _RANKS:
            return lambda v: min(v, RANK) if v > 0 else v
        if name in _EXPERTS:
            return lambda v: min(v, EXPERTS) if v > 0 else v
        if name in _TOP_K:
            return lambda v: min(v, TOP_K) if v > 0 else v
        if name in _SHARED_EXPERTS:
            return lambda v: min(v, 1) if v > 0 else v
        if name in _SSM_GROUPS:
            return lambda v: min(v, 1)
        if name in _EXPERT_GROUPS:
            return lambda v: min(v, 2) if v > 0 else v
        if name == "topk_group":
            return lambda v: min(v, 2, self.kw.get("n_group") or 2) if v > 0 else v
        if name in _CONTEXTS:
            return lambda v: min(max(v, CONTEXT[0]), CONTEXT[1]) if v > 0 else v
        if name in _WINDOWS:
            return lambda v: min(v, WINDOW) if v > 0 else v
        if name in _final_softcaps():
            return lambda v: min(v, SOFTCAP) if v > 0 else v
        if name in _RUN_TIME_LIMITS:
            return lambda v: min(v, CONTEXT[0]) if v > 0 else v
        if name in _VOCABS:
            return lambda v: self.vocab if v > 0 else v
        if name == "unpadded_vocab_size":
            return lambda v: self.vocab - 6
        if name in _NOISE or "dropout" in name or "pdrop" in name or name.endswith("drop_prob"):
            return lambda v: 0.0 if isinstance(v, float) else v
        if name.endswith("token_id") or name.endswith("token_index"):
            return lambda v: v % self.vocab if v >= self.vocab else v
        return None

    def _map_heads(self, v: int) -> int:
        if v == self.heads:
            return self.new_heads
        if v == self.kv:
            return self.new_kv
        if v <= 1:
            return v
        return max(1, min(MAX_HEADS, int(round(v * self.new_heads / self.heads)) if self.heads else 4))

    def _shrink_dict(self, d: dict) -> dict:
        out = {}
        for name, value in d.items():
            if name in ("rope_parameters", "rope_scaling") and isinstance(value, dict):
                out[name] = self._shrink_rope(value)
            elif name == "per_layer_config" and isinstance(value, dict):
                out[name] = {k: self._shrink_dict(v) if isinstance(v, dict) else v for k, v in value.items()}
            elif isinstance(value, dict) and _looks_like_config(value):  # a sub-config (DBRX's attn_config)
                out[name] = _Shrink(value, self.layers, parent=self).run()
            else:
                out[name] = self._value(name, value)
        return out

    def _shrink_rope(self, rope: dict) -> dict:
        if rope and all(isinstance(v, dict) for v in rope.values()):  # one per layer type
            return {k: self._shrink_rope(v) for k, v in rope.items()}
        out = dict(rope)
        for name in ("short_factor", "long_factor"):
            factors = out.get(name)
            if isinstance(factors, list) and factors:
                n = max(1, int(round(len(factors) / self.dim_scale)))
                out[name] = [factors[min(len(factors) - 1, int(i * len(factors) / n))] for i in range(n)]
        if isinstance(out.get("original_max_position_embeddings"), int):
            out["original_max_position_embeddings"] = self._rule("original_max_position_embeddings")(
                out["original_max_position_embeddings"])
        section = out.get("mrope_section")
        if isinstance(section, list) and section and self.dim_scale != 1.0:
            half = sum(section)
            new_half = max(len(section), int(round(half / self.dim_scale)))
            scaled = [max(1, int(v * new_half / half)) for v in section]
            scaled[0] += new_half - sum(scaled)
            out["mrope_section"] = scaled
        return out

    # ---- layers

    def _select_layers(self) -> None:
        """Keep one layer of every kind (then more, up to the requested count) and remap what is per layer."""
        count = next((k for k in _LAYER_COUNTS if _positive_int(self.kw.get(k))), None)
        if count is None:
            return
        total = self.kw[count]
        per_layer = [k for k, v in self.kw.items() if k not in _LAYER_INDEX_LISTS and isinstance(v, list)
                     and len(v) == total and total > 1 and "token" not in k]
        index_lists = [k for k in _LAYER_INDEX_LISTS if isinstance(self.kw.get(k), list)]
        firsts = [k for k in _FIRST_LAYERS if _positive_int(self.kw.get(k))]
        lasts = [k for k in _LAST_LAYERS if _positive_int(self.kw.get(k))]
        overrides = self.kw.get("per_layer_config") if isinstance(self.kw.get("per_layer_config"), dict) else {}
        by_layer = {int(k): v for k, v in overrides.items() if str(k).isdigit()}

        def kind(i: int) -> tuple:
            return (tuple(json.dumps(self.kw[k][i], sort_keys=True, default=str) for k in per_layer)
                    + tuple(i in self.kw[k] for k in index_lists) + tuple(i < self.kw[k] for k in firsts)
                    + tuple(i >= total - self.kw[k] for k in lasts)
                    + (json.dumps(by_layer.get(i), sort_keys=True, default=str),))

        chosen = self._choose([kind(i) for i in range(total)])
        n = len(chosen)
        for k in _LAYER_COUNTS:
            if self.kw.get(k) == total:
                self.kw[k] = n
        for k in per_layer:
            self.kw[k] = [self.kw[k][i] for i in chosen]
        for k in index_lists:
            self.kw[k] = [j for j, i in enumerate(chosen) if i in set(self.kw[k])]
        for k in firsts:
            self.kw[k] = sum(i < self.kw[k] for i in chosen)
        for k in lasts:
            self.kw[k] = sum(i >= total - self.kw[k] for i in chosen)
        for k, (first, last) in _MIDDLE_LAYERS.items():
            if _positive_int(self.kw.get(k)):
                self.kw[k] = n - (self.kw.get(first) or 0) - (self.kw.get(last) or 0)
        for k in _LAST_INDEX:
            if _positive_int(self.kw.get(k)):
                self.kw[k] = max(0, sum(i <= self.kw[k] for i in chosen) - 1)
        for k in _LAYER_PERIODS:
            if _positive_int(self.kw.get(k)):
                self.kw[k] = min(self.kw[k], n)
        for k, period in _LAYER_OFFSETS.items():
            if isinstance(self.kw.get(k), int) and _positive_int(self.kw.get(period)):
                self.kw[k] %= self.kw[period]
        if overrides:
            position = {i: j for j, i in enumerate(chosen)}
            width = len(next(iter(overrides)))  # keys are zero-padded layer indices ("05")
            self.kw["per_layer_config"] = {str(position[i]).zfill(width): v for i, v in by_layer.items()
                                           if i in position}
        pattern = self.kw.get("attention_types")  # GPT-Neo: [[["global", "local"], repeats]], a count per pattern
        if isinstance(pattern, list) and pattern and isinstance(pattern[0], list):
            n = max(n, len(pattern[0][0]))
            for k in _LAYER_COUNTS:
                if self.kw.get(k) in (total, len(chosen)):
                    self.kw[k] = n
            self.kw["attention_types"] = [[pattern[0][0], max(1, n // len(pattern[0][0]))]]

    def _choose(self, kinds: list[tuple]) -> list[int]:
        """Layer indices: the first layer of every kind (at most :data:`MAX_LAYERS`), then further layers of every
        kind in turn up to the requested count (the pattern repeats), ascending."""
        chosen = [kinds.index(k) for k in dict.fromkeys(kinds)]
        if len(chosen) > MAX_LAYERS:
            self.notes.append(f"the model has {len(chosen)} kinds of layers; the tiny copy keeps the first "
                              f"{MAX_LAYERS}")
            chosen = chosen[:MAX_LAYERS]
        elif len(chosen) > self.layers:
            self.notes.append(f"{len(chosen)} layers (not {self.layers}) to keep one of every kind of layer")
        queues = [[i for i in range(len(kinds)) if kinds[i] == kinds[c] and i != c] for c in chosen]
        while len(chosen) < self.layers and any(queues):
            for queue in queues:
                if queue and len(chosen) < self.layers:
                    chosen.append(queue.pop(0))
        return sorted(chosen)


def _final_softcaps() -> tuple[str, ...]:
    from .hidden_states import _SOFTCAPS

    return _SOFTCAPS


def _widest(kwargs: dict) -> Optional[int]:
    """The largest model width in a config and its sub-configs."""
    widths = [v for k, v in kwargs.items() if k in _HIDDEN and _positive_int(v)]
    widths += [w for v in kwargs.values() if isinstance(v, dict) and _looks_like_config(v) for w in [_widest(v)] if w]
    return max(widths, default=None)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _looks_like_config(value: dict) -> bool:
    """A nested sub-config (DBRX's ``attn_config``/``ffn_config``): its keys name config attributes."""
    keys = set(value)
    return bool(keys & set(_WIDTHS + _HEADS + _KV_HEADS + _EXPERTS + _TOP_K)) or "model_type" in keys


def _head_counts(heads: Optional[int], kv: Optional[int]) -> tuple[int, int]:
    """Tiny ``(query heads, key/value heads)`` of the same kind: multi-head (4, 4), multi-query (4, 1), or
    grouped (2 * ratio, 2) with the ratio capped at :data:`MAX_GQA`."""
    if not heads:
        return 4, 4
    kv = kv or heads
    if kv >= heads:
        return min(heads, 4), min(heads, 4)
    if kv == 1:
        return min(heads, 4), 1
    ratio = max(1, heads // kv)
    return 2 * min(ratio, MAX_GQA), 2


# -- building -------------------------------------------------------------------------------------------


def build_tiny_model(config: Any, model_class: type, *, seed: int = 0) -> Any:
    """``model_class`` from ``config`` with random float32 weights, eager attention, in eval mode.

    Matrices are drawn with standard deviation ``fan_in ** -0.5`` (the last dimension), so that attention
    scores are of order 1 and positions, masks and windows visibly change the output (a config's small
    ``initializer_range`` would leave attention almost uniform). Parameters that initialise to a constant
    (norm weights, biases, attention sinks, gates) get noise, so that every term changes the logits.
    """
    import torch

    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = model_class(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            if not p.is_floating_point() or flat.numel() == 0:
                continue
            if bool((flat == flat[0]).all()):  # noise relative to the constant (0.2 for zeros)
                scale = 0.25 * abs(float(flat[0])) or 0.2
                p.add_(scale * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return model


def make_tiny_model(config: Any, model_class: type, *, layers: int = 2) -> tuple[Any, TinyConfig]:
    """``(model, tiny)``: :func:`tiny_config` of ``config`` built by :func:`build_tiny_model`.

    Some architectures tie or share weights between layers of one kind, and need two of them: when the
    first build fails, the copy is rebuilt with twice the layers. Raises :class:`ModelSpecError` when
    transformers cannot build ``model_class`` from the full ``config`` either (on the meta device, no
    memory), and the build's own error otherwise; and for a decoder that does not run on its own or one
    that predicts several token streams (module docstring).
    """
    import torch

    _refuse_dependent_decoder(config, model_class)
    error: Optional[BaseException] = None
    for count in (layers, 2 * layers):
        try:
            tiny = tiny_config(config, layers=count)
            model = build_tiny_model(tiny.config, model_class)
        except Exception as exc:  # noqa: BLE001 - decided below
            error = error or exc
            continue
        if count != layers:
            tiny.notes.append(f"{count} layers: a copy of {layers} did not build ({_one_line(error)[:120]})")
        _refuse_several_streams(model)
        return model, tiny
    try:
        with torch.device("meta"):
            model_class(copy.deepcopy(config))
    except Exception as exc:  # noqa: BLE001 - the config itself does not build
        raise ModelSpecError(f"transformers cannot build {model_class.__name__} from this config: "
                             f"{_one_line(exc)} (a model_type's default config may leave settings unset that a "
                             "model's own config.json sets)") from None
    raise error


def _refuse_dependent_decoder(config: Any, model_class: type) -> None:
    """:class:`ModelSpecError` for a decoder none of whose layers computes keys and values: all of them reuse
    the states another model hands over (a speculative-decoding assistant), so it has no forward of its own."""
    raw = config.to_dict()
    total = next((raw[k] for k in _LAYER_COUNTS if _positive_int(raw.get(k))), None)
    for name in _SHARED_KV_LAYERS:
        shared = raw.get(name)
        if total is not None and _positive_int(shared) and shared >= total:
            raise ModelSpecError(
                f"{model_class.__name__} from this config does not run on its own: all {total} of its layers reuse "
                f"key/value states that another model computes ({name}={shared}, the layout of a speculative-"
                "decoding assistant), so check-model cannot check it; check the model it assists")


def _refuse_several_streams(model: Any) -> None:
    """:class:`ModelSpecError` for a causal LM with several output heads, one per token stream (MusicGen's
    audio codebooks): pygpo's log-probs and packed batches take one token stream per row."""
    import torch

    heads = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if isinstance(heads, torch.nn.ModuleList) and len(heads) > 1:
        raise ModelSpecError(
            f"{type(model).__name__} predicts {len(heads)} token streams at every position (one output head "
            f"each, such as audio codebooks; input_ids of shape (batch * {len(heads)}, length)): pygpo's "
            "log-probs and packed batches take one token stream per row, so check-model has nothing to check")
