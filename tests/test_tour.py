"""The backprop tour (tinyunet/tour.py, examples/backprop_tour.py) runs on a tiny U-Net and
prints what it promises: every layer's formulas and relative errors below 1e-6, the traced
table, the skip gradients, the weight-gradient table and PNG, the dead-ReLU check with its
advice when the head is dead, and the loss before and after the step.
"""
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyunet.backend import gpu_available
from tinyunet.tour import LAYER_TOURS, PNG_NAME, main, synthetic_batch, unet_step
from tinyunet.unet import UNet

TINY = ["--base-width", "4", "--depth", "2", "--size", "16"]
ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"conv": "== Conv2d", "pool": "== MaxPool2d", "upsample": "== Upsample2d", "concat": "== Concat",
           "crop": "== CenterCrop2d", "dropout": "== Dropout", "relu": "== ReLU", "sigmoid": "== Sigmoid",
           "bce": "== BCE with logits"}
# gradients compared per layer type: conv x, W, b; concat skip, up; the others their input
COMPARED = {"conv": 3, "pool": 1, "upsample": 1, "concat": 2, "crop": 1, "dropout": 1, "relu": 1,
            "sigmoid": 1, "bce": 1}


def relative_errors(text):
    return [float(v) for v in re.findall(r"relative error (\S+)", text)]


def assert_valid_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "a temporary file was left"


def test_tour_on_a_tiny_unet_prints_and_writes_everything(capsys, tmp_path):
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out

    # part 1: every layer type, its formulas, analytic beside numerical, errors below 1e-6
    assert set(HEADERS) == set(LAYER_TOURS)
    for header in HEADERS.values():
        assert header in out
    for formula in ("dx = col2im(W2^T @ dY)", "dW2 = sum_n dY[n] @ cols[n]^T", "dx = dy at each window's argmax",
                    "dx = dy * mask", "dx = dy * [x > 0]", "dx = dy * y * (1 - y)",
                    "max(z, 0) - z t + log(1 + exp(-|z|))", "p - t", "dskip = dy[:, :C1]"):
        assert formula in out, formula
    errors = relative_errors(out)
    assert len(errors) == sum(COMPARED.values())
    assert out.count("analytic") == out.count("numerical  [") == len(errors)
    assert max(errors) < 1e-6
    assigning = float(re.search(r"ASSIGNS.*relative (\S+)", out).group(1))
    assert assigning > 0.1, "the assigning col2im must be visibly wrong"
    assert "8 nonzero elements out of 32, one per window" in out

    # part 2: the traced table has a row for every layer, with its output shape
    model = UNet(base_width=4, depth=2)
    for name, _, _, shape in model.layer_shapes((1, 1, 16, 16)):
        assert re.search(rf"^{re.escape(name)}\s+\w+\s+{re.escape(str(shape))}", out, re.M), name
    skip_rows = re.findall(r"^\s+(\d)\s+\(1, \d+, \d+, \d+\)\s+(\S+)\s+(\S+)\s+(\S+)\s+([+-]\d\.\d+)$", out, re.M)
    assert [row[0] for row in skip_rows] == ["1", "2"]
    for _, via_skip, via_pool, total, cosine in skip_rows:
        assert float(total) <= float(via_skip) + float(via_pool) * (1 + 1e-3)      # triangle inequality
        assert -1 <= float(cosine) <= 1
    for name in (n for n in model.layers if n.split(".")[1].startswith(("conv", "upconv", "out"))):
        assert re.search(rf"^{re.escape(name)}\s+\(\d+, \d+, \d, \d\)\s+\S+e[+-]\d+\s+\S+e[+-]\d+", out, re.M), name
    assert "Dead ReLUs" in out and "head.relu, the 2-channel ReLU before the last 1x1 conv" in out
    assert re.search(r"channel 0 zero at [\d.]+% of pixels, channel 1 zero at [\d.]+% of pixels", out)
    loss = re.search(r"loss before (\S+)\s+after (\S+)", out)
    assert loss and all(np.isfinite(float(v)) for v in loss.groups())
    assert "Tour finished in" in out
    assert_valid_png(tmp_path / PNG_NAME)


def force_head(model, biases):
    model.layers["head.conv"].params["bias"][...] = np.asarray(biases, dtype=model.dtype)


@pytest.mark.parametrize("biases, dead", [((-1e3, 0.0), [0]), ((-1e3, -1e3), [0, 1])])
def test_a_dead_head_channel_is_detected_and_the_fix_is_printed(capsys, tmp_path, biases, dead):
    model = UNet(base_width=4, depth=2)
    force_head(model, biases)           # head.conv's output far below 0: its ReLU is 0 everywhere
    x, target = synthetic_batch(model, 1, 16)
    report = unet_step(model, x, target, out_dir=tmp_path)
    out = capsys.readouterr().out
    assert report.dead_head_channels == dead
    assert "DEAD HEAD" in out and "can move only one way" in out
    assert "UNetConfig(head_relu=False)" in out and "--no-head-relu" in out
    assert "different --seed" in out and "lower the learning rate" in out
    assert "channel 0 zero at 100.0% of pixels" in out
    if dead == [0, 1]:                  # nothing below the head gets a gradient: zeros, still a PNG
        assert re.search(r"^down1\.conv1\s+\S+.*\s0\.000e\+00", out, re.M)
        assert report.loss_after == pytest.approx(report.loss_before, abs=1e-3)
    assert_valid_png(tmp_path / PNG_NAME)


def test_a_live_head_is_not_called_dead(capsys, tmp_path):
    model = UNet(base_width=4, depth=2)
    force_head(model, (10.0, 10.0))     # head.conv's output far above 0: no zeros at all
    x, target = synthetic_batch(model, 1, 16)
    assert unet_step(model, x, target, out_dir=tmp_path).dead_head_channels == []
    out = capsys.readouterr().out
    assert "DEAD HEAD" not in out and "the head is fine" in out


def test_without_a_head_relu_and_unpadded(capsys, tmp_path):
    assert main(TINY + ["--layer", "none", "--no-head-relu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Part 1" not in out and "UNetConfig(head_relu=False)" in out and "DEAD HEAD" not in out
    assert main(["--base-width", "2", "--depth", "2", "--size", "44", "--padding", "valid",
                 "--layer", "none", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "up1.crop" in out and "single 1x1 conv" in out
    assert re.search(r"^\s+2\s+\(1, 4, 16, 16\)", out, re.M)      # level 2's skip, before its crop


def test_one_layer_only(capsys):
    assert main(["--layer", "pool", "--no-step"]) == 0
    out = capsys.readouterr().out
    assert "== MaxPool2d" in out and "== Conv2d" not in out and "Part 2" not in out
    assert len(relative_errors(out)) == 1


def test_bad_size_and_missing_gpu_say_what_to_do(capsys):
    assert main(TINY[:4] + ["--size", "18"]) == 2
    err = capsys.readouterr().err
    assert "backprop_tour: error" in err and "Nearest valid sizes: 16 or 20" in err
    if not gpu_available():
        assert main(TINY + ["--device", "gpu"]) == 2
        assert "GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--layer", "softmax"])


def test_the_example_script_runs_the_tour(monkeypatch, capsys, tmp_path):
    script = ROOT / "examples" / "backprop_tour.py"
    monkeypatch.setattr(sys, "argv", [str(script)] + TINY + ["--layer", "relu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    assert "== ReLU" in capsys.readouterr().out
    assert_valid_png(tmp_path / PNG_NAME)


@pytest.mark.gpu
def test_tour_on_the_gpu(capsys, tmp_path):
    assert main(TINY + ["--device", "gpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert max(relative_errors(out)) < 1e-6 and "gpu)" in out
    assert_valid_png(tmp_path / PNG_NAME)
