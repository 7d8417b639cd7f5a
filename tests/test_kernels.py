"""im2col/col2im: the reference, the Numba CPU kernels and the dispatcher (kernels/).

What is proved here:
* the reference equals the definition read literally (cpu.im2col_naive / col2im_naive), and a
  hand-computed example, so the oracle itself is checked;
* the Numba kernels equal the reference: im2col exactly, col2im within float rounding (they add
  in the same order, so in practice exactly), for random N, C, H, W, kernel, symmetric and
  asymmetric padding, stride 1 and 2, float32 and float64;
* col2im is im2col's adjoint: <im2col(x), y> == <x, col2im(y)>;
* ``out=`` buffers are filled and returned, and wrong ones are refused;
* the dispatcher picks by array type, and TINYUNET_KERNELS / use() / using() force a choice.
The CUDA kernels: tests/test_kernels_cuda.py.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyunet import kernels
from tinyunet.kernels import cpu, reference
from tinyunet.kernels.geometry import cols_shape, normalize


@st.composite
def geometries(draw, max_size=7, max_channels=3):
    """dict(shape, kernel, padding, stride, dtype, seed): a window always fits the padded input;
    the kernel sides, the paddings and the strides are drawn per axis."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pads = st.integers(0, 2)
    if draw(st.booleans()):                       # symmetric, as an int pair
        ph, pw = draw(pads), draw(pads)
        padding = ((ph, ph), (pw, pw))
    else:                                         # asymmetric, as Keras pads even kernels
        padding = ((draw(pads), draw(pads)), (draw(pads), draw(pads)))
    (pt, pb), (pl, pr) = padding
    h = draw(st.integers(max(1, kh - pt - pb), max_size))
    w = draw(st.integers(max(1, kw - pl - pr), max_size))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, max_channels)), h, w)
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))   # per axis: (2, 1) and (1, 2) too
    return dict(shape=shape, kernel=(kh, kw), padding=padding, stride=stride,
                dtype=draw(st.sampled_from([np.float32, np.float64])), seed=draw(st.integers(0, 2**32 - 1)))


def draw_arrays(g):
    """x of g's shape and a cols-shaped y, both from g's seed."""
    rng = np.random.default_rng(g["seed"])
    x = rng.standard_normal(g["shape"]).astype(g["dtype"])
    y = rng.standard_normal(cols_shape(g["shape"], g["kernel"], g["padding"], g["stride"])).astype(g["dtype"])
    return x, y


def args(g):
    return g["kernel"], g["padding"], g["stride"]


# -- the oracle is checked first -----------------------------------------------------------

def test_reference_on_a_hand_computed_example():
    """A 3x3 image, 2x2 kernel, no padding: four windows, the rows are the (i, j) offsets."""
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)    # 0 1 2 / 3 4 5 / 6 7 8
    cols = reference.im2col(x, 2, 0, 1)
    expected = np.array([[0, 1, 3, 4],      # (i, j) = (0, 0): top-left of each window
                         [1, 2, 4, 5],      # (0, 1)
                         [3, 4, 6, 7],      # (1, 0)
                         [4, 5, 7, 8]],     # (1, 1)
                        dtype=np.float32)
    np.testing.assert_array_equal(cols[0], expected)
    # col2im adds: the centre pixel sat in all four windows, a corner in one
    counts = reference.col2im(np.ones_like(cols), x.shape, 2, 0, 1)
    np.testing.assert_array_equal(counts[0, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


def test_padding_and_stride_on_a_hand_computed_example():
    """2x2 image, 2x2 kernel, Keras 'same' padding (0 before, 1 after), stride 2: one window,
    and a 3x3 kernel with padding 1 whose corner row reads only zeros."""
    x = np.array([[[[1, 2], [3, 4]]]], dtype=np.float64)
    cols = reference.im2col(x, 2, ((0, 1), (0, 1)), 2)
    np.testing.assert_array_equal(cols[0, :, 0], [1, 2, 3, 4])
    cols = reference.im2col(x, 3, 1, 1)                      # OH = OW = 2
    np.testing.assert_array_equal(cols[0, 0], [0, 0, 0, 1])  # (i, j) = (0, 0) reads the top-left pad


@settings(max_examples=15)
@given(geometries(max_size=5, max_channels=2))
def test_reference_equals_the_naive_loops(g):
    x, y = draw_arrays(g)
    np.testing.assert_array_equal(reference.im2col(x, *args(g)), cpu.im2col_naive(x, *args(g)))
    np.testing.assert_allclose(reference.col2im(y, x.shape, *args(g)), cpu.col2im_naive(y, x.shape, *args(g)),
                               rtol=1e-6, atol=1e-6)


# -- every implementation equals the reference -----------------------------------------------

def rounding(dtype):
    """A tolerance for sums of at most kh*kw = 9 terms of size ~1."""
    return dict(rtol=0, atol=20 * np.finfo(dtype).eps)


@given(geometries())
def test_cpu_im2col_equals_reference(g):
    x, _ = draw_arrays(g)
    got = cpu.im2col(x, *args(g))
    assert got.dtype == x.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, reference.im2col(x, *args(g)))


@settings(max_examples=40)
@given(g=geometries(max_size=40, max_channels=2), offset=st.integers(0, 15))
def test_cpu_im2col_with_streaming_stores_equals_reference(g, offset):
    """The streaming-store path (large float32 outputs) on small ones: every output alignment
    (``offset`` numbers past a 64-byte boundary), rows wider and narrower than a 16-number
    chunk, chunks across output rows, the image's edges and padding rows; every number of
    ``out`` written (it starts as NaN)."""
    x, _ = draw_arrays({**g, "dtype": np.float32})
    shape = cols_shape(x.shape, *args(g))
    size = int(np.prod(shape))
    block = np.full(size + 32, np.nan, dtype=np.float32)
    start = (-(block.ctypes.data // 4)) % 16 + offset
    out = block[start:start + size].reshape(shape)
    assert out.ctypes.data % 64 == 4 * offset
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "STREAM_MIN_BYTES", 0)
        assert cpu.streams(out, normalize(x.shape, *args(g))[2][1]) == (g["stride"][1] == 1)
        assert cpu.im2col(x, *args(g), out=out) is out
    np.testing.assert_array_equal(out, reference.im2col(x, *args(g)))


def test_im2col_into_a_misaligned_out_takes_ordinary_stores(monkeypatch):
    """A float32 buffer off a 4-byte boundary (a view into bytes) can never be streamed into."""
    monkeypatch.setattr(cpu, "STREAM_MIN_BYTES", 0)
    x = np.random.default_rng(0).standard_normal((1, 2, 20, 20)).astype(np.float32)
    shape = cols_shape(x.shape, 3, 1, 1)
    out = np.zeros(4 * int(np.prod(shape)) + 1, dtype=np.uint8)[1:].view(np.float32).reshape(shape)
    assert not out.flags.aligned and not cpu.streams(out, 1)
    np.testing.assert_array_equal(cpu.im2col(x, 3, 1, 1, out=out), reference.im2col(x, 3, 1, 1))


@settings(max_examples=20)
@given(size=st.integers(0, 200), offset=st.integers(0, 15), chunks=st.integers(1, 3), seed=st.integers(0, 99))
def test_write_streaming_sets_every_number(size, offset, chunks, seed):
    """The write roof of kernels/bench.py: every alignment, sizes below and above a chunk,
    sources of one to three chunks repeated."""
    source = np.random.default_rng(seed).standard_normal(16 * chunks).astype(np.float32)
    block = np.full(size + 32, np.nan, dtype=np.float32)
    out = block[offset:offset + size]
    assert cpu.write_streaming(out, source) is out
    np.testing.assert_array_equal(out, np.resize(source, size))
    assert np.isnan(block[:offset]).all() and np.isnan(block[offset + size:]).all()
    with pytest.raises(ValueError, match="C-contiguous, aligned float32 out"):
        cpu.write_streaming(np.zeros(4), source)
    misaligned = np.zeros(4 * 33, dtype=np.uint8)[1:129].view(np.float32)
    with pytest.raises(ValueError, match="not on a 4-byte boundary"):
        cpu.write_streaming(misaligned, source)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu.write_streaming(out, source[:10])


@given(geometries())
def test_cpu_col2im_equals_reference(g):
    x, y = draw_arrays(g)
    got = cpu.col2im(y, x.shape, *args(g))
    assert got.shape == x.shape and got.dtype == y.dtype
    np.testing.assert_allclose(got, reference.col2im(y, x.shape, *args(g)), **rounding(g["dtype"]))


@settings(max_examples=10)
@given(geometries(max_size=5, max_channels=2))
def test_cpu_matches_naive_loops(g):
    """The fast kernels against the literal definition, without the reference in between."""
    x, y = draw_arrays(g)
    np.testing.assert_array_equal(cpu.im2col(x, *args(g)), cpu.im2col_naive(x, *args(g)))
    np.testing.assert_allclose(cpu.col2im(y, x.shape, *args(g)), cpu.col2im_naive(y, x.shape, *args(g)),
                               **rounding(g["dtype"]))


@pytest.mark.parametrize("impl", [reference, cpu], ids=["reference", "cpu"])
@settings(max_examples=15)
@given(g=geometries())
def test_col2im_is_the_adjoint_of_im2col(impl, g):
    """<im2col(x), y> == <x, col2im(y)>: col2im must ADD overlapping windows, not assign."""
    x, y = draw_arrays({**g, "dtype": np.float64})
    lhs = np.vdot(impl.im2col(x, *args(g)), y)
    rhs = np.vdot(x, impl.col2im(y, x.shape, *args(g)))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_cpu_on_a_larger_input_with_both_strides():
    """More rows than threads and runs longer than a vector: the parallel split and the
    vectorised copies are exercised (the hypothesis inputs above are tiny)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 37, 29)).astype(np.float32)
    for kernel, padding, stride in [(3, 1, 1), (2, ((0, 1), (0, 1)), 1), (3, ((2, 0), (1, 2)), 2),
                                    ((3, 2), ((1, 0), (0, 1)), (2, 1)), ((2, 3), 1, (1, 2))]:
        cols = cpu.im2col(x, kernel, padding, stride)
        np.testing.assert_array_equal(cols, reference.im2col(x, kernel, padding, stride))
        np.testing.assert_allclose(cpu.col2im(cols, x.shape, kernel, padding, stride),
                                   reference.col2im(cols, x.shape, kernel, padding, stride), atol=1e-5, rtol=0)


def test_non_contiguous_input_is_accepted():
    x = np.random.default_rng(1).standard_normal((3, 4, 6, 5)).astype(np.float32)
    view = x[::2, :, :, ::-1]                   # strided and reversed
    np.testing.assert_array_equal(cpu.im2col(view, 3, 1, 1), reference.im2col(view, 3, 1, 1))


# -- out= buffers ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [reference, cpu], ids=["reference", "cpu"])
def test_out_buffers_are_filled_and_returned(impl):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    out = np.full(cols_shape(x.shape, 3, 1, 1), np.nan, dtype=np.float32)   # stale garbage
    assert impl.im2col(x, 3, 1, 1, out=out) is out
    np.testing.assert_array_equal(out, reference.im2col(x, 3, 1, 1))
    back = np.full(x.shape, np.nan, dtype=np.float32)
    assert impl.col2im(out, x.shape, 3, 1, 1, out=back) is back
    np.testing.assert_allclose(back, reference.col2im(out, x.shape, 3, 1, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", [reference, cpu], ids=["reference", "cpu"])
def test_wrong_out_buffers_are_refused(impl):
    x = np.zeros((1, 2, 4, 4), dtype=np.float32)
    shape = cols_shape(x.shape, 3, 1, 1)
    with pytest.raises(ValueError, match="shape"):
        impl.im2col(x, 3, 1, 1, out=np.empty(shape[:2] + (shape[2] + 1,), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        impl.im2col(x, 3, 1, 1, out=np.empty(shape, np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        impl.im2col(x, 3, 1, 1, out=np.empty(shape[::-1], np.float32).T)
    with pytest.raises(ValueError, match="cols has shape"):
        impl.col2im(np.zeros(shape[:2] + (3,), np.float32), x.shape, 3, 1, 1)


def test_geometry_errors_name_the_problem():
    with pytest.raises(ValueError, match="does not fit"):
        normalize((1, 1, 2, 2), 5, 0, 1)
    with pytest.raises(ValueError, match="negative"):
        normalize((1, 1, 4, 4), 3, -1, 1)
    with pytest.raises(ValueError, match="stride"):
        normalize((1, 1, 4, 4), 3, 1, 0)


# -- the dispatcher -------------------------------------------------------------------------

@pytest.fixture
def automatic_dispatch():
    previous = kernels.forced()
    kernels.use(None)
    yield
    kernels.use(previous)


def test_numpy_arrays_go_to_the_numba_kernels(automatic_dispatch):
    x = np.zeros((1, 1, 3, 3), np.float32)
    assert kernels.implementation_for(x) is cpu
    assert kernels.available()["cpu"] is None


def test_use_and_using_force_an_implementation(automatic_dispatch):
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    kernels.use("reference")
    assert kernels.implementation_for(x) is reference and kernels.forced() == "reference"
    with kernels.using("cpu"):
        assert kernels.implementation_for(x) is cpu
        np.testing.assert_array_equal(kernels.im2col(x, 3, 1, 1), reference.im2col(x, 3, 1, 1))
    assert kernels.forced() == "reference"
    kernels.use(None)
    assert kernels.implementation_for(x) is cpu
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        kernels.use("fortran")


def test_forced_cpu_refuses_what_it_cannot_read(automatic_dispatch):
    with kernels.using("cpu"), pytest.raises(TypeError, match="NumPy arrays"):
        kernels.im2col([[[[1.0]]]], 1, 0, 1)


def test_environment_variable_forces_an_implementation():
    code = ("import numpy as np; from tinyunet import kernels; "
            "print(kernels.forced(), kernels.implementation_for(np.zeros(1)).__name__)")
    env = {**os.environ, kernels.ENVIRONMENT_VARIABLE: "reference"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["reference", "tinyunet.kernels.reference"]


# -- the conv layer's compute path (tinyunet/layers/conv.py: im2col, flip, shifted) ---------

@st.composite
def conv_cases(draw):
    """A small conv geometry whose padding is given explicitly (asymmetric included)."""
    g = draw(geometries(max_size=6, max_channels=3))
    return dict(g, f=draw(st.integers(1, 4)), dtype=np.float64)


def conv2d_naive_backward(x, weight, dy, padding, stride):
    """(dx, dW, db) of y = conv(x, W) + b by the definition, window by window: each output
    pixel's dy[n, :, r, q] adds W^T dy to its window of dx and dy x^T to dW. The oracle of the
    backward, independent of im2col/col2im and of every method."""
    f, c, kh, kw = weight.shape
    (pt, pb), (pl, pr) = padding
    sh, sw = stride
    n, _, h, w = x.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    dx_pad, dw = np.zeros_like(x_pad), np.zeros_like(weight)
    for b in range(n):
        for r in range(dy.shape[2]):
            for q in range(dy.shape[3]):
                g = dy[b, :, r, q][:, None, None, None]                     # (F, 1, 1, 1)
                window = (slice(r * sh, r * sh + kh), slice(q * sw, q * sw + kw))
                dw += g * x_pad[b, :, window[0], window[1]][None]
                dx_pad[b, :, window[0], window[1]] += (g * weight).sum(axis=0)
    return dx_pad[:, :, pt:pt + h, pl:pl + w], dw, dy.sum(axis=(0, 2, 3))


@pytest.mark.parametrize("method", ["auto", "im2col", "flip", "shifted", "winograd"])
@settings(max_examples=15)
@given(g=conv_cases())
def test_conv_methods_agree_with_the_naive_loops(method, g):
    """Every method gives conv2d_naive's y and conv2d_naive_backward's dx, dW, db (the
    definition, not another method). A method that cannot do a geometry (e.g. 'flip' at
    stride 2) falls back to im2col, and the test then says so by what it asserts."""
    from tinyunet.layers import Conv2d, conv2d_naive
    from tinyunet.layers import conv
    rng = np.random.default_rng(g["seed"])
    layer = Conv2d(g["shape"][1], g["f"], g["kernel"], padding=g["padding"], stride=g["stride"],
                   seed=g["seed"] % 1000, dtype=np.float64)
    layer.params["bias"] = rng.standard_normal(g["f"])
    x = rng.standard_normal(g["shape"])
    expected_y = conv2d_naive(x, layer.params["weight"], layer.params["bias"], g["padding"], g["stride"])
    dy = rng.standard_normal(expected_y.shape)
    expected_dx, expected_dw, expected_db = conv2d_naive_backward(x, layer.params["weight"], dy, g["padding"],
                                                                  g["stride"])
    with conv.using_method(method):
        y = layer.forward(x)
        dx = layer.backward(dy)
        ran = conv._resolve_method(layer.params["weight"], g["padding"], g["stride"], x.shape)
    assert ran == method or method == "auto" or not conv.method_applies(method, g["kernel"], g["padding"],
                                                                        g["stride"])
    np.testing.assert_allclose(y, expected_y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grads["weight"], expected_dw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grads["bias"], expected_db, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["im2col", "flip", "shifted", "winograd"])
def test_each_conv_method_passes_a_gradient_check(method):
    """The derivative itself, not just agreement between methods: directional checks on a
    'same' 3x3 and a Keras 2x2 (padding 0 before, 1 after)."""
    from tinyunet.gradcheck import check_layer
    from tinyunet.layers import Conv2d
    from tinyunet.layers import conv
    rng = np.random.default_rng(5)
    for kernel in (3, 2):
        layer = Conv2d(5, 3, kernel, padding="same", seed=3, dtype=np.float64)
        with conv.using_method(method):
            errors = check_layer(layer, rng.standard_normal((2, 5, 9, 8)), mode="directional", rng=rng)
        assert errors and max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("method", ["im2col", "flip"])
@settings(max_examples=20)
@given(g=conv_cases(), limit=st.sampled_from([1, 200, 2000]))
def test_pieces_give_the_same_conv_as_one_column_matrix(method, g, limit):
    """A workspace limit of a few bytes cuts the column matrix into single images and bands of
    output rows (conv.pieces); y, dx, dW and db must not change (float64: same sums, same
    order within each product, so to rounding)."""
    from tinyunet.layers import Conv2d
    from tinyunet.layers import conv
    rng = np.random.default_rng(g["seed"])
    layer = Conv2d(g["shape"][1], g["f"], g["kernel"], padding=g["padding"], stride=g["stride"],
                   seed=g["seed"] % 1000, dtype=np.float64)
    x = rng.standard_normal(g["shape"])
    results = []
    for workspace in (10 ** 12, limit):
        saved, conv.WORKSPACE_BYTES = conv.WORKSPACE_BYTES, workspace
        try:
            with conv.using_method(method):
                y = layer.forward(x)
                dy = np.random.default_rng(1).standard_normal(y.shape)
                results.append((y, layer.backward(dy), *(layer.grads[k].copy() for k in sorted(layer.grads))))
        finally:
            conv.WORKSPACE_BYTES = saved
    for whole, pieced in zip(*results):
        np.testing.assert_allclose(pieced, whole, rtol=1e-12, atol=1e-12)


def test_pieces_cover_every_output_row_once_and_read_the_right_rows():
    from tinyunet.layers.conv import pieces
    x_shape, kernel, padding, stride = (2, 3, 11, 5), (3, 3), ((1, 2), (1, 1)), (2, 1)
    oh = (11 + 3 - 3) // 2 + 1                                         # 6 output rows
    assert [p.out_rows for p in pieces(x_shape, kernel, padding, stride, 8)] == [(0, oh)]
    row_bytes = 3 * 9 * 5 * 8
    parts = pieces(x_shape, kernel, padding, stride, 8, limit=4 * row_bytes)   # 4 rows per band
    assert [(p.image, p.out_rows) for p in parts] == [(slice(0, 1), (0, 4)), (slice(0, 1), (4, 6)),
                                                      (slice(1, 2), (0, 4)), (slice(1, 2), (4, 6))]
    # rows 0-3 read input rows -1..7 (one padding row above), rows 4-5 read 7..11 (one below)
    assert parts[0].in_rows == (0, 8) and parts[0].padding == ((1, 0), (1, 1))
    assert parts[1].in_rows == (7, 11) and parts[1].padding == ((0, 1), (1, 1))
    # padding beyond kernel - 1 would leave a band with no image rows: whole images only
    wide = pieces(x_shape, kernel, ((3, 3), (0, 0)), (1, 1), 8, limit=1)
    assert [p.out_rows for p in wide] == [(0, 15), (0, 15)]


def test_workspace_bytes():
    """The buffer a conv needs: its whole column matrix when that fits WORKSPACE_BYTES, one
    band when not, Winograd's V and M side by side."""
    from tinyunet.layers import Conv2d
    from tinyunet.layers import conv
    assert Conv2d(1, 64, 3).workspace_bytes((2, 1, 16, 16)) == 2 * 9 * 16 * 16 * 4          # im2col
    # Winograd, 64 -> 64 at 16x16, batch 2: F(2x2, 3x3), 2 * 8 * 8 tiles, 16 numbers per tile
    # and channel; at 32x32 F(4x4, 3x3): 2 * 8 * 8 tiles, 36 numbers
    assert Conv2d(64, 64, 3).workspace_bytes((2, 64, 16, 16)) == 2 * 8 * 8 * 16 * 128 * 4
    assert Conv2d(64, 64, 3).workspace_bytes((2, 64, 32, 32)) == 2 * 8 * 8 * 36 * 128 * 4
    with conv.using_method("im2col"):                                                     # too big: bands
        banded = Conv2d(128, 64, 3).workspace_bytes((2, 128, 256, 256))
    row = 128 * 9 * 256 * 4
    assert banded == conv.WORKSPACE_BYTES // row * row


@pytest.mark.parametrize("small_image_pixels", [0, 10**9])
def test_both_weight_gradient_layouts_pass_a_gradient_check(small_image_pixels, monkeypatch):
    """dW is summed image by image for large images and taken from the batch laid side by
    side for small ones (conv.SMALL_IMAGE_PIXELS); force each and check the derivative, and
    that the two give the same numbers."""
    from tinyunet.gradcheck import check_layer
    from tinyunet.layers import Conv2d
    from tinyunet.layers import conv
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4, 7, 6))
    layer = Conv2d(4, 5, 3, padding="same", seed=2, dtype=np.float64)
    monkeypatch.setattr(conv, "SMALL_IMAGE_PIXELS", small_image_pixels)
    with conv.using_method("im2col"):
        errors = check_layer(layer, x, mode="directional", rng=rng)
        assert errors and max(errors.values()) < 1e-6, errors
        dy = rng.standard_normal(layer.forward(x).shape)
        layer.backward(dy)
        dw = layer.grads["weight"].copy()
    monkeypatch.setattr(conv, "SMALL_IMAGE_PIXELS", 10**9 - small_image_pixels)
    with conv.using_method("im2col"):
        layer.forward(x)
        layer.backward(dy)
    np.testing.assert_allclose(layer.grads["weight"], dw, rtol=1e-12, atol=1e-12)


def test_conv_float32_stays_float32_and_outputs_never_alias_the_workspace():
    from tinyunet.layers import Conv2d
    from tinyunet.layers import conv
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 10, 10)).astype(np.float32)
    for method in ("im2col", "flip", "shifted"):
        layer = Conv2d(4, 3, 3, seed=1)
        with conv.using_method(method):
            y = layer.forward(x)
            dx = layer.backward(np.ones_like(y))
        blocks = list(conv._workspace.values())
        assert blocks, "the workspace should hold the reused column buffer"
        for result in (y, dx, *layer.grads.values()):
            assert result.dtype == np.float32, method
            assert not any(np.shares_memory(result, block) for block in blocks), method


def test_choose_method_follows_the_benchmark():
    from tinyunet.layers.conv import choose_method
    same3, same2 = ((1, 1), (1, 1)), ((0, 1), (0, 1))
    assert choose_method(64, 2, (3, 3), same3, (1, 1)) == "shifted"      # the U-Net head
    small = 4 * 4                                                           # below Winograd's size
    assert choose_method(128, 64, (3, 3), same3, (1, 1), small) == "flip"       # F < C
    assert choose_method(128, 128, (3, 3), same3, (1, 1), small) == "im2col"    # F = C
    assert choose_method(1024, 512, (2, 2), same2, (1, 1)) == "flip"
    assert choose_method(64, 128, (3, 3), same3, (1, 1), small) == "im2col"     # F > C
    assert choose_method(64, 64, (3, 3), same3, (2, 2)) == "im2col"      # stride 2
    assert choose_method(2, 1, (1, 1), ((0, 0), (0, 0)), (1, 1)) != "shifted"
    with pytest.raises(ValueError, match="unknown conv method"):
        from tinyunet.layers.conv import use_method
        use_method("fft")


# -- the benchmark runs end to end (tiny: a 4-channel U-Net on 16x16) ------------------------

def test_bench_writes_table_json_and_chart(tmp_path, capsys):
    import json
    from tinyunet.kernels import bench
    out = tmp_path / "bench"
    result = bench.main(["--size", "16", "--base-width", "4", "--repeats", "1", "--settle", "0", "--quiet",
                         "--out", str(out)])
    shapes = bench.unet_shapes(16, 2, base_width=4)
    impls = result["meta"]["implementations"]
    assert impls[:2] == ["numpy", "numba"]
    assert len(result["rows"]) == len(shapes) * len(bench.OPS) * len(impls)
    assert all(r["ms"] > 0 and 0 < r["peak_share"] for r in result["rows"])
    roof = result["headline"]["im2col"]        # the write roof, measured beside the rest
    assert result["peaks"]["write_gbps"] > 0 and roof["roof_speedup"] == roof["baseline_ms"] / roof["roof_ms"]
    assert sum(s.count for s in shapes) == 24                 # every conv of the U-Net, once
    # the up-convs as the 2x2 convs they fuse, on the upsampled input (UpConv2d's own input is
    # half the size)
    up = [s for s in shapes if any(name.endswith("upconv") for name in s.layers)]
    assert {s.x_shape[1:] for s in up} == {(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)}
    assert all(s.fused_upsampling for s in up) and sum(s.fused_upsampling for s in shapes) == 4
    fused_rows = [m for m in result["methods"] if m["chosen"] == "upconv"]
    assert len(fused_rows) == 4 and all(m["ms"]["upconv"] > 0 and "flip" in m["ms"] for m in fused_rows)
    saved = json.loads((out / "results.json").read_text())
    assert saved["totals"]["forward+backward"].keys() == set(impls)
    assert (out / "results.png").stat().st_size > 10_000
    assert "Summed over all the U-Net's conv layers" in (out / "results.md").read_text()
    assert "U-Net convs forward+backward" in capsys.readouterr().out or "torch" not in impls
