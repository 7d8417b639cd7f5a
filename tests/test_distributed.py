"""Data-parallel training over MPI (tinyunet/distributed.py), with 2 real ranks on loopback.

Each test launches ``mpiexec -n 2 python tests/test_distributed.py MODE DIR`` (this file is also
the program the ranks run, see ``main`` at the bottom) with a bounded timeout, then checks what
the ranks left in DIR. mpiexec is looked for next to the Python running the tests (where the
MPICH wheel of ``pip install -e ".[mpi]"`` puts it) and beside mpi4py's installation; without
mpi4py or mpiexec the tests are skipped with the reason.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
EXAMPLES = HERE.parent.parent / "examples"
TIMEOUT = 180        # seconds per launch: a hang (a rank waiting for ever) fails instead of blocking CI

# The tiny network and data every launch uses (milliseconds per step).
TINY = dict(base_width=4, depth=2, dropout=0.0, dtype="float64", seed=3)
PER_RANK_BATCH, SIZE, STEPS = 2, 16, 3


# ---------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------
def mpi_launcher() -> tuple[str, dict]:
    """(path of mpiexec, environment for the ranks), or skip saying what is missing."""
    spec = importlib.util.find_spec("mpi4py")
    if spec is None or spec.origin is None:
        pytest.skip('mpi4py is not installed: pip install -e ".[mpi]"')
    mpi_prefix = Path(spec.origin).resolve().parents[4]       # <prefix>/lib/pythonX.Y/site-packages/mpi4py
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = "1"                                       # 2 ranks on a shared machine: 1 thread each
    for folder in (Path(sys.executable).parent, mpi_prefix / "bin"):
        launcher = folder / "mpiexec"
        if launcher.is_file():
            if (mpi_prefix / "lib").is_dir() and mpi_prefix != Path(sys.prefix).resolve():
                # mpi4py looks for libmpi under sys.prefix; a venv layered on another finds it here
                env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(mpi_prefix / "lib"),
                                                                       env.get("LD_LIBRARY_PATH")]))
            return str(launcher), env
    pytest.skip(f'no mpiexec next to {sys.executable} or in {mpi_prefix / "bin"}: pip install -e ".[mpi]" '
                f"installs MPICH's")


def launch(ranks: list[list[str]], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run one mpiexec; ``ranks`` holds each program's arguments (one entry: every rank runs it,
    several: one rank each, MPMD). Kills the whole process group on timeout."""
    launcher, env = mpi_launcher()
    command = [launcher, "-n", "2", sys.executable, str(HERE), *ranks[0]]
    if len(ranks) > 1:
        command = [launcher]
        for i, arguments in enumerate(ranks):
            command += ([":"] if i else []) + ["-n", "1", sys.executable, *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"mpiexec did not finish within {timeout} s (a rank waiting for ever?):\n{output}")
    return subprocess.CompletedProcess(command, process.returncode, output, "")


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------
def reference_weights(steps: int) -> list[dict]:
    """One process, batch 2b, the same samples the two ranks drew: the weights after each step."""
    from tinyunet.losses import bce_with_logits
    from tinyunet.optim import Adam
    from tinyunet.unet import UNet
    model = UNet(**TINY)
    adam = Adam(model.parameters(), lr=1e-3)
    after = []
    for step in range(steps):
        images, targets = samples(step)
        loss, dlogits = bce_with_logits(model.forward(images), targets)
        model.backward(dlogits)
        adam.step(model.gradients())
        after.append({k: v.copy() for k, v in model.parameters().items()})
    return after


def samples(step: int):
    """The global batch of ``step``: 2 x PER_RANK_BATCH images and targets, float64."""
    rng = np.random.default_rng([11, step])
    images = rng.random((2 * PER_RANK_BATCH, 1, SIZE, SIZE))
    targets = (rng.random((2 * PER_RANK_BATCH, 1, SIZE, SIZE)) > 0.7).astype(np.float64)
    return images, targets


def test_two_ranks_step_for_step_equal_one_process_with_the_doubled_batch(tmp_path):
    """P = 2 ranks with batch b each == P = 1 with batch 2b, to 1e-12 in float64, every step;
    and in the same launch: a rank that fails stops both, naming it; configurations that
    differ are refused, naming the rank and the option."""
    result = launch([["library", str(tmp_path)]])
    assert result.returncode == 0, result.stdout
    expected = reference_weights(STEPS)
    for step in range(STEPS):
        with np.load(tmp_path / f"weights_{step}.npz") as saved:
            assert sorted(saved.files) == sorted(expected[step])
            worst = max(float(np.abs(saved[k] - v).max()) for k, v in expected[step].items())
            moved = max(float(np.abs(v - w).max()) for (k, v), w in
                        zip(expected[step].items(), (expected[step - 1] if step else reference_start()).values()))
            assert worst <= 1e-12, f"step {step + 1}: the 2-rank weights differ from 1 process's by {worst}"
            assert moved > 1e-4                      # the weights did move: the comparison means something
    for rank in (0, 1):
        failed = (tmp_path / f"failed_{rank}.txt").read_text()
        assert "rank 1 failed: ValueError: this rank's crop was bad" in failed and "Every rank stops" in failed
        mismatch = (tmp_path / f"mismatch_{rank}.txt").read_text()
        assert "rank 1: batch = 3 (rank 0: 2)" in mismatch and "lr" not in mismatch


def reference_start() -> dict:
    from tinyunet.unet import UNet
    return {k: v.copy() for k, v in UNet(**TINY).parameters().items()}


def test_training_on_two_ranks_writes_from_rank_0_only_and_resumes_identically(tmp_path):
    """train_membranes.py under mpiexec: 4 steps straight equal 2 steps + --resume to 4, bit for
    bit (every rank's generators are in the checkpoint); rank 1 opens nothing for writing."""
    result = launch([["train", str(tmp_path)]])
    assert result.returncode == 0, result.stdout
    from tinyunet.checkpoint import read_checkpoint
    meta_a, arrays_a = read_checkpoint(tmp_path / "runs" / "straight" / "checkpoint.npz")
    meta_b, arrays_b = read_checkpoint(tmp_path / "runs" / "resumed" / "checkpoint.npz")
    assert meta_a["step"] == meta_b["step"] == 4
    for name, value in arrays_a.items():
        np.testing.assert_array_equal(arrays_b[name], value, err_msg=name)
    ranks = meta_a["extra"]["ranks"]
    assert len(ranks) == 2 and ranks == meta_b["extra"]["ranks"]
    assert ranks[0]["batches"] != ranks[1]["batches"]          # each rank drew its own samples
    assert ranks[0]["dropout"] != ranks[1]["dropout"]
    writes = [json.loads((tmp_path / f"writes_{rank}.json").read_text()) for rank in (0, 1)]
    assert writes[1] == [], f"rank 1 wrote into the run folders: {writes[1][:5]}"
    assert any("checkpoint.npz" in w for w in writes[0])     # the watch does see rank 0's writes
    assert result.stdout.count("resumed from") == 1            # rank 0 alone logs
    assert result.stdout.count("Otsu threshold") == 3          # one final report per run, not two


def test_ranks_started_with_different_options_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    common = ["--base-width", "4", "--depth", "2", "--crop", "32", "--steps", "2", "--synthetic-count", "4",
              "--no-progress", "--out", str(out)]
    script = str(EXAMPLES / "train_membranes.py")
    result = launch([[script, *common, "--batch", "2"], [script, *common, "--batch", "1"]])
    assert result.returncode != 0
    assert "rank 1: batch = 1 (rank 0: 2)" in result.stdout, result.stdout
    assert not out.exists()


def test_a_rank_that_fails_outside_a_step_stops_every_rank_naming_itself(tmp_path):
    """Rank 1 cannot find its data (rank 0 can): rank 0 would wait for ever in the first
    collective; instead every rank stops, naming rank 1 and its error."""
    common = ["--base-width", "4", "--depth", "2", "--crop", "32", "--steps", "2", "--synthetic-count", "4",
              "--no-progress", "--out", str(tmp_path / "run")]
    script = str(EXAMPLES / "train_membranes.py")
    result = launch([[script, *common], [script, *common, "--data", str(tmp_path / "missing")]], timeout=120)
    assert result.returncode != 0
    assert result.stdout.count("rank 1 failed: ") == 1 and "missing" in result.stdout, result.stdout
    assert not (tmp_path / "run").exists()


def test_ranks_that_refuse_alike_say_it_once_as_one_process_would(tmp_path):
    """A folder that holds a run, under mpiexec: every rank refuses; rank 0 says it once, exit 2."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.npz").write_bytes(b"not read")
    common = ["--base-width", "4", "--depth", "2", "--crop", "32", "--steps", "2", "--synthetic-count", "4",
              "--no-progress", "--out", str(tmp_path / "run")]
    script = str(EXAMPLES / "train_membranes.py")
    result = launch([[script, *common], [script, *common]], timeout=120)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count("already holds a run") == 1 and "Abort" not in result.stdout, result.stdout


def test_resuming_on_another_number_of_ranks_says_what_continues():
    """No MPI needed: rank states saved by 2 ranks, restored on 1 and on 3."""
    from tinyunet import distributed
    from tinyunet.unet import UNet
    model = UNet(base_width=2, depth=2, seed=0)
    saved = []
    for rank in range(2):
        rng = distributed.seed_rank_streams(7, rank, model)
        rng.random(5)                                              # the streams moved on
        saved.append(distributed.rank_states(rng, model))
    lines = []
    rng = np.random.default_rng(0)
    distributed.restore_rank_streams(saved, 1, 3, 7, 40, rng, model, lines.append)
    assert rng.bit_generator.state == saved[1]["batches"] and lines == []     # only rank 0 talks
    distributed.restore_rank_streams(saved, 2, 3, 7, 40, rng, model, lines.append)
    fresh = distributed.seed_rank_streams(7, 2, UNet(base_width=2, depth=2, seed=0), step=40)
    assert rng.bit_generator.state == fresh.bit_generator.state                # a new rank: a new stream
    distributed.restore_rank_streams(saved, 0, 1, 7, 40, rng, model, lines.append)
    assert rng.bit_generator.state == saved[0]["batches"]
    assert "written by 2 rank(s) on 1" in lines[0] and "not the run 2 rank(s) would have continued" in lines[0]


def test_mpiexec_without_mpi4py_is_one_clear_line(monkeypatch):
    from tinyunet import distributed
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)        # import mpi4py now fails
    with pytest.raises(distributed.MPIUnavailableError, match=r'pip install -e "\.\[mpi\]"'):
        distributed.world()


def test_one_process_imports_nothing_of_mpi():
    code = ("import sys; from tinyunet import distributed; from tinyunet.train import Trainer; "
            "assert distributed.world() is None; assert 'mpi4py' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_", "PMIX_"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------------------------------------
# what each rank runs
# ---------------------------------------------------------------------------------------------
def rank_library(out: Path) -> None:
    """Rank r trains on its half of each global batch; averages with Communicator.average_gradients."""
    from tinyunet import distributed
    from tinyunet.losses import bce_with_logits
    from tinyunet.optim import Adam
    from tinyunet.unet import UNet
    comm = distributed.world()
    assert comm is not None and comm.size == 2
    model = UNet(**TINY)
    adam = Adam(model.parameters(), lr=1e-3)
    mine = slice(comm.rank * PER_RANK_BATCH, (comm.rank + 1) * PER_RANK_BATCH)
    for step in range(STEPS):
        images, targets = samples(step)
        loss, dlogits = bce_with_logits(model.forward(images[mine]), targets[mine])
        model.backward(dlogits)
        grads, loss = comm.average_gradients(model.gradients(), loss, step=step + 1)
        adam.step(grads)
        if comm.is_root:
            np.savez(out / f"weights_{step}.npz", **model.parameters())
    failure = ValueError("this rank's crop was bad") if comm.rank == 1 else None
    try:
        comm.average_gradients(model.gradients(), 0.0, failure, step=STEPS + 1)
    except distributed.RankFailedError as error:
        (out / f"failed_{comm.rank}.txt").write_text(str(error))
    try:
        comm.check_same({"batch": 2 + comm.rank, "lr": 1e-3})
    except distributed.ConfigMismatchError as error:
        (out / f"mismatch_{comm.rank}.txt").write_text(str(error))


def rank_train(out: Path) -> None:
    """train_membranes.py three times: 4 steps straight; 2 steps; --resume to 4. Every write
    this rank opens under out/runs is recorded (a Python audit hook)."""
    from scripts import load_example                   # tests/ is sys.path[0] in a rank
    example = load_example("train_membranes")
    runs = (out / "runs").resolve()
    writes = []

    def watch(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = (args[1] or ""), (args[2] or 0)
            writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and str(os.fsdecode(args[0])).startswith(str(runs)):
                writes.append(os.fsdecode(args[0]))
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove") and args:
            if str(os.fsdecode(args[0])).startswith(str(runs)):
                writes.append(f"{event} {os.fsdecode(args[0])}")

    sys.addaudithook(watch)
    common = ["--base-width", "4", "--depth", "2", "--crop", "32", "--batch", "1", "--synthetic-count", "6",
              "--eval-every", "2", "--checkpoint-every", "2", "--lr", "1e-3", "--no-progress", "--seed", "5"]
    assert example.main(common + ["--steps", "4", "--out", str(runs / "straight")]) == 0
    assert example.main(common + ["--steps", "2", "--out", str(runs / "resumed")]) == 0
    assert example.main(common + ["--steps", "4", "--out", str(runs / "resumed"), "--resume"]) == 0
    from tinyunet import distributed
    rank = distributed.world().rank
    (out / f"writes_{rank}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    {"library": rank_library, "train": rank_train}[mode](folder)
