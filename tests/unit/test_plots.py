import json

import numpy as np
from PIL import Image

from job import card, plots
from job.spec import Spec

# matplotlib's default colour cycle: the first line (train) is C0, the second (eval) C1, the reward margin C2.
TRAIN_BLUE, EVAL_ORANGE, MARGIN_GREEN = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pixels_of(png, colour) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    return int((np.abs(rgb - colour).max(axis=-1) <= 8).sum())


def train_records(steps=20):
    return [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3} for s in range(1, steps + 1)]


def test_train_loss_curve_is_a_png(tmp_path):
    png = plots.loss_curve(write_metrics(tmp_path / "metrics.jsonl", train_records()), tmp_path / "out" / "loss.png")
    assert png == tmp_path / "out" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    assert pixels_of(png, TRAIN_BLUE) > 200
    assert pixels_of(png, EVAL_ORANGE) == 0


def test_eval_loss_gets_its_own_curve(tmp_path):
    records = train_records() + [{"step": s, "eval_loss": 2.0 / s} for s in (5, 10, 15, 20)]
    png = plots.loss_curve(write_metrics(tmp_path / "metrics.jsonl", records), tmp_path / "loss.png")
    assert pixels_of(png, TRAIN_BLUE) > 200 and pixels_of(png, EVAL_ORANGE) > 200


def test_a_loss_only_run_has_one_panel_and_no_margin(tmp_path):
    figure = plots.loss_figure(write_metrics(tmp_path / "metrics.jsonl", train_records()))
    assert [axes.get_ylabel() for axes in figure.axes] == ["loss"]
    png = plots.loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert pixels_of(png, MARGIN_GREEN) == 0


def preference_records(steps=20):
    """What job.train's callback writes for a DPO run: the loss and, on the same line, the preference metrics."""
    return [{"step": s, "loss": 0.69 - 0.02 * s, "learning_rate": 1e-5, "rewards/chosen": 0.02 * s,
             "rewards/rejected": -0.02 * s, "rewards/margins": 0.04 * s, "rewards/accuracies": min(1.0, 0.5 + 0.05 * s),
             "logps/chosen": -80.0 + s, "logps/rejected": -90.0 - s} for s in range(1, steps + 1)]


def test_the_reward_margin_gets_a_labelled_panel_under_the_loss(tmp_path):
    records = preference_records() + [{"step": s, "eval_loss": 0.7 - 0.02 * s} for s in (10, 20)]
    metrics = write_metrics(tmp_path / "metrics.jsonl", records)
    figure = plots.loss_figure(metrics)
    loss_axes, margin_axes = figure.axes
    assert loss_axes.get_ylabel() == "loss" and margin_axes.get_ylabel() == "reward margin"
    assert margin_axes.get_xlabel() == "step"
    assert [line.get_label() for line in loss_axes.get_lines()] == ["train loss", "eval loss"]
    margin = next(line for line in margin_axes.get_lines() if line.get_label().startswith("reward margin"))
    assert list(margin.get_xdata()) == list(range(1, 21))
    assert list(margin.get_ydata()) == [r["rewards/margins"] for r in preference_records()]

    png = plots.loss_curve(metrics, tmp_path / "out" / "loss.png")
    with Image.open(png) as image:
        image.verify()
    assert pixels_of(png, TRAIN_BLUE) > 200 and pixels_of(png, EVAL_ORANGE) > 200
    assert pixels_of(png, MARGIN_GREEN) > 200
    with Image.open(png) as image, Image.open(plots.loss_curve(
            write_metrics(tmp_path / "sft.jsonl", train_records()), tmp_path / "sft.png")) as single:
        assert image.height > single.height  # the second panel adds height rather than squeezing the loss


def test_nothing_to_plot(tmp_path):
    assert plots.loss_curve(tmp_path / "absent.jsonl", tmp_path / "a.png") is None
    assert plots.loss_curve(write_metrics(tmp_path / "m.jsonl", [{"step": 1, "learning_rate": 1e-3}]), tmp_path / "b.png") is None
    assert not list(tmp_path.glob("*.png"))


def test_model_card_embeds_the_plot_only_when_published():
    spec = Spec.model_validate({"model": {"name": "m"}, "data": {"source": "d.jsonl"}}).masked()
    body = {"run_id": "r", "spec": spec, "training": {}, "data": {}, "probes": []}
    assert "![loss](loss.png)" in card.model_card(body, ["adapter/adapter_model.safetensors", "loss.png"])
    assert "loss.png" not in card.model_card(body, ["adapter/adapter_model.safetensors"])
