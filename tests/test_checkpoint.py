"""Checkpoints: bit-identical resume, atomic saves, clear errors for files that do not fit."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import tinyunet.checkpoint as checkpoint_module
from tinyunet.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from tinyunet.losses import bce_with_logits
from tinyunet.optim import SGD, Adam
from tinyunet.unet import UNet


def small_model(seed=0, **overrides):
    return UNet(**{"base_width": 4, "depth": 2, "dropout": 0.5, "seed": seed, **overrides})


def train_steps(model, optimizer, data_rng, steps):
    """The training loop in miniature: data, augmentation-like noise and dropout all random."""
    for _ in range(steps):
        x = data_rng.random((2, 1, 8, 8), dtype=np.float32)
        target = (data_rng.random((2, 1, 8, 8)) > 0.5).astype(np.float32)
        _, dlogits = bce_with_logits(model.forward(x), target)
        model.backward(dlogits)
        optimizer.step(model.gradients())


@pytest.mark.parametrize("optimizer_class", [Adam, SGD])
def test_resume_is_bit_identical(tmp_path, optimizer_class):
    """k steps, save, load into fresh objects, k more == 2k steps without a stop, bit for bit."""
    k = 3
    straight = small_model()
    straight_opt = optimizer_class(straight.parameters(), lr=1e-2)
    train_steps(straight, straight_opt, np.random.default_rng(11), 2 * k)

    first = small_model()
    first_opt = optimizer_class(first.parameters(), lr=1e-2)
    data_rng = np.random.default_rng(11)
    train_steps(first, first_opt, data_rng, k)
    path = save_checkpoint(tmp_path / "ckpt.npz", first, first_opt, step=k, rngs={"data": data_rng},
                           extra={"best_dice": 0.5})

    # everything fresh and different: another seed, another lr, another data generator
    resumed = small_model(seed=99)
    resumed_opt = optimizer_class(resumed.parameters(), lr=1.0)
    resumed_rng = np.random.default_rng(12345)
    loaded = load_checkpoint(path, resumed, resumed_opt, rngs={"data": resumed_rng})
    assert loaded.step == k and loaded.extra == {"best_dice": 0.5} and resumed_opt.step_count == k
    train_steps(resumed, resumed_opt, resumed_rng, k)

    for name, value in straight.parameters().items():
        assert np.array_equal(value, resumed.parameters()[name]), name
    for key, value in straight_opt.state_dict().items():
        assert np.array_equal(value, resumed_opt.state_dict()[key]), key
    # and the resume really needed the checkpoint: without it the parameters differ
    assert not np.array_equal(small_model(seed=99).parameters()["up1.conv1.weight"],
                              straight.parameters()["up1.conv1.weight"])


def test_model_built_from_saved_config(tmp_path):
    model = small_model(head_relu=False, padding="valid", depth=1)
    path = save_checkpoint(tmp_path / "m.npz", model)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and loaded.step == 0
    for name, value in model.parameters().items():
        assert np.array_equal(value, loaded.model.parameters()[name])


def test_file_holds_no_pickle_and_reads_without_it(tmp_path):
    model = small_model()
    path = save_checkpoint(tmp_path / "m.npz", model, Adam(model.parameters()), step=7)
    with np.load(path, allow_pickle=False) as archive:          # every entry loads without pickle
        entries = {name: archive[name] for name in archive.keys()}
    assert all(a.dtype != object for a in entries.values())
    meta = json.loads(str(entries["__tinyunet__"]))
    assert meta["step"] == 7 and meta["optimizer"]["class"] == "Adam"
    assert meta["config"]["base_width"] == 4
    assert set(meta["model_rngs"]) == {"down2.dropout", "bottom.dropout"}
    assert "param/down1.conv1.weight" in entries and "optim/m.down1.conv1.weight" in entries
    assert "optim/v.head.out.bias" in entries


def test_crash_during_save_leaves_previous_checkpoint_whole(tmp_path, monkeypatch):
    model = small_model()
    path = save_checkpoint(tmp_path / "ckpt.npz", model, step=1)
    before = path.read_bytes()

    def crash(handle, **arrays):            # writes half a file, then the process "dies"
        handle.write(before[: len(before) // 2])
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(checkpoint_module.np, "savez", crash)
    model.parameters()["down1.conv1.weight"] += 1
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path, small_model()).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]   # no temporary left behind


def test_mismatch_lists_every_name_expected_against_found(tmp_path):
    path = save_checkpoint(tmp_path / "wide.npz", small_model(base_width=8))
    other = small_model(base_width=4)
    before = other.parameters()["down1.conv1.weight"].copy()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, other)
    text = str(info.value)
    assert "down1.conv1.weight: expected (4, 1, 3, 3), found (8, 1, 3, 3)" in text
    assert "up1.conv2.bias: expected (4,), found (8,)" in text
    wide = small_model(base_width=8).parameters()
    differing = [n for n, p in other.parameters().items() if p.shape != wide[n].shape]
    assert len(differing) > 20 and all(f"  {n}: expected" in text for n in differing)
    assert f"({len(differing)} mismatches" in text      # one line per differing array, no more
    assert np.array_equal(other.parameters()["down1.conv1.weight"], before)   # untouched

    with pytest.raises(CheckpointError, match=r"down3.conv1.weight: expected \(32, 16, 3, 3\), found nothing"):
        load_checkpoint(path, small_model(base_width=8, depth=3))
    with pytest.raises(CheckpointError, match="config.head_relu: expected False, found True"):
        load_checkpoint(path, small_model(base_width=8, head_relu=False))


def test_optimizer_mismatches(tmp_path):
    model = small_model()
    path = save_checkpoint(tmp_path / "a.npz", model, Adam(model.parameters()))
    with pytest.raises(CheckpointError, match="optimizer: expected SGD, found Adam"):
        load_checkpoint(path, model, SGD(model.parameters()))
    bare = save_checkpoint(tmp_path / "b.npz", model)
    with pytest.raises(CheckpointError, match="found none"):
        load_checkpoint(bare, model, Adam(model.parameters()))
    with pytest.raises(CheckpointError, match=r"rngs\['data'\]: expected a saved generator"):
        load_checkpoint(bare, model, rngs={"data": np.random.default_rng()})


def test_truncated_corrupt_and_foreign_files(tmp_path):
    model = small_model()
    good = save_checkpoint(tmp_path / "good.npz", model, Adam(model.parameters()))
    data = good.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated, model)

    corrupt = tmp_path / "corrupt.npz"                    # flip bytes inside a stored array
    middle = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 64):
        middle[i] ^= 0xFF
    corrupt.write_bytes(bytes(middle))
    with pytest.raises(CheckpointError, match="truncated or corrupt|not a tinyunet"):
        load_checkpoint(corrupt, model)

    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a tinyunet checkpoint.*load_parameters"):
        load_checkpoint(foreign, model)

    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a tinyunet checkpoint"):
        load_checkpoint(text, model)

    pickled = tmp_path / "pickled.npz"                    # an object array needs pickle: refused
    np.savez(pickled, __tinyunet__=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(CheckpointError, match="without pickle"):
        read_checkpoint(pickled)

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.npz", model)
    assert zipfile.is_zipfile(good)


def test_bad_arguments(tmp_path):
    model = small_model()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "such" / "dir.npz", model)
    with pytest.raises(TypeError, match="numpy Generator"):
        save_checkpoint(tmp_path / "x.npz", model, rngs={"data": 3})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "x.npz", model, extra={"f": object()})


# ------------------------------------------------------------------ hostile and damaged files

def rewrite(path, out, meta_changes=None, array_changes=None, drop=()):
    """A copy of checkpoint ``path`` at ``out`` with its JSON and arrays edited."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.keys()}
    meta = json.loads(str(arrays["__tinyunet__"]))
    for key, value in (meta_changes or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    arrays["__tinyunet__"] = np.array(json.dumps(meta))
    arrays.update(array_changes or {})
    for name in drop:
        arrays.pop(name)
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize("overrides", [dict(), dict(padding="valid"), dict(head_relu=False, depth=1),
                                       dict(in_channels=3, base_width=2, depth=3, dropout=0.0)])
def test_parameter_shapes_match_the_model(overrides):
    model = small_model(**overrides)
    shapes = checkpoint_module.parameter_shapes(model.config)
    assert shapes == {name: tuple(p.shape) for name, p in model.parameters().items()}


@pytest.mark.parametrize("config_change, message", [
    ({"depth": 200}, "depth 200 is more than this tinyunet builds"),
    ({"base_width": 100000}, "means 4,540,005,000,005 parameters, more than tinyunet loads"),
    ({"depth": "4"}, "depth must be an int"),
    ({"colour": 1}, "saved config cannot be read"),
])
def test_a_hostile_config_is_refused_before_anything_is_allocated(tmp_path, config_change, message):
    good = save_checkpoint(tmp_path / "good.npz", small_model())
    config = {**json.loads(small_model().config.to_json()), **config_change}
    bad = rewrite(good, tmp_path / "bad.npz", {"config": config})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad)


def test_a_header_that_declares_more_than_is_stored_is_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", small_model())
    forged = tmp_path / "forged.npz"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(forged, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "param/down1.conv1.bias.npy":    # claims 10**12 floats, stores 4
                data = data.replace(b"(4,)", b"(1000000000000,)")
            target.writestr(info.filename, data)
    with pytest.raises(CheckpointError, match=r"param/down1.conv1.bias.*declares \(1000000000000,\) float32 but "
                                              r"stores \d+ bytes: truncated or corrupt"):
        load_checkpoint(forged)


@pytest.mark.parametrize("edit, message", [
    (dict(meta_changes={"step": None}), "the step is None, not an integer >= 0"),
    (dict(meta_changes={"step": -3}), "the step is -3"),
    (dict(meta_changes={"config": None}), "the model config is missing"),
    (dict(meta_changes={"rngs": {"data": {"bit_generator": "PCG64", "state": "x"}}}),
     r"rngs\['data'\]: the saved state is not a valid PCG64 state"),
    (dict(meta_changes={"model_rngs": {"down2.dropout": 7, "bottom.dropout": 7}}),
     "dropout generator 'down2.dropout': the saved state is not a valid PCG64 state"),
    (dict(array_changes={"param/down1.conv1.bias": np.array(["a", "b", "c", "d"])}),
     "param/down1.conv1.bias: the config means float32, the file holds <U1"),
    (dict(array_changes={"param/extra": np.zeros(3, np.float32)}), "param/extra: not part of"),
    (dict(drop=["param/up1.conv2.weight"]), "param/up1.conv2.weight: missing"),
    (dict(array_changes={"param/head.out.bias": np.array([np.nan], np.float32)}),
     "NaN or infinite values in param/head.out.bias.*lower --lr"),
])
def test_damaged_entries_are_named_and_nothing_is_loaded(tmp_path, edit, message):
    source = small_model(seed=1)
    good = save_checkpoint(tmp_path / "good.npz", source, Adam(source.parameters()), step=3,
                           rngs={"data": np.random.default_rng(5)})
    bad = rewrite(good, tmp_path / "bad.npz", **edit)
    model = small_model(seed=2)
    optimizer = Adam(model.parameters())
    rng = np.random.default_rng(9)
    before = {name: p.copy() for name, p in model.parameters().items()}
    rng_before, dropout_before = rng.bit_generator.state, model.random_generators()["bottom.dropout"].bit_generator.state
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad, model, optimizer, rngs={"data": rng})
    assert all(np.array_equal(before[name], p) for name, p in model.parameters().items())   # all or nothing
    assert rng.bit_generator.state == rng_before and optimizer.step_count == 0
    assert model.random_generators()["bottom.dropout"].bit_generator.state == dropout_before


def test_all_nan_weights_are_refused(tmp_path):
    model = small_model()
    for p in model.parameters().values():
        p[...] = np.nan
    path = save_checkpoint(tmp_path / "nan.npz", model)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in param/.*\(28 in all\).*diverged"):
        load_checkpoint(path)


@pytest.mark.parametrize("start, what", [(b"\x89PNG\r\n\x1a\n", "it is a PNG image"),
                                         (b"\x80\x04\x95", "it is a Python pickle"),
                                         (b"\x93NUMPY", "it is a single .npy array"),
                                         (b"hello", "it is not a .npz archive")])
def test_a_foreign_file_is_not_a_tinyunet_checkpoint(tmp_path, start, what):
    path = tmp_path / "model.npz"
    path.write_bytes(start + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"is not a tinyunet checkpoint \\({what}.*give the checkpoint.npz"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="that is a folder"):
        load_checkpoint(tmp_path)


def test_a_save_has_a_plain_files_mode_and_removes_stray_temporaries(tmp_path):
    import os
    import subprocess
    import sys
    model = small_model()
    # a save killed mid-write leaves its temporary: a process that has exited is gone for good
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stray = tmp_path / f".ckpt.npz.{dead}.abcd1234.tmp"
    stray.write_bytes(b"half")
    old_style = tmp_path / ".ckpt.npz.k2j3h4g5.tmp"        # mkstemp's name, an hour old
    old_style.write_bytes(b"half")
    os.utime(old_style, (0, 0))
    other = tmp_path / ".other.npz.1.abcd.tmp"             # another file's: not ours to remove
    other.write_bytes(b"x")
    previous = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "ckpt.npz", model)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640                # 0666 less the umask, as open() gives
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.npz.1.abcd.tmp", "ckpt.npz"]
    path.chmod(0o604)
    save_checkpoint(path, model)
    assert path.stat().st_mode & 0o777 == 0o604                # a replaced file keeps its mode
