"""Time one training step of the exact U-Net, tinyunet against PyTorch, side by side.

One step = forward, binary cross-entropy from the logits, backward, Adam, in float32, for the
Keras reference U-Net (31,031,685 parameters). Each framework at each size runs in its own
fresh process, so that its peak memory (the process's maximum resident set size, from
resource.getrusage) is its own and nothing of the other stays cached. Each process does one
warm-up step (Numba compiles, allocators settle), then times ``--steps`` steps; the report
gives the median, the ratio tinyunet / PyTorch, and the peak memory.

    python examples/bench_unet.py                         # 256x256 and 128x128, batch 2, CPU
    python examples/bench_unet.py --sizes 128 --steps 3 --rounds 2
    python examples/bench_unet.py --device gpu            # CuPy against PyTorch with cuDNN

``--rounds R`` alternates tinyunet and PyTorch processes R times per size and pools their
step times: on a shared, noisy machine that spreads the noise over both.

On the GPU (``--device gpu``):
* memory is each framework's GPU memory pool at its PEAK over the warm-up step: the bytes in
  use by arrays (CuPy's pool through tinyunet.backend.GpuMemoryPeak; PyTorch's
  max_memory_allocated) and the bytes the pool held (max_memory_reserved), not what is held at
  the end; the host RSS is printed but not compared (it measures the host side only);
* float32 on both sides and TF32 OFF on both: PyTorch's matmul and cuDNN convolutions would
  use TF32 by default, CuPy's GEMMs only with CUPY_TF32=1 (the workers get CUPY_TF32=0);
  cuDNN's benchmark mode is on (it picks the fastest algorithm for each shape);
* every clock read follows a synchronisation of the device (the launches are asynchronous).
Figures: examples/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

FRAMEWORKS = ("tinyunet", "torch")

# The environment this command started with, before anything imported tinyunet (whose import
# sets OMP_WAIT_POLICY for its own process). Each worker gets this one, so that PyTorch runs
# exactly as it would for the user, under no setting of tinyunet's.
STARTING_ENVIRONMENT = dict(os.environ)


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss() -> int:
    """The process's maximum resident set size so far, in bytes (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------------------------------------
# tinyunet
# ---------------------------------------------------------------------------------------------
def tinyunet_step_fn(size: int, batch: int, device: str):
    import numpy as np

    from tinyunet.backend import synchronize, to_device
    from tinyunet.losses import bce_with_logits
    from tinyunet.optim import Adam
    from tinyunet.unet import UNet

    model = UNet().to(device)                       # float32, dropout 0.5, training mode
    optimizer = Adam(model.parameters())            # after .to(): it updates these arrays
    rng = np.random.default_rng(0)
    x = to_device(rng.random((batch, 1, size, size), dtype=np.float32), device)
    target = to_device((rng.random((batch, 1, size, size)) > 0.5).astype(np.float32), device)

    def step():
        _, dlogits = bce_with_logits(model.forward(x), target)
        model.backward(dlogits)
        optimizer.step(model.gradients())

    def sync():
        synchronize(x)

    def measured_step() -> dict:
        """One step with CuPy's pool watched (not timed: the watch costs a call per allocation)."""
        from tinyunet.backend import GpuMemoryPeak
        with GpuMemoryPeak() as peak:
            step()
            sync()
        return {"gpu_peak_used": peak.peak_used, "gpu_peak_held": peak.peak_held}
    return step, sync, (measured_step if device == "gpu" else None)


def torch_fp32_exact(torch) -> dict:
    """TF32 off for PyTorch's matmul and cuDNN convolutions, cuDNN's benchmark mode on; returns
    the settings as they are afterwards, for the report."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("highest")
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


# ---------------------------------------------------------------------------------------------
# PyTorch: the same network (zhixuhao/unet's model.py), written for the benchmark
# ---------------------------------------------------------------------------------------------
def torch_step_fn(size: int, batch: int, device: str):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class KerasUNet(nn.Module):
        def __init__(self, base=64, depth=4):
            super().__init__()
            w = [base * 2 ** i for i in range(depth + 1)]
            self.down = nn.ModuleList()
            cin = 1
            for i in range(depth):
                self.down.append(nn.ModuleList([nn.Conv2d(cin, w[i], 3, padding=1), nn.Conv2d(w[i], w[i], 3, padding=1)]))
                cin = w[i]
            self.bottom = nn.ModuleList([nn.Conv2d(w[-2], w[-1], 3, padding=1), nn.Conv2d(w[-1], w[-1], 3, padding=1)])
            self.up = nn.ModuleList()
            for i in range(depth - 1, -1, -1):
                self.up.append(nn.ModuleList([nn.Conv2d(w[i + 1], w[i], 2), nn.Conv2d(2 * w[i], w[i], 3, padding=1),
                                              nn.Conv2d(w[i], w[i], 3, padding=1)]))
            self.head = nn.Conv2d(base, 2, 3, padding=1)
            self.out = nn.Conv2d(2, 1, 1)
            self.drop = nn.Dropout(0.5)

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

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    if device == "gpu":
        torch_fp32_exact(torch)
    torch.manual_seed(0)
    model = KerasUNet().to(dev).train()
    assert sum(p.numel() for p in model.parameters()) == 31_031_685
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)
    x = torch.rand(batch, 1, size, size, device=dev)
    target = (torch.rand(batch, 1, size, size, device=dev) > 0.5).float()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x), target)
        loss.backward()
        optimizer.step()

    def sync():
        if device == "gpu":
            torch.cuda.synchronize()

    def measured_step() -> dict:
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        return {"gpu_peak_used": torch.cuda.max_memory_allocated(), "gpu_peak_held": torch.cuda.max_memory_reserved()}
    return step, sync, (measured_step if device == "gpu" else None)


# ---------------------------------------------------------------------------------------------
# one framework, one size, in this process
# ---------------------------------------------------------------------------------------------
def worker(framework: str, size: int, batch: int, steps: int, device: str, conv_method: str = "auto") -> dict:
    make = tinyunet_step_fn if framework == "tinyunet" else torch_step_fn
    if framework == "tinyunet":                     # import first, so the baseline includes it
        import tinyunet.kernels
        import tinyunet.unet  # noqa: F401
        from tinyunet.layers import conv
        conv.use_method(conv_method)
        tinyunet.kernels.implementation_for(__import__("numpy").zeros(1))   # loads Numba
    else:
        import torch  # noqa: F401
    rss_start = current_rss()
    step, sync, measured_step = make(size, batch, device)
    rss_model = current_rss()
    gpu = {}
    if measured_step is not None:
        gpu = measured_step()                       # warm-up, with the GPU memory pool watched
    else:
        step()                                      # warm-up: compilation, first allocations
    times = []
    for _ in range(steps):
        sync()                                      # the clock starts on an idle device ...
        start = time.perf_counter()
        step()
        sync()                                      # ... and stops when the step's work is done
        times.append(time.perf_counter() - start)
    result = {"framework": framework, "size": size, "batch": batch, "device": device, "times": times,
              "peak_rss": peak_rss(), "rss_after_imports": rss_start, "rss_after_model": rss_model,
              "tinyunet_imported": "tinyunet" in sys.modules,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), **gpu}
    if device == "gpu":
        result.update(gpu_settings(framework))
    return result


def gpu_settings(framework: str) -> dict:
    """The card's name and the float32 settings this worker ran with, for the report."""
    if framework == "torch":
        import torch
        return {"gpu_name": torch.cuda.get_device_name(), "tf32": torch_fp32_exact(torch)}
    import cupy
    return {"gpu_name": cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode(),
            "tf32": {"CUPY_TF32": os.environ.get("CUPY_TF32", "unset (off)")}}


def run_worker(framework, size, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--size", str(size),
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
               "--conv-method", args.conv_method]
    # CUPY_TF32=0: CuPy's float32 GEMMs stay float32 (PyTorch's side: torch_fp32_exact)
    done = subprocess.run(command, capture_output=True, text=True, env={**STARTING_ENVIRONMENT, "CUPY_TF32": "0"})
    if done.returncode != 0:
        raise RuntimeError(f"the {framework} benchmark at {size}x{size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_lines(size: int, batch: int, device: str, pooled: dict, runs: dict) -> list[str]:
    """The printed lines for one size: per framework the median step time and its peak memory,
    then the ratios tinyunet / PyTorch. pooled: {framework: [step seconds]}; runs: {framework:
    [worker results]}. On the GPU the memory compared is the GPU pool's peak (in use, and
    held); the host RSS is shown for information and never compared."""
    lines = []
    for framework, times in pooled.items():
        peak = max(runs[framework], key=lambda r: r["peak_rss"])
        line = (f"{framework:>8}  {size}x{size}  batch {batch}  median {1000 * statistics.median(times):8.1f} ms"
                f"  (min {1000 * min(times):.1f}, max {1000 * max(times):.1f}, n={len(times)})")
        if device == "gpu":
            used = max(r["gpu_peak_used"] for r in runs[framework])
            held = max(r["gpu_peak_held"] for r in runs[framework])
            line += (f"  GPU peak {used / 1e9:.2f} GB in use, {held / 1e9:.2f} GB held by the pool"
                     f"  (host RSS {peak['peak_rss'] / 1e9:.2f} GB, not compared)")
        else:
            line += (f"  peak RSS {peak['peak_rss'] / 1e9:.2f} GB"
                     f" (+{(peak['peak_rss'] - peak['rss_after_imports']) / 1e9:.2f} GB over imports)")
        lines.append(line)
    if "tinyunet" in pooled and "torch" in pooled:
        ratio = statistics.median(pooled["tinyunet"]) / statistics.median(pooled["torch"])
        if device == "gpu":
            def most(framework, key):
                return max(r[key] for r in runs[framework])
            memory = (f"GPU peak in use tinyunet/torch {most('tinyunet', 'gpu_peak_used') / most('torch', 'gpu_peak_used'):.2f}x"
                      f", held {most('tinyunet', 'gpu_peak_held') / most('torch', 'gpu_peak_held'):.2f}x")
        else:
            memory = (f"peak RSS tinyunet/torch "
                      f"{max(r['peak_rss'] for r in runs['tinyunet']) / max(r['peak_rss'] for r in runs['torch']):.2f}x")
        lines.append(f"   ratio  {size}x{size}  time tinyunet/torch {ratio:.2f}x   {memory}")
    if device == "gpu":
        settings = {framework: (runs[framework][0].get("gpu_name"), runs[framework][0].get("tf32")) for framework in runs}
        lines.append("   GPU and float32 settings: " + "; ".join(f"{f}: {name}, {tf32}" for f, (name, tf32) in settings.items())
                     + "  (TF32 off on both sides; cuDNN benchmark mode on)")
    return lines


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def available(framework: str) -> bool:
    if framework == "tinyunet":
        return True
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def worker_main(argv) -> int:
    """The hidden command line of one worker process; it imports only the framework it times."""
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=FRAMEWORKS)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--device", choices=("cpu", "gpu"), required=True)
    parser.add_argument("--conv-method", default="auto")
    args = parser.parse_args(argv)
    print(json.dumps(worker(args.framework, args.size, args.batch, args.steps, args.device, args.conv_method)))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the frameworks' processes this many times")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    from tinyunet.layers.conv import METHODS
    parser.add_argument("--conv-method", default="auto", choices=("auto", *METHODS),
                        help="force one tinyunet conv method for every Conv2d (the fused up-convs, UpConv2d, have one way); auto: tinyunet's choice")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.batch < 1:
        parser.error("--steps, --rounds and --batch must be >= 1")

    frameworks = [f for f in args.frameworks if available(f)]
    skipped = sorted(set(args.frameworks) - set(frameworks))
    print(f"# bench_unet {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {platform.processor() or platform.machine()}"
          f"  {os.cpu_count()} CPUs  python {platform.python_version()}  device={args.device}")
    print("# " + "  ".join(f"{name} {_version(name)}" for name in ("numpy", "numba", "torch"))
          + "  " + "  ".join(f"{name}={STARTING_ENVIRONMENT.get(name, 'unset')}" for name in
                             ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_CORETYPE"))
          + "  (where unset, tinyunet's process sets OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=10000, "
            "OPENBLAS_THREAD_TIMEOUT=18)")
    print(f"# command: python examples/bench_unet.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    if skipped:
        print(f"# skipped (not importable): {', '.join(skipped)}")
    results = []
    for size in args.sizes:
        pooled = {f: [] for f in frameworks}
        peaks = {f: [] for f in frameworks}
        for _ in range(args.rounds):
            for framework in frameworks:
                r = run_worker(framework, size, args)
                results.append(r)
                pooled[framework] += r["times"]
                peaks[framework].append(r)
        for line in report_lines(size, args.batch, args.device, pooled, peaks):
            print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
