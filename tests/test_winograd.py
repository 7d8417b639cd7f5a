"""Winograd F(2x2, 3x3) and F(4x4, 3x3) (kernels/winograd.py): the transforms against the
direct convolution, the Numba kernels against the reference, and each backward as the exact
transpose, for both tile sizes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyunet import kernels
from tinyunet.kernels import winograd
from tinyunet.layers import Conv2d, conv2d_naive
from tinyunet.layers import conv


@st.composite
def cases(draw):
    """A 3x3 stride-1 geometry: odd and even sizes, padding 0-2 on each side, asymmetric too."""
    pads = ((draw(st.integers(0, 2)), draw(st.integers(0, 2))), (draw(st.integers(0, 2)), draw(st.integers(0, 2))))
    h = draw(st.integers(max(1, 3 - pads[0][0] - pads[0][1]), 9))
    w = draw(st.integers(max(1, 3 - pads[1][0] - pads[1][1]), 9))
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)), f=draw(st.integers(1, 4)), h=h, w=w,
                padding=pads, seed=draw(st.integers(0, 2 ** 16)))


def transformed_conv(x, weight, bias, padding, fast: bool, tile: int):
    """y through the four steps, by the reference or by the Numba kernels."""
    (top, bottom), (left, right) = padding
    out_h, out_w = x.shape[2] + top + bottom - 2, x.shape[3] + left + right - 2
    th, tw = winograd.tiles(out_h, out_w, tile)
    with kernels.using(None if fast else "reference"):
        v = winograd.input_transform(x, top, left, th, tw, tile=tile)
        m = np.matmul(winograd.weight_transform(weight, tile), v)
        return winograd.output_transform(m, x.shape[0], out_h, out_w, bias, tile=tile)


TILES = pytest.mark.parametrize("tile", [2, 4])


@TILES
@settings(max_examples=40, deadline=None)
@given(g=cases())
def test_the_transforms_compute_the_convolution(tile, g):
    rng = np.random.default_rng(g["seed"])
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    weight, bias = rng.standard_normal((g["f"], g["c"], 3, 3)), rng.standard_normal(g["f"])
    expected = conv2d_naive(x, weight, bias, g["padding"])
    for fast in (False, True):
        np.testing.assert_allclose(transformed_conv(x, weight, bias, g["padding"], fast, tile), expected,
                                   rtol=1e-10, atol=1e-10)


@TILES
@settings(max_examples=30, deadline=None)
@given(g=cases())
def test_each_kernel_equals_its_reference_and_each_backward_is_the_transpose(tile, g):
    """<T a, b> = <a, T^T b> for every transform T and its backward, on random a and b:
    the definition of the transpose, so the backward is the gradient of the forward."""
    rng = np.random.default_rng(g["seed"])
    (top, bottom), (left, right) = g["padding"]
    n, c, f, h, w = g["n"], g["c"], g["f"], g["h"], g["w"]
    out_h, out_w = h + top + bottom - 2, w + left + right - 2
    th, tw = winograd.tiles(out_h, out_w, tile)
    k = (tile + 2) ** 2
    x = rng.standard_normal((n, c, h, w))
    dv = rng.standard_normal((k, c, n * th * tw))
    m = rng.standard_normal((k, f, n * th * tw))
    dy = rng.standard_normal((n, f, out_h, out_w))
    weight, du = rng.standard_normal((f, c, 3, 3)), rng.standard_normal((k, f, c))
    results = {}
    for name in ("reference", None):
        with kernels.using(name):
            results[name] = (winograd.input_transform(x, top, left, th, tw, tile=tile),
                             winograd.input_transform_backward(dv, x.shape, top, left, th, tw, tile=tile),
                             winograd.output_transform(m, n, out_h, out_w, tile=tile),
                             winograd.output_transform_backward(dy, tile=tile))
    for fast, reference in zip(results[None], results["reference"]):
        np.testing.assert_allclose(fast, reference, rtol=1e-12, atol=1e-12)
    v, dx, y, dm = results["reference"]
    assert np.vdot(v, dv) == pytest.approx(np.vdot(x, dx), rel=1e-10, abs=1e-10)
    assert np.vdot(y, dy) == pytest.approx(np.vdot(m, dm), rel=1e-10, abs=1e-10)
    du_t = du.transpose(0, 2, 1)
    for name in ("reference", None):
        with kernels.using(name):
            results[name] = (winograd.weight_transform(weight, tile), winograd.weight_transform_backward(du_t, tile))
    for fast, reference in zip(results[None], results["reference"]):
        np.testing.assert_allclose(fast, reference, rtol=1e-12, atol=1e-12)
    u, dg = results["reference"]
    assert np.vdot(u, du) == pytest.approx(np.vdot(weight, dg), rel=1e-10)


@TILES
@pytest.mark.parametrize("workspace", [10 ** 12, 1])
@settings(max_examples=15, deadline=None)
@given(g=cases())
def test_the_winograd_method_gives_the_im2col_conv_and_gradients(tile, workspace, g):
    """The layer with method 'winograd', whole or in one-band pieces, against plain im2col."""
    rng = np.random.default_rng(g["seed"])
    layer = Conv2d(g["c"], g["f"], 3, padding=g["padding"], seed=g["seed"] % 100, dtype=np.float64)
    layer.params["bias"] = rng.standard_normal(g["f"])
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    results = []
    for method in ("im2col", "winograd"):
        saved = conv.WORKSPACE_BYTES, conv.WINOGRAD_TILE
        conv.WORKSPACE_BYTES, conv.WINOGRAD_TILE = (workspace if method == "winograd" else 10 ** 12), tile
        try:
            with conv.using_method(method):
                y = layer.forward(x)
                dy = np.random.default_rng(3).standard_normal(y.shape)
                results.append((y, layer.backward(dy), layer.grads["weight"].copy(), layer.grads["bias"].copy()))
        finally:
            conv.WORKSPACE_BYTES, conv.WINOGRAD_TILE = saved
    for winograd_result, im2col_result in zip(results[1], results[0]):
        np.testing.assert_allclose(winograd_result, im2col_result, rtol=1e-10, atol=1e-10)


@TILES
def test_winograd_float32_is_within_rounding_of_float64(tile, monkeypatch):
    """Forward and backward (dx, dW, db): the float32 Winograd layer within 1e-4 of the float64
    result's scale for both tiles (measured: ~5e-7 with 2x2 tiles, ~1e-5 with 4x4, whose
    matrices have larger entries). The float64 side is computed by im2col, so a transform
    wrong in both precisions fails here too."""
    monkeypatch.setattr(conv, "WINOGRAD_TILE", tile)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 20, 20))
    layer = Conv2d(32, 24, 3, seed=1, dtype=np.float64)
    layer.params["bias"][:] = rng.standard_normal(24)
    dy = rng.standard_normal((2, 24, 20, 20))
    with conv.using_method("im2col"):
        exact = layer.forward(x)
        exact_dx = layer.backward(dy)
        exact_grads = {k: v.copy() for k, v in layer.grads.items()}
    single_layer = layer.astype(np.float32)
    with conv.using_method("winograd"):
        assert conv._resolve_method(single_layer.params["weight"], ((1, 1), (1, 1)), (1, 1), x.shape) == "winograd"
        single = single_layer.forward(x.astype(np.float32))
        single_dx = single_layer.backward(dy.astype(np.float32))
    for got, want in [(single, exact), (single_dx, exact_dx), (single_layer.grads["weight"], exact_grads["weight"]),
                      (single_layer.grads["bias"], exact_grads["bias"])]:
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_auto_chooses_winograd_for_wide_3x3_on_large_images_and_not_elsewhere():
    same = ((1, 1), (1, 1))
    assert conv.choose_method(64, 64, (3, 3), same, (1, 1), 256 * 256) == "winograd"
    assert conv.choose_method(1024, 512, (3, 3), same, (1, 1), 32 * 32) == "winograd"
    assert conv.choose_method(1024, 1024, (3, 3), same, (1, 1), 16 * 16) == "winograd"  # the bottom at 256x256
    assert conv.choose_method(1024, 1024, (3, 3), same, (1, 1), 8 * 8) == "im2col"      # ... at 128x128
    assert conv.choose_method(1024, 512, (3, 3), same, (1, 1), 8 * 8) == "flip"
    assert conv.choose_method(256, 256, (3, 3), same, (1, 1), 8 * 8) == "winograd"  # a small U: SegNet's block 5
    assert conv.choose_method(256, 256, (3, 3), same, (1, 1), 4 * 4) == "im2col"
    assert conv.choose_method(64, 64, (3, 3), same, (1, 1), 256 * 256, gpu=True) == "im2col"   # CPU-measured
    assert conv.choose_method(1, 64, (3, 3), same, (1, 1)) == "im2col"          # the first conv
    assert conv.choose_method(64, 2, (3, 3), same, (1, 1)) == "shifted"         # the head
    assert conv.choose_method(128, 64, (2, 2), ((0, 1), (0, 1)), (1, 1)) == "flip"   # an up-conv
    assert conv.choose_method(64, 64, (3, 3), same, (2, 2)) == "im2col"         # stride 2


@TILES
@pytest.mark.parametrize("workspace", [10 ** 12, 1])
def test_the_winograd_method_on_the_reference_transforms(workspace, tile, monkeypatch):
    """The path CuPy arrays take (TINYUNET_KERNELS=reference here): the transforms return fresh
    arrays instead of filling the workspace, and the layer must give the same results."""
    monkeypatch.setattr(conv, "WINOGRAD_TILE", tile)
    rng = np.random.default_rng(4)
    layer = Conv2d(3, 5, 3, padding=((1, 2), (0, 1)), seed=2, dtype=np.float64)
    x = rng.standard_normal((2, 3, 7, 6))
    with conv.using_method("im2col"):
        y = layer.forward(x)
        dy = rng.standard_normal(y.shape)
        expected = (y, layer.backward(dy), layer.grads["weight"].copy())
    saved, conv.WORKSPACE_BYTES = conv.WORKSPACE_BYTES, workspace
    try:
        with conv.using_method("winograd"), kernels.using("reference"):
            got = (layer.forward(x), layer.backward(dy), layer.grads["weight"].copy())
    finally:
        conv.WORKSPACE_BYTES = saved
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


@TILES
def test_a_training_forward_keeps_v_and_u_for_the_backward_up_to_a_size(tile, monkeypatch):
    """What the forward keeps (conv._winograd_kept): V and U, each up to WINOGRAD_KEEP_BYTES,
    V only when the conv is one piece; nothing inside no_grad(); used up by the backward.
    Kept or computed again, the backward gives the same bits, and kept_bytes counts them."""
    from tinyunet import no_grad
    monkeypatch.setattr(conv, "WINOGRAD_TILE", tile)
    rng = np.random.default_rng(5)
    layer = Conv2d(16, 24, 3, seed=1, dtype=np.float64)
    x, dy = rng.standard_normal((2, 16, 12, 10)), rng.standard_normal((2, 24, 12, 10))

    def step():
        y = layer.forward(x)
        kept = dict(layer._winograd)
        kept_bytes = layer.kept_bytes(x.shape)
        dx = layer.backward(dy)
        assert layer._winograd is None                       # used up: V became dV
        return kept, kept_bytes, (y, dx, layer.grads["weight"].copy(), layer.grads["bias"].copy())

    with conv.using_method("winograd"):
        kept, kept_bytes, results = step()
        assert set(kept) == {"v", "u"} and kept_bytes == x.nbytes + kept["v"].nbytes + kept["u"].nbytes
        assert kept["u"].shape == ((tile + 2) ** 2, 24, 16)
        smaller = min(kept["v"].nbytes, kept["u"].nbytes)
        monkeypatch.setattr(conv, "WORKSPACE_BYTES", 1)        # bands: each its own V, computed again
        kept, kept_bytes, in_bands = step()
        assert set(kept) == {"u"} and kept_bytes == x.nbytes + kept["u"].nbytes
        monkeypatch.setattr(conv, "WORKSPACE_BYTES", 64 * 2 ** 20)
        monkeypatch.setattr(conv, "WINOGRAD_KEEP_BYTES", smaller - 1)
        kept, kept_bytes, recomputed = step()
        assert kept == {} and kept_bytes == x.nbytes
        with no_grad():
            layer.forward(x)
        assert layer._winograd is None
    for a, b in zip(recomputed, results):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(in_bands, results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@TILES
def test_two_convs_in_a_row_keep_their_own_v(tile, monkeypatch):
    """Each conv keeps a V of its own, not the workspace the next conv's forward overwrites:
    through two Winograd convs the gradients with V and U kept are those computed again."""
    monkeypatch.setattr(conv, "WINOGRAD_TILE", tile)
    rng = np.random.default_rng(6)
    first, second = Conv2d(16, 24, 3, seed=1, dtype=np.float64), Conv2d(24, 16, 3, seed=2, dtype=np.float64)
    x, dy = rng.standard_normal((2, 16, 12, 10)), rng.standard_normal((2, 16, 12, 10))

    def run():
        y = second.forward(first.forward(x))
        assert set(first._winograd) == set(second._winograd) == ({"v", "u"} if conv.WINOGRAD_KEEP_BYTES else set())
        dx = first.backward(second.backward(dy))
        return y, dx, first.grads["weight"].copy(), second.grads["weight"].copy()

    with conv.using_method("winograd"):
        kept = run()
        monkeypatch.setattr(conv, "WINOGRAD_KEEP_BYTES", 0)
        recomputed = run()
    for a, b in zip(kept, recomputed):
        np.testing.assert_array_equal(a, b)


def test_the_tile_follows_the_image_size():
    """F(4x4, 3x3) from WINOGRAD_TILE4_MIN_PIXELS output pixels (the U-Net's levels from 32x32),
    F(2x2, 3x3) below, where its 36 transformed weight copies would cost more than they save."""
    same = ((1, 1), (1, 1))
    assert conv._winograd_tile((2, 64, 256, 256), same) == 4
    assert conv._winograd_tile((2, 512, 32, 32), same) == 4
    assert conv._winograd_tile((2, 512, 16, 16), same) == 2
    assert conv._winograd_tile((2, 64, 34, 34), ((0, 0), (0, 0))) == 4        # 32x32 out, valid
    assert conv._winograd_tile((2, 64, 33, 33), ((0, 0), (0, 0))) == 2        # 31x31 out


@settings(max_examples=30, deadline=None)
@given(k=st.sampled_from([1, 16, 36]), m=st.integers(1, 20), inner=st.integers(1, 20), n=st.integers(1, 40),
       transpose=st.sampled_from(["", "a", "b"]), dtype=st.sampled_from([np.float32, np.float64]),
       into_out=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_the_products_on_numba_threads_equal_matmul(k, m, inner, n, transpose, dtype, into_out, seed):
    """winograd.products (the a^2 products of a Winograd conv: one BLAS call per Numba task when
    Numba has more than one thread, np.matmul otherwise) against np.matmul, for each transpose."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, inner, m) if transpose == "a" else (k, m, inner)).astype(dtype)
    b = rng.standard_normal((k, n, inner) if transpose == "b" else (k, inner, n)).astype(dtype)
    expected = np.matmul(a.transpose(0, 2, 1) if transpose == "a" else a, b.transpose(0, 2, 1) if transpose == "b" else b)
    out = np.full(expected.shape, np.nan, dtype=dtype) if into_out else None
    got = winograd.products(a, b, out=out, transpose_a=transpose == "a", transpose_b=transpose == "b")
    assert got.shape == expected.shape and got.dtype == dtype and (out is None or got is out)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * inner)


def test_the_products_take_numbas_threads_where_there_are_two(monkeypatch):
    """With more than one Numba thread the products run in Numba's kernels (and SciPy's BLAS is
    held to one thread); with one, or with the reference forced, np.matmul serves."""
    import numba
    a, b = np.ones((4, 3, 5), np.float32), np.ones((4, 5, 2), np.float32)
    calls = []
    monkeypatch.setattr(winograd, "_products_nn", lambda *args: calls.append("numba"))
    if numba.config.NUMBA_NUM_THREADS > 1:
        winograd.products(a, b)
        assert calls == ["numba"] and winograd._PRODUCTS_ON_NUMBA["ready"] is True
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        np.testing.assert_array_equal(winograd.products(a, b), np.full((4, 3, 2), 5, np.float32))
    finally:
        numba.set_num_threads(previous)
    with kernels.using("reference"):
        np.testing.assert_array_equal(winograd.products(a, b), np.full((4, 3, 2), 5, np.float32))
    assert calls in ([], ["numba"])
    assert len(calls) == (1 if numba.config.NUMBA_NUM_THREADS > 1 else 0)
