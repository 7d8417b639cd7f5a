"""Dropout's masks (tinyunet/layers/dropout.py): one NumPy generator per layer holds all the
state; each forward draws one key from it, and the mask is a counter-based function of (key,
element index) computed with the same integer operations by NumPy and CuPy. So a run that moves
between devices draws the masks it would have drawn on one device.

On the CPU the GPU is played by a stand-in array module (it records what it was asked to do and
computes with NumPy); the @pytest.mark.gpu tests compare real CuPy masks with NumPy's.
"""
import types

import numpy as np
import pytest

from tinyunet.layers import Dropout
from tinyunet.layers import dropout as dropout_module
from tinyunet.layers.dropout import keep_mask


def splitmix64(key: int, i: int) -> int:
    """The textbook SplitMix64 output for counter i + 1 from ``key``, in Python integers."""
    mask = 2 ** 64 - 1
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("key", [0, 1, 2 ** 63 + 12345, 2 ** 64 - 1])
def test_the_mask_is_splitmix64_of_key_and_index(key):
    p = 0.3
    got = keep_mask(key, (3, 7), p)
    expected = [(splitmix64(key, i) >> 40) >= int(np.ceil(p * 2 ** 24)) for i in range(21)]
    np.testing.assert_array_equal(got.ravel(), expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_keep_one_minus_p_independently(p):
    keep = keep_mask(987654321, (200_000,), p)
    sigma = np.sqrt(p * (1 - p) / keep.size)
    assert abs(keep.mean() - (1 - p)) < 5 * sigma
    a, b = keep[:-1].astype(float), keep[1:].astype(float)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(keep.size)   # neighbours uncorrelated
    assert not np.array_equal(keep, keep_mask(987654322, (200_000,), p))


def stand_in_gpu_module():
    """What keep_mask may ask of CuPy, answered by NumPy, with a log: proof that the GPU path
    uses only these calls and gets the same answer."""
    calls = []
    xp = types.ModuleType("stand_in_cupy")
    for name in ("arange", "empty_like", "right_shift"):
        def call(*args, _name=name, **kwargs):
            calls.append(_name)
            return getattr(np, _name)(*args, **kwargs)
        setattr(xp, name, call)
    xp.uint64 = np.uint64
    xp.calls = calls
    return xp


def test_a_run_moved_between_devices_draws_the_masks_it_would_have_drawn(monkeypatch):
    """Three forwards on the CPU, against one on the CPU, a checkpoint of the generator's state
    (as tinyunet/checkpoint.py saves it), and two on the 'GPU': the same three masks."""
    x = np.ones((2, 4, 6, 6), np.float32)
    staying = Dropout(0.5, seed=11)
    masks_cpu = [staying.forward(x).copy() for _ in range(3)]

    moving = Dropout(0.5, seed=11)
    first = moving.forward(x).copy()
    saved = moving.rng.bit_generator.state                       # the checkpoint holds this
    resumed = Dropout(0.5, seed=999)
    resumed.rng.bit_generator.state = saved
    gpu = stand_in_gpu_module()
    monkeypatch.setattr(dropout_module, "get_array_module", lambda a: gpu)
    later = [resumed.forward(x).copy() for _ in range(2)]
    assert "arange" in gpu.calls, "the stand-in GPU module computed the masks"
    for got, expected in zip([first] + later, masks_cpu):
        np.testing.assert_array_equal(got, expected)


def test_one_draw_per_forward_on_any_device(monkeypatch):
    """The generator advances by exactly one key per training forward (none in evaluation), so
    its state, saved in a checkpoint, says where the mask sequence is on either device."""
    layer = Dropout(0.5, seed=3)
    reference = np.random.default_rng(3)
    monkeypatch.setattr(dropout_module, "get_array_module", lambda a: stand_in_gpu_module())
    layer.forward(np.ones((1, 1, 4, 4)))
    layer.eval().forward(np.ones((1, 1, 4, 4)))
    reference.integers(2 ** 64, dtype=np.uint64)
    assert layer.rng.bit_generator.state == reference.bit_generator.state


# -- on a real GPU ----------------------------------------------------------------------------

@pytest.mark.gpu
def test_cupy_masks_equal_numpy_masks():
    import cupy
    for p in (0.1, 0.5):
        got = keep_mask(2 ** 63 + 5, (2, 64, 17, 9), p, cupy)
        assert isinstance(got, cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(got), keep_mask(2 ** 63 + 5, (2, 64, 17, 9), p))


@pytest.mark.gpu
def test_a_unet_checkpoint_from_the_cpu_continues_on_the_gpu_with_the_same_masks(tmp_path):
    import cupy

    from tinyunet.checkpoint import load_checkpoint, save_checkpoint
    from tinyunet.unet import UNet

    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32)
    cpu = UNet(base_width=4, depth=2, dropout=0.5, seed=4)
    cpu.forward(x)
    save_checkpoint(tmp_path / "c.npz", cpu)
    cpu.forward(x)
    expected = {name: layer.mask for name, layer in cpu.layers.items() if isinstance(layer, Dropout)}
    gpu = UNet(base_width=4, depth=2, dropout=0.5, seed=99).to("gpu")
    load_checkpoint(tmp_path / "c.npz", gpu)
    gpu.forward(cupy.asarray(x))
    for name, mask in expected.items():
        np.testing.assert_array_equal(cupy.asnumpy(gpu.layers[name].mask), mask)
