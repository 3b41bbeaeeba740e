"""What a run writes for its user: ``metrics.jsonl`` (one JSON object per logged step or evaluation),
the resolved ``config.yaml``, ``summary.json`` and PNG plots of loss, reward accuracy and margins.

Each plot puts a training metric and the held-out metric of the same definition on one axis:
``loss`` / ``eval/loss``, ``rewards/accuracies`` / ``eval/reward_accuracy`` (pairs with a positive
implicit reward margin, ties one half), and the loss's ``rewards/margins`` (``beta * h`` for DPO) /
``eval/rewards/margins``. ``eval/margin`` (the unscaled ``h``) is in ``metrics.jsonl`` only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

PLOTS = {
    "loss.png": ("loss", "eval/loss"),
    "reward_accuracy.png": ("rewards/accuracies", "eval/reward_accuracy"),
    "margins.png": ("rewards/margins", "eval/rewards/margins"),
}


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to ``metrics.jsonl``; on resume keeps only the records up to the resumed step."""

    def __init__(self, path: Path, *, resume_step: Optional[int] = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far (none yet in a run resumed into a fresh directory)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def evaluation_at(self, step: int) -> Optional[dict[str, Any]]:
        """The held-out metrics logged at ``step`` (its record with ``eval/`` keys), or ``None``: a resumed
        run reads its initial evaluation back this way."""
        for record in self.records():
            if record["step"] == step and any(k.startswith("eval/") for k in record):
                return {k: v for k, v in record.items() if k != "step"}
        return None


def plot_metrics(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per entry of :data:`PLOTS`: the training curve and the evaluation points over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (train_key, eval_key) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        plotted = False
        for key, style in ((train_key, "-"), (eval_key, "o-")):
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=key, markersize=3)
                plotted = True
        ax.set_xlabel("optimizer step")
        ax.set_title(name[:-4].replace("_", " "))
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend()
        else:  # a loss that reports no such metric (e.g. no rewards/margins)
            ax.text(0.5, 0.5, f"no {train_key} / {eval_key} logged", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written
