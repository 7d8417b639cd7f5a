"""Benchmark: im2col, col2im and the conv layer, for every conv shape of the U-Net.

    python -m tinyunet.kernels.bench                    batch 2, 256x256, 5 timed runs
    python -m tinyunet.kernels.bench --size 64 --repeats 3 --out bench_out/quick

For each distinct conv shape of the U-Net (tinyunet.unet.UNet, the Keras zhixuhao/unet) it
times, side by side in one process:

    im2col, col2im          each kernel implementation present, into reused buffers (as the
                            conv layer calls them), and PyTorch's unfold / fold as the peer
    conv forward            tinyunet.layers.Conv2d.forward, and torch.nn.functional.conv2d
    conv forward+backward   forward, then backward (dx, dW, db), and the same in PyTorch

Implementations, each one a kernel implementation (tinyunet.kernels.using) and a conv method
(tinyunet.layers.conv.using_method):

    numpy        NumPy reference kernels, plain im2col + matrix product, col2im backward:
                 the textbook path, and the baseline the ratios are taken against
    numba        the Numba CPU kernels with the conv method tinyunet picks ("auto"): what
                 tinyunet trains with on the CPU
    cupy, cuda   the same two on a GPU (CuPy reference kernels; Numba CUDA kernels)
    torch        PyTorch on the same device (cuDNN on a GPU), when it imports

PyTorch is asked for dx of every layer, the first included (its input requires grad),
because tinyunet's Conv2d.backward always returns dx: like is compared with like.

The up-convs (the 2x2 convs on upsampled tensors) are listed by the conv on the upsampled
input, as the Keras model has them. The U-Net computes each as one UpConv2d from the half-size
input, upsampling included; that is what "numba" ("auto") times for their forward and
forward+backward (and the "upconv" column of the methods table), while PyTorch is timed on the
conv alone, its upsampling not counted.

Timing: per case, the implementations take turns: a short rest, one warm-up call, then
``--repeats`` timed calls, and the median (see time_side_by_side for why not call by call). Reported:
ms, GFLOP/s (2 * N*F*C*kh*kw*OH*OW per forward, three times that for forward+backward),
GB/s for the copy kernels (bytes read + written), the share of this machine's peak measured
in the same run (a large float32 matrix product for GFLOP/s, a large array copy for GB/s),
and the time ratios t/t_numpy and t/t_torch (below 1: faster). On the CPU a streaming write
(kernels/cpu.py write_streaming, from a random 64 KB source) measures how fast memory can be
written at all: the headline says how long the 64-channel im2col's output takes to write at
that rate, the least time any im2col can take, and so the largest speedup over NumPy that
this machine allows in this run.

A second table, "conv methods", times forward+backward of every shape with the Numba kernels
under each conv method; tinyunet's "auto" rule (tinyunet/layers/conv.py) was chosen from it.

On a GPU (``--device gpu``): float32 on every side with TF32 OFF (PyTorch's matmul and cuDNN
would use it by default: gpu_float32_settings turns it off and cuDNN's benchmark mode on;
CuPy's GEMMs use it only under CUPY_TF32=1, which the table states); every clock read follows a
synchronisation of CuPy's stream and PyTorch's; and for each conv forward+backward the memory
it needs on the GPU beyond what was in use before it, at its peak (gpu_memory_above_inputs: the
CuPy pool's peak through tinyunet.backend.GpuMemoryPeak, PyTorch's max_memory_allocated).

Writes results.json, results.png and results.md into ``--out`` (default bench_out/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from tinyunet import backend, kernels
from tinyunet.kernels.geometry import normalize
from tinyunet.layers import conv as conv_module

OPS = ("im2col", "col2im", "forward", "forward+backward")


# -- what to measure ------------------------------------------------------------------------

@dataclass
class Shape:
    """One distinct conv of the U-Net: geometry, and the layers that share it."""
    in_channels: int
    out_channels: int
    kernel: tuple
    padding: tuple          # ((top, bottom), (left, right)), resolved for this input
    stride: tuple
    x_shape: tuple          # (N, C, H, W)
    layers: list = field(default_factory=list)
    # True for the up-convs: x is the upsampled input of the Keras model's 2x2 conv, and the
    # U-Net computes upsampling + conv as one UpConv2d from the half-size input. tinyunet's
    # choice ("auto") is timed as that layer; every other method as the conv on the upsampled x.
    fused_upsampling: bool = False

    @property
    def label(self) -> str:
        n, c, h, w = self.x_shape
        return f"{c}->{self.out_channels} {self.kernel[0]}x{self.kernel[1]} @{h}x{w}"

    @property
    def count(self) -> int:
        return len(self.layers)

    @property
    def y_shape(self) -> tuple:
        _, _, _, (oh, ow) = normalize(self.x_shape, self.kernel, self.padding, self.stride)
        return (self.x_shape[0], self.out_channels, oh, ow)

    @property
    def forward_flops(self) -> float:
        n, f, oh, ow = self.y_shape
        return 2.0 * n * f * self.in_channels * self.kernel[0] * self.kernel[1] * oh * ow

    @property
    def cols_shape(self) -> tuple:
        n, c = self.x_shape[:2]
        return (n, c * self.kernel[0] * self.kernel[1], self.y_shape[2] * self.y_shape[3])


def unet_shapes(size: int, batch: int, base_width: int = 64) -> list[Shape]:
    """The distinct conv shapes of the U-Net (default config: base width 64, depth 4) for a
    (batch, 1, size, size) input."""
    from tinyunet.layers import Conv2d, UpConv2d
    from tinyunet.layers.conv import resolve_padding
    from tinyunet.unet import UNet
    net = UNet(base_width=base_width)
    shapes: dict = {}
    for name, layer, in_shape, _ in net.layer_shapes((batch, net.config.in_channels, size, size)):
        if not isinstance(layer, Conv2d):
            continue
        fused = isinstance(layer, UpConv2d)
        if fused:                           # as the conv it fuses: 2x2 'same' on the upsampled x
            n, c, h, w = in_shape
            in_shape = (n, c, 2 * h, 2 * w)
        pad = resolve_padding(layer.padding, layer.kernel_size, layer.stride, in_shape[2:])
        key = (tuple(in_shape), layer.out_channels, layer.kernel_size, pad, layer.stride)
        if key not in shapes:
            shapes[key] = Shape(layer.in_channels, layer.out_channels, layer.kernel_size, pad,
                                layer.stride, tuple(in_shape), fused_upsampling=fused)
        shapes[key].layers.append(name)
    return list(shapes.values())


# -- implementations ------------------------------------------------------------------------

@dataclass
class Implementation:
    name: str
    kernels: str | None = None      # tinyunet.kernels implementation; None for torch
    method: str | None = None       # tinyunet conv method
    device: str = "cpu"


def implementations(device: str, with_torch: bool) -> list[Implementation]:
    available = kernels.available()
    if device == "gpu":
        impls = [Implementation("cupy", "reference", "im2col", "gpu")]
        if available["cuda"] is None:
            impls.append(Implementation("cuda", "cuda", "auto", "gpu"))
    else:
        impls = [Implementation("numpy", "reference", "im2col")]
        if available["cpu"] is None:
            impls.append(Implementation("numba", "cpu", "auto"))
    if with_torch and _torch() is not None:
        impls.append(Implementation("torch", device=device))
    return impls


def _torch():
    try:
        import torch
    except Exception:  # not installed, or a broken install: the peer is optional
        return None
    return torch


# -- timing ---------------------------------------------------------------------------------

SETTLE_SECONDS = 0.2


def time_side_by_side(functions: dict, repeats: int, sync, settle: float = SETTLE_SECONDS) -> dict:
    """{name: median seconds} of ``repeats`` calls of each function after one warm-up call.

    The implementations take turns, one block of calls each, and each block starts after
    ``settle`` seconds of rest. Why not alternate call by call: after a call, OpenBLAS's and
    OpenMP's worker threads keep spinning for up to ~0.1 s waiting for more work; within one
    process those spinning threads of one library steal the cores from the next library's
    call, which measured 10-40% slower that way than on its own. Resting first lets each
    implementation run as it would alone.
    """
    medians = {}
    for name, fn in functions.items():
        time.sleep(settle)
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        medians[name] = float(np.median(times))
    return medians


def measure_peaks(xp, sync, repeats: int) -> dict:
    """This machine's float32 matrix-product GFLOP/s and array-copy GB/s, measured now."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((2048, 2048)).astype(np.float32))
    b = xp.asarray(rng.standard_normal((2048, 4096)).astype(np.float32))
    c = xp.empty((2048, 4096), dtype=np.float32)
    src = xp.ones(64 * 2**20, dtype=np.float32)           # 256 MiB: far beyond any cache
    dst = xp.empty_like(src)
    functions = {"matmul": lambda: xp.matmul(a, b, out=c), "copy": lambda: xp.copyto(dst, src)}
    write_streaming = _write_streaming(xp)
    if write_streaming is not None:
        pattern = rng.standard_normal(16384).astype(np.float32)      # data, not a constant
        functions["write"] = lambda: write_streaming(dst, pattern)
    t = time_side_by_side(functions, repeats, sync)
    peaks = {"matmul_gflops": 2 * 2048 * 2048 * 4096 / t["matmul"] / 1e9,
             "copy_gbps": 2 * src.nbytes / t["copy"] / 1e9}
    if "write" in t:
        peaks["write_gbps"] = dst.nbytes / t["write"] / 1e9
    return peaks


def _write_streaming(xp):
    """The write roof, on the CPU: a write with streaming stores (nothing read, no cache line
    fetched before it is written), the least time in which any kernel can write its output."""
    if xp is not np or kernels.available()["cpu"] is not None:   # a GPU, or no Numba
        return None
    from tinyunet.kernels import cpu
    return cpu.write_streaming


class Case:
    """The arrays and the layer for one shape, and a timed callable per implementation/op."""

    def __init__(self, shape: Shape, device: str, seed: int = 0):
        from tinyunet.layers import Conv2d, UpConv2d
        self.shape = shape
        self.xp = xp = backend.get_array_module(backend.to_device(np.zeros(1), device))
        rng = np.random.default_rng(seed)
        s = shape
        self.x = xp.asarray(rng.standard_normal(s.x_shape, dtype=np.float32))
        if s.fused_upsampling:              # x is then the upsampling of x_small
            n, c, h, w = s.x_shape
            self.x_small = xp.asarray(rng.standard_normal((n, c, h // 2, w // 2), dtype=np.float32))
            self.x = xp.ascontiguousarray(xp.repeat(xp.repeat(self.x_small, 2, axis=2), 2, axis=3))
        self.dy = xp.asarray(rng.standard_normal(s.y_shape, dtype=np.float32))
        self.cols = xp.asarray(rng.standard_normal(s.cols_shape, dtype=np.float32))
        self.cols_out = xp.empty(s.cols_shape, dtype=np.float32)
        self.x_out = xp.empty(s.x_shape, dtype=np.float32)
        self.layer = Conv2d(s.in_channels, s.out_channels, s.kernel, padding=s.padding, stride=s.stride,
                            seed=seed).to(device)
        self.fused = UpConv2d(s.in_channels, s.out_channels, seed=seed).to(device) if s.fused_upsampling else None
        self._torch = None

    def function(self, impl: Implementation, op: str):
        if impl.kernels is None:
            return self._torch_function(impl, op)
        s, layer = self.shape, self.layer
        args = (s.kernel, s.padding, s.stride)
        if self.fused is not None and impl.method in ("auto", "upconv") and op in ("forward", "forward+backward"):
            def fused():                     # what the U-Net runs: upsampling + conv in one layer
                with kernels.using(impl.kernels):
                    self.fused.forward(self.x_small)
                    if op == "forward+backward":
                        self.fused.backward(self.dy)
            return fused

        def run():
            with kernels.using(impl.kernels), conv_module.using_method(impl.method):
                if op == "im2col":
                    kernels.im2col(self.x, *args, out=self.cols_out)
                elif op == "col2im":
                    kernels.col2im(self.cols, s.x_shape, *args, out=self.x_out)
                elif op == "forward":
                    layer.forward(self.x)
                else:
                    layer.forward(self.x)
                    layer.backward(self.dy)
        return run

    def _torch_function(self, impl: Implementation, op: str):
        torch = _torch()
        F = torch.nn.functional
        if self._torch is None:
            dev = "cuda" if impl.device == "gpu" else "cpu"
            to = (lambda a: torch.as_tensor(a, device=dev)) if dev == "cuda" else torch.from_numpy
            self._torch = dict(x=to(self.x), dy=to(self.dy), cols=to(self.cols),
                               w=to(self.layer.params["weight"]).requires_grad_(True),
                               b=to(self.layer.params["bias"]).requires_grad_(True))
        t, s = self._torch, self.shape
        (pt, pb), (pl, pr) = s.padding

        def padded(x):   # PyTorch pads symmetrically; Keras 'same' 2x2 pads 0 before, 1 after
            return x if pt == pb == pl == pr == 0 else F.pad(x, (pl, pr, pt, pb))

        if op == "im2col":
            return lambda: F.unfold(padded(t["x"]), s.kernel, stride=s.stride)
        if op == "col2im":
            n, c, h, w = s.x_shape
            size = (h + pt + pb, w + pl + pr)
            return lambda: F.fold(t["cols"], size, s.kernel, stride=s.stride)[:, :, pt:pt + h, pl:pl + w]
        if op == "forward":
            def forward():
                with torch.no_grad():
                    F.conv2d(padded(t["x"]), t["w"], t["b"], stride=s.stride)
            return forward
        x = t["x"].detach().requires_grad_(True)   # dx of every layer, as tinyunet computes

        def forward_backward():
            t["w"].grad = t["b"].grad = x.grad = None
            F.conv2d(padded(x), t["w"], t["b"], stride=s.stride).backward(t["dy"])
        return forward_backward


# -- the GPU: float32 settings and memory ------------------------------------------------------

def gpu_float32_settings(torch) -> dict:
    """TF32 off for PyTorch (matmul and cuDNN), cuDNN's benchmark mode on, CuPy's TF32 state as
    set by CUPY_TF32: the settings as they are afterwards, for the report."""
    settings = {"CUPY_TF32": os.environ.get("CUPY_TF32", "unset (off)")}
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        settings.update(torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                        torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                        torch_cudnn_benchmark=torch.backends.cudnn.benchmark)
    return settings


def gpu_memory_above_inputs(fn, sync, torch=None) -> int:
    """Bytes that one call of ``fn`` needs on the GPU beyond those in use before it, at its
    peak: PyTorch's allocator when ``torch`` is given, else CuPy's pool (watched, so not timed)."""
    if torch is not None:
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return int(torch.cuda.max_memory_allocated() - before)
    sync()
    with backend.GpuMemoryPeak() as peak:
        before = peak.peak_used
        fn()
        sync()
    return int(peak.peak_used - before)


# -- running, reporting ---------------------------------------------------------------------

def run(args) -> dict:
    from tqdm import tqdm
    device = args.device
    if device == "gpu":
        backend.require_gpu()
    torch = _torch()
    threads = os.cpu_count() or 1
    if torch is not None and not args.no_torch:
        torch.set_num_threads(threads)
    sync = (lambda: backend.synchronize()) if device == "gpu" else (lambda: None)
    if device == "gpu" and torch is not None:
        sync = lambda: (backend.synchronize(), torch.cuda.synchronize())  # noqa: E731
    impls = implementations(device, with_torch=not args.no_torch)
    gpu_settings = gpu_float32_settings(None if args.no_torch else torch) if device == "gpu" else None
    shapes = unet_shapes(args.size, args.batch, args.base_width)
    xp = backend.get_array_module(backend.to_device(np.zeros(1), device))
    peaks = measure_peaks(xp, sync, args.repeats)
    methods = [m for m in conv_module.METHODS] if args.methods else []
    rows, method_rows = [], []
    progress = tqdm(total=len(shapes) * (len(OPS) + (1 if methods else 0)), desc="bench", unit="case",
                    file=sys.stderr, disable=args.quiet)
    for shape in shapes:
        case = Case(shape, device)
        for op in OPS:
            progress.set_postfix_str(f"{shape.label} {op}")
            medians = time_side_by_side({i.name: case.function(i, op) for i in impls}, args.repeats, sync, args.settle)
            for impl in impls:
                rows.append(_row(shape, op, impl.name, medians, peaks))
                if device == "gpu" and op == "forward+backward":
                    rows[-1]["gpu_mb_above_inputs"] = gpu_memory_above_inputs(
                        case.function(impl, op), sync, torch if impl.name == "torch" else None) / 2**20
            progress.update()
        if methods:
            progress.set_postfix_str(f"{shape.label} methods")
            usable = [m for m in methods if conv_module.method_applies(m, shape.kernel, shape.padding, shape.stride)]
            if shape.fused_upsampling:
                usable.append("upconv")
            fns = {m: case.function(Implementation(m, "cpu" if device == "cpu" else "cuda", m, device),
                                    "forward+backward") for m in usable}
            medians = time_side_by_side(fns, args.repeats, sync, args.settle)
            _, _, _, (oh, ow) = normalize(shape.x_shape, shape.kernel, shape.padding, shape.stride)
            chosen = "upconv" if shape.fused_upsampling else conv_module.choose_method(
                shape.in_channels, shape.out_channels, shape.kernel, shape.padding, shape.stride, oh * ow,
                gpu=device == "gpu")
            method_rows.append(dict(shape=shape.label, count=shape.count, chosen=chosen,
                                    ms={m: 1e3 * t for m, t in medians.items()}))
            progress.update()
        del case
        conv_module.release_workspace()
    progress.close()
    meta = _meta(args, impls, device)
    if gpu_settings is not None:
        meta.update(gpu=backend.gpu_name(), float32=gpu_settings)
    return dict(meta=meta, peaks=peaks, rows=rows, methods=method_rows,
                totals=_totals(rows, shapes, impls), headline=_headline(rows, shapes, impls, peaks))


def _row(shape: Shape, op: str, impl: str, medians: dict, peaks: dict) -> dict:
    seconds = medians[impl]
    row = dict(shape=shape.label, count=shape.count, layers=shape.layers, op=op, impl=impl, ms=1e3 * seconds)
    if op in ("im2col", "col2im"):
        nbytes = 4 * (np.prod(shape.x_shape) + np.prod(shape.cols_shape))
        row["gbps"] = float(nbytes / seconds / 1e9)
        row["peak_share"] = row["gbps"] / peaks["copy_gbps"]
    else:
        flops = shape.forward_flops * (1 if op == "forward" else 3)
        row["gflops"] = float(flops / seconds / 1e9)
        row["peak_share"] = row["gflops"] / peaks["matmul_gflops"]
    for peer in ("numpy", "cupy", "torch"):
        if peer in medians:
            row[f"vs_{peer}"] = seconds / medians[peer]
    return row


def _totals(rows, shapes, impls) -> dict:
    """Summed over every conv layer of the U-Net (a shape counts once per layer using it)."""
    totals = {}
    for op in OPS:
        totals[op] = {i.name: sum(r["ms"] * r["count"] for r in rows if r["op"] == op and r["impl"] == i.name)
                      for i in impls}
    return totals


def _headline(rows, shapes, impls, peaks) -> dict:
    names = [i.name for i in impls]
    baseline = "cupy" if "cupy" in names else "numpy"
    fast = "cuda" if "cuda" in names else "numba"
    head = {}
    width = max(s.out_channels for s in shapes if s.x_shape[2] == shapes[0].x_shape[2])   # 64 by default
    big = [s for s in shapes if s.in_channels == width and s.kernel == (3, 3) and s.x_shape[2] == shapes[0].x_shape[2]]
    if big and fast in names:
        for op in ("im2col", "col2im"):
            ms = {r["impl"]: r["ms"] for r in rows if r["shape"] == big[0].label and r["op"] == op}
            head[op] = dict(shape=big[0].label, baseline=baseline, fast=fast, baseline_ms=ms[baseline],
                            fast_ms=ms[fast], speedup=ms[baseline] / ms[fast])
        if "write_gbps" in peaks:      # no im2col can beat writing its output at the roof
            roof_ms = 1e3 * 4 * np.prod(big[0].cols_shape) / 1e9 / peaks["write_gbps"]
            head["im2col"].update(roof_ms=float(roof_ms), roof_speedup=float(head["im2col"]["baseline_ms"] / roof_ms))
    return head


def _meta(args, impls, device) -> dict:
    import numba
    torch = _torch()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python -m tinyunet.kernels.bench " + " ".join(sys.argv[1:]),
                machine=f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
                device=device, size=args.size, batch=args.batch, base_width=args.base_width,
                repeats=args.repeats, settle_seconds=args.settle,
                implementations=[i.name for i in impls],
                versions=dict(numpy=np.__version__, numba=numba.__version__, python=platform.python_version(),
                              torch=None if torch is None else torch.__version__),
                threads=dict(numba=numba.get_num_threads(), torch=None if torch is None else torch.get_num_threads()),
                blas_environment={k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                                 "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                                 "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS")},
                dx_of_first_layer="computed by every implementation (PyTorch's input requires grad)")


def table(result: dict) -> str:
    """The figures as one Markdown table (also printed), with the totals and the headline."""
    meta, peaks = result["meta"], result["peaks"]
    lines = [f"{meta['date']}, {meta['machine']}; batch {meta['batch']}, {meta['size']}x{meta['size']}, "
             f"median of {meta['repeats']} after a warm-up",
             f"peaks measured in this run: float32 matmul {peaks['matmul_gflops']:.0f} GFLOP/s, "
             f"array copy {peaks['copy_gbps']:.1f} GB/s"
             + (f", streaming write {peaks['write_gbps']:.1f} GB/s" if "write_gbps" in peaks else ""), "",
             "| shape (layers) | op | impl | ms | GFLOP/s | GB/s | % peak | t/t_numpy | t/t_torch |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    base = "vs_cupy" if meta["device"] == "gpu" else "vs_numpy"
    for r in result["rows"]:
        lines.append("| {} (x{}) | {} | {} | {:.2f} | {} | {} | {:.0f}% | {} | {} |".format(
            r["shape"], r["count"], r["op"], r["impl"], r["ms"],
            f"{r['gflops']:.0f}" if "gflops" in r else "", f"{r['gbps']:.1f}" if "gbps" in r else "",
            100 * r["peak_share"], f"{r[base]:.2f}" if base in r else "",
            f"{r['vs_torch']:.2f}" if "vs_torch" in r else ""))
    lines += ["", "Summed over all the U-Net's conv layers (ms):", "",
              "| op | " + " | ".join(meta["implementations"]) + " |",
              "|---|" + "---:|" * len(meta["implementations"])]
    for op, by_impl in result["totals"].items():
        lines.append(f"| {op} | " + " | ".join(f"{by_impl[i]:.0f}" for i in meta["implementations"]) + " |")
    if result["methods"]:
        names = list(conv_module.METHODS) + ["upconv"]
        lines += ["", "Conv methods, forward+backward with the fast kernels (ms; * = tinyunet's choice; "
                  "upconv: the up-conv as the U-Net runs it, UpConv2d from the half-size input, the "
                  "upsampling included):", "",
                  "| shape (layers) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for m in result["methods"]:
            cells = [("" if k not in m["ms"] else f"{m['ms'][k]:.1f}" + (" *" if k == m["chosen"] else ""))
                     for k in names]
            lines.append(f"| {m['shape']} (x{m['count']}) | " + " | ".join(cells) + " |")
    lines += gpu_lines(result)
    lines += [""] + headline_lines(result)
    return "\n".join(lines)


def gpu_lines(result: dict) -> list[str]:
    """On a GPU run: the card, the float32 settings, and each conv's forward+backward memory."""
    meta = result["meta"]
    if meta["device"] != "gpu":
        return []
    lines = ["", f"GPU: {meta.get('gpu')}; float32 settings: {meta.get('float32')} (TF32 off on every side)", "",
             "GPU memory of one conv forward+backward beyond its inputs, at its peak (MB):", "",
             "| shape (layers) | " + " | ".join(meta["implementations"]) + " |",
             "|---|" + "---:|" * len(meta["implementations"])]
    for shape in dict.fromkeys(r["shape"] for r in result["rows"]):
        mb = {r["impl"]: r["gpu_mb_above_inputs"] for r in result["rows"]
              if r["shape"] == shape and r["op"] == "forward+backward" and "gpu_mb_above_inputs" in r}
        lines.append(f"| {shape} | " + " | ".join(f"{mb[i]:.1f}" if i in mb else "" for i in meta["implementations"]) + " |")
    return lines


def headline_lines(result: dict) -> list[str]:
    out = []
    for op, h in result["headline"].items():
        out.append(f"{op} {h['shape']}: {h['fast']} {h['fast_ms']:.1f} ms, {h['baseline']} {h['baseline_ms']:.1f} ms: "
                   f"{h['speedup']:.2f}x faster")
        if "roof_ms" in h:
            out.append(f"  (writing its columns at the streaming-write roof takes {h['roof_ms']:.1f} ms: "
                       f"no {op} can be more than {h['roof_speedup']:.2f}x faster than {h['baseline']} here)")
    totals = result["totals"]["forward+backward"]
    fast = "cuda" if "cuda" in totals else "numba"
    base = "cupy" if "cupy" in totals else "numpy"
    if "torch" in totals and fast in totals:
        out.append(f"U-Net convs forward+backward: {fast} {totals[fast]:.0f} ms, {base} {totals[base]:.0f} ms, "
                   f"torch {totals['torch']:.0f} ms; {fast}/torch = {totals[fast] / totals['torch']:.2f}, "
                   f"{base}/torch = {totals[base] / totals['torch']:.2f}")
    return out


def chart(result: dict, path: str) -> None:
    """Three panels (im2col, col2im, conv forward+backward): ms per shape, one bar per impl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    impls = result["meta"]["implementations"]
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fig, axes = plt.subplots(3, 1, figsize=(max(10, 0.7 * len(shapes)), 12), sharex=True)
    width = 0.8 / len(impls)
    for ax, op in zip(axes, ("im2col", "col2im", "forward+backward")):
        for k, impl in enumerate(impls):
            ms = {r["shape"]: r["ms"] for r in result["rows"] if r["op"] == op and r["impl"] == impl}
            ax.bar(np.arange(len(shapes)) + k * width, [ms.get(s, np.nan) for s in shapes], width, label=impl)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(op)
        ax.legend()
    axes[-1].set_xticks(np.arange(len(shapes)) + 0.4 - width / 2)
    axes[-1].set_xticklabels(shapes, rotation=60, ha="right", fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"tinyunet kernels, batch {meta['batch']}, {meta['size']}x{meta['size']}: {meta['machine']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tinyunet.kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up (>= 1, default 5)")
    parser.add_argument("--base-width", type=int, default=64,
                        help="channels of the U-Net's first level (default 64; smaller for a quick look)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", default="bench_out", help="folder for results.json/.png/.md")
    parser.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                        help=f"seconds of rest before each implementation's calls (default {SETTLE_SECONDS})")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--no-methods", dest="methods", action="store_false", help="skip the conv-method table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.size < 16 or args.size % 16 or args.batch < 1:
        parser.error("need --repeats >= 1, --batch >= 1 and --size a multiple of 16 (the U-Net pools 4 times)")
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    text = table(result)
    print(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    chart(result, os.path.join(args.out, "results.png"))
    print(f"\nwrote {args.out}/results.json, results.md, results.png")
    return result


if __name__ == "__main__":
    main()
