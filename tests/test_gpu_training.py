"""The GPU paths no other test covers, and the loss's device-side checks.

CPU tests (run everywhere): the loss keeps its value checks on the device for GPU arrays (no
read back per step), played here by a stand-in array module.

@pytest.mark.gpu tests (skipped without a GPU, ready for one): training end to end on the GPU
(border weights, Adam, checkpoint save and bit-identical resume into GPU arrays, evaluation,
TTA), a conv split into bands, the 'flip' and 'im2col' methods inside a network, the 'valid'
network, forced Winograd on CuPy; each against the same computation on the CPU in float64.
"""
import types

import numpy as np
import pytest

from tinyunet import losses
from tinyunet.gradcheck import relative_error
from tinyunet.losses import LossInputError, bce_with_logits


# -- the loss on the GPU: checks on the device, the value read when logged ------------------------

def stand_in_gpu_module():
    """NumPy under another name: bce_with_logits takes the device path (xp is not numpy)."""
    xp = types.ModuleType("stand_in_cupy")
    for name in ("maximum", "log1p", "exp", "abs", "where", "float64", "isfinite"):
        setattr(xp, name, getattr(np, name))
    return xp


def test_on_the_gpu_the_loss_checks_on_the_device_and_reads_nothing(monkeypatch):
    monkeypatch.setattr(losses, "get_array_module", lambda *a: stand_in_gpu_module())

    def no_reads(*args):
        raise AssertionError("check_values reads every value back: not on the GPU's default path")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    t = (rng.random(z.shape) > 0.5).astype(np.float32)
    w = rng.random(z.shape).astype(np.float32)
    expected = bce_with_logits(z, t, w)                       # the plain NumPy path (real module)
    monkeypatch.setattr(losses, "check_values", no_reads)
    loss, grad = bce_with_logits(z, t, w)
    assert float(loss) == pytest.approx(float(expected[0]), rel=1e-12)
    np.testing.assert_array_equal(grad, expected[1])
    assert np.isnan(bce_with_logits(z, t * 255, w)[0]), "labels 0/255: the loss says so (NaN)"
    assert np.isnan(bce_with_logits(z, t, -w)[0]), "negative weights: NaN"
    monkeypatch.undo()
    monkeypatch.setattr(losses, "get_array_module", lambda *a: stand_in_gpu_module())
    with pytest.raises(LossInputError, match="0/255"):        # check=True: the named message
        bce_with_logits(z, t * 255, w, check=True)


def test_on_the_cpu_the_loss_is_a_float_and_checks_at_once():
    z = np.zeros((1, 1, 2, 2), np.float32)
    loss, _ = bce_with_logits(z, np.ones_like(z))
    assert isinstance(loss, float) and loss == pytest.approx(np.log(2))
    with pytest.raises(LossInputError, match="0/255"):
        bce_with_logits(z, np.full_like(z, 255.0))


# -- on a real GPU ----------------------------------------------------------------------------------

def tiny_options(out, **changes):
    from tinyunet.train import TrainOptions
    values = dict(out=str(out), base_width=4, depth=2, crop=32, batch=2, steps=4, eval_every=2, checkpoint_every=2,
                  lr=1e-3, progress=False, minutes=5.0, device="gpu", border_weights=True, tta=True)
    values.update(changes)
    return TrainOptions(**values)


@pytest.fixture(scope="module")
def tiny_data():
    from tinyunet.data import synthetic_membranes
    return synthetic_membranes(4, size=48, seed=1)


@pytest.mark.gpu
def test_training_on_the_gpu_end_to_end(tmp_path, tiny_data):
    """Border-weighted loss, Adam, evaluation with TTA, checkpoints, the run folder: on the GPU."""
    import cupy

    from tinyunet.train import Trainer
    trainer = Trainer(tiny_options(tmp_path), tiny_data, log=lambda m: None)
    assert all(isinstance(p, cupy.ndarray) for p in trainer.model.parameters().values())
    loss = trainer.train_step()
    assert isinstance(loss, cupy.ndarray) and loss.shape == (), "the loss stays on the device until logged"
    result = trainer.fit()
    assert result["step"] == 4 and np.isfinite(float(loss))
    assert 0 <= result["scores"]["iou_membrane"] <= 1
    for name in ("checkpoint.npz", "metrics.json", "montage.png", "final.json"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.gpu
def test_resume_on_the_gpu_is_bit_identical(tmp_path, tiny_data):
    import cupy

    from tinyunet.train import Trainer
    quiet = dict(log=lambda m: None)
    straight = Trainer(tiny_options(tmp_path / "a", checkpoint_every=100), tiny_data, **quiet)
    for _ in range(4):
        straight.train_step()
    first = Trainer(tiny_options(tmp_path / "b", steps=2), tiny_data, **quiet)
    for _ in range(2):
        first.train_step()
    first.save()
    second = Trainer(tiny_options(tmp_path / "b", resume=True), tiny_data, **quiet)
    assert second.step == 2
    assert all(isinstance(p, cupy.ndarray) for p in second.model.parameters().values())
    for _ in range(2):
        second.train_step()
    for name, value in straight.model.parameters().items():
        np.testing.assert_array_equal(cupy.asnumpy(second.model.parameters()[name]), cupy.asnumpy(value),
                                      err_msg=name)


def gpu_and_cpu(model_or_layer_factory, x, method=None):
    """(output, dx) on the GPU and on the CPU, float64, for the same weights."""
    from tinyunet.backend import to_device, to_numpy
    from tinyunet.layers import conv
    results = []
    for device in ("gpu", "cpu"):
        model = model_or_layer_factory().to(device)
        with conv.using_method(method or "auto"):
            y = model.forward(to_device(x, device))
            dy = np.random.default_rng(1).standard_normal(y.shape)
            dx = model.backward(to_device(dy, device))
        results.append((to_numpy(y), to_numpy(dx)))
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["im2col", "flip", "shifted"])
def test_a_conv_split_into_bands_on_the_gpu(monkeypatch, method):
    """A workspace so small that every image runs in bands of rows: a non-contiguous matmul
    out=, and dx[...] += col2im(...) into a view."""
    from tinyunet.layers import Conv2d, conv
    monkeypatch.setattr(conv, "WORKSPACE_BYTES", 16 * 1024)
    x = np.random.default_rng(0).standard_normal((2, 8, 40, 24))
    assert len(conv.pieces(x.shape, (3, 3), ((1, 1), (1, 1)), (1, 1), 8)) > 2, "the test must split"
    (y_gpu, dx_gpu), (y_cpu, dx_cpu) = gpu_and_cpu(lambda: Conv2d(8, 16, 3, padding="same", seed=2, dtype="float64"),
                                                    x, method)
    assert relative_error(y_gpu, y_cpu) < 1e-12 and relative_error(dx_gpu, dx_cpu) < 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["flip", "im2col", "winograd"])
def test_a_network_with_one_conv_method_on_the_gpu(method):
    """'flip', 'im2col' and forced Winograd (the einsum reference transforms on CuPy) inside a
    whole network, against the CPU with the same method."""
    from tinyunet.unet import UNet
    x = np.random.default_rng(3).random((2, 1, 32, 32))
    (y_gpu, dx_gpu), (y_cpu, dx_cpu) = gpu_and_cpu(
        lambda: UNet(base_width=4, depth=2, dropout=0.0, dtype="float64", seed=5), x, method)
    assert relative_error(y_gpu, y_cpu) < 1e-10 and relative_error(dx_gpu, dx_cpu) < 1e-10


@pytest.mark.gpu
def test_the_valid_network_on_the_gpu():
    from tinyunet.unet import UNet, nearest_valid_sizes
    size = nearest_valid_sizes(44, 2, "valid")[1]
    x = np.random.default_rng(4).random((1, 1, size, size))
    (y_gpu, dx_gpu), (y_cpu, dx_cpu) = gpu_and_cpu(
        lambda: UNet(base_width=4, depth=2, padding="valid", dropout=0.0, dtype="float64", seed=6), x)
    assert y_gpu.shape == y_cpu.shape and relative_error(y_gpu, y_cpu) < 1e-10
    assert relative_error(dx_gpu, dx_cpu) < 1e-10


@pytest.mark.gpu
def test_prediction_on_the_gpu_and_the_pool_given_back():
    """TTA prediction on the GPU equals the CPU's; afterwards release_gpu_memory() gives the
    pool's cached blocks back (all of them but the free parts of blocks still partly in use)."""
    import cupy

    from tinyunet.backend import release_gpu_memory
    from tinyunet.infer import predict_probability
    from tinyunet.unet import UNet
    image = np.random.default_rng(5).random((40, 56)).astype(np.float32)
    cpu = predict_probability(UNet(base_width=4, depth=2, seed=7, dtype="float64"), image, tta=True)
    gpu = predict_probability(UNet(base_width=4, depth=2, seed=7, dtype="float64").to("gpu"), image, tta=True)
    assert isinstance(gpu, np.ndarray) and relative_error(gpu, cpu) < 1e-10
    pool = cupy.get_default_memory_pool()
    cached = pool.free_bytes()
    freed = release_gpu_memory()
    assert freed >= 0 and pool.free_bytes() <= cached
    assert freed > 0 or cached == 0, "cached blocks after a prediction, and none given back"
