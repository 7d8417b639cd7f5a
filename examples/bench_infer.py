"""Time and measure prediction: one forward of the exact U-Net inside tinyunet.no_grad() against
PyTorch CPU inside torch.no_grad(), side by side, and predict_membranes.py --tta per slice.

The sibling of examples/bench_unet.py (which times a training step), with its method: each
framework at each size runs in its own fresh process, so that its peak memory (the process's
maximum resident set size) is its own; one warm-up forward, then ``--steps`` timed forwards;
the report gives the median, the ratio tinyunet / PyTorch, and the peak memory. Float32, batch
1, evaluation mode (dropout off), the Keras reference U-Net (31,031,685 parameters), random
weights (the time and memory of a forward do not depend on the weights' values).

    python examples/bench_infer.py                                  # 512 and 1024, then TTA
    python examples/bench_infer.py --sizes 512 --rounds 2 --tta-slices 0
    python examples/bench_infer.py --tta-slices 6 --data ../shared/data/isbi2012/test

The TTA part runs examples/predict_membranes.py --tta, as a user would, in its own process
on the first ``--tta-slices`` PNG slices of ``--data`` with a checkpoint of random weights
written first, and reports its seconds per slice (after the imports and the model load) and
its peak resident memory. Figures: examples/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import STARTING_ENVIRONMENT, _version, available, current_rss, peak_rss  # noqa: E402

FRAMEWORKS = ("tinyunet", "torch")
# the ISBI test slices in the shared/ folder beside the repository (or above a worktree of it)
DEFAULT_DATA = next((p / "shared" / "data" / "isbi2012" / "test" for p in Path(__file__).resolve().parents
                     if (p / "shared" / "data" / "isbi2012" / "test").is_dir()), Path("shared/data/isbi2012/test"))


def tinyunet_forward_fn(size: int, batch: int):
    import numpy as np

    import tinyunet
    from tinyunet.unet import UNet

    model = UNet().eval()                               # float32, dropout off
    x = np.random.default_rng(0).random((batch, 1, size, size), dtype=np.float32)

    def forward():
        with tinyunet.no_grad():                        # keeps nothing for a backward
            model.forward(x)
    return forward


def torch_forward_fn(size: int, batch: int):
    """zhixuhao/unet's model.py in PyTorch, as examples/bench_unet.py builds it."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class KerasUNet(nn.Module):
        def __init__(self, base=64, depth=4):
            super().__init__()
            w = [base * 2 ** i for i in range(depth + 1)]
            self.down, cin = nn.ModuleList(), 1
            for i in range(depth):
                self.down.append(nn.ModuleList([nn.Conv2d(cin, w[i], 3, padding=1), nn.Conv2d(w[i], w[i], 3, padding=1)]))
                cin = w[i]
            self.bottom = nn.ModuleList([nn.Conv2d(w[-2], w[-1], 3, padding=1), nn.Conv2d(w[-1], w[-1], 3, padding=1)])
            self.up = nn.ModuleList(nn.ModuleList([nn.Conv2d(w[i + 1], w[i], 2), nn.Conv2d(2 * w[i], w[i], 3, padding=1),
                                                   nn.Conv2d(w[i], w[i], 3, padding=1)]) for i in range(depth - 1, -1, -1))
            self.head, self.out, self.drop = nn.Conv2d(base, 2, 3, padding=1), nn.Conv2d(2, 1, 1), nn.Dropout(0.5)

        def forward(self, x):
            skips = []
            for i, (c1, c2) in enumerate(self.down):
                x = F.relu(c2(F.relu(c1(x))))
                if i == len(self.down) - 1:
                    x = self.drop(x)
                skips.append(x)
                x = F.max_pool2d(x, 2)
            x = self.drop(F.relu(self.bottom[1](F.relu(self.bottom[0](x)))))
            for (upconv, c1, c2), skip in zip(self.up, reversed(skips)):
                x = F.relu(upconv(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (0, 1, 0, 1))))
                x = F.relu(c2(F.relu(c1(torch.cat([skip, x], dim=1)))))
            return self.out(F.relu(self.head(x)))

    torch.manual_seed(0)
    model = KerasUNet().eval()
    assert sum(p.numel() for p in model.parameters()) == 31_031_685
    x = torch.rand(batch, 1, size, size)

    def forward():
        with torch.no_grad():
            model(x)
    return forward


def worker(framework: str, size: int, batch: int, steps: int) -> dict:
    if framework == "tinyunet":                         # import first, so the baseline includes it
        import tinyunet.kernels
        import tinyunet.unet  # noqa: F401
        tinyunet.kernels.implementation_for(__import__("numpy").zeros(1))   # loads Numba
    else:
        import torch  # noqa: F401
    rss_start = current_rss()
    forward = (tinyunet_forward_fn if framework == "tinyunet" else torch_forward_fn)(size, batch)
    forward()                                           # warm-up: compilation, first allocations
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    return {"framework": framework, "size": size, "batch": batch, "times": times, "peak_rss": peak_rss(),
            "rss_after_imports": rss_start, "tinyunet_imported": "tinyunet" in sys.modules}


def run_worker(framework, size, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--size", str(size),
               "--batch", str(args.batch), "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True, env=STARTING_ENVIRONMENT)
    if done.returncode != 0:
        raise RuntimeError(f"the {framework} forward at {size}x{size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tta_worker(checkpoint: str, folder: str, out: str) -> dict:
    """predict_membranes.main(--tta) in this process: seconds per slice after the model load."""
    import tinyunet  # noqa: F401  (first, as the script imports it: its settings apply)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import predict_membranes
    from tinyunet.checkpoint import load_checkpoint
    load_checkpoint(checkpoint)                         # imports and Numba loaded before the clock
    slices = len(list(Path(folder).glob("*.png")))
    start = time.perf_counter()
    code = predict_membranes.main([checkpoint, folder, "--out", out, "--tta"])
    seconds = time.perf_counter() - start
    return {"code": code, "slices": slices, "seconds": seconds, "per_slice": seconds / max(slices, 1),
            "peak_rss": peak_rss()}


def run_tta(args) -> dict:
    slices = sorted(Path(args.data).glob("*.png"), key=lambda p: (len(p.stem), p.stem))[:args.tta_slices]
    if len(slices) < args.tta_slices:
        raise SystemExit(f"bench_infer: --data {args.data} has {len(slices)} PNG slices, fewer than "
                         f"--tta-slices {args.tta_slices}; point --data at a folder of slices")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "slices"
        folder.mkdir()
        for path in slices:
            shutil.copy(path, folder / path.name)
        checkpoint = Path(scratch) / "random.npz"
        made = subprocess.run([sys.executable, "-c", "import sys; from tinyunet.checkpoint import save_checkpoint; "
                               "from tinyunet.unet import UNet; "
                               "save_checkpoint(sys.argv[1], UNet(base_width=int(sys.argv[2]), seed=0))",
                               str(checkpoint), str(args.tta_base_width)],
                              capture_output=True, text=True, env=STARTING_ENVIRONMENT)
        if made.returncode != 0:
            raise RuntimeError(f"writing the random checkpoint failed:\n{made.stderr[-2000:]}")
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--tta-worker", str(checkpoint),
                               str(folder), str(Path(scratch) / "out")],
                              capture_output=True, text=True, env=STARTING_ENVIRONMENT)
        if done.returncode != 0:
            raise RuntimeError(f"predict_membranes --tta failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("framework", choices=FRAMEWORKS)
        for name in ("--size", "--batch", "--steps"):
            parser.add_argument(name, type=int, required=True)
        a = parser.parse_args(argv[1:])
        print(json.dumps(worker(a.framework, a.size, a.batch, a.steps)))
        return 0
    if argv[:1] == ["--tta-worker"]:
        print(json.dumps(tta_worker(*argv[1:4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 1024], help="forward sizes (none: only the TTA part)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed forwards per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the frameworks' processes this many times")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--tta-slices", type=int, default=6, help="slices for predict_membranes --tta (0: skip)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a folder of PNG slices for the TTA part")
    parser.add_argument("--tta-base-width", type=int, default=64, help="base width of the random-weights "
                        "checkpoint for the TTA part (64: the exact U-Net; the tests use a tiny one)")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.batch < 1 or args.tta_slices < 0:
        parser.error("--steps, --rounds and --batch must be >= 1, --tta-slices >= 0")
    frameworks = [f for f in args.frameworks if available(f)]
    print(f"# bench_infer {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {platform.processor() or platform.machine()}"
          f"  {os.cpu_count()} CPUs  python {platform.python_version()}")
    print("# " + "  ".join(f"{name} {_version(name)}" for name in ("numpy", "numba", "torch")))
    print(f"# command: python examples/bench_infer.py {' '.join(argv)}")
    results = []
    for size in args.sizes:
        pooled, peaks = {f: [] for f in frameworks}, {f: [] for f in frameworks}
        for _ in range(args.rounds):
            for framework in frameworks:
                r = run_worker(framework, size, args)
                results.append(r)
                pooled[framework] += r["times"]
                peaks[framework].append(r["peak_rss"])
        for framework in frameworks:
            times = pooled[framework]
            print(f"{framework:>8}  {size}x{size}  batch {args.batch}  forward median {1000 * statistics.median(times):8.0f} ms"
                  f"  (min {1000 * min(times):.0f}, max {1000 * max(times):.0f}, n={len(times)})"
                  f"  peak RSS {max(peaks[framework]) / 1e9:.2f} GB")
        if len(frameworks) == 2:
            ratio = statistics.median(pooled["tinyunet"]) / statistics.median(pooled["torch"])
            mem = max(peaks["tinyunet"]) / max(peaks["torch"])
            print(f"   ratio  {size}x{size}  time tinyunet/torch {ratio:.2f}x   peak RSS tinyunet/torch {mem:.2f}x")
    if args.tta_slices:
        tta = run_tta(args)
        results.append({"tta": tta})
        print(f"     tta  predict_membranes.py --tta  {tta['slices']} slices  {tta['per_slice']:.1f} s per slice"
              f"  peak RSS {tta['peak_rss'] / 1e9:.2f} GB  (random weights)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
