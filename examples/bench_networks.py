"""Time one training step of FCN-8s and of SegNet, tinyunet against PyTorch CPU, side by side.

One step = forward, softmax cross-entropy from the logits (tinyunet.losses.softmax_cross_entropy;
torch.nn.functional.cross_entropy), backward, Adam (tinyunet.optim.Adam; torch.optim.Adam with
the same lr and epsilon), in float32, batch N of (N, 3, S, S) crops with K classes, for the
same network on both sides at the same width:

    FCN-8s   tinyunet/fcn.py     VGG16 blocks of w, 2w, 4w, 8w, 8w; fc6 (7x7) and fc7 (1x1) of
                                 width fc; conv1_1 padded by P; frozen bilinear upsamplers
                                 (4x4/2, 4x4/2, 16x16/8, no bias, not in Adam on either side)
    SegNet   tinyunet/segnet.py  the same encoder with batch norm, ceil max-pools with indices,
                                 a mirrored decoder that unpools at them

The PyTorch models below are written from the same reference prototxts as the oracles of
tests/test_fcn.py and tests/test_segnet.py (which prove, at small width and in float64, that
the two frameworks compute the same logits and gradients from the same weights); the crop
offsets of FCN are tinyunet's derived ones, passed to the PyTorch worker.

Why a sibling of bench_unet.py and not more options on it: that script is one fixed network
(the Keras U-Net, its parameter count asserted); these two networks have their own settings
(width, fc width, input padding, classes) and their own PyTorch models. The process handling
is shared: this file imports bench_unet's helpers (STARTING_ENVIRONMENT, peak_rss,
current_rss, report_lines), so both scripts measure the same way: each framework in its own
fresh process (its peak RSS its own), one warm-up step, then ``--steps`` timed steps;
``--rounds`` alternates the two frameworks' processes and pools the times (on a shared
machine that spreads the noise over both); the report gives medians, the ratio
tinyunet / PyTorch, and each one's peak RSS.

Threads: both sides get ``--threads`` (default: the CPU count): torch.set_num_threads(T) in
PyTorch's process; NUMBA_NUM_THREADS = OPENBLAS_NUM_THREADS = T in tinyunet's (its kernels
run on Numba's pool, its matrix products on OpenBLAS's).

    python examples/bench_networks.py                       # FCN-8s and SegNet, width 16, 128x128, batch 2
    python examples/bench_networks.py --threads 2 --blas-threads 1 --steps 4 --rounds 2
    python examples/bench_networks.py --threads 1 --profile # + tinyunet's time per layer type
    python examples/bench_networks.py --networks segnet --widths 32 --rounds 3
    python examples/bench_networks.py --widths 64 --fc-ratio 64 --input-pad 100 --steps 2   # the reference

``--blas-threads B`` adds a tinyunet process whose OpenBLAS has B threads (its Numba kernels
keep T): OpenBLAS's master thread waits for its workers by spinning, and on a host with more
runnable threads than cores that turned FCN-8s steps of 0.34 s into 22.5 s of CPU time each
(examples/RESULTS.md). ``--profile`` wraps the tinyunet model's _run/_back and prints, per
layer type, forward (F) and backward (B) wall and CPU milliseconds per step.

Figures: examples/RESULTS.md, "FCN-8s and SegNet training step against PyTorch".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import STARTING_ENVIRONMENT, _version, current_rss, peak_rss  # noqa: E402

NETWORKS = ("fcn8s", "segnet")
FRAMEWORKS = ("tinyunet", "torch")


def fcn_settings(width: int, fc_width: int, input_pad: int, classes: int) -> dict:
    return dict(variant="8s", classes=classes, in_channels=3, base_width=width, fc_width=fc_width,
                input_pad=input_pad)


def smallest_input_pad(size: int, width: int, classes: int) -> int:
    """The smallest conv1_1 padding (a multiple of 4) with which FCN-8s fits an S x S input:
    pool5 at least 7x7 for fc6 and every crop offset >= 0 (tinyunet.fcn derives the offsets and
    refuses what does not fit). A CPU run uses no more than it needs: the reference's 100 is
    for inputs of any size down to 1x1."""
    import numpy as np

    from tinyunet.fcn import FCN
    for pad in range(0, 101, 4):
        try:
            model = FCN(**fcn_settings(width, 4, pad, classes))
            model.layer_shapes((1, 3, size, size))
            model.forward(np.zeros((1, 3, size, size), np.float32))
            return pad
        except ValueError:
            continue
    return 100


# ---------------------------------------------------------------------------------------------
# tinyunet
# ---------------------------------------------------------------------------------------------
def layer_timer(model):
    """Wrap model._run and model._back (the one place every layer's forward and backward goes
    through, tinyunet/network.py) to add up, per (direction, layer type), the wall time and the
    process's CPU time. Returns the dict it fills: {('F' | 'B', type): [wall s, cpu s]}.
    CPU time counts the work of every thread of this process and none of the machine's other
    processes: on a shared machine it moves much less than the wall time does."""
    import collections
    totals = collections.defaultdict(lambda: [0.0, 0.0])
    run, back = model._run, model._back

    def timed(direction, call):
        def wrapper(name, *args):
            wall, cpu = time.perf_counter(), time.process_time()
            out = call(name, *args)
            entry = totals[(direction, type(model.layers[name]).__name__)]
            entry[0] += time.perf_counter() - wall
            entry[1] += time.process_time() - cpu
            return out
        return wrapper
    model._run, model._back = timed("F", run), timed("B", back)
    return totals


def tinyunet_step_fn(network: str, settings: dict, size: int, batch: int):
    import numpy as np

    from tinyunet.losses import softmax_cross_entropy
    from tinyunet.optim import Adam

    if network == "fcn8s":
        from tinyunet.fcn import FCN
        model = FCN(**settings)
    else:
        from tinyunet.segnet import SegNet
        model = SegNet(**settings)
    # frozen upsamplers (FCN) out of the optimizer, as in the reference: Adam moves the rest
    optimizer = Adam(model.trainable_parameters(), lr=1e-4, epsilon=1e-7)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 3, size, size), dtype=np.float32)
    labels = rng.integers(0, settings["classes"], (batch, size, size))

    def step():
        _, dlogits = softmax_cross_entropy(model.forward(x), labels)
        model.backward(dlogits)
        optimizer.step(model.gradients())
    return step, model


# ---------------------------------------------------------------------------------------------
# PyTorch: the same networks, as in tests/test_fcn.py and tests/test_segnet.py
# ---------------------------------------------------------------------------------------------
def torch_models(torch):
    from torch import nn
    from torch.nn import functional as F

    def widths(w):
        return [w, 2 * w, 4 * w, 8 * w, 8 * w]

    blocks = (2, 2, 3, 3, 3)

    class FCN8s(nn.Module):
        """voc-fcn8s: VGG16 convs + ReLU, ceil max-pools, fc6/fc7 as convs with dropout, score
        layers, three frozen bilinear-sized deconvs, crops at the given offsets, sum fusion."""

        def __init__(self, classes, in_channels, base_width, fc_width, input_pad, offsets):
            super().__init__()
            self.convs, cin = nn.ModuleList(), in_channels
            for b, (n, w) in enumerate(zip(blocks, widths(base_width)), start=1):
                for j in range(1, n + 1):
                    self.convs.append(nn.Conv2d(cin, w, 3, padding=input_pad if b == j == 1 else 1))
                    cin = w
            self.fc6, self.fc7 = nn.Conv2d(cin, fc_width, 7), nn.Conv2d(fc_width, fc_width, 1)
            self.drop = nn.Dropout(0.5)
            self.score_fr = nn.Conv2d(fc_width, classes, 1)
            self.score_pool4 = nn.Conv2d(widths(base_width)[3], classes, 1)
            self.score_pool3 = nn.Conv2d(widths(base_width)[2], classes, 1)
            self.upscore2 = nn.ConvTranspose2d(classes, classes, 4, 2, bias=False)
            self.upscore_pool4 = nn.ConvTranspose2d(classes, classes, 4, 2, bias=False)
            self.upscore8 = nn.ConvTranspose2d(classes, classes, 16, 8, bias=False)
            for up in (self.upscore2, self.upscore_pool4, self.upscore8):
                up.weight.requires_grad_(False)                 # frozen, as tinyunet's default
            self.offsets = offsets

        def forward(self, x):
            def crop(h, offset, like):
                return h[:, :, offset:offset + like.shape[2], offset:offset + like.shape[3]]
            h, convs, pools = x, iter(self.convs), {}
            for b, n in enumerate(blocks, start=1):
                for _ in range(n):
                    h = F.relu(next(convs)(h))
                h = pools[b] = F.max_pool2d(h, 2, 2, ceil_mode=True)
            h = self.drop(F.relu(self.fc6(h)))
            h = self.drop(F.relu(self.fc7(h)))
            h = self.upscore2(self.score_fr(h))
            h = h + crop(self.score_pool4(pools[4]), self.offsets["score_pool4c"], h)
            h = self.upscore_pool4(h)
            h = h + crop(self.score_pool3(pools[3]), self.offsets["score_pool3c"], h)
            return crop(self.upscore8(h), self.offsets["score"], x)

    class SegNet(nn.Module):
        """segnet_train.prototxt: conv-BN-ReLU encoder with ceil pools that keep their indices,
        a decoder that unpools at them; the last conv gives the logits."""

        def __init__(self, classes, in_channels, base_width):
            super().__init__()
            w = widths(base_width)
            self.enc, self.dec, cin = nn.ModuleList(), nn.ModuleList(), in_channels
            for b, n in enumerate(blocks):
                for _ in range(n):
                    self.enc.append(nn.Sequential(nn.Conv2d(cin, w[b], 3, padding=1), nn.BatchNorm2d(w[b]), nn.ReLU()))
                    cin = w[b]
            for b in range(4, -1, -1):
                for j in range(blocks[b], 0, -1):
                    cout = w[b] if j > 1 else (w[b - 1] if b > 0 else classes)
                    layers = [nn.Conv2d(w[b], cout, 3, padding=1)]
                    if not (b == 0 and j == 1):
                        layers += [nn.BatchNorm2d(cout), nn.ReLU()]
                    self.dec.append(nn.Sequential(*layers))

        def forward(self, x):
            h, enc, dec, where = x, iter(self.enc), iter(self.dec), []
            for n in blocks:
                for _ in range(n):
                    h = next(enc)(h)
                size = h.shape[2:]
                h, idx = F.max_pool2d(h, 2, 2, ceil_mode=True, return_indices=True)
                where.append((idx, size))
            for b in range(4, -1, -1):
                idx, size = where[b]
                h = F.max_unpool2d(h, idx, 2, 2, output_size=size)
                for _ in range(blocks[b]):
                    h = next(dec)(h)
            return h
    return FCN8s, SegNet


def torch_step_fn(network: str, settings: dict, size: int, batch: int, offsets: dict):
    import torch
    from torch.nn import functional as F

    FCN8s, SegNet = torch_models(torch)
    torch.manual_seed(0)
    if network == "fcn8s":
        model = FCN8s(settings["classes"], settings["in_channels"], settings["base_width"], settings["fc_width"],
                      settings["input_pad"], offsets)
    else:
        model = SegNet(settings["classes"], settings["in_channels"], settings["base_width"])
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, eps=1e-7)
    x = torch.rand(batch, 3, size, size)
    labels = torch.randint(0, settings["classes"], (batch, size, size))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    return step, model


# ---------------------------------------------------------------------------------------------
# one framework, one network, one size, in this process
# ---------------------------------------------------------------------------------------------
def worker(framework: str, network: str, settings: dict, size: int, batch: int, steps: int, threads: int,
           offsets: dict, profile: bool = False) -> dict:
    if framework == "tinyunet":                         # import first, so the baseline includes it
        # tinyunet BEFORE numba (which loads NumPy and with it OpenBLAS): tinyunet's import sets
        # OPENBLAS_THREAD_TIMEOUT, which OpenBLAS reads once, when it loads; imported the other
        # way round, OpenBLAS's idle threads spin ~0.1 s after every product and take the cores
        # from the Numba kernels that follow (tinyunet/__init__.py). A user's script imports
        # tinyunet first, as every example does.
        import tinyunet
        import tinyunet.fcn  # noqa: F401
        import tinyunet.kernels
        import numba
        assert tinyunet.OPENBLAS_SPIN_SHORTENED or "OPENBLAS_THREAD_TIMEOUT" in os.environ
        import tinyunet.segnet  # noqa: F401
        numba.set_num_threads(threads)
        tinyunet.kernels.implementation_for(__import__("numpy").zeros(1))   # loads Numba
        used_threads = numba.get_num_threads()
    else:
        import torch
        torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
    rss_start = current_rss()
    if framework == "tinyunet":
        step, model = tinyunet_step_fn(network, settings, size, batch)
        parameters = int(sum(v.size for v in model.parameters().values()))
    else:
        step, model = torch_step_fn(network, settings, size, batch, offsets)
        parameters = int(sum(p.numel() for p in model.parameters()))
    totals = layer_timer(model) if profile else None
    step()                                              # warm-up: compilation, first allocations
    if totals is not None:
        totals.clear()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    result = {"framework": framework, "network": network, "size": size, "batch": batch, "times": times,
              "cpu_times": cpu_times, "threads": used_threads, "parameters": parameters, "peak_rss": peak_rss(),
              "rss_after_imports": rss_start}
    if totals is not None:
        result["layers"] = {f"{d} {kind}": [wall / steps, cpu / steps] for (d, kind), (wall, cpu) in totals.items()}
    return result


def run_worker(entry, network, settings, size, args, offsets) -> dict:
    """entry: 'torch', 'tinyunet' (OpenBLAS with --threads threads) or 'tinyunet-blasB'."""
    framework, blas = (entry.split("-blas") + [None])[:2] if entry.startswith("tinyunet") else (entry, None)
    command = [sys.executable, os.path.abspath(__file__), "--worker", framework, network, json.dumps(settings),
               str(size), str(args.batch), str(args.steps), str(args.threads), json.dumps(offsets),
               str(int(args.profile and entry == "tinyunet"))]
    env = dict(STARTING_ENVIRONMENT)
    if framework == "tinyunet":                         # Numba's pool and OpenBLAS's, as PyTorch's
        env.update(NUMBA_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(blas or args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {framework} {network} benchmark at {size}x{size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_lines(label: str, pooled: dict, runs: dict) -> list[str]:
    """Per framework: median step time (min, max, n), median CPU time of the process per step
    (all its threads; it includes threads that spin while they wait, so it is not the work
    alone), peak RSS; then the ratios of the medians."""
    lines = []
    for framework, times in pooled.items():
        peak = max(runs[framework], key=lambda r: r["peak_rss"])
        lines.append(f"{framework:>14}  {label}  median {1000 * statistics.median(times):8.1f} ms"
                     f"  (min {1000 * min(times):.1f}, max {1000 * max(times):.1f}, n={len(times)})"
                     f"  CPU {1000 * statistics.median(t for r in runs[framework] for t in r['cpu_times']):.1f} ms"
                     f"  peak RSS {peak['peak_rss'] / 1e9:.2f} GB"
                     f" (+{(peak['peak_rss'] - peak['rss_after_imports']) / 1e9:.2f} GB over imports)"
                     f"  {runs[framework][0]['parameters']:,} params, {runs[framework][0]['threads']} threads"
                     + (f" (OpenBLAS {framework.split('-blas')[1]})" if "-blas" in framework else ""))
    for entry in pooled:
        if entry.startswith("tinyunet") and "torch" in pooled:
            ratio = statistics.median(pooled[entry]) / statistics.median(pooled["torch"])
            rss = max(r["peak_rss"] for r in runs[entry]) / max(r["peak_rss"] for r in runs["torch"])
            lines.append(f"   ratio  {label}  time {entry}/torch {ratio:.2f}x   peak RSS {entry}/torch {rss:.2f}x")
    return lines


def profile_lines(runs: list) -> list[str]:
    """tinyunet's per-layer-type times, the median over its processes, largest first."""
    kinds = sorted({kind for r in runs for kind in r["layers"]})
    rows = [(kind, statistics.median(r["layers"].get(kind, [0, 0])[0] for r in runs),
             statistics.median(r["layers"].get(kind, [0, 0])[1] for r in runs)) for kind in kinds]
    cpu = statistics.median(t for r in runs for t in r["cpu_times"])
    lines = [f"          tinyunet CPU time per step {1000 * cpu:.1f} ms; per layer type, wall / CPU ms per step:"]
    lines += [f"            {kind:<20} {1000 * wall:8.1f} {1000 * c:8.1f}" for kind, wall, c in
              sorted(rows, key=lambda row: -row[2])]
    return lines


def load_average() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        framework, network, settings, size, batch, steps, threads, offsets, profile = argv[1:]
        print(json.dumps(worker(framework, network, json.loads(settings), int(size), int(batch), int(steps),
                                int(threads), json.loads(offsets), profile == "1")))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--widths", type=int, nargs="+", default=[16], help="base widths (64: the reference)")
    parser.add_argument("--fc-ratio", type=int, default=4, help="FCN's fc6/fc7 width = this x base width")
    parser.add_argument("--input-pad", type=int, default=None,
                        help="FCN's conv1_1 padding (default: the smallest that fits the crop; the reference: 100)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the frameworks' processes this many times")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--blas-threads", type=int, nargs="*", default=[],
                        help="also run tinyunet with OpenBLAS limited to B threads (its Numba kernels keep "
                             "--threads), as 'tinyunet-blasB': on a busy host OpenBLAS's threads wait for each "
                             "other by spinning")
    parser.add_argument("--profile", action="store_true",
                        help="also time tinyunet's layers by type, forward (F) and backward (B): wall and CPU ms per step")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.batch, args.threads, args.classes - 1, *args.widths, *args.sizes) < 1:
        parser.error("--steps, --rounds, --batch, --threads, --widths, --sizes must be >= 1 and --classes >= 2")

    print(f"# bench_networks {time.strftime('%Y-%m-%d %H:%M %Z')}  {platform.node()}  {cpu_model()}"
          f"  {os.cpu_count()} CPUs  python {platform.python_version()}  threads={args.threads}")
    print("# " + "  ".join(f"{name} {_version(name)}" for name in ("numpy", "numba", "torch"))
          + f"  load average before: {load_average()}")
    print(f"# command: python examples/bench_networks.py {' '.join(argv)}")
    results = []
    for network in args.networks:
        for width in args.widths:
            for size in args.sizes:
                offsets = {}
                if network == "fcn8s":
                    from tinyunet.fcn import FCN
                    pad = args.input_pad if args.input_pad is not None else smallest_input_pad(size, width, args.classes)
                    settings = fcn_settings(width, args.fc_ratio * width, pad, args.classes)
                    offsets = FCN(**settings).offsets
                    label = f"fcn8s  w{width} fc{settings['fc_width']} pad{pad}  {size}x{size} batch {args.batch}"
                else:
                    settings = dict(classes=args.classes, in_channels=3, base_width=width)
                    label = f"segnet w{width}  {size}x{size} batch {args.batch}"
                entries = [e for f in args.frameworks for e in
                           ([f] + [f"tinyunet-blas{b}" for b in args.blas_threads] if f == "tinyunet" else [f])]
                pooled = {f: [] for f in entries}
                runs = {f: [] for f in entries}
                for _ in range(args.rounds):
                    for framework in entries:
                        r = run_worker(framework, network, settings, size, args, offsets)
                        r["entry"] = framework
                        results.append(r)
                        pooled[framework] += r["times"]
                        runs[framework].append(r)
                for line in report_lines(label, pooled, runs):
                    print(line, flush=True)
                if args.profile and runs.get("tinyunet"):
                    for line in profile_lines(runs["tinyunet"]):
                        print(line, flush=True)
    print(f"# load average after: {load_average()}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
