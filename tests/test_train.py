"""Training end to end on a tiny network: the run folder, resume, and the collapse warnings."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tinyunet.data import synthetic_membranes
from tinyunet.train import (CollapseWatch, Trainer, TrainOptions, check_options, head_relu_dead_channels,
                            learning_rate, parse_indices, resume_options)
from tinyunet.unet import UNet


def tiny_options(out, **changes):
    values = dict(out=str(out), base_width=4, depth=2, crop=32, batch=2, steps=4, eval_every=2,
                  checkpoint_every=2, lr=1e-3, progress=False, minutes=5.0)
    values.update(changes)
    return TrainOptions(**values)


@pytest.fixture
def quick_figures(monkeypatch):
    """matplotlib takes seconds a figure: tests that do not look at the figures get empty files
    (test_a_run_leaves_everything_a_person_looks_at draws them for real)."""
    import tinyunet.plots as plots
    monkeypatch.setattr(plots, "save_curves", lambda history, path: path.touch())
    monkeypatch.setattr(plots, "save_montage", lambda images, targets, probabilities, names, path, t: path.touch())


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
    assert parse_indices("3,1,3", 5) == [3, 1]                 # in the order given, each once
    with pytest.raises(ValueError, match="up to 99999999999 are outside the 24 items"):
        parse_indices("0-99999999999", 24)
    with pytest.raises(ValueError, match="outside the 24 items"):
        parse_indices("20-25", 24)


def test_ctrl_c_saves_a_checkpoint_and_still_reports(tmp_path, tiny_data, monkeypatch, quick_figures):
    """One Ctrl-C (SIGINT) stops at the step boundary and still reports; a KeyboardInterrupt
    between steps (a second Ctrl-C) saves that step and stops at once. Every phase of a step:
    tests/test_interrupts.py."""
    import signal
    trainer = Trainer(tiny_options(tmp_path, steps=10, eval_every=100, checkpoint_every=100), tiny_data,
                      log=lambda m: None)
    real_step = trainer.train_step

    def step_then_interrupt():
        if trainer.step == 3:
            signal.raise_signal(signal.SIGINT)
        return real_step()

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    result = trainer.fit()
    assert result["interrupted"] and result["step"] == 4            # the step in flight was finished
    assert (tmp_path / "montage.png").is_file() and (tmp_path / "report.txt").is_file()

    lines = []
    resumed = Trainer(tiny_options(tmp_path, steps=10, resume=True), tiny_data, log=lines.append)
    assert resumed.step == 4
    real_step = resumed.train_step

    def stop_at_once():
        if resumed.step == 6:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(resumed, "train_step", stop_at_once)
    (tmp_path / "report.txt").unlink()
    with pytest.raises(KeyboardInterrupt):
        resumed.fit()
    assert any("stopped at once at step 6" in line for line in lines)
    assert Trainer(tiny_options(tmp_path, steps=10, resume=True), tiny_data, log=lambda m: None).step == 6
    assert not (tmp_path / "report.txt").exists()


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


def test_a_cosine_run_ends_at_the_floor(tmp_path, tiny_data, quick_figures):
    trainer = Trainer(tiny_options(tmp_path, lr_schedule="cosine", steps=5, minutes=60.0), tiny_data,
                      log=lambda *_: None)
    trainer.fit()
    # the last step ran at progress 4/5: lr * (0.05 + 0.95 * (1 + cos(0.8 pi)) / 2)
    assert trainer.optimizer.lr == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5 * (1 + np.cos(0.8 * np.pi))))


# ----------------------------------------------------------- bad options, kept runs, resume

@pytest.mark.parametrize("changes, message", [
    (dict(eval_every=0), "--eval-every 0: must be at least 1"),
    (dict(checkpoint_every=0), "--checkpoint-every 0: must be at least 1"),
    (dict(batch=0), "--batch 0: must be at least 1"),
    (dict(batch=-1), "--batch -1: must be at least 1"),
    (dict(crop=-32), "--crop -32: must be at least 4"),
    (dict(crop=30), r"--crop 30 must be divisible by 2\*\*depth = 4"),
    (dict(val="abc"), "--val 'abc': give validation items as 'last4', '20-23'"),
    (dict(val="-1"), "--val '-1': give validation items as"),
    (dict(val="5-2"), "the range 5-2 runs backwards"),
    (dict(val="last0"), "hold out at least one item"),
    (dict(seed=-1), "--seed -1: must be at least 0"),
    (dict(lr=float("nan")), "--lr nan: must be a number"),
    (dict(lr=float("inf")), "--lr inf: Adam's learning rate must be a finite number > 0"),
    (dict(lr=0.0), "--lr 0.0: Adam's learning rate must be a finite number > 0"),
    (dict(threshold=1.5), "--threshold 1.5: a membrane probability threshold lies strictly between 0 and 1"),
    (dict(threshold=0.0), "--threshold 0.0: a membrane probability"),
    (dict(steps=-5), "--steps -5: must be at least 1"),
    (dict(steps=0), "--steps 0: must be at least 1"),
    (dict(minutes=0.0), "--minutes 0.0: a run needs time to train"),
    (dict(minutes=float("nan")), "--minutes nan: must be a number"),
    (dict(steps=2.5), "--steps 2.5: must be a whole number"),
    (dict(depth=0), "--depth 0: must be at least 1 and at most 12"),
    (dict(base_width=100000), "--base-width/--depth: base_width=100000.*more than tinyunet loads"),
    (dict(augment="rotate"), "--augment 'rotate': choose one of"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(synthetic_count=1), "--synthetic-count 1: must be at least 2"),
    (dict(data="synthetic", crop=512), "--crop 512 is larger than the synthetic slices"),
    (dict(resume=True, overwrite=True), "--resume and --overwrite contradict each other"),
    (dict(data=""), "--data '': must not be empty"),
    (dict(batch=10 ** 9), r"--batch 1000000000 --crop 32 needs about \d+\.\d GB for one training step.*"
                          r"lower --batch or --crop"),
    (dict(synthetic_count=10 ** 7), r"--synthetic-count 10000000 slices of 256 pixels need 5242.9 GB"),
])
def test_every_bad_option_is_refused_before_any_work(tmp_path, changes, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_options(out, **changes))       # no dataset given: none is generated before the refusal
    assert not out.exists()                         # nothing on disk changed


@settings(max_examples=25)
@given(batch=st.integers(-10**6, 0), steps=st.integers(-10**6, 0),
       threshold=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("nan"))),
       lr=st.one_of(st.floats(max_value=0.0), st.just(float("inf")), st.just(float("nan"))))
def test_out_of_range_values_are_refused_whatever_they_are(batch, steps, threshold, lr):
    for changes in (dict(batch=batch), dict(steps=steps), dict(threshold=threshold), dict(lr=lr)):
        with pytest.raises(ValueError, match=f"--{next(iter(changes)).replace('_', '-')} "):
            check_options(tiny_options("unused", **changes))


def test_a_crop_larger_than_the_data_is_refused_before_the_run_folder_exists(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="--crop 64 is larger than the training image 'synthetic_000' "
                                         r"\(48 pixels on its short side\); use --crop 48 or less"):
        Trainer(tiny_options(tmp_path / "run", crop=64), tiny_data)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_is_kept_unless_resume_or_overwrite(tmp_path, tiny_data, quick_figures):
    Trainer(tiny_options(tmp_path, steps=2), tiny_data, log=lambda m: None).fit()
    before = (tmp_path / "checkpoint.npz").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint.npz, at step 2\): continue it with "
                                         r"--resume, replace it with --overwrite, or choose another --out"):
        Trainer(tiny_options(tmp_path, steps=1), tiny_data)
    assert (tmp_path / "checkpoint.npz").read_bytes() == before
    lines = []
    result = Trainer(tiny_options(tmp_path, steps=1, overwrite=True), tiny_data, log=lines.append).fit()
    assert result["step"] == 1 and any("--overwrite: removed the previous run's checkpoint" in line for line in lines)


def test_resume_restores_the_runs_own_options(tmp_path, tiny_data, quick_figures):
    run = tiny_options(tmp_path, steps=3, lr_schedule="cosine", lr=3e-3, crop=16, threshold=0.4)
    Trainer(run, tiny_data, log=lambda m: None).fit()
    restored = resume_options(tmp_path)                       # nothing typed: the run's own options
    assert (restored.lr, restored.crop, restored.lr_schedule, restored.steps) == (3e-3, 16, "cosine", 3)
    with pytest.raises(ValueError, match=r"--resume: --steps 9 \(the run: 3\) would change what the run computes"):
        Trainer(resume_options(tmp_path, {"steps": 9}), tiny_data)
    with pytest.raises(ValueError, match=r"--crop 32 \(the run: 16\), --lr 0.001 \(the run: 0.003\) would change"):
        Trainer(resume_options(tmp_path, {"crop": 32, "lr": 1e-3}), tiny_data)
    with pytest.raises(ValueError, match="is at step 3, which reaches --steps 3: its cosine schedule is over"):
        Trainer(resume_options(tmp_path), tiny_data)


def test_resume_reports_options_that_only_change_what_is_reported(tmp_path, tiny_data, quick_figures):
    Trainer(tiny_options(tmp_path, steps=2), tiny_data, log=lambda m: None).fit()
    with pytest.raises(ValueError, match="is at step 2, which reaches --steps 2: give a larger --steps"):
        Trainer(resume_options(tmp_path), tiny_data)
    lines = []
    trainer = Trainer(resume_options(tmp_path, {"steps": 3, "threshold": 0.6}), tiny_data, log=lines.append)
    assert trainer.step == 2
    assert "--resume: --steps 3 (the run: 2)" in lines and "--resume: --threshold 0.6 (the run: 0.5)" in lines


def test_nan_data_is_blamed_not_the_learning_rate(tmp_path):
    trainer = Trainer(tiny_options(tmp_path), synthetic_membranes(4, size=48, seed=1), log=lambda m: None)
    for image in trainer.train_set.images:       # corrupted after it was checked, e.g. by a custom augment
        image[:] = np.nan
    with pytest.raises(FloatingPointError, match="training batch holds NaN or infinite values: check the data"):
        trainer.train_step()
    trainer = Trainer(tiny_options(tmp_path / "b"), synthetic_membranes(4, size=48, seed=1), log=lambda m: None)
    trainer.model.parameters()["head.out.bias"][:] = np.nan
    with pytest.raises(FloatingPointError, match=r"the weights hold NaN or infinite values, the run diverged.*"
                                                 r"lower --lr \(now 0.001\)"):
        trainer.train_step()


def test_the_step_memory_estimate_is_the_summarys():
    from tinyunet.train import step_memory_bytes
    model = UNet(base_width=8, depth=3)
    line = next(line for line in model.summary((1, 1, 64, 64), print_fn=None).splitlines()
                if line.startswith("Training-step memory"))
    assert f"{step_memory_bytes(model, 1, 64) / 2 ** 20:,.1f} MiB =" in line
    assert step_memory_bytes(model, 3, 64) > step_memory_bytes(model, 2, 64) > step_memory_bytes(model, 1, 64)


def test_the_first_run_says_that_numba_is_compiling(tmp_path, tiny_data, monkeypatch, quick_figures):
    from tinyunet import train as train_module
    from tinyunet.kernels import cpu
    cache_file = cpu._im2col_kernel._cache._cache_file
    monkeypatch.setattr(cache_file, "_index_path", str(tmp_path / "missing.nbi"))   # a fresh install
    assert train_module.kernels_need_compiling()
    lines = []
    Trainer(tiny_options(tmp_path / "run", steps=1), tiny_data, log=lines.append).fit()
    assert lines[0].startswith("first run: Numba compiles the CPU kernels before the first steps finish")
    (tmp_path / "present.nbi").write_bytes(b"")
    monkeypatch.setattr(cache_file, "_index_path", str(tmp_path / "present.nbi"))   # compiled before
    assert not train_module.kernels_need_compiling()
    lines = []
    Trainer(tiny_options(tmp_path / "again", steps=1), tiny_data, log=lines.append).fit()
    assert not any("Numba" in line for line in lines)
