"""The GPU side of both benchmarks: peak memory, float32 settings, the report.

On the CPU the GPU is played by stand-ins (a fake CuPy with a memory pool that counts, a fake
torch.cuda), so the reporting code is tested everywhere; the @pytest.mark.gpu tests at the end
run both benchmarks with --device gpu at a tiny size where a GPU is.
"""
import types

import numpy as np
import pytest

from scripts import load_example
from tinyunet import backend


class FakePool:
    """CuPy's MemoryPool as the tracker sees it: malloc, bytes in use, bytes held."""

    def __init__(self):
        self.used, self.cached = 0, 0

    def malloc(self, size):
        reuse = min(self.cached, size)
        self.cached -= reuse
        self.used += size
        return ("block", size)

    def free(self, size):                 # what CuPy does when an array dies: keep the block
        self.used -= size
        self.cached += size

    def used_bytes(self):
        return self.used

    def total_bytes(self):
        return self.used + self.cached


def fake_cupy(monkeypatch):
    pool = FakePool()
    allocator = {}
    cupy = types.ModuleType("fake_cupy")
    cupy.ndarray = type("ndarray", (), {})
    cupy.get_default_memory_pool = lambda: pool
    cupy.cuda = types.SimpleNamespace(set_allocator=lambda f: allocator.update(current=f))
    monkeypatch.setattr(backend, "_cupy", cupy)
    monkeypatch.setattr(backend, "_GPU_CHECKS", {cupy: None})     # "a GPU answers"
    return cupy, pool, allocator


def test_the_peak_is_the_highest_point_not_the_bytes_held_at_the_end(monkeypatch):
    _, pool, allocator = fake_cupy(monkeypatch)
    with backend.GpuMemoryPeak() as peak:
        malloc = allocator["current"]
        assert malloc == peak._malloc                  # every allocation goes through the watch
        malloc(100)
        malloc(300)                                    # 400 in use: the peak
        pool.free(300)
        malloc(50)                                     # reuses part of the cached block
        pool.free(100)
    assert (peak.peak_used, peak.peak_held) == (400, 400)
    assert pool.used_bytes() == 50                     # what the old report would have shown
    assert allocator["current"] == pool.malloc         # the plain allocator is back


def test_gpu_memory_above_inputs_with_cupy_and_with_torch(monkeypatch):
    from tinyunet.kernels import bench
    _, pool, allocator = fake_cupy(monkeypatch)
    pool.malloc(1000)                                   # the inputs, in use before the call

    def call():
        allocator["current"](64)
        allocator["current"](32)
        pool.free(96)
    syncs = []
    assert bench.gpu_memory_above_inputs(call, lambda: syncs.append(1)) == 96
    assert len(syncs) == 2                              # before and after the call

    state = {"allocated": 500, "peak": 900}
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(
        memory_allocated=lambda: state["allocated"], max_memory_allocated=lambda: state["peak"],
        reset_peak_memory_stats=lambda: state.update(peak=state["allocated"])))

    def torch_call():
        state["peak"] = state["allocated"] + 250
    assert bench.gpu_memory_above_inputs(torch_call, lambda: None, fake_torch) == 250


def test_tf32_is_turned_off_for_pytorch_and_stated_for_cupy(monkeypatch):
    torch = pytest.importorskip("torch")
    from tinyunet.kernels import bench
    monkeypatch.delenv("CUPY_TF32", raising=False)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        settings = bench.gpu_float32_settings(torch)
        assert settings == {"CUPY_TF32": "unset (off)", "torch_matmul_allow_tf32": False,
                            "torch_cudnn_allow_tf32": False, "torch_cudnn_benchmark": True}
        torch.backends.cudnn.allow_tf32 = True
        unet = load_example("bench_unet").torch_fp32_exact(torch)
        assert unet["cudnn_allow_tf32"] is False and unet["matmul_allow_tf32"] is False and unet["cudnn_benchmark"]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
        torch.set_float32_matmul_precision("highest")


def worker_result(framework, times, rss, used=None, held=None):
    result = {"framework": framework, "times": times, "peak_rss": rss, "rss_after_imports": rss // 2}
    if used is not None:
        result.update(gpu_peak_used=used, gpu_peak_held=held, gpu_name="NVIDIA Fake",
                      tf32={"cudnn_allow_tf32": False} if framework == "torch" else {"CUPY_TF32": "0"})
    return result


def test_bench_unet_reports_gpu_peaks_and_no_rss_ratio_on_the_gpu():
    bench = load_example("bench_unet")
    runs = {"tinyunet": [worker_result("tinyunet", [0.03, 0.04], 3_000_000_000, 1_500_000_000, 2_000_000_000)],
            "torch": [worker_result("torch", [0.02, 0.02], 2_000_000_000, 1_000_000_000, 1_000_000_000)]}
    pooled = {f: r[0]["times"] for f, r in runs.items()}
    lines = bench.report_lines(256, 8, "gpu", pooled, runs)
    text = "\n".join(lines)
    assert "GPU peak 1.50 GB in use, 2.00 GB held by the pool" in lines[0]
    assert "time tinyunet/torch 1.75x" in text
    assert "GPU peak in use tinyunet/torch 1.50x, held 2.00x" in text
    assert "peak RSS tinyunet/torch" not in text and "not compared" in lines[0]
    assert "TF32 off on both sides" in lines[-1] and "NVIDIA Fake" in lines[-1]


def test_bench_unet_keeps_the_rss_ratio_on_the_cpu():
    bench = load_example("bench_unet")
    runs = {"tinyunet": [worker_result("tinyunet", [0.3], 3_000_000_000)],
            "torch": [worker_result("torch", [0.2], 2_000_000_000)]}
    lines = bench.report_lines(128, 2, "cpu", {f: r[0]["times"] for f, r in runs.items()}, runs)
    assert "peak RSS tinyunet/torch 1.50x" in lines[-1] and "GPU" not in "\n".join(lines)


def test_kernel_bench_prints_the_gpu_memory_table():
    from tinyunet.kernels import bench
    rows = [dict(shape="64x128", op="forward+backward", impl=i, gpu_mb_above_inputs=mb)
            for i, mb in (("cupy", 12.0), ("cuda", 10.5), ("torch", 4.25))]
    result = {"meta": {"device": "gpu", "gpu": "NVIDIA Fake", "float32": {"CUPY_TF32": "unset (off)"},
                       "implementations": ["cupy", "cuda", "torch"]}, "rows": rows}
    lines = bench.gpu_lines(result)
    assert "| 64x128 | 12.0 | 10.5 | 4.2 |" in lines and "TF32 off" in lines[1]
    assert bench.gpu_lines({"meta": {"device": "cpu"}, "rows": rows}) == []


# -- on a real GPU: both benchmarks end to end, tiny --------------------------------------------

@pytest.mark.gpu
def test_bench_unet_on_the_gpu(capsys):
    pytest.importorskip("torch")
    bench = load_example("bench_unet")
    assert bench.main(["--device", "gpu", "--sizes", "32", "--steps", "1", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "GPU peak in use tinyunet/torch" in out and "TF32 off on both sides" in out


@pytest.mark.gpu
def test_kernel_bench_on_the_gpu(tmp_path, capsys):
    from tinyunet.kernels import bench
    result = bench.main(["--device", "gpu", "--size", "16", "--base-width", "4", "--repeats", "1", "--settle", "0",
                         "--quiet", "--no-methods", "--out", str(tmp_path)])
    assert "cuda" in result["meta"]["implementations"], "the CUDA kernels must be measured, not skipped"
    assert all(r["gpu_mb_above_inputs"] >= 0 for r in result["rows"] if r["op"] == "forward+backward")
    assert (tmp_path / "results.md").exists() and np.isfinite([r["ms"] for r in result["rows"]]).all()
