"""bce_with_logits: the stable form equals the textbook formula, and its gradient is right."""
import numpy as np
import pytest

from tinyunet.gradcheck import check_gradients
from tinyunet.losses import LossInputError, bce_with_logits


def textbook_bce(z, t, w=None):
    p = 1 / (1 + np.exp(-z))
    per_pixel = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    return float((per_pixel if w is None else per_pixel * w).mean())


@pytest.mark.parametrize("weighted", [False, True])
def test_loss_equals_textbook_formula_and_gradient_checks(weighted):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 1, 5, 4)) * 3
    t = (rng.random(z.shape) > 0.5).astype(np.float64)
    w = rng.random(z.shape) * 5 if weighted else None
    loss, dz = bce_with_logits(z, t, w)
    assert loss == pytest.approx(textbook_bce(z, t, w), rel=1e-12)
    errors = check_gradients(lambda: bce_with_logits(z, t, w)[0], {"z": z}, {"z": dz})
    assert errors["z"] < 1e-6, errors


def test_soft_targets_gradient_is_sigmoid_minus_target_over_count():
    z = np.array([[-2.0, 0.0, 3.0]])
    t = np.array([[0.25, 0.5, 1.0]])
    _, dz = bce_with_logits(z, t)
    np.testing.assert_allclose(dz, (1 / (1 + np.exp(-z)) - t) / 3, rtol=1e-12)


def test_extreme_logits_give_finite_loss_and_gradient():
    z = np.array([[-1000.0, 1000.0, -1000.0, 1000.0]], dtype=np.float32)
    t = np.array([[0.0, 1.0, 1.0, 0.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, dz = bce_with_logits(z, t)
    assert loss == pytest.approx(500.0)          # two pixels right (0 loss), two wrong by 1000
    assert dz.dtype == np.float32
    np.testing.assert_allclose(dz, [[0.0, 0.0, -0.25, 0.25]])


def test_targets_stored_as_0_255_are_refused_with_the_fix():
    z = np.zeros((1, 1, 2, 2))
    with pytest.raises(LossInputError, match="divide by 255"):
        bce_with_logits(z, np.full_like(z, 255.0))


def test_shape_mismatch_and_nan_logits_are_refused():
    with pytest.raises(LossInputError, match="targets have shape"):
        bce_with_logits(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 3)))
    with pytest.raises(LossInputError, match="NaN or inf"):
        bce_with_logits(np.full((1, 1, 2, 2), np.nan), np.zeros((1, 1, 2, 2)))
    with pytest.raises(LossInputError, match="weights must be >= 0"):
        bce_with_logits(np.zeros((1, 2)), np.zeros((1, 2)), -np.ones((1, 2)))
