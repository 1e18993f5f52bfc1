"""The loss curve published with a run (loss.png) and embedded in its model card."""

from __future__ import annotations

import json
from pathlib import Path

MARGIN = "rewards/margins"  # what a preference method's trainer logs as the mean chosen-minus-rejected reward


def read_series(metrics_path: Path, *keys: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of each of `keys` from a metrics.jsonl, in the order logged."""
    series: dict[str, list[tuple[int, float]]] = {key: [] for key in keys}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for key in keys:
            if record.get(key) is not None:
                series[key].append((record["step"], float(record[key])))
    return series


def read_losses(metrics_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) points from a metrics.jsonl."""
    series = read_series(metrics_path, "loss", "eval_loss")
    return series["loss"], series["eval_loss"]


def loss_figure(metrics_path: Path):
    """The matplotlib Figure of loss_curve (None when there is nothing to plot): train and eval loss against step,
    and below them, in a panel of its own, the reward margin when a preference method logged one. The margin gets
    its own panel because its scale has nothing to do with the loss's, and a preference run's progress shows in it
    more plainly than in its loss."""
    series = read_series(metrics_path, "loss", "eval_loss", MARGIN) if metrics_path.is_file() else {}
    train, evaluation, margins = series.get("loss", []), series.get("eval_loss", []), series.get(MARGIN, [])
    if not train and not evaluation and not margins:
        return None
    # The object API with the Agg canvas: no pyplot global state, no display needed, same output everywhere.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = int(bool(train or evaluation)) + int(bool(margins))
    figure = Figure(figsize=(7, 4 if panels == 1 else 6.5), dpi=100)
    FigureCanvasAgg(figure)
    axes_list = list(figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0])
    if train or evaluation:
        axes = axes_list[0]
        if train:
            axes.plot(*zip(*train), label="train loss", linewidth=1.5)
        if evaluation:
            axes.plot(*zip(*evaluation), label="eval loss", marker="o", linewidth=1.5)
        axes.set_ylabel("loss")
    if margins:
        axes = axes_list[-1]
        # C2 (green): a colour neither loss curve uses, so the panels read apart.
        axes.plot(*zip(*margins), label="reward margin (chosen - rejected)", color="C2", linewidth=1.5)
        axes.axhline(0.0, color="0.5", linewidth=0.8)  # above it, the policy prefers the chosen answers
        axes.set_ylabel("reward margin")
    for axes in axes_list:
        axes.grid(alpha=0.3)
        axes.legend()
    axes_list[-1].set_xlabel("step")
    axes_list[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return figure


def loss_curve(metrics_path: Path, png_path: Path) -> Path | None:
    """Plot train (and eval, when logged) loss against step into png_path, with the reward margin in a second panel
    when logged; None when there is nothing to plot."""
    figure = loss_figure(metrics_path)
    if figure is None:
        return None
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, format="png")
    return png_path
