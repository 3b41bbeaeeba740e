"""``TrainConfig``: every option of ``pygpo train``, loaded from YAML and ``--key value`` overrides.

    cfg = load_config("run.yaml", ["--lr", "5e-7", "--loss_args.beta=0.2", "--gradient_checkpointing"])

Precedence: field defaults < the YAML file (read with ``yaml.safe_load``; a mapping of field names)
< the overrides, in order. Then :meth:`TrainConfig.resolved` fills the preset fields not given
(those whose default is ``None`` and differs between the demo and a real run, e.g. ``lr``:
``model: demo`` takes :data:`DEMO_PRESET`, a model path :data:`RUN_PRESET`) and every value is
validated. A preset field given as ``none`` stays ``None`` where that means something
(:data:`NULLABLE_PRESET_FIELDS`: ``--max_prompt_length none`` is no limit); on the others (``lr``,
``batch_size``, ``output_dir``, ...) it is an error.

Overrides:
    ``--key value`` or ``--key=value``; ``-`` in a key reads as ``_`` (``--max-steps``).
    A bool field alone (``--prefix_sharing``) means true; ``--prefix_sharing false`` sets it false.
    ``none``/``null`` sets an optional field to ``None``.
    Mapping fields take dotted keys: ``--loss_args.beta 0.2``, ``--loss_weights.sft 0.5``,
    ``--loss_schedule.lam.end 1.0`` (a component's: ``--loss_schedule.dpo.beta.end 0.2``; the last part,
    ``start``/``end``/``kind``, is the schedule's field), ``--demo_model.hidden_size 128``,
    ``--reducer_args.alpha 0.5``; or a whole YAML mapping:
    ``--loss_args '{beta: 0.2, label_smoothing: 0.1}'``.
    Values are converted to the field's type (``1e-4`` is a float, unlike in YAML 1.1); values inside
    ``loss_args`` and ``reducer_args`` are parsed as YAML scalars with the same float rule.

Unknown keys raise :class:`ConfigError` listing the close matches and every valid key; a value of
the wrong type names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

DEMO = "demo"
DTYPES = ("fp32", "bf16")
SCHEDULES = ("constant", "linear", "cosine")
DATASET_FORMATS = ("auto", "standard", "conversational")
REFERENCE_MODES = ("copy", "cache", "none")  # anything else is a path to a reference model
SCHEDULE_KEYS = ("start", "end", "kind")
#: Reducers ``pygpo train`` can run: ``weighted`` and ``segments`` need per-token inputs (token weights,
#: segment ids) that the trainer does not read from the data.
TRAIN_REDUCERS = ("sum", "mean", "ld", "sampled")
#: Reducers a cache of reference sequence sums can serve (``mean`` divides the sums by the lengths); the
#: others pick tokens by the pair's lengths or a random draw, so they need the reference's token log-probs.
CACHEABLE_REDUCERS = ("sum", "mean")
#: Preset fields whose ``None`` has a meaning of its own (the model's tokenizer, no length limit, steps
#: from ``epochs``, torch's thread count); every other preset field must end up with a value.
NULLABLE_PRESET_FIELDS = ("tokenizer", "max_length", "max_prompt_length", "max_steps", "num_threads")
#: Loss inputs the trainer computes with a reference *model* during training, so a cache of reference
#: sequence scores cannot supply them: the token KL over the vocabulary (TDPO, SparsePO, RRPO, PMPO) and
#: the reference scores of mismatched prompt/response pairs (KTO's reference point).
REFERENCE_MODEL_INPUTS = ("kl", "kl_ref_logps")

#: The demo model: a Llama (``transformers.LlamaConfig``) with random weights over the byte vocabulary.
DEMO_MODEL: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}

#: Values of the preset fields for ``model: demo`` (measured to learn the demo task in seconds on CPU).
DEMO_PRESET: dict[str, Any] = {
    "tokenizer": "byte",
    "lr": 3e-3,
    "batch_size": 32,
    "max_steps": 200,
    "warmup_steps": 20,
    "schedule": "cosine",
    "eval_every": 25,
    "max_length": 32,
    "generate_eval_size": 512,
    "max_new_tokens": 8,
    "output_dir": "pygpo_demo",
    # one thread: the tiny model gains nothing from two, and on a busy CPU a second OpenMP thread
    # waiting for a core made the demo about 10x slower (measured on 2 shared cores)
    "num_threads": 1,
}

#: Values of the preset fields for a real model (TRL's DPO defaults where TRL has one).
RUN_PRESET: dict[str, Any] = {
    "lr": 1e-6,
    "batch_size": 8,
    "warmup_steps": 0,
    "schedule": "linear",
    "eval_every": 0,
    "max_length": 1024,
    "max_prompt_length": 512,
    "generate_eval_size": 0,
    "max_new_tokens": 128,
    "output_dir": "pygpo_output",
}


class ConfigError(ValueError):
    """A configuration key or value that is not valid; the message names the key."""


def _f(default: Any, help: str) -> Any:
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Options of one training run; ``None`` on a preset field means "the preset's value"."""

    # model, tokenizer, data
    model: str = _f(DEMO, "'demo' (random-init Llama from demo_model) or a local Hugging Face model directory")
    tokenizer: Optional[str] = _f(None, "'byte' (ByteTokenizer) or a tokenizer directory; default: the model's")
    demo_model: dict[str, int] = _f(DEMO_MODEL, "LlamaConfig sizes of the demo model")
    dataset: str = _f(DEMO, "'demo' (shipped sorting task) or a local .jsonl/.parquet file or datasets directory")
    eval_dataset: Optional[str] = _f(None, "held-out preference data; default: the demo's eval split (dataset: demo), "
                                           "or rows split off dataset")
    dataset_format: str = _f("auto", "auto | standard (prompt/chosen/rejected strings) | conversational (message lists)")
    eval_fraction: float = _f(0.05, "fraction of dataset held out when eval_dataset is not given (0: no held-out "
                                    "evaluation; with dataset: demo any value > 0 holds out the demo's eval split)")
    eval_size: Optional[int] = _f(None, "number of held-out rows split off dataset (takes precedence over eval_fraction; "
                                        "dataset: demo: the first N pairs of its eval split); not with eval_dataset")
    skip_bad_rows: bool = _f(False, "skip malformed rows (counted in the summary) instead of raising")
    max_length: Optional[int] = _f(None, "max tokens of prompt + longest response (responses truncated)")
    max_prompt_length: Optional[int] = _f(None, "max prompt tokens (the prompt's end is kept); none: no limit")
    # loss
    loss: str = _f("dpo", "registry key (pygpo losses --names), or several joined by '+': 'dpo+sft'")
    loss_args: dict[str, Any] = _f({}, "hyper-parameters: {beta: 0.1}; '<key>.<name>' targets one component")
    loss_weights: dict[str, float] = _f({}, "weight per component of a combined loss (default 1 each)")
    loss_schedule: dict[str, dict] = _f(
        {}, "hyper-parameter schedules over training: {lam: {start: 0.9, end: 1.0, kind: linear}} (DPO-Shift); "
            "--loss_schedule.<name>.start 0.9 (a component's: --loss_schedule.dpo.beta.start 0.1); start at the "
            "first optimizer step, end at the last"
    )
    reducer: str = _f("sum", "per-token log-probs -> sequence scores: " + " | ".join(TRAIN_REDUCERS)
                      + " (ld: LD-DPO, sampled: SamPO; weighted and segments need per-token inputs pygpo train "
                        "does not read)")
    reducer_args: dict[str, Any] = _f({}, "the reducer's hyper-parameters: {alpha: 0.5} for ld; {seed: 0} for sampled "
                                          "(its own generator, restarted on resume; without a seed the draws come "
                                          "from the run's RNG, restored on resume)")
    # reference model
    reference: str = _f("copy", "copy (frozen copy of the initial model) | cache (scores computed once) | none | a model path")
    reference_cache: Optional[str] = _f(None, "file of the cached reference scores; default: <output_dir>/reference_cache.safetensors")
    sync_ref_every: int = _f(0, "TR-DPO: update the reference every N optimizer steps (0: never; needs a loss "
                                "with a reference model)")
    sync_ref_alpha: float = _f(0.6, "TR-DPO: ref <- alpha * policy + (1 - alpha) * ref (1.0: hard copy)")
    # optimisation
    dtype: str = _f("fp32", "compute precision: fp32 | bf16 (mixed precision: float32 master weights and "
                            "optimizer state, forwards under torch.autocast(bfloat16))")
    batch_size: Optional[int] = _f(None, "preference pairs per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: Optional[float] = _f(None, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    schedule: Optional[str] = _f(None, "learning-rate schedule after warmup: constant | linear | cosine")
    warmup_steps: Optional[int] = _f(None, "linear warmup steps")
    max_grad_norm: Optional[float] = _f(1.0, "gradient clipping norm; none: no clipping")
    epochs: float = _f(1.0, "passes over the training data (given, it replaces the preset's max_steps; ignored "
                            "when max_steps is given too)")
    max_steps: Optional[int] = _f(None, "optimizer steps; none: from epochs")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass")
    prefix_sharing: bool = _f(True, "one forward per prompt for all its responses (pygpo.prefix)")
    eager_gradients: bool = _f(False, "lm_head gradients computed in the loss's forward, a tile per chunk of "
                                      "examples (FusedPreferenceLoss(eager_gradients=True); per-example losses only)")
    # evaluation, logging, checkpoints
    eval_every: Optional[int] = _f(None, "evaluate every N optimizer steps (0: at the end only)")
    generate_eval_size: Optional[int] = _f(None, "held-out prompts decoded greedily at each evaluation and scored "
                                                 "as the demo task (0: none; model: demo only)")
    max_new_tokens: Optional[int] = _f(None, "greedy decoding length limit (with generate_eval_size, model: demo only)")
    log_every: int = _f(10, "print a line of training metrics and write them to metrics.jsonl every N optimizer steps")
    output_dir: Optional[str] = _f(None, "run directory (resolved config, metrics, checkpoints)")
    save_every: int = _f(0, "checkpoint every N optimizer steps (0: at the end only)")
    resume: Optional[str] = _f(None, "checkpoint directory to resume from, or 'latest' (newest in output_dir)")
    seed: int = _f(0, "seed of the model init, data split and shuffling")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    fsdp: bool = _f(False, "under torchrun: shard parameters, gradients and optimizer state with FSDP2 (default: DDP)")
    num_threads: Optional[int] = _f(None, "torch CPU threads (demo: 1); none: torch's default")

    def __post_init__(self) -> None:
        self.validate()

    # -- presets, validation, serialisation --------------------------------------------------------

    def resolved(self, *, explicit: Iterable[str] = ()) -> "TrainConfig":
        """A copy with every ``None`` preset field set from :data:`DEMO_PRESET` or :data:`RUN_PRESET`.

        Fields named in ``explicit`` keep their value, ``None`` included (``--max_prompt_length none``
        means no limit, not the preset's). An explicit ``epochs`` without an explicit ``max_steps`` keeps
        ``max_steps`` unset, so the run length follows ``epochs`` rather than the demo preset's steps.
        """
        preset = DEMO_PRESET if self.model == DEMO else RUN_PRESET
        keep = set(explicit)
        if "epochs" in keep:
            keep.add("max_steps")
        filled = {k: v for k, v in preset.items() if getattr(self, k) is None and k not in keep}
        max_len = filled.get("max_length", self.max_length)
        if "max_prompt_length" in filled and max_len is not None and filled["max_prompt_length"] >= max_len:
            filled["max_prompt_length"] = max_len // 2  # the preset's prompt limit follows a shorter max_length
        out = dataclasses.replace(self, **filled)
        for key in _PRESET_FIELDS:
            if getattr(out, key) is None and key not in NULLABLE_PRESET_FIELDS:
                raise ConfigError(f"{key}: expected {_type_name(_HINTS[key], nullable=False)}, got none "
                                  "(leave it out to take the preset's value)")
        return out

    @property
    def is_demo(self) -> bool:
        return self.model == DEMO

    def loss_components(self) -> list[str]:
        """The registry keys of ``loss`` (``"dpo+sft"`` -> ``["dpo", "sft"]``)."""
        return [k.strip() for k in self.loss.split("+")]

    def loss_name(self) -> Union[str, dict[str, float]]:
        """The ``name`` argument of :func:`pygpo.preference_loss`: the key, or key -> weight."""
        keys = self.loss_components()
        if len(keys) == 1 and not self.loss_weights:
            return keys[0]
        return {k: float(self.loss_weights.get(k, 1.0)) for k in keys}

    def loss_args_at(self, progress: float) -> dict[str, Any]:
        """``loss_args`` with every scheduled hyper-parameter at ``progress`` in [0, 1] (the loop passes
        step / (total - 1): the first step runs at start, the last at end).

        ``linear``: start + (end - start) p; ``cosine``: end + (start - end) (1 + cos(pi p)) / 2;
        ``constant``: start. (DPO-Shift, Yang et al. 2025, varies its lambda this way.)
        """
        p = min(max(float(progress), 0.0), 1.0)
        args = dict(self.loss_args)
        for name, sched in self.loss_schedule.items():
            start, end = sched["start"], sched["end"]
            if sched["kind"] == "linear":
                args[name] = start + (end - start) * p
            elif sched["kind"] == "cosine":
                args[name] = end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
            else:
                args[name] = start
        return args

    def fused_loss_options(self) -> dict[str, Any]:
        """Keyword options of the run's :class:`pygpo.FusedPreferenceLoss` beyond the loss name, the
        hyper-parameters (:meth:`loss_args_at`) and the model's logit softcap."""
        return {"reducer": self.reducer, "reducer_args": dict(self.reducer_args), "eager_gradients": self.eager_gradients}

    def loss_hparams(self) -> dict[str, dict[str, Any]]:
        """Each component's resolved hyper-parameters (defaults filled in) at the start of training."""
        from pygpo.losses import get
        from pygpo.losses.validation import resolve_hparams

        keys = self.loss_components()
        specs = {k: get(k) for k in keys}
        given = [(f"loss_args.{n}", n, v) for n, v in self.loss_args_at(0.0).items()]
        return {k: resolve_hparams(specs[k], v) for k, v in _hparams_by_component(self, keys, specs, given).items()}

    def needs_reference(self) -> bool:
        """Whether any loss component uses reference scores, or the reference model itself (the token KL
        of PMPO, a reference-free loss by its scores) (``reference`` is ignored otherwise)."""
        from pygpo.losses import get

        return any(get(k).reference != "none" or any(n in get(k).input_names for n in REFERENCE_MODEL_INPUTS)
                   for k in self.loss_components())

    def validate(self) -> None:
        """Check every value (ranges, choices, loss keys); raises :class:`ConfigError`."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce_value(f.name, getattr(self, f.name), _HINTS[f.name]))
        _choice("dtype", self.dtype, DTYPES)
        _choice("dataset_format", self.dataset_format, DATASET_FORMATS)
        if self.schedule is not None:
            _choice("schedule", self.schedule, SCHEDULES)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        for key in ("model", "dataset", "reference"):
            if not getattr(self, key).strip():
                raise ConfigError(f"{key}: expected a non-empty string")
        for key in ("tokenizer", "eval_dataset", "reference_cache", "output_dir", "resume"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ConfigError(f"{key}: expected a non-empty path (or leave it out), got {value!r}")
        _at_least(self, 1, "batch_size", "grad_accum", "max_steps", "eval_size", "log_every", "max_new_tokens", "num_threads")
        _at_least(self, 0, "warmup_steps", "eval_every", "save_every", "sync_ref_every", "generate_eval_size")
        _at_least(self, 2, "max_length")
        _at_least(self, 1, "max_prompt_length")
        for key in ("lr", "epochs", "max_grad_norm"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key}: expected a finite number > 0, got {value!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay: expected a finite number >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: expected 0 <= eval_fraction < 1, got {self.eval_fraction!r}")
        if not 0.0 < self.sync_ref_alpha <= 1.0:
            raise ConfigError(f"sync_ref_alpha: expected 0 < alpha <= 1, got {self.sync_ref_alpha!r}")
        if self.max_length is not None and self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length: expected < max_length ({self.max_length}), got {self.max_prompt_length}"
            )
        if self.sync_ref_every and self.reference in ("cache", "none"):
            raise ConfigError(f"sync_ref_every: needs a reference model, but reference is {self.reference!r}")
        self.demo_model = {**DEMO_MODEL, **self.demo_model}  # a partial mapping overrides some sizes
        unknown = set(self.demo_model) - set(DEMO_MODEL)
        if unknown:
            raise ConfigError(f"demo_model: unknown key(s) {sorted(unknown)}; valid: {', '.join(DEMO_MODEL)}")
        for key, value in self.demo_model.items():
            if value < 1:
                raise ConfigError(f"demo_model.{key}: expected an int >= 1, got {value}")
        _check_demo_model(self.demo_model)
        if self.eval_size is not None and self.eval_dataset is not None:
            raise ConfigError(f"eval_size: holds out rows of dataset, but eval_dataset ({self.eval_dataset!r}) is the "
                              "held-out set, so nothing is split off; drop eval_size or eval_dataset")
        if self.generate_eval_size and not self.is_demo:
            raise ConfigError(f"generate_eval_size: greedy decoding is scored as the demo task's answers, so it needs "
                              f"model: demo; got {self.generate_eval_size} with model {self.model!r}; leave it out (or 0)")
        _check_loss(self)
        if self.sync_ref_every and not self.needs_reference():
            raise ConfigError(f"sync_ref_every: loss {self.loss!r} uses no reference model, so there is nothing to "
                              f"sync; drop sync_ref_every (got {self.sync_ref_every})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML (every field, in declaration order); :func:`load_config` reads it back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


_HINTS = get_type_hints(TrainConfig)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))
_PRESET_FIELDS: tuple[str, ...] = tuple(k for k in FIELD_NAMES if k in DEMO_PRESET or k in RUN_PRESET)


def config_help() -> str:
    """One line per option: ``name (type, default): help``; for ``--help`` output."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        preset = f.name in _PRESET_FIELDS
        shown = "preset" if default is None and preset else default
        nullable = not preset or f.name in NULLABLE_PRESET_FIELDS
        lines.append(f"  --{f.name} ({_type_name(_HINTS[f.name], nullable=nullable)}, default {shown}): "
                     f"{f.metadata['help']}")
    return "\n".join(lines)


def _check_demo_model(sizes: Mapping[str, int]) -> None:
    """Sizes a Llama can be built from: heads split the hidden size evenly, query heads are a multiple of
    the key/value heads (grouped-query attention), and the head dimension is even (RoPE rotates pairs)."""
    hidden, heads, kv = sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if hidden % heads:
        raise ConfigError(f"demo_model.hidden_size: expected a multiple of num_attention_heads ({heads}), got {hidden}")
    if heads % kv:
        raise ConfigError(f"demo_model.num_key_value_heads: expected a divisor of num_attention_heads ({heads}), "
                          f"got {kv}")
    if (hidden // heads) % 2:
        raise ConfigError(f"demo_model.hidden_size: the head dimension hidden_size / num_attention_heads = "
                          f"{hidden} / {heads} = {hidden // heads} must be even (RoPE rotates pairs of dimensions)")


# -- loss checks ------------------------------------------------------------------------------------


def _check_loss(cfg: TrainConfig) -> None:
    from pygpo.losses import get
    from pygpo.losses.constraints import Interval
    from pygpo.losses.errors import PreferenceLossError

    keys = cfg.loss_components()
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"loss: {', '.join(repeated)} given more than once in {cfg.loss!r}; "
                          "give each component once and set its weight with loss_weights")
    try:
        specs = {k: get(k) for k in keys}
    except PreferenceLossError as exc:
        raise ConfigError(f"loss: {exc}") from None
    for k, spec in specs.items():
        if spec.kind == "reducer":
            hint = (f"keep a loss head and pass --reducer {k} (e.g. --loss dpo --reducer {k})" if k in TRAIN_REDUCERS
                    else f"pygpo train runs the reducers {' | '.join(TRAIN_REDUCERS)} (option reducer)")
            raise ConfigError(f"loss: {k!r} is a reducer (per-token log-probs -> sequence scores), not a loss; {hint}")
    if cfg.reference == "none":
        needing = [k for k, spec in specs.items()
                   if spec.reference == "required" or any(n in spec.input_names for n in REFERENCE_MODEL_INPUTS)]
        if needing:
            raise ConfigError(f"reference: 'none', but loss {', '.join(needing)} needs reference scores or the "
                              "reference model's token KL; use copy, cache or a model path")
    if cfg.reference == "cache":
        for k, spec in specs.items():
            live = [n for n in REFERENCE_MODEL_INPUTS if n in spec.input_names]
            if live:
                raise ConfigError(
                    f"reference: 'cache' cannot serve loss {k}: it needs {', '.join(live)}, computed with the "
                    "reference model at every step, which a cache of reference scores does not hold; "
                    "use reference: copy or a model path"
                )
    _check_loss_weights(cfg, keys)
    _check_schedule_form(cfg)
    per_key = _hparams_by_component(cfg, keys, specs, [(f"loss_args.{n}", n, v) for n, v in cfg.loss_args.items()])
    scheduled = _hparams_by_component(cfg, keys, specs, [(f"loss_schedule.{n}", n, n) for n in cfg.loss_schedule])
    for k, values in per_key.items():
        _resolve(specs[k], values, "loss_args")
    _check_reducer(cfg, specs, per_key)
    # linear and cosine move between start and end, so both ends bound every value when the valid range
    # is an interval; constant stays at start
    for k, names in scheduled.items():
        for hp, name in names.items():
            if not isinstance(specs[k].ranges[hp], Interval):
                raise ConfigError(f"loss_schedule.{name}: {k}'s {hp} is not a real-valued hyper-parameter "
                                  f"({specs[k].ranges[hp].describe()}), so it cannot be scheduled")
            sched = cfg.loss_schedule[name]
            if specs[k].ranges[hp].integral and sched["kind"] != "constant":
                raise ConfigError(f"loss_schedule.{name}: {k}'s {hp} takes integers "
                                  f"({specs[k].ranges[hp].describe()}), so it cannot move along a {sched['kind']} "
                                  "schedule; give it a value in loss_args instead")
            for end in ("start",) if sched["kind"] == "constant" else ("start", "end"):
                _resolve(specs[k], {**per_key[k], hp: sched[end]}, f"loss_schedule.{name}.{end}")
    # what only the loss module itself knows (a stateful head's required hyper-parameters, what
    # eager_gradients can run) is refused here too, before any data or model is loaded
    from pygpo.fused import FusedPreferenceLoss

    options = {**cfg.fused_loss_options(), "eager_gradients": False}
    try:
        module = FusedPreferenceLoss(cfg.loss_name(), **options, **cfg.loss_args_at(0.0))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"loss: {exc}") from None
    why = module.eager_unsupported() if cfg.eager_gradients else None
    if why is not None:
        raise ConfigError(f"eager_gradients: cannot run {why}; use eager_gradients: false")


def _check_reducer(cfg: TrainConfig, specs: dict[str, Any], per_key: dict[str, dict[str, Any]]) -> None:
    """``reducer`` is one :data:`TRAIN_REDUCERS` key, ``reducer_args`` its hyper-parameters in range, and
    every loss component has a meaning on its scores (:func:`pygpo.fused.inputs.reducer_conflict`)."""
    from pygpo.fused.inputs import reducer_conflict
    from pygpo.losses import get, names

    name = cfg.reducer
    if name not in TRAIN_REDUCERS:
        if name in names() and get(name).kind == "reducer":
            raise ConfigError(f"reducer: {name!r} needs per-token inputs (token weights or segment ids) that pygpo "
                              f"train does not read from the data; use one of {' | '.join(TRAIN_REDUCERS)}")
        raise ConfigError(f"reducer: expected one of {' | '.join(TRAIN_REDUCERS)}, got {name!r}")
    spec = get(name)
    for arg in cfg.reducer_args:
        if arg not in spec.defaults:
            raise ConfigError(f"reducer_args.{arg}: not an option of reducer {name!r}; valid: "
                              f"{', '.join(spec.defaults) or '(none)'}")
    _resolve(spec, cfg.reducer_args, "reducer_args")
    if cfg.reference == "cache" and name not in CACHEABLE_REDUCERS and cfg.needs_reference():
        raise ConfigError(f"reducer: {name!r} chooses the tokens it sums per pair, so it needs the reference model's "
                          "token log-probs, which reference: 'cache' (sequence sums) does not hold; use reference: "
                          f"copy or a model path, or reducer {' or '.join(CACHEABLE_REDUCERS)}")
    for k, loss_spec in specs.items():
        why = reducer_conflict(loss_spec, name, per_key[k])
        if why is not None:
            raise ConfigError(f"reducer: {why}")


def _hparams_by_component(cfg: TrainConfig, keys: list[str], specs: dict[str, Any],
                          given: list[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    """``(label, name, value)`` triples sorted to the components they target (``'<key>.<hp>'`` names
    one component, a bare ``<hp>`` every component that has it)."""
    per_key: dict[str, dict[str, Any]] = {k: {} for k in keys}
    for label, name, value in given:
        comp, _, hp = name.rpartition(".")
        if comp and comp not in keys:
            raise ConfigError(f"{label}: {comp!r} is not a component of loss {cfg.loss!r}; valid: {', '.join(keys)}")
        targets = [comp] if comp else [k for k in keys if hp in specs[k].defaults]
        if not targets or any(hp not in specs[t].defaults for t in targets):
            valid = sorted({h for k in keys for h in specs[k].defaults})
            raise ConfigError(
                f"{label}: not a hyper-parameter of loss {cfg.loss!r}; valid: {', '.join(valid) or '(none)'}"
            )
        for t in targets:
            per_key[t][hp] = value
    return per_key


def _resolve(spec: Any, values: dict[str, Any], label: str) -> None:
    from pygpo.losses.errors import PreferenceLossError
    from pygpo.losses.validation import resolve_hparams

    try:
        resolve_hparams(spec, values)
    except PreferenceLossError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def _check_loss_weights(cfg: TrainConfig, keys: list[str]) -> None:
    """Weights are finite and >= 0 (a negative weight would maximise a loss), not all zero."""
    for name, weight in cfg.loss_weights.items():
        if name not in keys:
            raise ConfigError(f"loss_weights.{name}: not a component of loss {cfg.loss!r}; valid: {', '.join(keys)}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"loss_weights.{name}: expected a finite number >= 0, got {weight!r}")
    if all(cfg.loss_weights.get(k, 1.0) == 0 for k in keys):
        raise ConfigError(f"loss_weights: every component of loss {cfg.loss!r} has weight 0, so nothing "
                          "would be trained; give at least one a weight > 0")


def _check_schedule_form(cfg: TrainConfig) -> None:
    """Each schedule is ``{start, end, kind}`` with finite ``start``/``end``; ``kind`` defaults to linear."""
    for name, sched in cfg.loss_schedule.items():
        extra = set(sched) - set(SCHEDULE_KEYS)
        if extra or "start" not in sched or "end" not in sched:
            raise ConfigError(
                f"loss_schedule.{name}: expected a mapping with start, end and optional kind "
                f"({' | '.join(SCHEDULES)}), got {sched!r}"
            )
        for end in ("start", "end"):
            sched[end] = coerce_value(f"loss_schedule.{name}.{end}", sched[end], float)
            if not math.isfinite(sched[end]):
                raise ConfigError(f"loss_schedule.{name}.{end}: expected a finite number, got {sched[end]!r}")
        sched.setdefault("kind", "linear")
        _choice(f"loss_schedule.{name}.kind", sched["kind"], SCHEDULES)


# -- type coercion ----------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


def _type_name(tp: Any, *, nullable: bool = True) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        inner = " or ".join(_type_name(a) for a in args if a is not type(None))
        return inner + " or none" if nullable else inner
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def parse_scalar(text: str) -> Any:
    """A YAML scalar, except that float-looking text (``1e-4``) is a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def coerce_value(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to the type ``tp`` (strings parsed); :class:`ConfigError` naming ``key``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        inner = [a for a in args if a is not type(None)][0]
        try:
            return coerce_value(key, value, inner)
        except ConfigError:
            if get_origin(inner) is dict:
                raise
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}") from None
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = parse_scalar(value) if value.strip() else {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        inner = args[1] if args else Any
        return {str(k): _coerce_item(f"{key}.{k}", v, inner) for k, v in value.items()}
    wrong = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong
    if tp is int:
        if isinstance(value, str):
            value = parse_scalar(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if isinstance(value, float) and not value.is_integer():
            raise wrong
        return int(value)
    if tp is float:
        if isinstance(value, str):
            value = parse_scalar(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise wrong
        return str(value)
    return value


def _coerce_item(key: str, value: Any, tp: Any) -> Any:
    if tp is Any:
        return parse_scalar(value) if isinstance(value, str) else value
    if tp is dict:  # a nested mapping whose values are YAML scalars (loss_schedule entries)
        return coerce_value(key, value, dict[str, Any])
    return coerce_value(key, value, tp)


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {' | '.join(choices)}, got {value!r}")


def _at_least(cfg: TrainConfig, low: int, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"{key}: expected an int >= {low}, got {value}")


# -- loading ----------------------------------------------------------------------------------------


def unknown_key_error(key: str, valid: Sequence[str], where: str = "config key") -> ConfigError:
    """:class:`ConfigError` for an unknown key: close matches first, then every valid key."""
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown {where} {key!r}.{hint} Valid keys: {', '.join(valid)}")


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """``["--a", "1", "--b=2", "--flag"]`` -> ``[("a", "1"), ("b", "2"), ("flag", None)]``.

    ``None`` marks a key given without a value (a bool switch). ``-`` in keys reads as ``_``.
    """
    out: list[tuple[str, Optional[str]]] = []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"overrides: expected --key value or --key=value, got {token!r} at position {i}")
        key, eq, value = token[2:].partition("=")
        head, dot, rest = key.partition(".")
        key = head.replace("-", "_") + dot + rest
        if eq:
            out.append((key, value))
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append((key, args[i + 1]))
            i += 2
        else:
            out.append((key, None))
            i += 1
    return out


def _set_dotted(data: dict[str, Any], key: str, raw: Optional[str]) -> None:
    head, _, rest = key.partition(".")
    if head not in FIELD_NAMES:
        raise unknown_key_error(head, FIELD_NAMES)
    tp = _HINTS[head]
    if not rest:
        if raw is None:
            if tp is not bool:
                raise ConfigError(f"--{head}: expected a value ({_type_name(tp)})")
            raw = "true"
        data[head] = coerce_value(head, raw, tp)
        return
    if get_origin(tp) is not dict:
        raise ConfigError(f"--{key}: {head} is not a mapping, so it takes no '.<name>' suffix")
    if raw is None:
        raise ConfigError(f"--{key}: expected a value")
    node = data.get(head)
    if node is None:
        node = data[head] = {}
    if not isinstance(node, dict):
        raise ConfigError(f"{head}: expected a mapping, got {node!r}")
    parts = [rest]  # '<component>.<name>' is one loss_args / reducer_args key
    if head == "loss_schedule":
        # '<name>.start' sets one end of schedule '<name>', itself '<hp>' or '<component>.<hp>'
        name, dot, last = rest.rpartition(".")
        if dot and last in SCHEDULE_KEYS:
            parts = [name, last]
    elif head == "demo_model" and rest not in DEMO_MODEL:
        raise unknown_key_error(rest, list(DEMO_MODEL), "demo_model key")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{head}.{part}: expected a mapping, got {node!r}")
    node[parts[-1]] = parse_scalar(raw)


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML, or ``None`` for the defaults), apply ``overrides``, resolve presets, validate.

    Raises :class:`ConfigError` for unknown keys, wrong types or invalid values, before any compute.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: no such file {str(path)!r}")
        with open(path, encoding="utf-8") as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {path} must hold a mapping of option names, got {type(loaded).__name__}")
        for key in loaded:
            if key not in FIELD_NAMES:
                raise unknown_key_error(str(key), FIELD_NAMES)
        data.update(loaded)
    for key, raw in parse_overrides(overrides):
        _set_dotted(data, key, raw)
    typed = {k: coerce_value(k, v, _HINTS[k]) for k, v in data.items()}
    return TrainConfig(**typed).resolved(explicit=typed)
