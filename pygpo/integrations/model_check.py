"""``pygpo check-model``: will prefix sharing and the fused lm_head work for a given transformers model?

Answered without its weights and without a GPU: :func:`check_model` reads the model's *config only* (a
local Hugging Face directory, a ``config.json``, or a ``model_type`` name such as ``llama`` or
``gpt_oss``), builds a tiny copy of the same architecture with random weights in float32 (eager
attention, the reference; :mod:`pygpo.integrations.tiny_model` says what the copy shrinks and what it
keeps) and runs three checks on it:

(a) ``lm_head``: :func:`~pygpo.integrations.hidden_states.lm_head_of` applied to
    :func:`~pygpo.integrations.hidden_states.final_hidden_states` reproduces the log-probs of
    ``model(...).logits`` (softcaps and logit scales included).
(b) ``prefix sharing``: with :func:`~pygpo.integrations.transformers.enable_prefix_sharing`, the
    response log-probs of one packed batch (:func:`~pygpo.integrations.transformers.response_logprobs`;
    examples with K=2 and K=3 responses, two prompts per row, sequences longer than every scaled-down
    attention window) equal separate ``prompt + response`` forwards of the untouched model, and so do the
    parameter gradients of a weighted sum of them. A model whose fused lm_head is refused is checked with
    its own logits at the target rows instead.
(c) ``no-layout forward``: the prefix-sharing model without a layout (a left-padded batch, and one without
    a mask) gives the logits of the untouched model.

Each check ends ``pass`` (with its largest errors), ``refused`` (pygpo raised its own ``ValueError`` or
``TypeError`` with a message: the documented outcome for what it cannot reproduce), ``skipped`` (no
prefix-sharing model to check), or ``FAILED`` (a mismatch, or an exception pygpo did not mean to raise:
a pygpo bug to report). Tolerances (:data:`TOLERANCES`) are float32 ones; a wrong mask, position or
window moves the compared values by 1e-2 or more. The limits that pygpo checks at run time against the
real config, and which the tiny copy keeps from binding (Llama 4's attention chunk and temperature-tuning
floor, length-dependent RoPE past the original context), are noted in the report. For a multimodal model
the text decoder (``get_text_config()``) is checked.

The copy is built and checked on one torch thread (restored afterwards): its forwards and backwards are
tiny, and intra-op threads cost more than they give on them.

Input that cannot be checked raises :class:`ModelSpecError` (``pygpo check-model`` exits 2): no such
directory or ``model_type``, a type without a causal LM class, a config transformers cannot build, or a
tiny copy whose own forward fails without any pygpo code (a ``model_type``'s default config may leave
settings unset, such as DeepSeek-V2's experts per token), a decoder that runs only beside another model (a
speculative-decoding assistant), or a causal LM that predicts several token streams per position (MusicGen).

A pass on a tiny random copy is evidence, not proof, for the full-size model: the same code runs with
the same switches, but numerics at full size and lengths beyond those of the check are not exercised.

The tiny copy's names (:func:`load_config`, :func:`tiny_config`, :func:`make_tiny_model`, ...) are
importable from here as well as from :mod:`pygpo.integrations.tiny_model`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from .tiny_model import (CONTEXT, EXPERTS, HIDDEN, MAX_GQA, MAX_HEADS, MAX_LAYERS, RANK, SOFTCAP, TOP_K, VOCAB,
                         WINDOW, ModelSpecError, TinyConfig, _one_line, build_tiny_model, causal_lm_class,
                         load_config, make_tiny_model, tiny_config)

__all__ = [
    # the checks
    "TOLERANCES", "EXAMPLES", "ROW_TOKENS", "STATUSES", "CheckResult", "ModelReport", "raised_by_pygpo",
    "check_model",
    # the tiny copy, from pygpo.integrations.tiny_model
    "HIDDEN", "VOCAB", "WINDOW", "CONTEXT", "SOFTCAP", "MAX_HEADS", "MAX_GQA", "EXPERTS", "TOP_K", "RANK",
    "MAX_LAYERS", "ModelSpecError", "load_config", "causal_lm_class", "TinyConfig", "tiny_config",
    "build_tiny_model", "make_tiny_model",
]


# -- checks ---------------------------------------------------------------------------------------------

#: Largest errors a check accepts, float32 against float32: ``|d log p|`` per token (lm_head), per response
#: sum (prefix sharing), ``|d logit|`` (no-layout forward), and the gradient error relative to each
#: parameter's gradient norm (floored at 1e-3 of the largest one).
TOLERANCES = {"lm_head": 1e-4, "prefix_sharing": 2e-4, "grad": 1e-3, "no_layout_forward": 1e-4}
#: The packed batch of check (b): ``(prompt length, response lengths)`` per example; with rows of
#: :data:`ROW_TOKENS` tokens, first-fit decreasing puts two examples in each row.
EXAMPLES = ((5, (5, 3)), (7, (6, 4, 5)), (6, (4, 6)), (6, (5, 3, 4)))
ROW_TOKENS = 35
STATUSES = ("pass", "refused", "skipped", "FAILED")
#: The checks behind each verdict (a failed build fails both).
_VERDICT_CHECKS = {"prefix_sharing": ("prefix_sharing", "no_layout_forward"), "fused_lm_head": ("lm_head",)}


@dataclasses.dataclass
class CheckResult:
    """One check: ``status`` in :data:`STATUSES`, its largest ``errors`` by name, a ``message`` (the refusal,
    the mismatch or the exception) and what it compared (``detail``)."""

    name: str
    status: str
    errors: dict[str, float] = dataclasses.field(default_factory=dict)
    message: str = ""
    detail: str = ""


def _pygpo_dirs() -> tuple[Path, ...]:
    import importlib.util

    dirs = [Path(__file__).resolve().parents[1]]
    spec = importlib.util.find_spec("pygpo.kernels")
    dirs += [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    return tuple(dirs)


def raised_by_pygpo(exc: BaseException) -> bool:
    """Whether ``exc`` is a refusal pygpo raised itself: a ``ValueError`` or ``TypeError`` whose innermost
    frame is pygpo's code (this module excluded). The same types raised in torch or transformers are not."""
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return path != Path(__file__).resolve() and any(path.is_relative_to(d) for d in _pygpo_dirs())


def _run_check(name: str, detail: str, body: Callable[[], tuple[dict[str, float], str]]) -> CheckResult:
    """``body() -> (errors, mismatch message or "")`` as a :class:`CheckResult`; pygpo's own refusals are
    ``refused``, every other exception ``FAILED``."""
    try:
        errors, mismatch = body()
    except Exception as exc:  # noqa: BLE001 - classified
        if raised_by_pygpo(exc):
            return CheckResult(name, "refused", message=_one_line(exc), detail=detail)
        return CheckResult(name, "FAILED", message=f"{type(exc).__name__}: {_one_line(exc)}", detail=detail)
    return CheckResult(name, "FAILED" if mismatch else "pass", errors, mismatch, detail)


def _tokens(config: Any, count: int, generator: Any) -> list[int]:
    """``count`` random ids of the tiny vocabulary, none of them a special token (pad, bos, eos, ...)."""
    import torch

    special = set()
    for name, value in config.to_dict().items():
        if name.endswith(("token_id", "token_ids", "token_index")):
            special.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    allowed = torch.tensor([t for t in range(int(config.vocab_size)) if t not in special])
    return allowed[torch.randint(0, len(allowed), (count,), generator=generator)].tolist()


def _logits(model: Any, ids: Any, mask: Any = None, **kwargs: Any) -> Any:
    return model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits.float()


def _check_lm_head(model: Any, ids: Any, backend: str) -> tuple[dict[str, float], str]:
    import torch

    from .hidden_states import final_hidden_states, lm_head_of

    with torch.no_grad():
        want = torch.log_softmax(_logits(model, ids)[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        head = lm_head_of(model)
        got = head.logprobs(final_hidden_states(model, ids)[:, :-1], ids[:, 1:], backend=backend)
    err = float((got.double() - want).abs().max())
    return {"logprob": err}, _mismatch("log-probs differ from model(...).logits", err, TOLERANCES["lm_head"])


def _mismatch(what: str, err: float, tol: float) -> str:
    return "" if err <= tol else f"{what}: max error {err:.2e} > {tol:.0e}"


def _separate_logprobs(model: Any, prompts: list, responses: list, order: list) -> Any:
    """Sequence log-probs of ``prompts[e] + responses[e][k]`` for ``(e, k)`` in ``order``, one forward each."""
    import torch

    out = []
    for e, k in order:
        prompt, response = prompts[e], responses[e][k]
        logits = _logits(model, torch.tensor([prompt + response]))[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        out.append(logp.gather(-1, torch.tensor(response)[:, None]).sum())
    return torch.stack(out)


def _shared_logprobs(model: Any, batch: Any, fused_head: bool) -> Any:
    """Response log-probs of one shared forward: the fused lm_head, or the model's own logits at the targets."""
    import torch

    from .transformers import response_logprobs

    if fused_head:
        return response_logprobs(model, batch)
    logits = _logits(model, batch.input_ids, prefix_layout=batch.layout)
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
    return batch.response_sums(torch.log_softmax(rows, -1).gather(-1, batch.target_labels[:, None])[:, 0])


def _grad_error(shared: Any, ref: Any) -> float:
    """Largest ``|g_shared - g_ref| / max(|g_ref|, 1e-3 max |g_ref|)`` over parameters (a gradient missing
    on one side counts as zeros)."""
    import torch

    pairs = list(zip(shared.named_parameters(), ref.named_parameters()))
    norms = [float(p.grad.norm()) for _, (_, p) in pairs if p.grad is not None]
    floor = 1e-3 * max(norms, default=0.0) + 1e-30
    worst = 0.0
    for (name, ps), (_, pr) in pairs:
        gs = ps.grad if ps.grad is not None else (torch.zeros_like(ps) if pr.grad is not None else None)
        gr = pr.grad if pr.grad is not None else (torch.zeros_like(pr) if ps.grad is not None else None)
        if gs is None:
            continue
        worst = max(worst, float((gs - gr).norm()) / max(float(gr.norm()), floor))
    return worst


def _check_prefix_sharing(shared: Any, ref: Any, config: Any, fused_head: bool) -> tuple[dict[str, float], str]:
    import torch

    from ..prefix import pack

    gen = torch.Generator().manual_seed(3)
    prompts = [_tokens(config, p, gen) for p, _ in EXAMPLES]
    responses = [[_tokens(config, r, gen) for r in lengths] for _, lengths in EXAMPLES]
    batch = pack(prompts, responses, max_tokens=ROW_TOKENS)
    if batch.input_ids.shape[0] != len(EXAMPLES) // 2:  # the check's own data: two prompts per row
        raise RuntimeError(f"the check batch packed into {batch.input_ids.shape[0]} rows, not {len(EXAMPLES) // 2}")
    order = list(zip(batch.response_example.tolist(), batch.response_rank.tolist()))
    shared.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    got = _shared_logprobs(shared, batch, fused_head)
    want = _separate_logprobs(ref, prompts, responses, order)
    err = float((got.detach().double() - want.detach().double()).abs().max())
    weights = torch.linspace(-1.0, 1.5, len(order))  # signs and sizes differ: every response's gradient counts
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    grad_err = _grad_error(shared, ref)
    mismatch = _mismatch("response log-probs differ from separate prompt + response forwards", err,
                         TOLERANCES["prefix_sharing"])
    mismatch = mismatch or _mismatch("parameter gradients differ from separate forwards", grad_err,
                                     TOLERANCES["grad"])
    return {"logprob": err, "grad": grad_err}, mismatch


def _check_no_layout(shared: Any, ref: Any, config: Any) -> tuple[dict[str, float], str]:
    import torch

    gen = torch.Generator().manual_seed(4)
    ids = torch.tensor([_tokens(config, 10, gen), _tokens(config, 10, gen)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        padded = (_logits(shared, ids, mask) - _logits(ref, ids, mask))
        plain = (_logits(shared, ids) - _logits(ref, ids))
    err = max(float(padded[0].abs().max()), float(padded[1, 3:].abs().max()), float(plain.abs().max()))
    return {"logit": err}, _mismatch("logits differ from the untouched model", err, TOLERANCES["no_layout_forward"])


# -- the report -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelReport:
    """What :func:`check_model` found: the checks, the two verdicts and the exit code of ``pygpo check-model``."""

    model: str
    model_type: str
    causal_lm: str
    backend: str
    tiny: dict[str, Any]
    checks: list[CheckResult]
    notes: list[str]

    def verdicts(self) -> dict[str, dict[str, str]]:
        """``{"prefix_sharing": {...}, "fused_lm_head": {...}}``, each ``{"status": "supported" | "refused" |
        "FAILED", "reason": ...}``: FAILED when one of its checks (or the build) failed, else refused when one
        was refused (the first refusal's message), else supported."""
        out = {}
        for key, names in _VERDICT_CHECKS.items():
            mine = self._checks_of(key)
            failed = [c for c in mine if c.status == "FAILED"]
            refused = next((c for c in mine if c.status == "refused"), None)
            if failed:
                out[key] = {"status": "FAILED", "reason": "; ".join(f"{c.name}: {c.message}" for c in failed)}
            elif refused is not None:
                prefix = "" if refused.name == names[0] else "without a layout: "
                out[key] = {"status": "refused", "reason": prefix + refused.message}
            else:
                out[key] = {"status": "supported", "reason": ""}
        return out

    def _checks_of(self, verdict: str) -> list[CheckResult]:
        return [c for c in self.checks if c.name in _VERDICT_CHECKS[verdict] + ("build",)]

    @property
    def exit_code(self) -> int:
        """0 when every check passed or was refused with a message, 1 when one FAILED."""
        return 1 if any(c.status == "FAILED" for c in self.checks) else 0

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_type": self.model_type, "causal_lm": self.causal_lm,
                "backend": self.backend, "tiny_config": self.tiny,
                "checks": [dataclasses.asdict(c) for c in self.checks], "verdict": self.verdicts(),
                "notes": self.notes, "exit_code": self.exit_code}

    def format(self) -> str:
        """The human-readable report: one line per check, notes, and the two verdict lines."""
        t = self.tiny
        shape = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in t.items() if v is not None)
        lines = [f"{self.model}: {self.causal_lm}, tiny random copy ({shape}); float32, eager reference, "
                 f"backend {self.backend}"]
        for c in self.checks:
            errors = ", ".join(f"{k} {v:.1e}" for k, v in c.errors.items())
            text = c.message if c.status != "pass" else f"max error {errors}" if errors else ""
            if c.status == "FAILED" and errors:
                text += f" (max error {errors})"
            lines.append(f"  {c.name:<18} {c.status:<8} {text}")
            if c.detail and c.status in ("pass", "FAILED"):
                lines.append(f"  {'':<18} {'':<8} ({c.detail})")
        lines += [f"  note: {n}" for n in self.notes]
        names = {"prefix_sharing": "prefix sharing", "fused_lm_head": "fused lm_head"}
        for key, v in self.verdicts().items():
            reason = f": {v['reason']}" if v["reason"] else ""
            if v["status"] == "FAILED":  # the check lines above say what failed
                failed = ", ".join(c.name for c in self._checks_of(key) if c.status == "FAILED")
                reason = f" ({failed}: a pygpo bug, please report it)"
            lines.append(f"{names[key]}: {v['status']}{reason}")
        return "\n".join(lines)


def _tiny_summary(config: Any) -> dict[str, Any]:
    def first(*names: str) -> Any:
        for name in names:
            try:
                value = getattr(config, name, None)
            except Exception:  # noqa: BLE001 - a per-layer attribute of a heterogeneous config
                value = config.to_dict().get(name)
            if value is not None:
                return value
        return None

    return {"layers": first("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
            "hidden": first("hidden_size", "d_model", "n_embd"),
            "heads": first("num_attention_heads", "n_head", "n_heads"),
            "kv_heads": first("num_key_value_heads", "num_kv_heads"),
            "head_dim": first("head_dim", "qk_head_dim"), "vocab": first("vocab_size"),
            "experts": first("num_experts", "num_local_experts", "n_routed_experts"),
            "sliding_window": first("sliding_window")}

#: A config attribute pygpo refuses at training time with a non-zero value (noted, not checked).
_DROPOUT_NOTE = "attention_dropout"


def _run_time_notes(config: Any) -> list[str]:
    """What pygpo checks at run time against the real config's limits, which the tiny copy keeps from binding."""
    from .prefix_model_checks import rope_parameters

    notes = []
    types = set(getattr(config, "layer_types", None) or ())
    if "chunked_attention" in types and getattr(config, "attention_chunk_size", None):
        notes.append(f"chunked attention: packed sequences longer than attention_chunk_size="
                     f"{config.attention_chunk_size} are refused at run time")
    if getattr(config, "attn_temperature_tuning", False) and getattr(config, "floor_scale", None):
        notes.append(f"attention temperature tuning: packed rows of floor_scale={config.floor_scale} tokens or more "
                     "are refused at run time")
    for rope in rope_parameters(config):
        kind = str(rope.get("rope_type", rope.get("type", "default")))
        if "dynamic" in kind or kind == "longrope":
            notes.append(f"{kind} RoPE: packed sequences past the original context are refused at run time")
            break
    dropout = getattr(config, _DROPOUT_NOTE, None)
    if isinstance(dropout, float) and dropout > 0:
        notes.append(f"{_DROPOUT_NOTE}={dropout}: prefix sharing refuses attention dropout in training; set it to 0")
    return notes


# -- check_model ----------------------------------------------------------------------------------------


def _prepare_backend(backend: str) -> None:
    """``triton`` runs the kernels on the CPU, in triton's interpreter, which must be chosen before triton
    is first imported."""
    if backend not in ("torch", "triton"):
        raise ModelSpecError(f"backend must be 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return
    from ..ops.dispatch import triton_problem

    problem = triton_problem()
    if problem:
        raise ModelSpecError(f"backend='triton' {problem}")
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise ModelSpecError("backend='triton' runs the kernels on the CPU in triton's interpreter: set "
                         "TRITON_INTERPRET=1 before triton is first imported")


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, and restored when it is left (on
    an error too)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_model(model: Any, *, layers: int = 2, backend: str = "torch") -> ModelReport:
    """Check prefix sharing and the fused lm_head on a tiny random copy of ``model``'s architecture.

    Args:
        model: a local model directory, a ``config.json`` path, a transformers ``model_type`` name, or a
            transformers config object.
        layers: layers of the tiny copy (more when the architecture has more kinds of layers).
        backend: ``"torch"`` or ``"triton"`` (the kernels in triton's CPU interpreter).

    Returns:
        A :class:`ModelReport` (module docstring for the checks and their outcomes).

    Raises:
        ModelSpecError: ``model`` names no readable config or one transformers cannot build, or a bad
            ``layers`` or ``backend``.
    """
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ModelSpecError(f"layers must be a positive integer, got {layers!r}")
    _prepare_backend(backend)
    label = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
    config = load_config(model) if isinstance(model, (str, os.PathLike)) else model
    text, model_class = causal_lm_class(config)
    notes = [] if text is config else [f"checked the text decoder ({text.model_type}) of this {config.model_type} "
                                       "model"]
    report = ModelReport(str(label), text.model_type, model_class.__name__, backend, {}, [], notes)
    with _torch_threads(1):  # many tiny forwards and backwards: intra-op threads cost more than they give
        _check_tiny_copy(report, text, model_class, layers, backend)
    return report


def _check_tiny_copy(report: ModelReport, config: Any, model_class: type, layers: int, backend: str) -> None:
    """Build the tiny copy of ``config`` and run the checks on it, into ``report``; a copy that does not build
    is a FAILED ``build`` check, one whose forward fails in transformers alone a :class:`ModelSpecError`."""
    import torch

    try:
        ref, tiny = make_tiny_model(config, model_class, layers=layers)
    except ModelSpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - the tiny copy did not build: nothing could be checked
        report.checks.append(CheckResult("build", "FAILED", message=f"the tiny copy did not build: "
                                         f"{type(exc).__name__}: {_one_line(exc)}"))
        return
    report.tiny = _tiny_summary(tiny.config)
    report.notes += tiny.notes + _run_time_notes(config)
    ids = torch.tensor([_tokens(tiny.config, 12, torch.Generator().manual_seed(s)) for s in (1, 2)])
    try:
        with torch.no_grad():
            _logits(ref, ids)
    except Exception as exc:  # noqa: BLE001 - the reference itself does not run: nothing can be compared
        raise ModelSpecError(f"the tiny copy of {model_class.__name__} does not run in transformers (no pygpo "
                             f"code involved): {type(exc).__name__}: {_one_line(exc)}; either the config leaves "
                             "settings unset (a model_type's default config may: try the model's own config.json), "
                             "or check-model does not know how to shrink one of its attributes") from None
    _run_checks(report, ref, tiny.config, ids, backend)


def _run_checks(report: ModelReport, ref: Any, config: Any, ids: Any, backend: str) -> None:
    """Checks (a) to (c) of the module docstring on the tiny copy ``ref`` (``config``, token ``ids``), into
    ``report``; (b) and (c) are skipped when prefix sharing cannot be enabled."""
    from .transformers import enable_prefix_sharing

    lm = _run_check("lm_head", "token log-probs of lm_head_of(final_hidden_states) vs model(...).logits",
                    lambda: _check_lm_head(ref, ids, backend))
    report.checks.append(lm)
    shared = copy.deepcopy(ref)
    try:
        enable_prefix_sharing(shared, backend=backend)
    except Exception as exc:  # noqa: BLE001 - classified
        status = "refused" if raised_by_pygpo(exc) else "FAILED"
        message = _one_line(exc) if status == "refused" else f"{type(exc).__name__}: {_one_line(exc)}"
        report.checks.append(CheckResult("prefix_sharing", status, message=message))
        report.checks.append(CheckResult("no_layout_forward", "skipped", message="prefix sharing was not enabled"))
        return
    head = "fused lm_head" if lm.status == "pass" else "the model's own logits at the targets"
    responses = sum(len(r) for _, r in EXAMPLES)
    report.checks.append(_run_check(
        "prefix_sharing", f"{responses} responses, K=2 and K=3, 2 prompts per row, {head}: log-probs and "
        "gradients vs separate prompt + response forwards",
        lambda: _check_prefix_sharing(shared, ref, config, lm.status == "pass")))
    report.checks.append(_run_check(
        "no_layout_forward", "left-padded and unpadded logits vs the untouched model",
        lambda: _check_no_layout(shared, ref, config)))
