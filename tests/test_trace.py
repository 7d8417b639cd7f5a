"""tinyunet.trace records what each layer computed, pairs the gradients at each skip, and is
gone (model.tracer is None) outside its ``with`` block.

The statistics are checked against values computed here by hand, and the skip pairs against
raw gradients captured independently of the tracer's own bookkeeping.
"""
import math

import numpy as np
import pytest

from tinyunet.backend import to_device
from tinyunet.layers import Conv2d, ReLU
from tinyunet.losses import bce_with_logits
from tinyunet.trace import LayerRecord, Tracer, norm, trace
from tinyunet.unet import UNet, nearest_valid_sizes


def tiny_step(model, size, tracer=None, seed=0):
    """Forward, BCE, backward on a random input inside ``trace``; returns (tracer, dx)."""
    rng = np.random.default_rng(seed)
    x = rng.random((2, 1, size, size)).astype(model.dtype)
    with trace(model, tracer) as t:
        logits = model.forward(x)
        target = (rng.random(logits.shape) > 0.5).astype(model.dtype)
        _, dlogits = bce_with_logits(logits, target)
        dx = model.backward(dlogits)
    return t, dx


def test_one_record_per_layer_in_forward_order_with_the_right_shapes():
    model = UNet(base_width=4, depth=2)
    t, dx = tiny_step(model, 16)
    assert list(t.records) == list(model.layers)
    expected = {name: out for name, _, _, out in model.layer_shapes((2, 1, 16, 16))}
    assert {name: r.shape for name, r in t.records.items()} == expected
    assert t.records["down1.conv1"].kind == "Conv2d" and t.records["up1.concat"].kind == "Concat"
    for r in t.records.values():
        assert r.grad_norm is not None, f"{r.name} was not seen by the backward"
        assert all(type(v) is float for v in (r.mean, r.std, r.zero_fraction, r.grad_norm))
    assert t.backward_order[0] == "head.out" and t.backward_order[-1] == "down1.conv1"
    # the first conv's grad_input is exactly what backward returned
    assert t.records["down1.conv1"].grad_norm == pytest.approx(np.linalg.norm(dx.astype(np.float64)), rel=1e-12)


def test_parameter_gradient_norms_are_those_of_model_gradients():
    model = UNet(base_width=4, depth=2)
    t, _ = tiny_step(model, 16)
    grads = model.gradients()
    for name, r in t.records.items():
        keys = set(model.layers[name].params)
        assert set(r.param_grad_norms) == keys
        for key in keys:
            expected = np.linalg.norm(grads[f"{name}.{key}"].astype(np.float64))
            assert r.param_grad_norms[key] == pytest.approx(expected, rel=1e-12)


def test_statistics_against_hand_computed_values():
    t = Tracer()
    y = np.array([[[[0.0, 1.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]], dtype=np.float32)   # (1, 2, 2, 2)
    t.on_forward("r", ReLU(), y)
    r = t.records["r"]
    assert (r.name, r.kind, r.shape) == ("r", "ReLU", (1, 2, 2, 2))
    assert r.mean == pytest.approx(3 / 8)
    assert r.std == pytest.approx(np.sqrt(np.mean((y.astype(np.float64) - 3 / 8) ** 2)))
    assert r.zero_fraction == 6 / 8
    assert r.channel_zero_fraction == (0.5, 1.0)
    assert r.grad_norm is None and r.finite

    conv = Conv2d(1, 1, 1, dtype=np.float64)
    conv.grads = {"weight": np.full((1, 1, 1, 1), 3.0), "bias": np.array([4.0])}
    t.on_forward("c", conv, y.astype(np.float64))
    t.on_backward("c", conv, np.full((1, 1, 2, 2), 0.5))
    c = t.records["c"]
    assert c.grad_norm == 1.0 and c.grad_norms == (1.0,)
    assert c.param_grad_norms == {"weight": 3.0, "bias": 4.0}


def test_norm_does_not_overflow_in_float32():
    big = np.full(4, 1e30, dtype=np.float32)          # the sum of squares overflows float32
    assert norm(big) == pytest.approx(2e30, rel=1e-6)


def test_a_non_finite_output_is_named():
    t = Tracer()
    t.on_forward("a", ReLU(), np.ones((1, 1, 2, 2)))
    t.on_forward("b", ReLU(), np.array([[[[np.nan, 1.0]]]]))
    t.on_forward("c", ReLU(), np.array([[[[np.inf, 1.0]]]]))
    assert t.first_nonfinite() == "b"
    assert not LayerRecord("x", "X", (1,), 0.0, 0.0, 0.0, grad_norm=math.inf).finite


class RawCapture(Tracer):
    """A tracer that also keeps copies of every forward output and grad_input, to check the
    skip records against arrays captured outside the tracer's pairing logic."""

    def __init__(self):
        super().__init__()
        self.outputs, self.grads = {}, {}

    def on_forward(self, name, layer, output):
        self.outputs[name] = output.copy()
        super().on_forward(name, layer, output)

    def on_backward(self, name, layer, grad_input):
        self.grads[name] = tuple(g.copy() for g in grad_input) if isinstance(grad_input, tuple) else grad_input.copy()
        super().on_backward(name, layer, grad_input)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_skip_records_pair_the_pool_and_the_skip_gradient(padding):
    model = UNet(base_width=3, depth=2, padding=padding, dtype="float64", dropout=0.0)
    size = 16 if padding == "same" else nearest_valid_sizes(40, 2, "valid")[1]
    t, _ = tiny_step(model, size, tracer=RawCapture())
    assert sorted(t.skips) == [1, 2]
    for i, s in t.skips.items():
        via_skip = t.grads[f"up{i}.crop"] if padding == "valid" else t.grads[f"up{i}.concat"][0]
        via_pool = t.grads[f"down{i}.pool"]
        assert via_skip.shape == via_pool.shape == s.shape == t.records[f"down{i}.relu2"].shape
        total = via_skip + via_pool
        assert s.skip_norm == pytest.approx(np.linalg.norm(via_skip))
        assert s.pool_norm == pytest.approx(np.linalg.norm(via_pool))
        assert s.sum_norm == pytest.approx(np.linalg.norm(total))
        assert s.cosine == pytest.approx(np.sum(via_skip * via_pool) / (s.skip_norm * s.pool_norm))
        # The sum is what the level's last ReLU received: its backward is (skip + pool) * [y > 0].
        np.testing.assert_allclose(t.grads[f"down{i}.relu2"], total * (t.outputs[f"down{i}.relu2"] > 0),
                                   rtol=0, atol=1e-15)
    assert not t._skip_grads, "a skip gradient was held after the backward"


def test_trace_restores_the_previous_tracer_even_after_an_error():
    model = UNet(base_width=2, depth=1)
    assert model.tracer is None
    with trace(model) as t:
        assert model.tracer is t
    assert model.tracer is None
    with pytest.raises(ValueError):
        with trace(model):
            model.forward(np.zeros((1, 1, 3, 3), np.float32))      # 3 is not divisible by 2
    assert model.tracer is None
    outer = Tracer()
    model.tracer = outer
    with trace(model) as inner:
        assert model.tracer is inner
    assert model.tracer is outer


def test_off_means_no_tracer_and_no_records():
    """Off costs nothing: the model's only hook is `if self.tracer is not None`, so after the
    block nothing is recorded (the records of the traced pass stay exactly as they were)."""
    model = UNet(base_width=2, depth=1)
    t, _ = tiny_step(model, 8)
    before = dict(t.records)
    snapshot = {name: (r.mean, r.grad_norm) for name, r in before.items()}
    x = np.random.default_rng(1).random((2, 1, 8, 8)).astype(np.float32)
    model.backward(np.ones_like(model.forward(x)))               # an untraced pass
    assert model.tracer is None
    assert t.records == before and all(t.records[n] is before[n] for n in before)
    assert {name: (r.mean, r.grad_norm) for name, r in t.records.items()} == snapshot


def test_a_second_forward_starts_a_new_pass():
    model = UNet(base_width=2, depth=1)
    x = np.random.default_rng(2).random((1, 1, 8, 8)).astype(np.float32)
    with trace(model) as t:
        model.backward(np.ones_like(model.forward(x)))
        first = t.records["down1.conv1"]
        model.forward(x)
    assert t.backward_order == []
    assert t.records["down1.conv1"] is not first and t.records["down1.conv1"].grad_norm is None


def test_tables_have_a_row_per_layer_and_per_level():
    model = UNet(base_width=2, depth=2)
    t, _ = tiny_step(model, 8)
    lines = t.table().splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "output"]
    assert len(lines) == 2 + len(model.layers)
    for name, line in zip(model.layers, lines[2:]):
        assert line.startswith(name + " ")
    skip_lines = t.skip_table().splitlines()
    assert len(skip_lines) == 2 + 2 and "cosine" in skip_lines[0]


@pytest.mark.gpu
def test_trace_on_gpu_matches_cpu():
    cpu = UNet(base_width=2, depth=2, dtype="float64", dropout=0.0)
    gpu = UNet(base_width=2, depth=2, dtype="float64", dropout=0.0).to("gpu")
    rng = np.random.default_rng(0)
    x = rng.random((1, 1, 8, 8))
    target = (rng.random((1, 1, 8, 8)) > 0.5).astype(np.float64)
    tracers = []
    for model, device in ((cpu, "cpu"), (gpu, "gpu")):
        xd, td = to_device(x, device), to_device(target, device)
        with trace(model) as t:
            model.backward(bce_with_logits(model.forward(xd), td)[1])
        tracers.append(t)
    for name, r in tracers[0].records.items():
        g = tracers[1].records[name]
        assert type(g.mean) is float and g.shape == r.shape
        assert g.mean == pytest.approx(r.mean, rel=1e-9, abs=1e-12)
        assert g.grad_norm == pytest.approx(r.grad_norm, rel=1e-9)
    assert tracers[1].skips[1].cosine == pytest.approx(tracers[0].skips[1].cosine, rel=1e-9)
