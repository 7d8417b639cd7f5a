"""Hypothesis strategies for layer geometries, kept small so gradient checks stay fast.

Every strategy returns plain Python values; tests build the arrays from a seed so that a
failing example is reproducible from what hypothesis prints.
"""
from hypothesis import strategies as st

small_int = st.integers

#: Non-square geometries that every conv test also runs explicitly (hypothesis draws them too,
#: but a list written down cannot be shrunk away): (kernel, stride, padding).
NON_SQUARE_CASES = [((3, 1), (2, 1), ((1, 0), (0, 2))), ((1, 3), (1, 2), "same"), ((2, 3), (2, 1), "valid"),
                    ((3, 2), (1, 3), (1, 0)), ((3, 3), (2, 1), "same"), ((2, 2), (1, 2), ((0, 1), (2, 1)))]


@st.composite
def paddings(draw, kernel):
    """'same', 'valid', an int, a pair (rows, columns), or explicit ((top, bottom), (left,
    right)): every side drawn on its own, so asymmetric and non-square paddings come up."""
    kind = draw(st.sampled_from(["same", "valid", "int", "pair", "explicit"]))
    if kind in ("same", "valid"):
        return kind
    if kind == "int":
        return draw(small_int(0, 2))
    if kind == "pair":
        return (draw(small_int(0, 2)), draw(small_int(0, 2)))
    pair = st.tuples(small_int(0, 2), small_int(0, 2))
    return (draw(pair), draw(pair))


@st.composite
def strides(draw, max_stride=2):
    """(sh, sw), each drawn on its own: (2, 1) and (1, 2) come up as often as (2, 2). A bug
    that reads the row stride from the column one (or the reverse) passes every square stride."""
    return (draw(small_int(1, max_stride)), draw(small_int(1, max_stride)))


@st.composite
def conv_geometries(draw, max_size=7, max_channels=3):
    """dict(n, c, f, h, w, kernel, padding, stride) of a conv whose window fits its input;
    the two kernel sides, the two strides and the four paddings are drawn independently."""
    kh, kw = draw(small_int(1, 3)), draw(small_int(1, 3))
    stride = draw(strides())
    padding = draw(paddings((kh, kw)))
    h = draw(small_int(kh, max_size))   # at least one window fits even without padding
    w = draw(small_int(kw, max_size))
    return dict(n=draw(small_int(1, 2)), c=draw(small_int(1, max_channels)),
                f=draw(small_int(1, max_channels)), h=h, w=w, kernel=(kh, kw),
                padding=padding, stride=stride)


@st.composite
def pool_geometries(draw, max_size=9):
    """dict(n, c, h, w, kernel, stride), sizes that need not divide (the floor is tested)."""
    kernel = draw(small_int(1, 3))
    stride = draw(st.one_of(st.none(), small_int(1, 3)))
    return dict(n=draw(small_int(1, 2)), c=draw(small_int(1, 3)),
                h=draw(small_int(kernel, max_size)), w=draw(small_int(kernel, max_size)),
                kernel=kernel, stride=stride)


@st.composite
def image_shapes(draw, max_size=6, max_channels=3):
    """(N, C, H, W) of a small batch."""
    return (draw(small_int(1, 2)), draw(small_int(1, max_channels)),
            draw(small_int(1, max_size)), draw(small_int(1, max_size)))


seeds = st.integers(0, 2**32 - 1)
