"""Helpers for tests/test_readme_examples.py: read README.md's code blocks, run them, and build the tiny real
objects (models, token ids, padded batches) that stand in for the names a README reader already has.

Nothing here imports pygpo: the references the README's results are checked against come from plain torch
and transformers.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

_FENCE = re.compile(r"^```(\S*)\s*$")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")


@dataclass(frozen=True)
class Block:
    """A fenced code block of a markdown file.

    ``index``: position among the blocks of its language (0-based); ``line``: 1-based line of its first code
    line; ``heading``: the nearest heading above it; ``intro``: the prose between that heading (or the
    previous block) and the fence.
    """

    lang: str
    index: int
    line: int
    heading: str
    intro: str
    source: str

    @property
    def first_line(self) -> str:
        return next((s.strip() for s in self.source.splitlines() if s.strip()), "")

    @property
    def test_id(self) -> str:
        slug = re.sub(r"[^0-9A-Za-z_.]+", "_", self.first_line)[:40].strip("_")
        return f"{self.lang}{self.index}-L{self.line}-{slug}"


def code_blocks(text: str, lang: str) -> list[Block]:
    """Every ```lang fenced block of ``text``, in order (fences inside other blocks are not opened)."""
    blocks: list[Block] = []
    heading, prose = "", []
    open_lang, start, body = None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = _FENCE.match(line)
        if open_lang is None:
            if fence:
                open_lang, start, body = fence.group(1), number + 1, []
                continue
            title = _HEADING.match(line)
            if title:
                heading, prose = title.group(1), []
            else:
                prose.append(line)
            continue
        if fence and not fence.group(1):
            if open_lang == lang:
                intro = "\n".join(prose).strip()
                blocks.append(Block(lang, len(blocks), start, heading, intro, "\n".join(body) + "\n"))
            open_lang, prose = None, []
            continue
        body.append(line)
    if open_lang is not None:
        raise ValueError(f"unclosed ``` fence opened at line {start - 1}")
    return blocks


def substitute(source: str, table: Sequence[tuple[str, str, str]]) -> str:
    """Apply ``(old, new, why)`` textual substitutions; each ``old`` must occur exactly once, so a README
    edit that removes or repeats an elided spot fails here instead of being run unchanged."""
    for old, new, why in table:
        count = source.count(old)
        if count != 1:
            raise AssertionError(f"substitution {old!r} -> {new!r} ({why}) expects one occurrence, found {count}")
        source = source.replace(old, new)
    return source


def run_block(source: str, namespace: dict[str, Any], *, first_line: int) -> list[tuple[int, Any]]:
    """Execute ``source`` statement by statement in ``namespace`` (as ``exec`` would) and return the value
    of every bare expression statement with its README line, e.g. ``out.loss, out.per_example`` (what a
    reader would see in a REPL). Tracebacks name ``README.md`` and the README's line numbers."""
    filename = str(README)
    tree = ast.parse(source, filename=filename)
    ast.increment_lineno(tree, first_line - 1)
    values: list[tuple[int, Any]] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr):
            code = compile(ast.Expression(stmt.value), filename, "eval")
            values.append((stmt.lineno, eval(code, namespace)))  # noqa: S307 - the README's own code
        else:
            exec(compile(ast.Module([stmt], type_ignores=[]), filename, "exec"), namespace)  # noqa: S102
    return values


# ---------------------------------------------------------------------------------------------- token data

def preference_examples(n: int, vocab: int, *, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` examples ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of random token ids in ``[1, vocab)``
    (0 is kept for padding), with lengths that differ between examples and between the two responses."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        length = int(torch.randint(lo, hi + 1, (), generator=g))
        return torch.randint(1, vocab, (length,), generator=g).tolist()

    return [{"prompt_ids": ids(3, 9), "chosen_ids": ids(2, 7), "rejected_ids": ids(2, 7)} for _ in range(n)]


def padded_pairs(examples: Sequence[dict[str, list[int]]], *, pad_id: int = 0):
    """Right-padded rows ``prompt + response``: the ``B`` chosen rows, then the ``B`` rejected rows.

    Returns ``input_ids (2B, T)`` int64, ``mask (2B, T)`` int64 (1 on real tokens) and
    ``prompt_or_padding (2B, T)`` bool (True on prompt and padding positions).
    """
    rows = [(ex["prompt_ids"], ex[key]) for key in ("chosen_ids", "rejected_ids") for ex in examples]
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    prompt_or_padding = torch.ones((len(rows), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        p, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        mask[i, :n] = 1
        prompt_or_padding[i, p:n] = False
    return input_ids, mask, prompt_or_padding


def sequence_logp(model64, prompt: Sequence[int], response: Sequence[int]) -> float:
    """``sum_t log p(response_t | prompt, response_<t)`` from one unpadded plain forward of a float64 model."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model64(input_ids=ids, use_cache=False).logits[0, :-1].double()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt) - 1:].sum())


def reference_pair_logps(model64, examples: Sequence[dict[str, list[int]]]) -> torch.Tensor:
    """``(B, 2)`` float64 ``[chosen, rejected]`` sequence log-probs, one plain forward per response."""
    return torch.tensor([[sequence_logp(model64, ex["prompt_ids"], ex[key]) for key in ("chosen_ids", "rejected_ids")]
                         for ex in examples], dtype=torch.float64)
