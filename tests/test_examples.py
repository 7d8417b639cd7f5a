"""The example scripts work as a person runs them: arguments in, files out, clear errors."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyunet.checkpoint import save_checkpoint
from tinyunet.unet import UNet

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
