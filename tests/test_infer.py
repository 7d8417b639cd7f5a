"""Overlap-tile prediction: any size, the same answer as one whole pass where context allows,
TTA that maps every view back, and the three output files."""
import numpy as np
import pytest
from PIL import Image

from tinyunet.infer import predict_logits_tiled, predict_probability, save_prediction, tile_geometry
from tinyunet.unet import UNet


@pytest.fixture(scope="module")
def tiny_same():
    return UNet(base_width=4, depth=2, dropout=0.0, seed=3, dtype="float64").eval()


def test_tiles_agree_with_one_whole_pass_away_from_the_border():
    # depth 1 sees 11 pixels around each output pixel (3x3 convs 2+2, pool, 2x2 up-conv, head)
    model = UNet(base_width=4, depth=1, dropout=0.0, seed=3, head_relu=False, dtype="float64")
    image = np.random.default_rng(0).random((64, 64))
    whole = model.forward(image[None, None])[0, 0]
    # 32-pixel tiles keeping their central 8: 12 pixels of context on every side
    tiled = predict_logits_tiled(model, image, tile=32, margin=12)
    with pytest.raises(ValueError, match="margin 16 leaves nothing"):   # 15 rounds up to the grid: 16
        predict_logits_tiled(model, image, tile=32, margin=15)
    assert tiled.shape == (64, 64)
    # far from the image border (where the whole pass sees zero padding, the tiles a mirror)
    # a pixel's receptive field lies inside both, so both compute the same number
    inner = slice(14, 50)
    np.testing.assert_allclose(tiled[inner, inner], whole[inner, inner], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(37, 53), (16, 16), (5, 90)])
def test_any_size_gives_a_probability_of_that_size(tiny_same, shape):
    image = np.random.default_rng(1).random(shape)
    probability = predict_probability(tiny_same, image, tile=32, margin=8)
    assert probability.shape == shape and probability.dtype == np.float32
    assert np.all((probability >= 0) & (probability <= 1))


def test_tta_of_a_rotation_symmetric_input_equals_plain_average(tiny_same):
    image = np.random.default_rng(2).random((32, 32))
    plain = predict_probability(tiny_same, image, tile=32, margin=8)
    tta = predict_probability(tiny_same, image, tile=32, margin=8, tta=True)
    assert tta.shape == plain.shape
    # averaging 8 views of a non-symmetric network differs from one view, but stays close
    assert not np.allclose(tta, plain) and np.abs(tta - plain).max() < 0.5
    # each view is mapped back: TTA of the flipped image is the flipped TTA
    flipped = predict_probability(tiny_same, image[:, ::-1].copy(), tile=32, margin=8, tta=True)
    np.testing.assert_allclose(flipped, tta[:, ::-1], rtol=1e-5, atol=1e-6)


def test_valid_network_tiles_without_a_margin():
    model = UNet(base_width=2, depth=1, dropout=0.0, padding="valid", seed=0, dtype="float64")
    tile, keep, offset = tile_geometry(model.config, 32, 0)
    assert (tile, offset) == (32, 0) and keep == 32 - 16      # depth 1: 32 -> 28/2=14 -> 10 -> 20 -> 16
    probability = predict_probability(model, np.random.default_rng(3).random((41, 23)), tile=32)
    assert probability.shape == (41, 23)


def test_bad_tile_and_threshold_are_refused(tiny_same, tmp_path):
    with pytest.raises(ValueError, match="multiple of 4"):
        predict_probability(tiny_same, np.zeros((8, 8)), tile=30)
    with pytest.raises(ValueError, match="expected one \\(H, W\\) grey image"):
        predict_probability(tiny_same, np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        save_prediction(np.zeros((4, 4)), np.zeros((4, 4)), tmp_path, "x", threshold=1.0)


def test_saved_files(tmp_path):
    image = np.linspace(0, 1, 16).reshape(4, 4)
    probability = np.linspace(0, 1, 16).reshape(4, 4).astype(np.float32)
    paths = save_prediction(image, probability, tmp_path, "slice", threshold=0.5)
    prob = np.array(Image.open(paths["probability"]))
    assert prob.dtype == np.uint16 and prob.max() == 65535 and prob.min() == 0
    mask = np.array(Image.open(paths["mask"]))
    np.testing.assert_array_equal(mask == 0, probability >= 0.5)        # 0 = membrane, as ISBI labels
    rgb = np.array(Image.open(paths["overlay"]))
    assert rgb.shape == (4, 4, 3)
    assert rgb[3, 3, 0] > rgb[3, 3, 1]                                   # membrane tinted red
    assert rgb[0, 0, 0] == rgb[0, 0, 1] == rgb[0, 0, 2]                  # cell stays grey
    assert not list(tmp_path.glob(".*.tmp"))                             # no temporary left behind


def test_auto_tile_covers_the_image_in_one_pass(tiny_same):
    from tinyunet.infer import auto_tile
    assert auto_tile(tiny_same, (256, 256), margin=32) == 320      # 256 + 2*32, divisible by 4
    assert auto_tile(tiny_same, (30, 7), margin=8) == 48
    probability = predict_probability(tiny_same, np.random.default_rng(4).random((30, 7)))
    assert probability.shape == (30, 7)


def test_auto_tile_takes_the_largest_tile_within_the_memory_budget():
    from tinyunet.infer import DEFAULT_MEMORY_BUDGET, auto_tile
    model = UNet()                                                  # the exact U-Net, 31M parameters
    tile = auto_tile(model, (4096, 4096), margin=32)                # too large for one pass
    assert tile % 16 == 0 and 64 < tile < 4096
    assert model.inference_bytes((1, 1, tile, tile)) <= DEFAULT_MEMORY_BUDGET
    assert model.inference_bytes((1, 1, tile + 16, tile + 16)) > DEFAULT_MEMORY_BUDGET
    assert auto_tile(model, (512, 512), margin=32) == 576           # a slice fits in one pass
    budget = model.inference_bytes((1, 1, 256, 256))
    assert auto_tile(model, (512, 512), margin=32, memory_budget=budget) == 256
    with pytest.raises(ValueError, match="no tile fits a memory budget of 0.10 GB.*raise memory_budget"):
        auto_tile(model, (512, 512), margin=32, memory_budget=10 ** 8)


def test_a_small_budget_predicts_in_tiles_the_same_image(tiny_same):
    from tinyunet.infer import auto_tile
    image = np.random.default_rng(5).random((70, 90))
    whole = predict_probability(tiny_same, image, margin=32)        # one 160-pixel pass
    budget = tiny_same.inference_bytes((1, 1, 80, 80))
    assert auto_tile(tiny_same, image.shape, 32, memory_budget=budget) == 80
    tiled = predict_probability(tiny_same, image, margin=32, memory_budget=budget)   # 80-pixel tiles
    # 32 pixels of context cover depth 2's receptive field: the tiles give the one pass's numbers
    np.testing.assert_allclose(tiled, whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-7), ("float32", 2e-6)])   # the result is float32
@pytest.mark.parametrize("shape, tile", [((40, 40), None), ((37, 53), 32)])
def test_tta_in_batches_equals_eight_separate_passes(dtype, tolerance, shape, tile):
    """The eight views batched (their tiles share forwards) give what eight separate passes
    gave: each view predicted alone, its probability mapped back, the eight averaged."""
    from tinyunet.infer import _dihedral, _undo_dihedral, auto_tile
    from tinyunet.layers.activation import sigmoid
    model = UNet(base_width=4, depth=2, dropout=0.5, seed=7, dtype=dtype)
    image = np.random.default_rng(6).random(shape).astype(np.float32)
    chosen = auto_tile(model, shape, 8) if tile is None else tile
    separate = np.zeros(shape)
    model.eval()
    for flip in (False, True):
        for k in range(4):
            view = np.ascontiguousarray(_dihedral(image, k, flip))
            logits = predict_logits_tiled(model, view, chosen, 8, batch=1)
            separate += _undo_dihedral(sigmoid(logits), k, flip)
    separate /= 8
    model.train()
    for batch in (8, 3, None):
        together = predict_probability(model, image, tile=tile, margin=8, tta=True, batch=batch)
        np.testing.assert_allclose(together, separate, rtol=tolerance, atol=tolerance)
    assert model.training                                           # the mode came back


def test_inference_bytes_bound_what_numpy_allocates():
    """UNet.inference_bytes against tracemalloc (which sees every NumPy array): in a warm
    process (the workspace grown), the peak of a forward inside no_grad() plus the workspace it
    reuses stays within the estimate's activations + workspace, and close to them."""
    import tracemalloc

    import tinyunet
    from tinyunet.layers import conv
    for config, shape in [(dict(base_width=8, depth=3), (2, 1, 64, 64)),
                          (dict(base_width=16, depth=4), (3, 1, 128, 128)),
                          (dict(base_width=8, depth=2, padding="valid"), (2, 1, 60, 60))]:
        model = UNet(**config).eval()
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        conv.release_workspace()
        with tinyunet.no_grad():
            model.forward(x)                                        # grows the workspace
        workspace = sum(block.nbytes for block in conv._workspace.values())
        tracemalloc.start()
        try:
            with tinyunet.no_grad():
                model.forward(x)
            measured = tracemalloc.get_traced_memory()[1] + workspace + x.nbytes
        finally:
            tracemalloc.stop()
        estimate = model.inference_bytes(shape, parts=True)
        bound = estimate["activations"] + estimate["workspace"]
        # + 256 kB: tracemalloc also sees the Python objects a forward makes (frames, tuples)
        assert 0.8 * bound <= measured <= 1.02 * bound + 2 ** 18, (config, measured, estimate)


def test_bench_infer_runs_at_a_tiny_size(tmp_path, capsys):
    """examples/bench_infer.py end to end at 16x16 and on two tiny slices with a tiny model."""
    import importlib.util
    from scripts import load_example
    bench = load_example("bench_infer")
    for index in range(2):
        Image.fromarray((np.random.default_rng(index).random((40, 36)) * 255).astype(np.uint8)).save(
            tmp_path / f"{index}.png")
    frameworks = ["tinyunet", "torch"] if importlib.util.find_spec("torch") else ["tinyunet"]
    assert bench.main(["--sizes", "16", "--steps", "1", "--frameworks", *frameworks, "--tta-slices", "2",
                       "--data", str(tmp_path), "--tta-base-width", "4"]) == 0
    out = capsys.readouterr().out
    assert "tinyunet  16x16  batch 1  forward median" in out
    assert "predict_membranes.py --tta  2 slices" in out and "s per slice" in out
    if len(frameworks) == 2:
        assert "ratio  16x16  time tinyunet/torch" in out
    with pytest.raises(SystemExit, match="fewer than --tta-slices 3"):
        bench.main(["--sizes", "--tta-slices", "3", "--data", str(tmp_path)])
