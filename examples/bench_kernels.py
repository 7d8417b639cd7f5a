"""Benchmark the im2col/col2im kernels and the conv layer against NumPy and PyTorch.

    python examples/bench_kernels.py                       # batch 2, 256x256, into bench_out/
    python examples/bench_kernels.py --size 64 --repeats 3 --out bench_out/quick
    python examples/bench_kernels.py --device gpu          # CuPy, Numba CUDA, cuDNN

A thin wrapper: every option and every figure is explained by
``python -m tinyunet.kernels.bench --help`` (kernels/bench.py).
"""
from tinyunet.kernels.bench import main

if __name__ == "__main__":
    main()
