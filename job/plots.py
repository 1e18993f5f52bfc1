"""The loss curve published with a run (loss.png) and embedded in its model card."""

from __future__ import annotations

import json
from pathlib import Path


def read_losses(metrics_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) points from a metrics.jsonl."""
    train, evaluation = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("loss") is not None:
            train.append((record["step"], float(record["loss"])))
        if record.get("eval_loss") is not None:
            evaluation.append((record["step"], float(record["eval_loss"])))
    return train, evaluation


def loss_curve(metrics_path: Path, png_path: Path) -> Path | None:
    """Plot train (and eval, when logged) loss against step into png_path; None when there is nothing to plot."""
    train, evaluation = read_losses(metrics_path) if metrics_path.is_file() else ([], [])
    if not train and not evaluation:
        return None
    # The object API with the Agg canvas: no pyplot global state, no display needed, same output everywhere.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1.5)
    if evaluation:
        axes.plot(*zip(*evaluation), label="eval loss", marker="o", linewidth=1.5)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, format="png")
    return png_path
