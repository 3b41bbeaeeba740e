"""The docs table of every registry key, generated from the registry so it cannot drift.

``markdown_table()`` returns the text of ``docs/losses.md``; ``python -m pygpo losses`` prints it and
``python -m pygpo losses --write docs/losses.md`` regenerates the file (a test checks they agree).
"""

from __future__ import annotations

from typing import Any

from .registry import LossSpec, get, names

SECTIONS = {
    1: "Reducers: per-token log-probs to sequence scores",
    2: "Pairwise heads on (u_w, u_l), reference-based",
    3: "Token-level KL heads",
    4: "Reference-free heads",
    5: "Additive regularizers (combine with any head)",
    6: "Unpaired and single-response losses",
    7: "Multi-response (K >= 2 responses per prompt)",
    8: "Batch-level and stateful losses",
}

HEADER = """# Loss registry

Generated from the registry metadata by `pygpo.losses.markdown_table()` (regenerate with
`python -m pygpo losses --write docs/losses.md`; a test checks this file matches). The specification
is LOSSES.md. Notation: `u = lp - rp` per response, `h = u_w - u_l`, `ls(z) = -log sigmoid(z)`,
`sg[.]` stop-gradient. Scores are token sums over completion tokens unless an entry says otherwise.

```python
import pygpo
out = pygpo.preference_loss("dpo", policy_logps, ref_logps, beta=0.1)   # (B, 2) [chosen, rejected]
out.loss, out.per_example, out.metrics
```
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return "`" + _cell(text) + "`"


def _value(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _hparams(spec: LossSpec) -> str:
    if not spec.defaults:
        return "-"
    parts = [f"`{k}={_value(v)}` {_cell(spec.ranges[k].describe())}" for k, v in spec.defaults.items()]
    return "<br>".join(parts)


def _inputs(spec: LossSpec) -> str:
    parts = []
    for item in spec.inputs:
        flag = "" if item.required else " (optional)"
        shape = "(object)" if item.dtype == "object" else _cell(item.shape_text())
        parts.append(f"`{item.name}` {shape}{flag}")
    return "<br>".join(parts) if parts else "-"


def _scores(spec: LossSpec) -> str:
    if spec.kind == "reducer":
        return "per-token values (B, K, T), policy and reference alike"
    shapes = " or ".join("(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")") for shape in spec.scores)
    ref = {"required": "policy + ref", "none": "policy only", "optional": "policy (+ ref)"}[spec.reference]
    return f"{ref} {shapes}"


def _key(spec: LossSpec) -> str:
    text = f"`{spec.key}`"
    if spec.aliases:
        text += " (alias " + ", ".join(f"`{a}`" for a in spec.aliases) + ")"
    if spec.stateful is not None:
        text += f"<br>state: `{spec.stateful.__name__}`"
    return text


def markdown_table() -> str:
    """The full markdown text of docs/losses.md: one table per LOSSES.md section, one row per key."""
    lines = [HEADER]
    for section, title in SECTIONS.items():
        keys = [k for k in names() if get(k).section == section]
        lines.append(f"## {section}. {title}\n")
        lines.append("| key | formula | scores | inputs | hyper-parameters (default, valid range) | paper | notes |")
        lines.append("|---|---|---|---|---|---|---|")
        for key in keys:
            spec = get(key)
            row = [
                _key(spec),
                _code(spec.formula),
                _scores(spec),
                _inputs(spec),
                _hparams(spec),
                _cell(spec.paper),
                _cell(spec.notes) if spec.notes else "",
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)
