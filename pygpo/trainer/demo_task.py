"""The demo task: sort distinct digits, with a subtly wrong answer as the rejected response.

A prompt is ``"sort <digits>="`` with 4 to 6 distinct digits in random order; the chosen response is
the digits in ascending order; the rejected response is objectively wrong in one small way:

    ``swap``     two adjacent digits of the sorted answer exchanged  ("sort 5291=" -> "1259" / "1295")
    ``replace``  one digit replaced by a digit absent from the prompt ("sort 5291=" -> "1259" / "1269")

so a model that prefers the chosen response must know both the order and the content of the answer.
:func:`score` checks a completion, which gives the task metric of greedy decoding.

The package ships one train and one held-out split, made by :func:`generate_splits` with
``DEMO_SEED``; ``python -m pygpo.trainer.demo_task DIR`` writes them again (byte for byte).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

DEMO_SEED = 20240611
TRAIN_SIZE = 4000
EVAL_SIZE = 512
MIN_DIGITS = 4
MAX_DIGITS = 6
REJECT_KINDS = ("swap", "replace")
DATA_DIR = Path(__file__).resolve().parent / "demo_data"
SPLIT_FILES = {"train": "train.jsonl", "eval": "eval.jsonl"}

_PROMPT_RE = re.compile(r"^sort (\d+)=$")


def make_prompt(digits: str) -> str:
    """The prompt for a string of digits: ``"sort 5291="``."""
    return f"sort {digits}="


def answer(prompt: str) -> str:
    """The correct response to a demo prompt (its digits sorted ascending)."""
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(f"prompt: expected 'sort <digits>=', got {prompt!r}")
    return "".join(sorted(match.group(1)))


def score(prompt: str, completion: str) -> bool:
    """True when ``completion`` (surrounding whitespace ignored) is the sorted digits of ``prompt``."""
    return completion.strip() == answer(prompt)


def _wrong_answer(correct: str, kind: str, rng: random.Random) -> str:
    digits = list(correct)
    if kind == "swap":
        i = rng.randrange(len(digits) - 1)
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
    elif kind == "replace":
        i = rng.randrange(len(digits))
        absent = [d for d in "0123456789" if d not in correct]
        # prefer a neighbour value (off by one): the subtlest content error
        near = [d for d in absent if abs(int(d) - int(digits[i])) == 1]
        digits[i] = rng.choice(near or absent)
    else:
        raise ValueError(f"kind: expected one of {REJECT_KINDS}, got {kind!r}")
    return "".join(digits)


def generate_pairs(
    n: int,
    *,
    seed: int,
    min_digits: int = MIN_DIGITS,
    max_digits: int = MAX_DIGITS,
    exclude: Iterable[str] = (),
) -> list[dict[str, str]]:
    """``n`` preference rows ``{"prompt", "chosen", "rejected"}`` with distinct prompts.

    Deterministic in ``seed``; prompts in ``exclude`` are never produced (for disjoint splits).
    """
    if not 2 <= min_digits <= max_digits <= 9:
        raise ValueError(f"min_digits/max_digits: expected 2 <= min <= max <= 9, got {min_digits}, {max_digits}")
    rng = random.Random(seed)
    seen = set(exclude)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        k = rng.randint(min_digits, max_digits)
        prompt = make_prompt("".join(rng.sample("0123456789", k)))
        if prompt in seen:
            continue
        seen.add(prompt)
        chosen = answer(prompt)
        rejected = _wrong_answer(chosen, rng.choice(REJECT_KINDS), rng)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def generate_splits(
    *, seed: int = DEMO_SEED, train_size: int = TRAIN_SIZE, eval_size: int = EVAL_SIZE
) -> dict[str, list[dict[str, str]]]:
    """The train and held-out splits; no held-out prompt occurs in train."""
    held_out = generate_pairs(eval_size, seed=seed + 1)
    train = generate_pairs(train_size, seed=seed, exclude=(r["prompt"] for r in held_out))
    return {"train": train, "eval": held_out}


def dumps_jsonl(rows: Sequence[dict]) -> str:
    """One JSON object per line, keys in insertion order, ``\\n`` line ends (byte-stable)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_splits(out_dir: Path, *, seed: int = DEMO_SEED) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` to ``out_dir``; returns split -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate_splits(seed=seed).items():
        path = out_dir / SPLIT_FILES[split]
        path.write_bytes(dumps_jsonl(rows).encode("utf-8"))
        paths[split] = path
    return paths


def data_path(split: str) -> Path:
    """Path of a shipped split (``"train"`` or ``"eval"``)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split: expected one of {sorted(SPLIT_FILES)}, got {split!r}")
    return DATA_DIR / SPLIT_FILES[split]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = Path(args[0]) if args else DATA_DIR
    for split, path in write_splits(out).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
