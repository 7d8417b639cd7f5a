"""Training end to end on a tiny network: the run folder, resume, and the collapse warnings."""
import json

import numpy as np
import pytest
from PIL import Image

from tinyunet.data import synthetic_membranes
from tinyunet.train import (CollapseWatch, Trainer, TrainOptions, head_relu_dead_channels, learning_rate,
                            parse_indices)
from tinyunet.unet import UNet


def tiny_options(out, **changes):
    values = dict(out=str(out), base_width=4, depth=2, crop=32, batch=2, steps=4, eval_every=2,
                  checkpoint_every=2, lr=1e-3, progress=False, minutes=5.0)
    values.update(changes)
    return TrainOptions(**values)


@pytest.fixture(scope="module")
def tiny_data():
    return synthetic_membranes(4, size=48, seed=1)


def test_a_run_leaves_everything_a_person_looks_at(tmp_path, tiny_data):
    lines = []
    result = Trainer(tiny_options(tmp_path), tiny_data, log=lines.append).fit()
    assert result["step"] == 4
    for name in ("checkpoint.npz", "metrics.json", "curves.png", "montage.png", "report.txt", "final.json"):
        assert (tmp_path / name).is_file(), name
    for name in ("curves.png", "montage.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 300
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    assert all(0 <= h["iou_membrane"] <= 1 and h["train_loss"] > 0 for h in history)
    predictions = sorted(p.name for p in (tmp_path / "predictions").iterdir())
    assert predictions == ["synthetic_003_mask.png", "synthetic_003_overlay.png", "synthetic_003_prob.png"]
    report = "\n".join(lines)
    assert "tinyunet" in report and "Otsu threshold" in report and "majority class" in report


def test_resume_is_bit_identical(tmp_path, tiny_data):
    straight = Trainer(tiny_options(tmp_path / "a", steps=4, checkpoint_every=100), tiny_data, log=lambda m: None)
    for _ in range(4):
        straight.train_step()
    first = Trainer(tiny_options(tmp_path / "b", steps=2), tiny_data, log=lambda m: None)
    for _ in range(2):
        first.train_step()
    first.save()
    second = Trainer(tiny_options(tmp_path / "b", steps=4, resume=True), tiny_data, log=lambda m: None)
    assert second.step == 2
    for _ in range(2):
        second.train_step()
    for name, value in straight.model.parameters().items():
        np.testing.assert_array_equal(second.model.parameters()[name], value, err_msg=name)


def test_resume_without_a_checkpoint_says_so(tmp_path, tiny_data):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        Trainer(tiny_options(tmp_path, resume=True), tiny_data)


def test_crop_not_divisible_is_refused(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="--crop 30 must be divisible by 2\\*\\*depth = 4"):
        Trainer(tiny_options(tmp_path, crop=30), tiny_data)


def test_collapse_to_one_class_is_reported_after_patience():
    watch = CollapseWatch(patience=3)
    assert watch.check(0.9995, []) == [] and watch.check(1.0, []) == []
    messages = watch.check(1.0, [])
    assert len(messages) == 1 and "COLLAPSE" in messages[0] and "'membrane'" in messages[0]
    assert watch.check(1.0, []) == []                       # said once, not at every evaluation
    fresh = CollapseWatch(patience=2)
    fresh.check(0.0, []), fresh.check(0.2, [])             # a normal evaluation resets the streak
    assert fresh.check(0.0, []) == []


def test_a_dead_head_relu_channel_is_detected_and_explained():
    model = UNet(base_width=4, depth=1, dropout=0.0, seed=0)
    model.layers["head.conv"].params["bias"][1] = -1e6        # channel 1 can never be positive
    model.forward(np.random.default_rng(0).random((1, 1, 16, 16)).astype(np.float32))
    dead = head_relu_dead_channels(model)
    assert [c for c, _ in dead] == [1] and dead[0][1] == 1.0
    watch = CollapseWatch(3)
    assert watch.check(0.3, dead) == [] and watch.check(0.3, dead) == []   # may still come back
    messages = watch.check(0.3, dead)
    assert "DEAD HEAD" in messages[0] and "channel 1: 100.0% zeros" in messages[0]
    assert "--no-head-relu" in messages[0]
    revived = CollapseWatch(2)
    revived.check(0.3, dead), revived.check(0.3, []), revived.check(0.3, dead)   # a live evaluation resets
    assert revived.warned == set()
    assert head_relu_dead_channels(UNet(base_width=4, depth=1, head_relu=False)) == []


def test_validation_indices():
    assert parse_indices("20-23", 24) == [20, 21, 22, 23]
    assert parse_indices("last2", 5) == [3, 4]
    assert parse_indices("1,3", 5) == [1, 3]
    with pytest.raises(ValueError, match="outside the 24 items"):
        parse_indices("20-25", 24)


def test_ctrl_c_saves_a_checkpoint_and_still_reports(tmp_path, tiny_data, monkeypatch):
    trainer = Trainer(tiny_options(tmp_path, steps=10, eval_every=100, checkpoint_every=100), tiny_data,
                      log=lambda m: None)
    real_step = trainer.train_step

    def step_then_interrupt():
        if trainer.step == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    result = trainer.fit()
    assert result["interrupted"] and result["step"] == 3
    resumed = Trainer(tiny_options(tmp_path, steps=10, resume=True), tiny_data, log=lambda m: None)
    assert resumed.step == 3
    assert (tmp_path / "montage.png").is_file()


def test_cosine_schedule_runs_from_lr_down_to_its_floor():
    cosine = TrainOptions(lr=2e-4, lr_schedule="cosine")
    assert learning_rate(cosine, 0.0) == pytest.approx(2e-4)
    assert learning_rate(cosine, 0.5) == pytest.approx(2e-4 * (0.05 + 0.95 * 0.5))
    assert learning_rate(cosine, 1.0) == pytest.approx(2e-4 * 0.05)
    assert learning_rate(cosine, 7.0) == pytest.approx(2e-4 * 0.05)       # past the end: the floor
    rates = [learning_rate(cosine, k / 10) for k in range(11)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert learning_rate(TrainOptions(lr=2e-4), 0.7) == 2e-4               # constant, the default
    with pytest.raises(ValueError, match="lr schedule 'step'.*constant"):
        Trainer(TrainOptions(lr_schedule="step"), synthetic_membranes(2, size=32, seed=0))


def test_a_cosine_run_ends_at_the_floor(tmp_path, tiny_data):
    trainer = Trainer(tiny_options(tmp_path, lr_schedule="cosine", steps=5, minutes=60.0), tiny_data,
                      log=lambda *_: None)
    trainer.fit()
    # the last step ran at progress 4/5: lr * (0.05 + 0.95 * (1 + cos(0.8 pi)) / 2)
    assert trainer.optimizer.lr == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5 * (1 + np.cos(0.8 * np.pi))))
