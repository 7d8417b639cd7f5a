"""Checkpoints of every model (tinyunet.models): the kind and config saved, batch-norm
statistics restored (a resumed SegNet continues bit for bit), frozen FCN upsamplers saved but
not in Adam, and one clear line for a checkpoint of another model or class count."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_checkpoint import rewrite

from tinyunet.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from tinyunet.formats import load_model
from tinyunet.losses import softmax_cross_entropy
from tinyunet.models import MODELS, build_model, model_kind
from tinyunet.optim import Adam

TINY = {"unet": dict(base_width=2, depth=2), "fcn32s": dict(base_width=2, fc_width=4),
        "fcn16s": dict(base_width=2, fc_width=4), "fcn8s": dict(base_width=2, fc_width=4),
        "segnet": dict(base_width=2)}


def train_steps(model, optimizer, data_rng, steps, size=32):
    """forward, softmax cross-entropy, backward, Adam on the trainable parameters."""
    for _ in range(steps):
        x = data_rng.random((2, 1, size, size), dtype=np.float32)
        labels = data_rng.integers(0, model.config.classes, (2, size, size))
        _, dlogits = softmax_cross_entropy(model.forward(x), labels)
        model.backward(dlogits)
        optimizer.step(model.gradients())


def test_a_resumed_segnet_continues_bit_for_bit(tmp_path):
    """N steps, save, load into a fresh model and Adam, M more == N + M steps without a stop:
    parameters, Adam's state and the batch-norm running statistics, bit for bit."""
    n, m = 2, 2
    straight = build_model("segnet", classes=3, **TINY["segnet"])
    straight_opt = Adam(straight.trainable_parameters(), lr=1e-2)
    train_steps(straight, straight_opt, np.random.default_rng(3), n + m)

    first = build_model("segnet", classes=3, **TINY["segnet"])
    first_opt = Adam(first.trainable_parameters(), lr=1e-2)
    data_rng = np.random.default_rng(3)
    train_steps(first, first_opt, data_rng, n)
    path = save_checkpoint(tmp_path / "segnet.npz", first, first_opt, step=n, rngs={"data": data_rng})

    resumed = build_model("segnet", classes=3, seed=7, **TINY["segnet"])      # other weights, fresh statistics
    resumed_opt = Adam(resumed.trainable_parameters(), lr=1.0)
    resumed_rng = np.random.default_rng(999)
    loaded = load_checkpoint(path, resumed, resumed_opt, rngs={"data": resumed_rng})
    assert loaded.kind == "segnet" and loaded.step == n
    train_steps(resumed, resumed_opt, resumed_rng, m)

    for name, value in {**straight.parameters(), **straight.buffers()}.items():
        assert np.array_equal(value, {**resumed.parameters(), **resumed.buffers()}[name]), name
    for key, value in straight_opt.state_dict().items():
        assert np.array_equal(value, resumed_opt.state_dict()[key]), key
    assert straight.buffers()["bn1_1.running_var"].std() > 0          # the statistics did move


@pytest.mark.parametrize("kind", MODELS)
def test_every_kind_round_trips_and_is_built_from_the_file(tmp_path, kind):
    model = build_model(kind, classes=3, seed=2, **TINY[kind])
    train_steps(model, Adam(model.trainable_parameters(), lr=1e-2), np.random.default_rng(0), 1)
    path = save_checkpoint(tmp_path / f"{kind}.npz", model, step=5)
    meta, _ = read_checkpoint(path)
    assert meta["kind"] == kind and meta["config"] == json.loads(model.config.to_json())
    for loaded in (load_checkpoint(path).model, load_model(path)):      # built from the kind and config
        assert model_kind(loaded) == kind and loaded.config == model.config
        for name, value in {**model.parameters(), **model.buffers()}.items():
            assert np.array_equal(value, {**loaded.parameters(), **loaded.buffers()}[name]), name


def test_frozen_upsamplers_are_saved_and_adam_holds_only_the_trainable(tmp_path):
    model = build_model("fcn8s", classes=3, **TINY["fcn8s"])
    optimizer = Adam(model.trainable_parameters(), lr=1e-2)
    train_steps(model, optimizer, np.random.default_rng(1), 1)
    path = save_checkpoint(tmp_path / "fcn.npz", model, optimizer, step=1)
    _, arrays = read_checkpoint(path)
    assert "param/upscore8.weight" in arrays and "optim/m.upscore8.weight" not in arrays
    assert "optim/m.score_fr.weight" in arrays
    fresh = build_model("fcn8s", classes=3, seed=5, **TINY["fcn8s"])
    fresh_opt = Adam(fresh.trainable_parameters())
    load_checkpoint(path, fresh, fresh_opt)
    assert fresh_opt.step_count == 1
    np.testing.assert_array_equal(fresh.parameters()["upscore8.weight"], model.parameters()["upscore8.weight"])


@pytest.mark.parametrize("saved, given, message", [
    (("segnet", 3), ("unet", 1), "holds a segnet checkpoint (classes 3); this model is a unet (classes 1)"),
    (("fcn8s", 3), ("fcn16s", 3), "holds a fcn8s checkpoint (classes 3); this model is a fcn16s (classes 3)"),
    (("unet", 3), ("unet", 2), "holds a unet checkpoint (classes 3); this model is a unet (classes 2)"),
])
def test_a_checkpoint_of_another_model_or_class_count_is_one_line_and_changes_nothing(tmp_path, saved, given,
                                                                                        message):
    path = save_checkpoint(tmp_path / "x.npz", build_model(saved[0], classes=saved[1], **TINY[saved[0]]))
    model = build_model(given[0], classes=given[1], seed=4, **TINY[given[0]])
    before = {k: v.copy() for k, v in model.parameters().items()}
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, model)
    text = str(caught.value)
    assert "\n" not in text and message in text
    assert text.endswith("build it with tinyunet.models.build_model from the file "
                         "(load_checkpoint(path) with no model does)")
    assert all(np.array_equal(v, model.parameters()[k]) for k, v in before.items())


def test_missing_batch_norm_statistics_are_named(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", build_model("segnet", classes=3, **TINY["segnet"]))
    bad = rewrite(good, tmp_path / "bad.npz", drop=["buffer/bn3_2.running_var"])
    with pytest.raises(CheckpointError, match=r"does not hold what its own config describes.*\n"
                                              r"  buffer/bn3_2.running_var: missing"):
        load_checkpoint(bad)


def test_old_unet_checkpoints_without_a_kind_still_load(tmp_path):
    """Files written before kinds existed: no 'kind' in the JSON, no 'classes' in the config."""
    model = build_model("unet", classes=1, **TINY["unet"])
    good = save_checkpoint(tmp_path / "good.npz", model)
    config = {k: v for k, v in json.loads(model.config.to_json()).items() if k != "classes"}
    old = rewrite(good, tmp_path / "old.npz", {"kind": None, "config": config})
    meta, _ = read_checkpoint(old)
    assert "kind" not in meta
    loaded = load_checkpoint(old)
    assert loaded.kind == "unet" and loaded.config.classes == 1 and loaded.config == model.config


@pytest.mark.parametrize("meta_change, message", [
    ({"kind": "resnet"}, "the model kind 'resnet' is none of unet, fcn32s"),
    ({"kind": "fcn16s"}, "the config is an FCN-8s, not a fcn16s"),
    ({"kind": "unet"}, "saved config cannot be read"),
])
def test_a_forged_kind_is_refused(tmp_path, meta_change, message):
    good = save_checkpoint(tmp_path / "good.npz", build_model("fcn8s", classes=3, **TINY["fcn8s"]))
    bad = rewrite(good, tmp_path / "bad.npz", meta_change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad)


def test_a_forged_fcn_is_bounded_before_anything_is_allocated(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", build_model("fcn8s", classes=3, **TINY["fcn8s"]))
    config = {**json.loads(build_model("fcn8s", classes=3, **TINY["fcn8s"]).config.to_json()), "fc_width": 10 ** 6}
    bad = rewrite(good, tmp_path / "bad.npz", {"config": config})
    with pytest.raises(CheckpointError, match="fc_width=1000000.* parameters, more than tinyunet loads"):
        load_checkpoint(bad)
