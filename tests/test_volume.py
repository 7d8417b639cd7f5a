"""Block-wise prediction of volumes (tinyunet/volume.py) against whole-slice prediction."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

pytest.importorskip("dask")
pytest.importorskip("zarr")

import zarr  # noqa: E402

from tinyunet import volume as volumes  # noqa: E402
from tinyunet.checkpoint import save_checkpoint  # noqa: E402
from tinyunet.data import synthetic_membranes  # noqa: E402
from tinyunet.infer import predict_probability  # noqa: E402
from tinyunet.unet import UNet  # noqa: E402

CHUNK = 32


@pytest.fixture(scope="module")
def tiny():
    return UNet(base_width=4, depth=2, dropout=0.0, seed=2).eval()


@pytest.fixture(scope="module")
def stack():
    """(3, 70, 90) uint8: neither side a multiple of the 32-pixel chunk (70 = 2 x 32 + 6, whose
    6 joins the block before; 90 = 2 x 32 + 26)."""
    images = synthetic_membranes(3, size=96, seed=4).images
    return np.stack([np.round(image[:70, 3:93] * 255) for image in images]).astype(np.uint8)


def whole_slices(model, stack, margin):
    return np.stack([predict_probability(model, s.astype(np.float32) / 255, margin=margin) for s in stack])


@pytest.mark.parametrize("classes, field", [(1, (24, 27)), (3, (23, 26))])
def test_receptive_field_is_what_the_network_reads(classes, field):
    """A change at input pixel c moves exactly the outputs p with c in [p - left, p + right]
    (one class: the Keras head's 3x3 conv widens it by one; K classes: a 1x1 head)."""
    model = UNet(base_width=2, depth=2, dropout=0.0, head_relu=False, dtype="float64", classes=classes,
                 seed=1).eval()
    left, right = volumes.receptive_field(2, head_conv=classes == 1)
    assert (left, right) == field
    assert volumes.receptive_field(4) == (108, 123) and volumes.receptive_field(4, head_conv=False) == (107, 122)
    rng = np.random.default_rng(0)
    base = rng.random((1, 1, 8, 160)) + 0.5
    reached_left = reached_right = 0
    for c in range(76, 84):                                    # every phase of the pooling grid, twice
        changed = base.copy()
        changed[0, 0, :, c] += 1.0
        moved = np.flatnonzero(np.abs(model.forward(changed) - model.forward(base))[0].max(axis=(0, 1)) > 0)
        assert c - right <= moved.min() and moved.max() <= c + left, (c, moved.min(), moved.max())
        reached_left, reached_right = max(reached_left, moved.max() - c), max(reached_right, c - moved.min())
    assert (reached_left, reached_right) == (left, right)      # the bound is reached: no smaller halo is exact
    assert volumes.halo_for(model.config) == 28 and volumes.halo_for(UNet(base_width=1, classes=classes).config) == 128


def test_blocks_equal_the_whole_slice_prediction(tmp_path, tiny, stack):
    halo = volumes.halo_for(tiny.config)
    result = volumes.predict_volume(tiny, stack, str(tmp_path / "p.zarr"), chunk=CHUNK, progress=False,
                                    mask_output=str(tmp_path / "m.zarr"), threshold=0.5)
    assert result == {"blocks": 3 * 2 * 2, "predicted": 12, "skipped": 0, "halo": 28, "classes": 1}
    blocks = zarr.open_array(str(tmp_path / "p.zarr"), mode="r")[:]
    expected = whole_slices(tiny, stack, margin=halo)
    assert blocks.dtype == np.float32 and blocks.shape == stack.shape
    np.testing.assert_allclose(blocks, expected, rtol=0, atol=2e-6)
    masks = zarr.open_array(str(tmp_path / "m.zarr"), mode="r")[:]
    np.testing.assert_array_equal(masks, (blocks >= 0.5).astype(np.uint8))


def test_a_halo_smaller_than_the_receptive_field_leaves_seams(tmp_path, tiny, stack):
    """halo 20 < 27: a pixel p of block [s, e) reads p - 24 .. p + 27 but has real context on
    s - 20 .. e + 19 only: pixels with p < s + 4 or p > e - 8 see zeros (or a too short mirror at
    the border) where the whole slice has pixels; the pixels in between are still exact."""
    left, right = volumes.receptive_field(2)
    halo = 20
    volumes.predict_volume(tiny, stack, str(tmp_path / "small.zarr"), chunk=CHUNK, halo=halo, progress=False)
    error = np.abs(zarr.open_array(str(tmp_path / "small.zarr"), mode="r")[:] - whole_slices(tiny, stack, 28))
    exact = np.zeros(stack.shape[1:], bool)
    rows = [(0, 32), (32, 70)]                                   # the blocks: 6 rows joined the second
    columns = [(0, 32), (32, 64), (64, 90)]
    for s, e in rows:
        for c, d in columns:
            exact[s + left - halo:e - right + halo, c + left - halo:d - right + halo] = True
    assert error[:, exact].max() <= 2e-6
    assert error[:, ~exact].max() > 1e-3
    assert error[:, 31:33, :].max() > 1e-3                      # across the seam between rows 31 and 32


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, tiny, stack, monkeypatch):
    straight = tmp_path / "straight.zarr"
    volumes.predict_volume(tiny, stack, str(straight), chunk=CHUNK, progress=False)
    written, original = [], volumes.write_block

    def crash_after_three(*args):
        if len(written) == 3:
            raise KeyboardInterrupt("the machine went down")
        written.append(args[1])
        return original(*args)

    monkeypatch.setattr(volumes, "write_block", crash_after_three)
    resumed = tmp_path / "resumed.zarr"
    with pytest.raises(KeyboardInterrupt):
        volumes.predict_volume(tiny, stack, str(resumed), chunk=CHUNK, progress=False)
    monkeypatch.setattr(volumes, "write_block", original)
    result = volumes.predict_volume(tiny, stack, str(resumed), chunk=CHUNK, progress=False)
    assert result["skipped"] == 3 and result["predicted"] == 9
    np.testing.assert_array_equal(zarr.open_array(str(resumed), mode="r")[:], zarr.open_array(str(straight), mode="r")[:])
    assert volumes.predict_volume(tiny, stack, str(resumed), chunk=CHUNK, progress=False)["predicted"] == 0


def test_a_local_cluster_of_two_workers_and_a_tiff_stack(tmp_path, tiny, stack):
    distributed = pytest.importorskip("distributed")
    tifffile = pytest.importorskip("tifffile")
    checkpoint = tmp_path / "tiny.npz"
    save_checkpoint(checkpoint, tiny)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        result = volumes.predict_volume(str(checkpoint), str(tmp_path / "stack.tif"), str(tmp_path / "p.zarr"),
                                        chunk=CHUNK, address=cluster.scheduler_address, progress=False,
                                        converted=str(tmp_path / "stack.zarr"))
    assert result["predicted"] == 12
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "stack.zarr"), mode="r")[:], stack)
    expected = whole_slices(tiny, stack, margin=28)
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "p.zarr"), mode="r")[:], expected, rtol=0, atol=2e-6)


def test_bad_options_are_refused_before_anything_is_written(tmp_path, tiny, stack, monkeypatch):
    out = tmp_path / "p.zarr"
    for options, message in (({"chunk": 30}, "multiples of the pooling grid 4"), ({"chunk": 16}, "smaller than the halo"),
                             ({"threshold": 1.0}, "threshold")):
        with pytest.raises(volumes.VolumeError, match=message):
            volumes.predict_volume(tiny, stack, str(out), progress=False, **options)
    with pytest.raises(volumes.VolumeError, match="checkpoint path"):
        volumes.predict_volume(tiny, stack, str(out), chunk=CHUNK, address="tcp://127.0.0.1:1", progress=False)
    assert not out.exists()
    zarr.create_array(store=str(out), shape=(1, 5, 5), chunks=(1, 5, 5), dtype=np.float32)
    with pytest.raises(volumes.VolumeError, match="already holds"):
        volumes.predict_volume(tiny, stack, str(out), chunk=CHUNK, progress=False)
    monkeypatch.setitem(sys.modules, "dask", None)
    with pytest.raises(volumes.VolumeError, match=r'pip install -e "\.\[scale\]"'):
        volumes.predict_volume(tiny, stack, str(out), chunk=CHUNK, progress=False)


def with_live_relus(model, seed: int, positive: bool = False):
    """model with every bias drawn around +0.05, which keeps its ReLUs alive (with zero biases
    most pixels' last features are 0 and every logit ties at the head's bias); ``positive``:
    every weight made positive too."""
    rng = np.random.default_rng(seed)
    for layer in model.layers.values():
        if positive and "weight" in layer.params:
            layer.params["weight"][:] = np.abs(layer.params["weight"])
        if "bias" in layer.params:
            layer.params["bias"][:] = rng.normal(0.05, 0.05, layer.params["bias"].shape)
    return model


@pytest.fixture(scope="module")
def three_classes():
    """A 3-class U-Net whose labels vary (with_live_relus)."""
    return with_live_relus(UNet(base_width=4, depth=2, dropout=0.0, classes=3, seed=3).eval(), seed=3)


def test_a_k_class_unet_writes_the_labels_of_the_whole_slice_prediction(tmp_path, three_classes, stack):
    """K classes: uint8 labels, the argmax at each pixel, equal to the whole slice's
    predict_probability(margin=halo) argmax wherever its top two classes are not tied to
    rounding; resumable like the probabilities (255 marks a block not yet written)."""
    out = str(tmp_path / "labels.zarr")
    result = volumes.predict_volume(three_classes, stack, out, chunk=CHUNK, progress=False)
    assert result == {"blocks": 12, "predicted": 12, "skipped": 0, "halo": 28, "classes": 3}
    labels = zarr.open_array(out, mode="r")[:]
    probability = np.stack([predict_probability(three_classes, s.astype(np.float32) / 255, margin=28)
                            for s in stack])                                    # (Z, K, Y, X)
    top_two = np.sort(probability, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-5
    assert labels.dtype == np.uint8 and labels.shape == stack.shape and clear.mean() > 0.98
    np.testing.assert_array_equal(labels[clear], probability.argmax(axis=1)[clear])
    assert np.bincount(labels.ravel()).min() > 1000     # labels that vary, not one constant class
    writable = zarr.open_array(out, mode="r+")
    writable[1, 32:64, 0:32] = 255                      # a block lost: predicted again, nothing else
    assert volumes.predict_volume(three_classes, stack, out, chunk=CHUNK, progress=False)["predicted"] == 1
    np.testing.assert_array_equal(zarr.open_array(out, mode="r")[:], labels)


def test_a_k_class_unet_refuses_a_mask_a_threshold_and_a_probability_array(tmp_path, three_classes, stack):
    with pytest.raises(volumes.VolumeError, match="a mask is for a one-class model.*drop the mask"):
        volumes.predict_volume(three_classes, stack, str(tmp_path / "l.zarr"), chunk=CHUNK, progress=False,
                               mask_output=str(tmp_path / "m.zarr"))
    with pytest.raises(volumes.VolumeError, match="a mask is for a one-class model.*drop the threshold"):
        volumes.predict_volume(three_classes, stack, str(tmp_path / "l.zarr"), chunk=CHUNK, progress=False,
                               threshold=0.3)
    assert not (tmp_path / "l.zarr").exists() and not (tmp_path / "m.zarr").exists()
    zarr.create_array(store=str(tmp_path / "p.zarr"), shape=stack.shape, chunks=(1, 32, 32), dtype=np.float32)
    with pytest.raises(volumes.VolumeError, match="float32 .* not the uint8"):
        volumes.predict_volume(three_classes, stack, str(tmp_path / "p.zarr"), chunk=CHUNK, progress=False)


def test_the_command_line_writes_then_completes_a_zarr_volume(tmp_path, tiny, stack, capsys):
    from scripts import load_example
    example = load_example("predict_volume")
    save_checkpoint(tmp_path / "tiny.npz", tiny)
    zarr.create_array(store=str(tmp_path / "in.zarr"), shape=stack.shape, chunks=(1, 64, 64), dtype=np.uint8)[:] = stack
    arguments = [str(tmp_path / "tiny.npz"), str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--chunk", "32",
                 "--no-progress"]
    assert example.main(arguments) == 0
    assert "12 blocks predicted, 0 already there (halo 28 pixels)" in capsys.readouterr().out
    assert example.main(arguments) == 0
    assert "0 blocks predicted, 12 already there" in capsys.readouterr().out
    assert example.main(arguments[:3] + ["--chunk", "30"]) == 2
    assert "multiples of the pooling grid 4" in capsys.readouterr().err


def test_the_command_line_writes_labels_for_k_classes(tmp_path, three_classes, stack, capsys):
    from scripts import load_example
    example = load_example("predict_volume")
    save_checkpoint(tmp_path / "three.npz", three_classes)
    zarr.create_array(store=str(tmp_path / "in.zarr"), shape=stack.shape, chunks=(1, 64, 64), dtype=np.uint8)[:] = stack
    arguments = [str(tmp_path / "three.npz"), str(tmp_path / "in.zarr"), str(tmp_path / "labels.zarr"),
                 "--chunk", "32", "--no-progress"]
    assert example.main(arguments) == 0
    assert "labels of 3 classes: 12 blocks predicted, 0 already there" in capsys.readouterr().out
    expected = volumes.predict_volume(three_classes, stack, str(tmp_path / "again.zarr"), chunk=CHUNK, progress=False)
    assert expected["predicted"] == 12
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:],
                                  zarr.open_array(str(tmp_path / "again.zarr"), mode="r")[:])
    assert example.main(arguments + ["--mask", str(tmp_path / "m.zarr")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "drop the mask" in err
    assert example.main(arguments + ["--threshold", "0.3"]) == 2
    assert "drop the threshold" in capsys.readouterr().err


# -- SegNet: a halo of 224 pixels from its own receptive field ------------------------------------

def segnet(seed: int, positive: bool = False, dtype="float32"):
    """A SegNet of width 2 for grey slices and 3 classes, with biases that keep its ReLUs alive
    (as three_classes); ``positive``: every weight made positive, so that a larger input pixel
    raises every value it reaches (a change then travels as far as the max-pools let it)."""
    from tinyunet.segnet import SegNet
    return with_live_relus(SegNet(classes=3, in_channels=1, base_width=2, dtype=dtype, seed=seed).eval(), seed,
                           positive)


@pytest.mark.parametrize("positive", [False, True])
def test_segnet_reads_no_further_than_its_receptive_field(positive):
    """A change at input pixel c moves outputs only within [c - left, c + right], at every one
    of the 32 phases of the five pools. A max-pool passes a change only where it moves a
    window's maximum, so the reach stays below the bound (positive weights: 196 / 179 of 211)."""
    left, right = volumes.segnet_receptive_field()
    assert (left, right) == (211, 211)
    model = segnet(seed=1, positive=positive, dtype="float64")
    assert volumes.halo_for(model.config) == 224 and volumes.grid_for(model.config) == 32
    left_reached, right_reached = reach_of_one_pixel(model, np.random.default_rng(0).random((1, 1, 32, 704)) + 0.5,
                                                     range(336, 368), (left, right))
    assert max(left_reached, right_reached) > 128   # it does reach past the U-Net's halo: 128 would not do


def reach_of_one_pixel(model, base, columns, bound):
    """(left, right): how far a change at each input column c moves the logits, asserting that
    it stays within bound = (left, right). im2col convs: Winograd's tiles also pass rounding
    (1e-16) from pixels of their patch outside a 3x3 window, which is not reading them."""
    from tinyunet.layers import conv
    left, right = bound
    reached_left = reached_right = 0
    with conv.using_method("im2col"):
        reference = model.forward(base)
        for c in columns:
            changed = base.copy()
            changed[0, 0, :, c] += 1.0
            moved = np.flatnonzero(np.abs(model.forward(changed) - reference)[0].max(axis=(0, 1)) > 0)
            assert c - right <= moved.min() and moved.max() <= c + left, (c, moved.min(), moved.max())
            reached_left, reached_right = max(reached_left, moved.max() - c), max(reached_right, c - moved.min())
    return reached_left, reached_right


@pytest.fixture(scope="module")
def wide_slice():
    """(1, 480, 500) uint8: 2 x 2 blocks of 224 (the remainders 32 and 52, smaller than the halo,
    join the last block of each axis)."""
    image = synthetic_membranes(1, size=512, seed=5).images[0]
    return np.round(image[None, :480, 6:506] * 255).astype(np.uint8)


def test_segnet_blocks_equal_the_whole_slice_labels_and_a_smaller_halo_does_not(tmp_path, wide_slice):
    model = segnet(seed=3)
    result = volumes.predict_volume(model, wide_slice, str(tmp_path / "l.zarr"), chunk=224, progress=False)
    assert result == {"blocks": 4, "predicted": 4, "skipped": 0, "halo": 224, "classes": 3}
    blocks_equal_the_whole_slice_and_a_smaller_halo_does_not(model, wide_slice, tmp_path / "l.zarr", 224, 96)


def blocks_equal_the_whole_slice_and_a_smaller_halo_does_not(model, stack, written, halo, smaller_halo):
    """The labels at ``written`` (one slice, blocks with ``halo``) equal the argmax of the whole
    slice's predict_probability(margin=halo) wherever its top two classes are more than 1e-5
    apart (98% of the pixels at least), with two classes or more of over 1000 pixels each; the
    same blocks with ``smaller_halo`` differ from it at more than 100 such pixels."""
    labels = zarr.open_array(str(written), mode="r")[:]
    probability = predict_probability(model, stack[0].astype(np.float32) / 255, margin=halo)     # (K, Y, X)
    top_two = np.sort(probability, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-5
    assert labels.dtype == np.uint8 and clear.mean() > 0.98
    np.testing.assert_array_equal(labels[0][clear], probability.argmax(axis=0)[clear])
    assert np.sort(np.bincount(labels.ravel()))[-2] > 1000                 # not one class everywhere
    chunk = zarr.open_array(str(written), mode="r").chunks[1]
    seamed = written.parent / "seams.zarr"
    volumes.predict_volume(model, stack, str(seamed), chunk=chunk, halo=smaller_halo, progress=False)
    seams = zarr.open_array(str(seamed), mode="r")[0] != probability.argmax(axis=0)
    assert (seams & clear).sum() > 100


def test_a_segnet_of_colour_images_is_refused(tmp_path, stack):
    from tinyunet.segnet import SegNet
    with pytest.raises(volumes.VolumeError, match="takes 3 input channels"):
        volumes.predict_volume(SegNet(classes=3, in_channels=3, base_width=2), stack, str(tmp_path / "l.zarr"),
                               chunk=224, progress=False)
    assert not (tmp_path / "l.zarr").exists()


# -- FCN: a halo of 256 pixels, its receptive field walked through its own wiring -----------------

def fcn(variant: str, seed: int, dtype="float32"):
    """An FCN of width 2 (fc 8) for grey slices and 3 classes, score layers drawn (the
    reference's are zero: every logit would be its bias) and ReLUs kept alive."""
    from tinyunet.fcn import FCN
    return with_live_relus(FCN(variant=variant, classes=3, in_channels=1, base_width=2, fc_width=8, dropout=0.0,
                               score_init="he_normal", dtype=dtype, seed=seed).eval(), seed)


@pytest.mark.parametrize("variant, field", [("32s", 233), ("16s", 241), ("8s", 245)])
def test_fcn_reads_exactly_its_receptive_field(variant, field):
    """A change at input pixel c moves the logits within [c - field, c + field] and, at some of
    the 32 pool phases, as far as that: the walk's bound is the reach (fc6's 7x7 at stride 32
    and the bilinear upsamplers' tails); conv1_1's padding does not move it."""
    model = fcn(variant, seed=1, dtype="float64")
    assert volumes.fcn_receptive_field(model.config) == (field, field)
    assert volumes.fcn_receptive_field(dataclasses.replace(model.config, input_pad=81)) == (field, field)
    assert volumes.halo_for(model.config) == 256 and volumes.grid_for(model.config) == 32
    reached = reach_of_one_pixel(model, np.random.default_rng(0).random((1, 1, 64, 832)) + 0.5, range(400, 432),
                                 (field, field))
    assert reached == (field, field)


def test_fcn_blocks_equal_the_whole_slice_labels_and_a_smaller_halo_does_not(tmp_path, capsys):
    """An FCN-8s checkpoint through the command line: 2 x 2 blocks of 256 pixels, labels equal
    to the whole slice's argmax (margin 256); with a 128-pixel halo (SegNet's 224 would do
    no better than 245 needs) seams appear."""
    from scripts import load_example
    model = fcn("8s", seed=7)
    image = synthetic_membranes(1, size=576, seed=6).images[0]
    stack = np.round(image[None, :544, 8:568] * 255).astype(np.uint8)      # blocks of 256 and 288
    save_checkpoint(tmp_path / "fcn8s.npz", model)
    zarr.create_array(store=str(tmp_path / "in.zarr"), shape=stack.shape, chunks=(1, 64, 64), dtype=np.uint8)[:] = stack
    arguments = [str(tmp_path / "fcn8s.npz"), str(tmp_path / "in.zarr"), str(tmp_path / "labels.zarr"),
                 "--chunk", "256", "--no-progress"]
    assert load_example("predict_volume").main(arguments) == 0
    assert "labels of 3 classes: 4 blocks predicted, 0 already there (halo 256 pixels)" in capsys.readouterr().out
    blocks_equal_the_whole_slice_and_a_smaller_halo_does_not(model, stack, tmp_path / "labels.zarr", 256, 128)
