"""SegNet: the reference parameter count, whole-network float64 gradients in training mode, and
a PyTorch SegNet with the same weights (same logits, gradients and running statistics)."""
import numpy as np
import pytest
from netcheck import joint_directional_errors, randomize

from tinyunet.network import NetworkInputError
from tinyunet.segnet import SegNet, SegNetConfig, count_parameters, layer_table

SMALL = dict(base_width=2, classes=3)


def test_reference_parameter_count():
    """From the prototxt's table by hand, K = 11 (CamVid): VGG16's 13 convs, the decoder's 13
    (mirrored, each block's last narrowing, conv1_1_D to K), 2 batch-norm parameters per channel
    of the 25 normalised convs."""
    k = 11
    enc = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    dec = [512, 512, 512, 512, 512, 256, 256, 256, 128, 128, 64, 64, k]   # conv5_3_D .. conv1_1_D
    dec_in = [512, 512, 512, 512, 512, 512, 256, 256, 256, 128, 128, 64, 64]
    convs = sum(9 * cin * cout + cout for cin, cout in zip([3] + enc[:-1], enc)) + \
        sum(9 * cin * cout + cout for cin, cout in zip(dec_in, dec))
    bn = 2 * (sum(enc) + sum(dec[:-1]))
    assert convs + bn == 29_449_355                              # the docstring's figure (paper: 29.5M)
    assert count_parameters(SegNetConfig()) == {"total": convs + bn, "buffers": bn}


def test_built_model_has_the_tables_parameters_and_buffers():
    config = SegNetConfig(**SMALL)
    model = SegNet(config)
    counts = count_parameters(config)
    assert model.num_parameters() == counts["total"]
    assert sum(b.size for b in model.buffers().values()) == counts["buffers"]
    assert [name for name, _, _ in layer_table(config)] == list(model.named_layers())
    assert f"Total params: {counts['total']:,}" in model.summary((1, 3, 16, 16), print_fn=None)


@pytest.mark.parametrize("size", [(16, 16), (19, 23), (33, 17)])
def test_any_size_comes_back_at_its_size(size):
    assert SegNet(**SMALL).layer_shapes((2, 3) + size)[-1][2] == (2, 3) + size


def test_whole_network_directional_float64_in_training_mode():
    rng = np.random.default_rng(0)
    model = SegNet(dtype="float64", **SMALL)
    randomize(model, rng)
    x = rng.standard_normal((2, 3, 17, 14))
    labels = rng.integers(0, 3, (2, 17, 14))
    errors = joint_directional_errors(model, x, labels, rng, directions=3, eps=1e-5)
    assert max(errors) < 1e-6, errors


def test_evaluation_uses_the_running_statistics():
    rng = np.random.default_rng(1)
    model = SegNet(dtype="float64", **SMALL)
    x = rng.standard_normal((2, 3, 16, 16))
    model.forward(x)
    moved = model.buffers()["bn1_1.running_mean"].copy()
    assert moved.any()
    model.eval()
    a = model.forward(x)
    np.testing.assert_array_equal(model.buffers()["bn1_1.running_mean"], moved)   # untouched
    np.testing.assert_array_equal(model.forward(x[:1]), a[:1])                    # per-image now


def test_input_errors_say_what_was_expected():
    model = SegNet(**SMALL)
    with pytest.raises(NetworkInputError, match="expected 3 input channel"):
        model.forward(np.zeros((1, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="more than one value per channel"):
        model.forward(np.zeros((1, 3, 16, 16), np.float32))        # 1x1 at block 5, batch 1
    with pytest.raises(ValueError, match="classes must be >= 2"):
        SegNetConfig(classes=1)


# -- PyTorch, written from the prototxt -----------------------------------------------------
def torch_segnet(torch, params, running, x):
    F = torch.nn.functional
    p = params

    def cbr(name, bn, h, relu=True):
        h = F.conv2d(h, p[f"{name}.weight"], p[f"{name}.bias"], padding=1)
        if bn is None:
            return h
        h = F.batch_norm(h, running[f"{bn}.running_mean"], running[f"{bn}.running_var"], p[f"{bn}.weight"],
                         p[f"{bn}.bias"], training=True, momentum=0.1, eps=1e-5)
        return F.relu(h)

    blocks, h, where = (2, 2, 3, 3, 3), x, {}
    for b, n in enumerate(blocks, start=1):
        for j in range(1, n + 1):
            h = cbr(f"conv{b}_{j}", f"bn{b}_{j}", h)
        size = h.shape[2:]
        h, idx = F.max_pool2d(h, 2, 2, ceil_mode=True, return_indices=True)
        where[b] = (idx, size)
    for b in range(5, 0, -1):
        idx, size = where[b]
        h = F.max_unpool2d(h, idx, 2, 2, output_size=size)
        for j in range(blocks[b - 1], 0, -1):
            h = cbr(f"conv{b}_{j}_D", None if b == j == 1 else f"bn{b}_{j}_D", h)
    return h


@pytest.mark.torch
def test_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    model = SegNet(dtype="float64", **SMALL)
    randomize(model, rng)
    for value in model.buffers().values():                     # start from non-trivial statistics
        value[...] = rng.uniform(0.5, 1.5, value.shape)
    running = {name: torch.tensor(value.copy()) for name, value in model.buffers().items()}
    x = rng.standard_normal((2, 3, 19, 22))
    logits = model.forward(x)
    dlogits = rng.standard_normal(logits.shape)
    dx = model.backward(dlogits)
    params = {name: torch.tensor(value, requires_grad=True) for name, value in model.parameters().items()}
    xt = torch.tensor(x, requires_grad=True)
    yt = torch_segnet(torch, params, running, xt)
    yt.backward(torch.tensor(dlogits))
    np.testing.assert_allclose(logits, yt.detach().numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-8, atol=1e-11)
    for name, g in model.gradients().items():
        np.testing.assert_allclose(g, params[name].grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)
    for name, value in model.buffers().items():
        np.testing.assert_allclose(value, running[name].numpy(), rtol=1e-10, err_msg=name)


def test_tracer_sees_every_layer_and_backward_frees_what_each_layer_kept():
    from tinyunet.losses import softmax_cross_entropy
    from tinyunet.trace import trace
    model = SegNet(**SMALL)
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with trace(model) as t:
        _, dlogits = softmax_cross_entropy(model.forward(x), np.zeros((2, 16, 16), np.int64))
        model.backward(dlogits)
    assert list(t.records) == list(model.named_layers()) and t.first_nonfinite() is None
    assert sorted(t.backward_order) == sorted(model.named_layers())
    kept = {name: [a for a in layer._saved if getattr(layer, a) is not None] for name, layer in model.layers.items()}
    assert not any(kept.values()), kept
    with pytest.raises(RuntimeError, match="before forward"):
        model.layers["upsample1"].backward(np.zeros((2, 2, 16, 16), np.float32))
