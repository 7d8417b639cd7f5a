"""examples/fcn_ceiling.py: the best a bilinear upsampling of a stride-s score map can do."""
import numpy as np
import pytest

from tinyunet.data import synthetic_cells
from tinyunet.metrics import class_scores

from scripts import load_example

ceiling = load_example("fcn_ceiling")


def test_a_straight_boundary_between_grid_points_is_fitted_exactly():
    # A bilinear field is linear between grid points, so its zero crossing can sit anywhere:
    # a vertical boundary at column 21 (not on the stride-8 grid) is fitted pixel for pixel.
    labels = np.zeros((1, 48, 48), dtype=np.uint8)
    labels[:, :, 21:] = 1
    predicted = ceiling.best_scores(labels, 2, 8, steps=300)
    assert np.array_equal(predicted, labels)


def test_lines_thinner_than_the_grid_are_out_of_reach():
    # One-pixel lines every 6 rows (17 % of the pixels): a stride-32 field cannot rise and fall
    # between them, so it marks none of them and the line class has no IoU at all; at stride 1
    # it can (a bilinear kernel of 2 at stride 1 averages neighbouring scores, nothing more).
    labels = np.zeros((1, 64, 64), dtype=np.uint8)
    labels[:, ::6] = 1
    coarse = class_scores(ceiling.best_scores(labels, 2, 32, steps=200), labels, 2)
    fine = class_scores(ceiling.best_scores(labels, 2, 1, steps=200), labels, 2)
    assert coarse["iou"][1] == 0.0
    assert fine["mean_iou"] == 1.0


def test_the_ceiling_falls_with_the_stride_and_the_loss_falls_as_it_fits():
    labels = np.stack(synthetic_cells(2, 96, seed=1).targets)
    losses = []
    means = [class_scores(ceiling.best_scores(labels, 3, s, steps=120,
                                              record=lambda step, loss: losses.append(loss)), labels, 3)["mean_iou"]
             for s in (8, 16, 32)]
    assert means[0] > means[1] > means[2]
    assert losses[119] < 0.8 * losses[0]                 # the stride-8 fit went down


def test_learning_the_upsampling_kernel_moves_it_and_does_not_do_worse():
    labels = np.stack(synthetic_cells(2, 64, seed=2).targets)
    frozen, learned = ([], [])
    ceiling.best_scores(labels, 3, 16, steps=80, record=lambda s, loss: frozen.append(loss))
    ceiling.best_scores(labels, 3, 16, steps=80, learn_upsampling=True, record=lambda s, loss: learned.append(loss))
    assert learned[-1] < frozen[-1]


def test_the_command_line_prints_one_row_per_model(capsys):
    code = ceiling.main(["--models", "fcn32s", "fcn8s", "--steps", "3", "--synthetic-count", "5",
                         "--synthetic-size", "64"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| fcn")]
    assert [row.split("|")[1].strip() for row in rows] == ["fcn32s", "fcn8s"]
    assert "IoU mitochondrion" in out


@pytest.mark.parametrize("arguments, message", [
    (["--classes", "1"], "FCN needs --classes 2 or more"),
    (["--classes", "4"], "not 4"),
    (["--data", "/no/such/folder"], "does not exist"),
    (["--val", "0-99"], "outside the 5 items"),
])
def test_bad_input_is_one_line(arguments, message, capsys):
    code = ceiling.main(arguments + ["--synthetic-count", "5", "--synthetic-size", "64", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_steps_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        ceiling.parse_args(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
