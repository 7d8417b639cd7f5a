"""Softmax cross-entropy for K classes: central differences, stability, ignore label, weights,
median-frequency balancing, and torch.nn.functional.cross_entropy."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds

from tinyunet.gradcheck import check_gradients
from tinyunet.losses import LossInputError, median_frequency_weights, softmax_cross_entropy

IGNORE = 255


@st.composite
def problems(draw):
    """dict(logits, labels, class_weights, ignore_index, weights) of a small random problem."""
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    n, k, h, w = draw(st.integers(1, 2)), draw(st.integers(2, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    labels = rng.integers(0, k, (n, h, w))
    ignore = draw(st.booleans())
    if ignore:
        labels[rng.random((n, h, w)) < 0.3] = IGNORE
    return dict(logits=3 * rng.standard_normal((n, k, h, w)), labels=labels,
                class_weights=rng.uniform(0.2, 3.0, k) if draw(st.booleans()) else None,
                ignore_index=IGNORE if ignore else None,
                weights=rng.uniform(0.5, 2.0, (n, h, w)) if draw(st.booleans()) else None)


@given(problems())
def test_gradient_by_central_differences(p):
    loss, grad = softmax_cross_entropy(**p)
    z = p["logits"]
    rest = {k: v for k, v in p.items() if k != "logits"}
    errors = check_gradients(lambda: softmax_cross_entropy(z, **rest)[0], {"z": z}, {"z": grad})
    assert errors["z"] < 1e-7 or (np.abs(grad).max() == 0), errors


@pytest.mark.torch
@given(problems())
def test_against_torch_cross_entropy(p):
    torch = pytest.importorskip("torch")
    loss, grad = softmax_cross_entropy(**p)
    zt = torch.tensor(p["logits"], requires_grad=True)
    target = torch.tensor(p["labels"])
    cw = None if p["class_weights"] is None else torch.tensor(p["class_weights"])
    ignore = -100 if p["ignore_index"] is None else p["ignore_index"]
    per_pixel = torch.nn.functional.cross_entropy(zt, target, weight=cw, ignore_index=ignore, reduction="none")
    scored = target != ignore
    denominator = (cw[target.clamp(max=zt.shape[1] - 1)] if cw is not None else torch.ones_like(zt[:, 0]))[scored].sum()
    if p["weights"] is None:
        reference = torch.nn.functional.cross_entropy(zt, target, weight=cw, ignore_index=ignore)
    else:    # torch has no per-pixel weights: weight the unreduced losses, PyTorch's denominator
        reference = (per_pixel * torch.tensor(p["weights"])).sum() / denominator
    if not bool(scored.any()):
        assert loss == 0 and not grad.any()
        return
    reference.backward()
    np.testing.assert_allclose(loss, reference.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_extreme_logits_stay_finite_and_exact():
    z = np.array([[1000.0, -1000.0, 0.0]]).reshape(1, 3, 1, 1)
    loss, grad = softmax_cross_entropy(z, np.array([[[1]]]))
    assert loss == pytest.approx(2000.0) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad.ravel(), [1.0, -1.0, 0.0])
    loss, _ = softmax_cross_entropy(z, np.array([[[0]]]))
    assert loss == 0.0


def test_ignored_pixels_are_not_scored_and_get_no_gradient():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 3, 2, 2))
    labels = np.array([[[0, 2], [IGNORE, 1]]])
    loss, grad = softmax_cross_entropy(z, labels, ignore_index=IGNORE)
    assert not grad[0, :, 1, 0].any()
    kept = softmax_cross_entropy(z[:, :, [0, 0, 1], [0, 1, 1]][..., None], labels[:, [0, 0, 1], [0, 1, 1]][..., None])
    assert loss == pytest.approx(kept[0], rel=1e-12)          # the mean over the 3 scored pixels


def test_two_classes_is_the_bce_of_the_logit_difference():
    from tinyunet.losses import bce_with_logits
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 2, 3, 3))
    t = rng.integers(0, 2, (2, 3, 3))
    loss, grad = softmax_cross_entropy(z, t)
    bce, dbce = bce_with_logits(z[:, 1:] - z[:, :1], t[:, None].astype(np.float64))
    assert loss == pytest.approx(bce, rel=1e-12)
    np.testing.assert_allclose(grad[:, 1:], dbce, rtol=1e-10, atol=1e-15)


def test_median_frequency_weights_by_hand():
    # image 0: 3 px of class 0, 1 px of class 1; image 1: 2 px of 0, 1 px of 2, 1 ignored
    labels = np.array([[[0, 0], [0, 1]], [[0, 0], [2, IGNORE]]])
    weights = median_frequency_weights(labels, 4, ignore_index=IGNORE)
    freq = np.array([5 / 7, 1 / 4, 1 / 3])                   # class 2's image has 3 valid pixels
    np.testing.assert_allclose(weights[:3], np.median(freq) / freq)
    assert weights[3] == 0                                   # never appears


def test_bad_labels_say_what_was_found():
    z = np.zeros((1, 3, 2, 2))
    with pytest.raises(LossInputError, match=r"class indices in \[0, 2\].*found \[3, 255\]"):
        softmax_cross_entropy(z, np.array([[[0, 3], [255, 1]]]))
    with pytest.raises(TypeError, match="integer class indices"):
        softmax_cross_entropy(z, np.zeros((1, 2, 2)))
    with pytest.raises(LossInputError, match=r"drop the channel axis"):
        softmax_cross_entropy(z, np.zeros((1, 1, 2, 2), np.int64))
    with pytest.raises(LossInputError, match="use bce_with_logits"):
        softmax_cross_entropy(np.zeros((1, 1, 2, 2)), np.zeros((1, 2, 2), np.int64))
    with pytest.raises(LossInputError, match="one entry per class"):
        softmax_cross_entropy(z, np.zeros((1, 2, 2), np.int64), class_weights=np.ones(2))


@pytest.mark.torch
@pytest.mark.parametrize("class_weights", [None, np.array([0.5, 2.0, 1.0, 3.0])])
def test_all_equal_logits_give_log_k_and_torchs_gradient(class_weights):
    """The max is attained K times (a kink of max, not of the loss): p = 1/K exactly,
    l = log K at every pixel, dL/dz = w c[t] (1/K - [k = t]) / D; torch agrees."""
    torch = pytest.importorskip("torch")
    k = 4
    z = np.full((2, k, 3, 2), 0.7)
    labels = np.random.default_rng(3).integers(0, k, (2, 3, 2))
    loss, grad = softmax_cross_entropy(z, labels, class_weights=class_weights)
    assert loss == pytest.approx(np.log(k), rel=1e-14)
    c = np.ones(k) if class_weights is None else class_weights
    onehot = np.moveaxis(np.eye(k)[labels], -1, 1)
    expected = c[labels][:, None] * (1 / k - onehot) / c[labels].sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-16)
    zt = torch.tensor(z, requires_grad=True)
    cw = None if class_weights is None else torch.tensor(class_weights)
    reference = torch.nn.functional.cross_entropy(zt, torch.tensor(labels), weight=cw)
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-12)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-10, atol=1e-16)


@pytest.mark.torch
def test_nothing_scored_gives_loss_0_and_no_gradient_where_torch_gives_nan():
    """Every pixel ignored (or every scored pixel of class weight 0): D = 0. tinyunet's rule,
    documented in softmax_cross_entropy: loss 0.0 and a zero gradient (a batch of void crops
    must not poison a training run); torch's mean reduction divides 0 by 0 and returns NaN."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    z = 3 * rng.standard_normal((2, 3, 2, 2))
    labels = np.full((2, 2, 2), IGNORE)
    for kwargs in (dict(ignore_index=IGNORE), dict(ignore_index=IGNORE, weights=rng.uniform(0.5, 2, (2, 2, 2)))):
        loss, grad = softmax_cross_entropy(z, labels, **kwargs)
        assert loss == 0.0 and type(loss) is float and grad.shape == z.shape and not grad.any()
    labels = rng.integers(0, 2, (2, 2, 2))                       # classes 0 and 1, both weight 0
    loss, grad = softmax_cross_entropy(z, labels, class_weights=np.array([0.0, 0.0, 1.0]))
    assert loss == 0.0 and not grad.any()
    theirs = torch.nn.functional.cross_entropy(torch.tensor(z), torch.full((2, 2, 2), IGNORE), ignore_index=IGNORE)
    assert torch.isnan(theirs)
