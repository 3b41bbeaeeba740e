"""What a run writes for its user: ``metrics.jsonl`` (one JSON object per logged step or evaluation),
the resolved ``config.yaml``, ``summary.json`` and PNG plots of loss, reward accuracy and margins."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

PLOTS = {
    "loss.png": ("loss", "eval/loss"),
    "reward_accuracy.png": ("rewards/accuracies", "eval/reward_accuracy"),
    "margins.png": ("rewards/margins", "eval/margin"),
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
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def plot_metrics(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per entry of :data:`PLOTS`: the training curve and the evaluation points over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (train_key, eval_key) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, style in ((train_key, "-"), (eval_key, "o-")):
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=key, markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_title(name[:-4].replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written
