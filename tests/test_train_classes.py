"""Training K classes and the other networks with the same loop: options, a run end to end,
resume (batch norm's running statistics too), the CPU clock, and the comparison table."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from tinyunet.data import DataError, synthetic_cells, synthetic_membranes
from tinyunet.train import CollapseWatch, OptionError, Trainer, TrainOptions, check_options

from scripts import EXAMPLES, load_example



def tiny_options(out, **changes):
    values = dict(out=str(out), base_width=4, depth=2, crop=32, batch=2, steps=4, eval_every=2,
                  checkpoint_every=2, lr=1e-3, progress=False, minutes=5.0, classes=3,
                  synthetic_count=4, synthetic_size=64)
    values.update(changes)
    return TrainOptions(**values)


@pytest.fixture
def quick_figures(monkeypatch):
    import tinyunet.plots as plots
    monkeypatch.setattr(plots, "save_curves", lambda history, path: path.touch())
    monkeypatch.setattr(plots, "save_class_montage", lambda *args: args[-1].touch())
    monkeypatch.setattr(plots, "save_montage", lambda *args: args[4].touch())


@pytest.mark.parametrize("changes, message", [
    (dict(model="fcn4s"), "--model 'fcn4s': choose one of unet, fcn32s, fcn16s, fcn8s, segnet"),
    (dict(model="segnet", classes=1), "--classes 1: segnet scores K >= 2 classes"),
    (dict(classes=0), "--classes 0: must be at least 1"),
    (dict(classes=255), "--classes 255: must be at least 1 and at most 254"),
    (dict(classes=1, class_weights="median-frequency"), "--class-weights 'median-frequency': balances"),
    (dict(class_weights="inverse"), "--class-weights 'inverse': choose one of none, median-frequency"),
    (dict(clock="gpu"), "--clock 'gpu': choose one of wall, cpu"),
    (dict(model="fcn8s", crop=48), "--crop 48 must be divisible by fcn8s's 5 poolings: 2**5 = 32 (e.g. 32)"),
    (dict(model="segnet", learn_upsampling=True), "--learn-upsampling True: only FCN has bilinear upsamplers"),
    (dict(learn_upsampling=True), "unet has none: drop --learn-upsampling or use --model fcn32s"),
])
def test_bad_model_and_class_options_are_refused_before_any_work(tmp_path, changes, message):
    options = tiny_options(tmp_path / "run", **changes)
    with pytest.raises(OptionError) as error:
        check_options(options)
    assert message in str(error.value)
    with pytest.raises(OptionError):
        Trainer(options, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_a_crop_too_small_for_fcn6_is_refused_with_the_nearest_size(tmp_path):
    with pytest.raises(OptionError, match="--crop 32 is too small for a fcn32s .* the smallest valid size: 64"):
        Trainer(tiny_options(tmp_path / "run", model="fcn32s", classes=3, crop=32), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_a_class_count_the_data_does_not_have_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"the 'synthetic' data has classes 1 .* not 4"):
        Trainer(tiny_options(tmp_path / "run", classes=4), log=lambda m: None)
    three_classes = synthetic_cells(4, size=48, seed=1)          # data given as a Dataset
    with pytest.raises(OptionError, match=r"--classes 2: the data 'synthetic' holds 3 class\(es\) \(cytoplasm, "
                                          r"membrane, mitochondrion\); give --classes 3"):
        Trainer(tiny_options(tmp_path / "run", classes=2), three_classes, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_three_classes_end_to_end(tmp_path, quick_figures):
    lines = []
    result = Trainer(tiny_options(tmp_path, class_weights="median-frequency"), log=lines.append).fit()
    assert result["step"] == 4
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    assert all(0 <= h["mean_iou"] <= 1 and h["train_loss"] > 0 for h in history)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["class_names"] == ["cytoplasm", "membrane", "mitochondrion"]
    counts = np.array(final["scores"]["confusion"]["counts"])
    assert counts.shape == (3, 3) and counts.sum() > 0
    assert set(final["scores"]["baselines"]) == {"k-means on intensity", "majority class"}
    for name in ("confusion.png", "report.txt", "checkpoint.npz"):
        assert (tmp_path / name).is_file(), name
    report = "\n".join(lines)
    assert "median-frequency class weights: cytoplasm" in report and "k-means on intensity" in report


def test_a_one_class_run_is_also_scored_as_two_classes(tmp_path, quick_figures):
    data = synthetic_membranes(4, size=48, seed=1)
    result = Trainer(tiny_options(tmp_path, classes=1), data, log=lambda m: None).fit()
    scores = result["scores"]
    # the two-class IoU of membrane is the membrane IoU of the binary scores: the same pixels
    assert scores["classes"]["iou_membrane"] == pytest.approx(scores["iou_membrane"], abs=1e-9)
    assert "mean_iou" in scores["classes"] and "k-means on intensity" in scores["baselines"]


def test_membrane_maps_train_two_class_networks(tmp_path, quick_figures):
    data = synthetic_membranes(4, size=64, seed=1)
    result = Trainer(tiny_options(tmp_path, model="fcn32s", classes=2, crop=64), data, log=lambda m: None).fit()
    assert result["step"] == 4
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["class_names"][1] == "membrane" and final["model"] == "fcn32s"


def test_learned_upsamplers_leave_bilinear_and_a_resumed_run_keeps_learning_them(tmp_path, quick_figures):
    """--learn-upsampling: the FCN's upsamplers get Adam steps (frozen, they stay bilinear), the
    checkpoint records the choice, and a resumed run restores it with the moved weights."""
    from tinyunet.checkpoint import read_checkpoint_meta
    from tinyunet.layers.convtranspose import bilinear_weight
    options = dict(model="fcn16s", crop=64, steps=2, checkpoint_every=100, eval_every=100)
    frozen = Trainer(tiny_options(tmp_path / "frozen", **options), log=lambda m: None)
    learned = Trainer(tiny_options(tmp_path / "learned", learn_upsampling=True, **options), log=lambda m: None)
    for trainer in (frozen, learned):
        trainer.fit()
    start = bilinear_weight(3, 3, (4, 4))
    np.testing.assert_array_equal(frozen.model.parameters()["upscore2.weight"], start)
    moved = learned.model.parameters()["upscore2.weight"]
    assert np.abs(moved - start).max() > 1e-4
    assert read_checkpoint_meta(tmp_path / "learned" / "checkpoint.npz")["config"]["learn_upsampling"] is True
    from tinyunet.train import resume_options
    resumed = Trainer(resume_options(str(tmp_path / "learned"), {"steps": 3}), log=lambda m: None)   # as --resume
    assert resumed.options.learn_upsampling and resumed.model.config.learn_upsampling
    np.testing.assert_array_equal(resumed.model.parameters()["upscore2.weight"], moved)
    resumed.train_step()
    assert not np.array_equal(resumed.model.parameters()["upscore2.weight"], moved)


def test_a_segnet_run_resumes_bit_identically(tmp_path):
    """Four steps straight equal two, a checkpoint, a new Trainer, two more: the weights, Adam and
    batch norm's running statistics (they are not gradients: only the checkpoint carries them)."""
    options = dict(model="segnet", crop=32, checkpoint_every=100, eval_every=100)
    straight = Trainer(tiny_options(tmp_path / "a", **options), log=lambda m: None)
    for _ in range(4):
        straight.train_step()
    first = Trainer(tiny_options(tmp_path / "b", steps=2, **options), log=lambda m: None)
    for _ in range(2):
        first.train_step()
    first.save()
    resumed = Trainer(tiny_options(tmp_path / "b", resume=True, **options), log=lambda m: None)
    for _ in range(2):
        resumed.train_step()
    for name, value in straight.model.parameters().items():
        np.testing.assert_array_equal(resumed.model.parameters()[name], value, err_msg=name)
    buffers = straight.model.buffers()
    assert buffers, "SegNet has batch-norm buffers"
    for name, value in buffers.items():
        np.testing.assert_array_equal(resumed.model.buffers()[name], value, err_msg=name)


def test_the_cpu_clock_counts_cpu_time_not_waiting(tmp_path, monkeypatch):
    """--clock cpu: a step that waits (sleeps) costs almost nothing of the budget; the wall clock
    counts the wait."""
    seconds = {}
    for clock in ("wall", "cpu"):
        trainer = Trainer(tiny_options(tmp_path / clock, clock=clock, classes=1, steps=2, eval_every=100),
                          synthetic_membranes(4, size=48, seed=1), log=lambda m: None)
        real_step = trainer.train_step

        def slow_step(real_step=real_step):
            time.sleep(0.3)
            return real_step()
        monkeypatch.setattr(trainer, "train_step", slow_step)
        trainer._loop([], type("NoInterrupt", (), {"requested": False})())
        seconds[clock] = trainer.train_seconds
    assert seconds["wall"] >= 0.6
    assert seconds["cpu"] < seconds["wall"] - 0.4


def test_collapse_to_one_of_k_classes_is_named():
    watch = CollapseWatch(patience=2)
    assert watch.check(0.9995, [], "cytoplasm") == []
    messages = watch.check(0.9999, [], "cytoplasm")
    assert len(messages) == 1 and "predicted 'cytoplasm'" in messages[0]
    assert CollapseWatch(patience=1).check(0.0005, [], "cytoplasm") == []   # K classes: only the top share


def test_the_comparison_table_is_built_from_the_runs(tmp_path, quick_figures):
    for model in ("unet", "segnet"):
        Trainer(tiny_options(tmp_path / model, model=model, crop=32, steps=2), log=lambda m: None).fit()
    Trainer(tiny_options(tmp_path / "fcn32s", model="fcn32s", crop=64, steps=2, learn_upsampling=True),
            log=lambda m: None).fit()
    done = subprocess.run([sys.executable, str(EXAMPLES / "compare_models.py"), "--report-only", "--out",
                           str(tmp_path), "--models", "unet", "segnet", "fcn8s", "fcn32s"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | classes | parameters | steps")
    assert "IoU mitochondrion" in rows[0]
    by_model = {row.split(" | ")[0][2:]: row for row in rows[1:]}
    assert set(by_model) == {"unet", "segnet", "fcn8s", "fcn32s (learned upsampling)", "k-means on intensity",
                             "majority class"}
    assert "no final.json" in by_model["fcn8s"]
    segnet = json.loads((tmp_path / "segnet" / "final.json").read_text())
    assert f"{segnet['scores']['mean_iou']:.3f}" in by_model["segnet"]


def test_the_comparison_passes_learn_upsampling_to_fcn_runs_only():
    compare = load_example("compare_models")
    args = compare.parse_args(["--learn-upsampling"])
    assert "--learn-upsampling" in compare.command(args, "fcn16s")
    assert "--learn-upsampling" not in compare.command(args, "segnet")
    assert "--learn-upsampling" not in compare.command(compare.parse_args([]), "fcn16s")


def test_a_k_class_checkpoint_predicts_labels_in_its_own_colours(tmp_path, quick_figures):
    from PIL import Image

    run = tmp_path / "run"
    Trainer(tiny_options(run, model="segnet", crop=32, steps=2), log=lambda m: None).fit()
    palette = synthetic_cells(2, size=32).palette
    image = synthetic_cells(1, size=64, seed=5).images[0]
    Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / "slice.png")
    predict = load_example("predict_membranes")
    assert predict.main([str(run / "checkpoint.npz"), str(tmp_path / "slice.png"), "--out", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "slice_labels.png") as picture:
        assert picture.mode == "P"
        labels = np.asarray(picture)
        colours = np.array(picture.getpalette()[:9]).reshape(3, 3)
    assert labels.shape == (64, 64) and set(np.unique(labels)) <= {0, 1, 2}
    np.testing.assert_array_equal(colours, palette)
    assert (tmp_path / "out" / "slice_overlay.png").is_file()
