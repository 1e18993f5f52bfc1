import json

import numpy as np
from PIL import Image

from job import card, plots
from job.spec import Spec

# matplotlib's default colour cycle: the first line (train) is C0, the second (eval) C1.
TRAIN_BLUE, EVAL_ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


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


def test_nothing_to_plot(tmp_path):
    assert plots.loss_curve(tmp_path / "absent.jsonl", tmp_path / "a.png") is None
    assert plots.loss_curve(write_metrics(tmp_path / "m.jsonl", [{"step": 1, "learning_rate": 1e-3}]), tmp_path / "b.png") is None
    assert not list(tmp_path.glob("*.png"))


def test_model_card_embeds_the_plot_only_when_published():
    spec = Spec.model_validate({"model": {"name": "m"}, "data": {"source": "d.jsonl"}}).masked()
    body = {"run_id": "r", "spec": spec, "training": {}, "data": {}, "probes": []}
    assert "![loss](loss.png)" in card.model_card(body, ["adapter/adapter_model.safetensors", "loss.png"])
    assert "loss.png" not in card.model_card(body, ["adapter/adapter_model.safetensors"])
