"""The example scripts work as a person runs them: arguments in, files out, clear errors."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinyunet.checkpoint import save_checkpoint
from tinyunet.unet import UNet

from scripts import EXAMPLES, load_example


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.npz"
    save_checkpoint(path, UNet(base_width=4, depth=2, dropout=0.0, seed=0))
    return path


def test_train_membranes_command_line(tmp_path, capsys):
    train = load_example("train_membranes")
    code = train.main(["--base-width", "4", "--depth", "2", "--crop", "32", "--steps", "2", "--eval-every", "2",
                       "--synthetic-count", "3", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert (tmp_path / "montage.png").is_file() and (tmp_path / "checkpoint.npz").is_file()
    assert "Otsu threshold" in capsys.readouterr().out


def test_train_membranes_bad_data_is_a_clear_error(tmp_path, capsys):
    train = load_example("train_membranes")
    assert train.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_membranes_on_a_folder_a_stack_and_a_file(tmp_path, tiny_checkpoint):
    predict = load_example("predict_membranes")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pages = [Image.fromarray((rng.random((20, 28)) * 255).astype(np.uint8)) for _ in range(2)]
    pages[0].save(folder / "a.png")
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    out = tmp_path / "out"
    assert predict.main([str(tiny_checkpoint), str(folder), str(tmp_path / "stack.tif"),
                         str(folder / "a.png"), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 9 and "a_prob.png" in written
    with Image.open(out / "a_mask.png") as mask:
        assert mask.size == (28, 20)


def test_predict_membranes_errors(tmp_path, tiny_checkpoint, capsys):
    predict = load_example("predict_membranes")
    assert predict.main([str(tmp_path / "none.npz"), str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert predict.main([str(tiny_checkpoint), str(tmp_path / "nothing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_unet_refuses_an_unknown_conv_method(capsys):
    bench = load_example("bench_unet")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--conv-method", "fft"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fft'" in err and "winograd" in err


def test_bench_unet_times_pytorch_without_tinyunet_in_its_process():
    """The PyTorch worker must not import tinyunet: its import would count in PyTorch's memory
    and its OMP_WAIT_POLICY would change how PyTorch's OpenMP threads wait."""
    pytest.importorskip("torch")
    bench = load_example("bench_unet")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, bench.__file__, "--worker", "torch", "--size", "16", "--batch", "1",
                           "--steps", "1", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tinyunet_imported"] is False and result["omp_wait_policy"] is None
    assert len(result["times"]) == 1 and result["peak_rss"] > 0


def test_bench_unet_runs_both_frameworks_and_reports_the_ratio(capsys):
    frameworks = ["tinyunet", "torch"] if importlib.util.find_spec("torch") else ["tinyunet"]
    bench = load_example("bench_unet")
    assert bench.main(["--sizes", "16", "--steps", "1", "--batch", "1", "--frameworks", *frameworks]) == 0
    out = capsys.readouterr().out
    assert "tinyunet  16x16  batch 1  median" in out
    assert "OPENBLAS_THREAD_TIMEOUT=" in out and "OPENBLAS_CORETYPE=" in out
    if len(frameworks) == 2:
        assert "ratio  16x16  time tinyunet/torch" in out


# ------------------------------------------------------------ bad input: one line, exit 2

TINY = ["--base-width", "4", "--depth", "2", "--crop", "32", "--steps", "2", "--eval-every", "2",
        "--synthetic-count", "3", "--no-progress"]


@pytest.mark.parametrize("arguments, message", [
    (["--eval-every", "0"], "--eval-every 0: must be at least 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0: must be at least 1"),
    (["--batch", "-1"], "--batch -1: must be at least 1"),
    (["--crop", "-32"], "--crop -32: must be at least"),
    (["--val", "abc"], "--val 'abc': give validation items as"),
    (["--seed", "-1"], "--seed -1: must be at least 0"),
    (["--lr", "nan"], "--lr nan: must be a number"),
    (["--threshold", "1.5"], "--threshold 1.5: a membrane probability threshold lies strictly between 0 and 1"),
    (["--minutes", "0"], "--minutes 0.0: a run needs time to train"),
    (["--steps", "-5"], "--steps -5: must be at least 1"),
    (["--threads", "-1"], "--threads -1: give at least 1"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
])
def test_train_membranes_refuses_bad_options_in_one_line(tmp_path, capsys, arguments, message):
    train = load_example("train_membranes")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) if arguments[0] == "--threads" else _no_exit() as stop:
        code = train.main(TINY + ["--out", str(out)] + arguments)
    code = stop.value.code if arguments[0] == "--threads" else code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()                                                  # nothing was written


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_train_membranes_keeps_a_run_and_resumes_it_with_its_own_options(tmp_path, capsys):
    train = load_example("train_membranes")
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--out", out, "--lr-schedule", "cosine", "--lr", "0.002"]) == 0
    before = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    capsys.readouterr()
    assert train.main(TINY + ["--out", out]) == 2                          # the README's command, twice
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint.npz, at step 2)" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == before
    assert train.main(["--out", out, "--resume", "--steps", "4"]) == 2      # the cosine's length is the run's
    assert "--steps 4 (the run: 2) would change what the run computes" in capsys.readouterr().err
    assert train.main(["--out", out, "--resume", "--lr", "0.002"]) == 2     # the run's own lr: only the end is hit
    assert "is at step 2, which reaches --steps 2: its cosine schedule is over" in capsys.readouterr().err
    assert train.main(TINY + ["--out", out, "--overwrite", "--steps", "1"]) == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["step"] == 1


def test_predict_membranes_refuses_colliding_names(tmp_path, tiny_checkpoint, capsys):
    predict = load_example("predict_membranes")
    for folder, value in (("a", 0), ("b", 255)):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((20, 20), value, np.uint8)).save(tmp_path / folder / "x.png")
    out = tmp_path / "out"
    assert predict.main([str(tiny_checkpoint), str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                         "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"two inputs would write the same files {out / 'x'}_*.png: {tmp_path / 'a' / 'x.png'} and " \
           f"{tmp_path / 'b' / 'x.png'}" in err
    assert not out.exists()
    assert predict.main([str(tiny_checkpoint), str(tmp_path / "a" / "x.png"), str(tmp_path / "a"),
                         "--out", str(out)]) == 0                 # the same image twice: predicted once
    assert "wrote 3 files for 1 images" in capsys.readouterr().out


def test_predict_membranes_bad_checkpoint_and_options(tmp_path, tiny_checkpoint, capsys):
    predict = load_example("predict_membranes")
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(picture)
    assert predict.main([str(picture), str(picture)]) == 2
    err = capsys.readouterr().err
    assert "is not a tinyunet checkpoint (it is a PNG image, not a .npz archive)" in err and "pickle" not in err
    for option, value, message in (("--threshold", "1.5", "1.5 is outside (0, 1)"), ("--margin", "-40", "-40 is outside [0, inf]"),
                                   ("--tile", "abc", "'abc' is not a whole number")):
        with pytest.raises(SystemExit) as stop:
            predict.main([str(tiny_checkpoint), str(picture), option, value])
        assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("image, message", [
    (np.full((16, 16), 200, np.uint8), r"the image is uint8 \(0..255\); give floats in \[0, 1\]: divide by 255"),
    (np.full((16, 16), np.nan, np.float32), "256 pixels of the image are NaN or infinite"),
    (np.full((16, 16), 3.0), r"image values run from 3 to 3; give values in \[0, 1\]"),
    (np.zeros((2, 16, 16)), r"expected one \(H, W\) grey image, got shape \(2, 16, 16\)"),
])
def test_predict_probability_refuses_bad_input(image, message):
    from tinyunet.infer import predict_probability
    with pytest.raises(ValueError, match=message):
        predict_probability(UNet(base_width=4, depth=2, dropout=0.0), image)
    with pytest.raises(ValueError, match="margin must be a whole number >= 0, got -40"):
        predict_probability(UNet(base_width=4, depth=2, dropout=0.0), np.zeros((16, 16)), margin=-40)
