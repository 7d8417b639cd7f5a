"""FCN-32s/16s/8s: the derived crop offsets, the reference parameter counts, every input size,
whole-network float64 gradients, and a PyTorch FCN with the same weights (same logits, same
gradients). The layers new to FCN (CeilMaxPool2d, Crop2d, Add) are checked here too."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from netcheck import joint_directional_errors, randomize, rewinder
from paths import PATHS, layer_path
from strategies import seeds

from tinyunet.fcn import FCN, VARIANTS, FCNConfig, count_parameters, layer_table
from tinyunet.gradcheck import check_gradients
from tinyunet.layers import Add, CeilMaxPool2d, Crop2d
from tinyunet.network import NetworkInputError

SMALL = dict(base_width=2, fc_width=6, classes=3, score_init="he_normal")


# -- the reference: offsets and counts ------------------------------------------------------
@pytest.mark.parametrize("variant, offsets", [("32s", {"score": 19}),
                                              ("16s", {"score_pool4c": 5, "score": 27}),
                                              ("8s", {"score_pool4c": 5, "score_pool3c": 9, "score": 31})])
def test_derived_offsets_are_the_reference_prototxts(variant, offsets):
    """voc-fcn*/train.prototxt: Crop offsets 5 and 9 at the skips, 19/27/31 at the end."""
    assert FCN(variant=variant, **SMALL).offsets == offsets
    moved = FCN(variant=variant, input_pad=110, **SMALL).offsets          # shifts only the last crop
    assert moved == {k: v + 10 if k == "score" else v for k, v in offsets.items()}


def test_too_small_an_input_pad_is_refused_naming_the_reference():
    with pytest.raises(ValueError, match="the reference pads by 100"):
        FCN(input_pad=10, **SMALL)


def test_reference_parameter_counts():
    """From VGG16's table by hand: 13 3x3 convs, fc6 7x7x512x4096, fc7 4096x4096, 1x1 scores,
    bias-free (K, K, k, k) upsamplers; K = 21 (PASCAL VOC)."""
    k = 21
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    vgg = sum(9 * cin * cout + cout for cin, cout in zip([3] + widths[:-1], widths))
    assert vgg == 14_714_688                                              # VGG16's conv part
    fc = (7 * 7 * 512 * 4096 + 4096) + (4096 * 4096 + 4096)
    score = lambda cin: cin * k + k                                        # noqa: E731
    up = lambda size: k * k * size * size                                  # noqa: E731
    expected = {"32s": vgg + fc + score(4096) + up(64),
                "16s": vgg + fc + score(4096) + up(4) + score(512) + up(32),
                "8s": vgg + fc + score(4096) + up(4) + score(512) + up(4) + score(256) + up(16)}
    assert expected["8s"] == 134_489_759                                  # the docstring's figure
    for variant in VARIANTS:
        counts = count_parameters(FCNConfig(variant=variant))
        assert counts["total"] == expected[variant]
        assert counts["trainable"] == vgg + fc + score(4096) + {"32s": 0, "16s": score(512),
                                                                "8s": score(512) + score(256)}[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_built_model_has_the_tables_parameters(variant):
    config = FCNConfig(variant=variant, **SMALL)
    model = FCN(config)
    assert model.num_parameters() == count_parameters(config)["total"]
    assert [name for name, _, _ in layer_table(config)] == list(model.named_layers())
    assert "Total params: " + f"{model.num_parameters():,}" in model.summary((1, 3, 20, 20), print_fn=None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_input_size_gives_logits_of_its_size(variant):
    model = FCN(variant=variant, **SMALL)
    for size in range(1, 70):
        assert model.layer_shapes((1, 3, size, size + 1))[-1][2] == (1, 3, size, size + 1)


# -- the layers new to FCN ------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 2, 5, 7), (2, 1, 6, 6), (1, 1, 1, 3), (1, 2, 9, 4)])
def test_ceil_pool_against_torch_ceil_mode(shape):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.permutation(int(np.prod(shape))).reshape(shape) / np.prod(shape)
    pool = CeilMaxPool2d(2, return_indices=True)
    y, idx = pool.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = pool.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt, idxt = torch.nn.functional.max_pool2d(xt, 2, ceil_mode=True, return_indices=True)
    yt.backward(torch.tensor(dy))
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(idx, idxt.numpy())
    np.testing.assert_array_equal(dx, xt.grad.numpy())


def test_crop_and_add_gradients():
    rng = np.random.default_rng(1)
    crop, add = Crop2d((2, 1)), Add()
    x, a, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    r = rng.standard_normal((2, 3, 4, 4))
    crop.forward(x, (4, 4))
    np.testing.assert_array_equal(crop.forward(x, a), x[:, :, 2:6, 1:5])
    add.forward((a, b))
    da, db = add.backward(r)
    analytic = {"x": crop.backward(r), "a": da, "b": db}
    errors = check_gradients(lambda: float(((crop.forward(x, (4, 4)) + add.forward((a, b))) * r).sum()),
                             {"x": x, "a": a, "b": b}, analytic)
    assert max(errors.values()) < 1e-8, errors
    with pytest.raises(ValueError, match="does not fit"):
        Crop2d((5, 0)).forward(x, (4, 4))


# -- the whole network ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_whole_network_directional_float64(variant):
    """Along random directions in (x, every trainable parameter) jointly: two forwards each."""
    rng = np.random.default_rng(2)
    model = FCN(variant=variant, dropout=0.5, learn_upsampling=True, dtype="float64", **SMALL)
    randomize(model, rng)
    x = rng.standard_normal((2, 3, 9, 8))
    labels = rng.integers(0, 3, (2, 9, 8))
    # eps 1e-4: the loss's rounding divided by eps dominates below (FCN-32s, whose 64x64
    # upsampler sums many products: 2e-7 at 1e-6, 7e-6 at 1e-7, 9e-9 at 1e-4)
    errors = joint_directional_errors(model, x, labels, rng, directions=3, eps=1e-4)
    assert max(errors) < 1e-6, errors


def test_frozen_upsamplers_get_zero_gradients_and_are_not_trainable():
    rng = np.random.default_rng(3)
    model = FCN(dtype="float64", **SMALL)
    assert set(model.parameters()) - set(model.trainable_parameters()) == {
        "upscore2.weight", "upscore_pool4.weight", "upscore8.weight"}
    x = rng.standard_normal((1, 3, 8, 8))
    model.backward(np.ones(model.forward(x).shape))
    assert not model.gradients()["upscore8.weight"].any()


def test_input_errors_say_what_was_expected():
    model = FCN(**SMALL)
    with pytest.raises(NetworkInputError, match="expected 3 input channel"):
        model.forward(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(TypeError, match="x.astype"):
        model.forward(np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="variant must be one of"):
        FCNConfig(variant="4s")


# -- PyTorch, written from the reference prototxt -------------------------------------------
def torch_fcn(torch, variant, params, x, masks):
    """voc-fcn*s/net.py in PyTorch: the same weights, the reference's crop offsets typed in."""
    F = torch.nn.functional
    p = params

    def conv(name, h, pad):
        return F.conv2d(h, p[f"{name}.weight"], p[f"{name}.bias"], padding=pad)

    def crop(h, offset, like):
        return h[:, :, offset:offset + like.shape[2], offset:offset + like.shape[3]]

    h, pools = x, {}
    for b, convs in enumerate((2, 2, 3, 3, 3), start=1):
        for j in range(1, convs + 1):
            h = F.relu(conv(f"conv{b}_{j}", h, 100 if b == j == 1 else 1))
        h = pools[b] = F.max_pool2d(h, 2, 2, ceil_mode=True)
    h = F.relu(conv("fc6", h, 0)) * masks["drop6"]
    h = F.relu(conv("fc7", h, 0)) * masks["drop7"]
    h = conv("score_fr", h, 0)
    up = lambda name, h, s: F.conv_transpose2d(h, p[f"{name}.weight"], stride=s)   # noqa: E731
    if variant == "32s":
        return crop(up("upscore", h, 32), 19, x)
    h = up("upscore2", h, 2)
    h = h + crop(conv("score_pool4", pools[4], 0), 5, h)
    if variant == "16s":
        return crop(up("upscore16", h, 16), 27, x)
    h = up("upscore_pool4", h, 2)
    h = h + crop(conv("score_pool3", pools[3], 0), 9, h)
    return crop(up("upscore8", h, 8), 31, x)


@pytest.mark.torch
@pytest.mark.parametrize("variant", VARIANTS)
def test_against_torch(variant):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    model = FCN(variant=variant, learn_upsampling=True, dtype="float64", **SMALL)
    randomize(model, rng)
    x = rng.standard_normal((2, 3, 13, 11))
    rewinder(model)
    logits = model.forward(x)
    masks = {name: torch.tensor(layer.mask) for name, layer in model.named_layers().items() if name.startswith("drop")}
    dlogits = rng.standard_normal(logits.shape)
    dx = model.backward(dlogits)
    params = {name: torch.tensor(value, requires_grad=True) for name, value in model.parameters().items()}
    xt = torch.tensor(x, requires_grad=True)
    yt = torch_fcn(torch, variant, params, xt, masks)
    yt.backward(torch.tensor(dlogits))
    np.testing.assert_allclose(logits, yt.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-8, atol=1e-12)
    for name, g in model.gradients().items():
        np.testing.assert_allclose(g, params[name].grad.numpy(), rtol=1e-8, atol=1e-11, err_msg=name)


def test_tracer_sees_every_layer_and_backward_frees_what_each_layer_kept():
    from tinyunet.losses import softmax_cross_entropy
    from tinyunet.trace import trace
    model = FCN(**SMALL)
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with trace(model) as t:
        _, dlogits = softmax_cross_entropy(model.forward(x), np.zeros((1, 8, 8), np.int64))
        model.backward(dlogits)
    assert list(t.records) == list(model.named_layers()) and t.first_nonfinite() is None
    assert sorted(t.backward_order) == sorted(model.named_layers())
    kept = {name: [a for a in layer._saved if getattr(layer, a) is not None] for name, layer in model.layers.items()}
    assert not any(kept.values()), kept


@st.composite
def overhanging_pools(draw):
    """kernel >= stride (what CeilMaxPool2d accepts), sizes that leave the last window hanging
    over the bottom/right edge, values in {-2, -1, -0.0, 0.0} (ties, and all <= 0: a padding
    of 0 instead of -inf would win or tie an overhanging window)."""
    k = draw(st.integers(2, 3))
    s = draw(st.integers(1, k))
    low = k - 1 if k == s else k          # torch's ceil mode needs a first window that starts inside
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(low, 8)), draw(st.integers(low, 8)))
    return k, s, shape, draw(seeds)


@pytest.mark.torch
@pytest.mark.parametrize("path", PATHS)
@given(overhanging_pools())
def test_ceil_pool_overhanging_windows_and_ties_against_torch(path, drawn):
    torch = pytest.importorskip("torch")
    k, s, shape, seed = drawn
    rng = np.random.default_rng(seed)
    x = np.array([-2.0, -1.0, -0.0, 0.0])[rng.integers(0, 4, shape)]
    with layer_path(path):
        pool = CeilMaxPool2d(k, s, return_indices=True)
        y, idx = pool.forward(x)
        dy = rng.standard_normal(y.shape)
        dx = pool.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt, idxt = torch.nn.functional.max_pool2d(xt, k, s, ceil_mode=True, return_indices=True)
    yt.backward(torch.tensor(dy))
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(np.signbit(y), np.signbit(yt.detach().numpy()))    # -0.0 kept
    np.testing.assert_array_equal(idx, idxt.numpy())
    # overlapping windows (s < k) add their gradients, in another order than torch's
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-14, atol=0)
