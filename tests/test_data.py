"""Proofs for tinyunet/data.py: synthetic slices, files and their checks, downloads, weights, crops."""
import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tinyunet import data
from tinyunet.data import (ChecksumError, batches, DataError, DataNotFoundError, Dataset, DownloadError, border_weight_map,
                           default_cache_dir, download_isbi2012, isbi2012_sha256, load_folder, load_image_folder,
                           load_tiff_stack, random_crops, read_image, read_target, resolve_data, save_folder,
                           synthetic_membranes, target_from_label)
from tinyunet.metrics import iou, otsu_baseline

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"   # ../shared beside the repo
needs_isbi = pytest.mark.skipif(not (ISBI / "train" / "label").is_dir(), reason="shared ISBI copy not present")


def _png(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _tiny_folder(root, names=("0", "1", "2"), size=16):
    """A labelled folder of small random slices: image/<name>.png and label/<name>.png."""
    rng = np.random.default_rng(0)
    for name in names:
        _png(rng.integers(0, 256, (size, size)), root / "image" / f"{name}.png")
        _png(np.where(rng.random((size, size)) < 0.2, 0, 255), root / "label" / f"{name}.png")
    return root


# ----------------------------------------------------------------------------------- synthetic

def test_synthetic_is_reproducible():
    first = synthetic_membranes(3, size=64, seed=1)
    again = synthetic_membranes(5, size=64, seed=1)     # slice i depends only on (seed, i)
    other = synthetic_membranes(3, size=64, seed=2)
    for i in range(3):
        np.testing.assert_array_equal(first.images[i], again.images[i])
        np.testing.assert_array_equal(first.targets[i], again.targets[i])
        assert not np.array_equal(first.images[i], other.images[i])
    assert first.images[0].dtype == np.float32 and first.images[0].shape == (64, 64)
    assert set(np.unique(first.targets[0])) == {0.0, 1.0} and len(first) == 3


def test_synthetic_fools_otsu_and_has_membrane_share():
    start = time.perf_counter()
    dataset = synthetic_membranes(4, size=256, seed=0)
    assert time.perf_counter() - start < 4.0, "should take well under 1 s per 256x256 slice"
    for image, target in zip(dataset.images, dataset.targets):
        membrane = target == 1
        assert 0.15 <= membrane.mean() <= 0.25
        assert iou(otsu_baseline(image), target) < 0.6      # a global threshold is clearly beaten
        # The reason: a tenth of the cell pixels (organelles, dark cells) is as dark as membrane.
        assert np.mean(image[~membrane] <= np.quantile(image[membrane], 0.75)) > 0.08
        assert image.min() >= 0 and image.max() <= 1


# --------------------------------------------------------------------------- datasets, labels

def test_split_picks_items():
    dataset = synthetic_membranes(4, size=32)
    part = dataset.split([3, 1])
    assert part.names == [dataset.names[3], dataset.names[1]] and part.targets[0] is dataset.targets[3]
    with pytest.raises(DataError, match="one name"):
        Dataset([np.zeros((2, 2))], [], ["a", "b"])


def test_label_values_are_checked(tmp_path):
    np.testing.assert_array_equal(target_from_label(np.array([[0, 255]])), [[1.0, 0.0]])   # 0 = membrane
    np.testing.assert_array_equal(target_from_label(np.array([[0, 1]])), [[1.0, 0.0]])
    _png([[0, 128], [255, 3]], tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad\.png holds the values \[0, 3, 128, 255\].*binarize"):
        read_target(tmp_path / "bad.png")


def test_float_and_fractional_labels_are_refused_not_truncated(tmp_path):
    almost_cell = np.full((4, 4), 0.996, np.float32)                # truncation would make it all membrane
    with pytest.raises(DataError, match=r"label cells.tif holds fractional values \[0.996\].*8-bit PNG"):
        target_from_label(almost_cell, "cells.tif")
    with pytest.raises(DataError, match=r"fractional values \[0.6\]"):
        target_from_label(np.array([[0.6, 255.0]]))
    with pytest.raises(DataError, match="NaN or infinite"):
        target_from_label(np.array([[np.nan, 255.0]]))
    np.testing.assert_array_equal(target_from_label(np.array([[0.0, 255.0]])), [[1.0, 0.0]])   # whole floats are fine
    Image.fromarray(almost_cell, mode="F").save(tmp_path / "float_label.tif")
    with pytest.raises(DataError, match=r"float_label\.tif holds fractional values \[0.996\]"):
        read_target(tmp_path / "float_label.tif")


@pytest.mark.parametrize("image, message", [
    (np.full((4, 4), np.nan, np.float32), "item 'x': 16 pixels are NaN or infinite"),
    (np.array([[0.5, np.inf], [0, 0]], np.float32), "item 'x': 1 pixels are NaN or infinite"),
    (np.full((4, 4), 200, np.uint8), r"dtype uint8 \(8-bit values 0..255: divide by 255\)"),
    (np.full((4, 4), 200.0, np.float32), r"from 200 to 200, outside \[0, 1\] \(it looks like 0..255"),
    (np.zeros((1, 4, 4), np.float32), r"one \(H, W\) grey image.*shape \(1, 4, 4\)"),
])
def test_bad_images_are_named_where_they_enter(image, message):
    with pytest.raises(DataError, match=message):
        Dataset([image], [], ["x"])


@pytest.mark.parametrize("target, message", [
    (np.full((4, 4), np.nan, np.float32), r"item 'x': a target holds 1 \(membrane\) and 0 \(cell\) only, found \[nan\]"),
    (np.full((4, 4), 255, np.uint8), r"found \[255\].*target_from_label"),
    (np.full((4, 4), 0.5, np.float32), r"found \[0.5\]"),
])
def test_bad_targets_are_named_where_they_enter(target, message):
    with pytest.raises(DataError, match=message):
        Dataset([np.zeros((4, 4), np.float32)], [target], ["x"])


def test_an_image_over_the_pixel_limit_is_a_clear_error(tmp_path, monkeypatch):
    _png(np.zeros((40, 40)), tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)       # 1600 pixels is more than twice the limit
    with pytest.raises(DataError, match=r"huge\.png is larger than Pillow's decompression-bomb limit of 100 "
                                        r"pixels.*cut it into smaller images"):
        read_image(tmp_path / "huge.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "huge.tif")
    with pytest.raises(DataError, match="decompression-bomb limit"):
        load_tiff_stack(tmp_path / "huge.tif")


def test_load_folder_roundtrip_natural_order(tmp_path):
    dataset = synthetic_membranes(12, size=32)
    dataset.names = [str(i) for i in range(12)]
    load = load_folder(save_folder(dataset, tmp_path / "set"))
    assert load.names == [str(i) for i in range(12)]                    # 0, 1, 2, ..., 10, 11
    for i in range(12):
        np.testing.assert_array_equal(load.images[i], dataset.images[i])
        np.testing.assert_array_equal(load.targets[i], dataset.targets[i])
    assert not list((tmp_path / "set" / "image").glob(".*tmp"))         # no temporary files left


def test_unpaired_files_are_listed(tmp_path):
    root = _tiny_folder(tmp_path, names=("0", "1", "2", "3"))
    (root / "label" / "3.png").unlink()
    _png(np.zeros((16, 16)), root / "label" / "7.png")
    with pytest.raises(DataError, match=r"images without a label.*: 3;.*labels without an image.*: 7"):
        load_folder(root)


def test_size_mismatch_is_named(tmp_path):
    root = _tiny_folder(tmp_path)
    _png(np.zeros((16, 8)), root / "label" / "1.png")
    with pytest.raises(DataError, match=r"image .*1\.png is 16x16 .* label .*1\.png is 16x8"):
        load_folder(root)


def test_unreadable_image_is_named(tmp_path):
    root = _tiny_folder(tmp_path)
    (root / "image" / "2.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot read the image .*image/2\.png"):
        load_folder(root)


def test_missing_folder_and_wrong_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(tmp_path / "nowhere")
    _png(np.zeros((4, 4)), tmp_path / "flat" / "0.png")
    with pytest.raises(DataNotFoundError, match="image/ and label/.*load_image_folder"):
        load_folder(tmp_path / "flat")


def test_load_image_folder_without_labels(tmp_path):
    for name in ("10", "2", "1"):
        _png(np.full((5, 6), 51), tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    dataset = load_image_folder(tmp_path)
    assert dataset.names == ["1", "2", "10"] and not dataset.labelled
    np.testing.assert_allclose(dataset.images[0], 0.2)
    assert dataset.images[0].shape == (5, 6)


def test_sixteen_bit_and_rgb_images_read_to_unit_range(tmp_path):
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((2, 2, 3), 255, np.uint8)).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(read_image(tmp_path / "deep.png"), [[0.0, 1.0]])
    np.testing.assert_allclose(read_image(tmp_path / "rgb.png"), 1.0)


def test_tiff_stack_roundtrip_and_mismatch(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (12, 10), dtype=np.uint8) for _ in range(3)]
    labels = [np.where(rng.random((12, 10)) < 0.3, 0, 255).astype(np.uint8) for _ in range(3)]
    pages = [Image.fromarray(a) for a in images]
    pages[0].save(tmp_path / "volume.tif", save_all=True, append_images=pages[1:])
    label_pages = [Image.fromarray(a) for a in labels]
    label_pages[0].save(tmp_path / "labels.tif", save_all=True, append_images=label_pages[1:])
    stack = load_tiff_stack(tmp_path / "volume.tif", tmp_path / "labels.tif")
    assert stack.names == ["volume_0", "volume_1", "volume_2"]
    for i in range(3):
        np.testing.assert_allclose(stack.images[i], images[i] / 255)
        np.testing.assert_array_equal(stack.targets[i], labels[i] == 0)
    label_pages[0].save(tmp_path / "short.tif", save_all=True, append_images=label_pages[1:2])
    with pytest.raises(DataError, match="3 pages but .*short.tif has 2"):
        load_tiff_stack(tmp_path / "volume.tif", tmp_path / "short.tif")
    with pytest.raises(DataError, match="stack of 3 pages.*load_tiff_stack"):
        read_image(tmp_path / "volume.tif")


@needs_isbi
def test_load_real_isbi_folder():
    dataset = load_folder(ISBI / "train")
    assert len(dataset) == 24 and dataset.names[:11] == [str(i) for i in range(11)]
    assert dataset.images[0].shape == (512, 512)
    assert 0.18 < np.mean([t.mean() for t in dataset.targets]) < 0.26    # about 22 % membrane


# ----------------------------------------------------------------------------------- download

@pytest.fixture
def file_server():
    """Serves `files` (name -> bytes) under http://127.0.0.1:<port>/data/membrane/, counting requests."""
    files, requests = {}, []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path.endswith("/slow.png"):
                time.sleep(0.5)  # longer than the client's timeout; the client hangs up first
                return
            body = files.get(self.path.removeprefix("/data/membrane/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            if "nolength" not in self.path:     # without it the client reads until the server hangs up
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/data/membrane", files=files, requests=requests)
    server.shutdown()
    server.server_close()
    thread.join()


def _sums(files):
    return {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}


def test_download_verifies_and_reuses_the_cache(file_server, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    file_server.files.update({"train/image/0.png": b"zero", "train/label/0.png": b"label", "test/1.png": b"one"})
    sums = _sums(file_server.files)
    cache = download_isbi2012(tmp_path / "cache", base_url=file_server.url, expected_sha256=sums, timeout=5)
    assert (cache / "train/label/0.png").read_bytes() == b"label" and len(file_server.requests) == 3
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")]   # no temporary files left
    download_isbi2012(cache, base_url=file_server.url, expected_sha256=sums, timeout=5, progress=False)
    assert len(file_server.requests) == 3                              # verified files: no new request
    (cache / "test/1.png").write_bytes(b"damaged")
    download_isbi2012(cache, base_url=file_server.url, expected_sha256=sums, timeout=5, progress=False)
    assert file_server.requests[3:] == ["/data/membrane/test/1.png"] and (cache / "test/1.png").read_bytes() == b"one"


def test_download_errors_are_named(file_server, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    file_server.files.update({"train/image/0.png": b"good", "train/image/1.png": b"tampered"})
    sums = _sums(file_server.files) | {"train/image/1.png": "ab" * 32}
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(ChecksumError, match=rf"train/image/1\.png .*expected sha256 {'ab' * 32}, got {actual}"):
        download_isbi2012(tmp_path, base_url=file_server.url, expected_sha256=sums, progress=False)
    assert (tmp_path / "train/image/0.png").exists() and not (tmp_path / "train/image/1.png").exists()
    assert not list((tmp_path / "train/image").glob(".*"))             # the bad download was deleted
    with pytest.raises(DownloadError, match=r"test/5\.png from .*/data/membrane/test/5\.png: HTTP 404"):
        download_isbi2012(tmp_path, base_url=file_server.url, expected_sha256={"test/5.png": "00" * 32},
                          progress=False)
    with pytest.raises(DownloadError, match=r"slow\.png .*timed out.*synthetic"):
        download_isbi2012(tmp_path, base_url=file_server.url, expected_sha256={"slow.png": "00" * 32},
                          timeout=0.1, progress=False)
    assert not (tmp_path / "slow.png").exists()


@pytest.mark.parametrize("name", ["../x.png", "/tmp/x.png", "train/../../x.png", "a//b.png", "a\\b.png",
                                  "C:/x.png", ""])
def test_download_names_stay_inside_the_cache(file_server, tmp_path, name):
    with pytest.raises(DataError, match="must be a relative path inside the cache folder"):
        download_isbi2012(tmp_path / "cache", base_url=file_server.url, expected_sha256={"ok.png": "00" * 32,
                                                                                           name: "00" * 32})
    assert file_server.requests == [] and not (tmp_path / "cache").exists()      # refused before any request


def test_download_size_is_capped(file_server, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    file_server.files.update({"big.png": b"x" * 5000, "nolength.png": b"y" * 5000})
    sums = _sums(file_server.files)
    with pytest.raises(DownloadError, match=r"big\.png from .* is larger than 1,000 bytes \(Content-Length 5,000\)"):
        download_isbi2012(tmp_path, base_url=file_server.url, expected_sha256={"big.png": sums["big.png"]},
                          max_bytes=1000, progress=False)
    with pytest.raises(DownloadError, match=r"nolength\.png .* larger than 1,000 bytes \(the transfer went past it"):
        download_isbi2012(tmp_path, base_url=file_server.url, progress=False, max_bytes=1000,
                          expected_sha256={"nolength.png": sums["nolength.png"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == []                        # nothing kept
    with pytest.raises(DataError, match="64 hexadecimal digits"):
        download_isbi2012(tmp_path, base_url=file_server.url, expected_sha256={"a.png": "nope"})


def test_shipped_sums_and_default_cache(monkeypatch, tmp_path):
    sums = isbi2012_sha256()
    assert len(sums) == 90 and sums["train/label/29.png"] and sums["test/0.png"]
    monkeypatch.setenv("TINYUNET_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "isbi2012"
    monkeypatch.delenv("TINYUNET_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "tinyunet" / "isbi2012"


@needs_isbi
def test_shipped_sums_verify_the_shared_copy():
    sums = isbi2012_sha256()
    for name in ("train/image/0.png", "train/label/23.png", "test/29.png"):
        assert hashlib.sha256((ISBI / name).read_bytes()).hexdigest() == sums[name], name


# ------------------------------------------------------------------------------ resolve_data

def test_resolve_data_specs(tmp_path, monkeypatch):
    synthetic = resolve_data("synthetic", count=2, size=48)
    assert len(synthetic) == 2 and synthetic.images[0].shape == (48, 48)
    folder = _tiny_folder(tmp_path / "set")
    assert resolve_data(folder).names == ["0", "1", "2"]
    assert not resolve_data(folder, labelled=False).labelled
    page = Image.fromarray(np.zeros((4, 4), np.uint8))
    page.save(tmp_path / "v.tif", save_all=True, append_images=[page])
    page.save(tmp_path / "l.tif", save_all=True, append_images=[page])
    assert len(resolve_data((tmp_path / "v.tif", tmp_path / "l.tif"))) == 2
    assert resolve_data(f"{tmp_path / 'v.tif'},{tmp_path / 'l.tif'}").targets[1].all()
    with pytest.raises(DataError, match="single file"):
        resolve_data(tmp_path / "v.tif")
    with pytest.raises(FileNotFoundError, match="not 'synthetic' or 'isbi2012'.*does not exist"):
        resolve_data(tmp_path / "missing")
    _tiny_folder(tmp_path / "cache" / "train", names=("5", "6"))
    monkeypatch.setattr(data, "download_isbi2012", lambda cache_dir=None: tmp_path / "cache")
    assert resolve_data("isbi2012").names == ["5", "6"]            # the download's train/ folder


# ------------------------------------------------------------------------------ border weights

def test_border_weights_two_cells_by_hand():
    target = np.zeros((9, 21), np.float32)
    target[:, 10] = 1                                        # two cells, a 1-px membrane between
    w0, sigma = 10.0, 2.0
    weights = border_weight_map(target, w0=w0, sigma=sigma)
    # Class weights N / (2 N_c): 189 pixels, 9 membrane, 180 cell.
    w_membrane, w_cell = 189 / 18, 189 / 360
    # On the membrane d1 = d2 = 1: w = w_membrane + w0 exp(-(1 + 1)^2 / (2 sigma^2)).
    np.testing.assert_allclose(weights[:, 10], w_membrane + w0 * np.exp(-4 / 8), rtol=1e-6)
    assert np.unravel_index(np.argmax(weights), weights.shape)[1] == 10
    # At column 0: d1 = 0, d2 = 11, so the border term is 10 exp(-121 / 8) < 3e-6.
    np.testing.assert_allclose(weights[:, 0], w_cell, atol=1e-5)
    unbalanced = border_weight_map(target, w0=w0, sigma=sigma, class_balance=False)
    np.testing.assert_allclose(unbalanced[:, 0], 1.0, atol=1e-5)


def test_border_weights_narrow_gap_weighs_more():
    target = np.zeros((20, 30), np.float32)
    target[:10, 14:15] = 1                                   # 1 px wide in the top half
    target[10:, 12:17] = 1                                   # 5 px wide in the bottom half
    weights = border_weight_map(target, class_balance=False)
    assert weights[2, 14] > weights[17, 14] + 1              # (1 + 1)^2 vs (3 + 3)^2 in the exponent


def _brute_force_weights(target, w0, sigma):
    """The formula with the full distance map of every cell: no bounding boxes."""
    cells, count = ndimage.label(target == 0)
    distances = np.sort(np.stack([ndimage.distance_transform_edt(cells != k) for k in range(1, count + 1)]), axis=0)
    membrane = target == 1
    w_c = np.where(membrane, target.size / (2 * membrane.sum()), target.size / (2 * (~membrane).sum()))
    return w_c + w0 * np.exp(-(distances[0] + distances[1]) ** 2 / (2 * sigma ** 2))


@pytest.mark.parametrize("sigma", [3.0, 5.0])
def test_border_weights_match_brute_force(sigma):
    target = synthetic_membranes(1, size=96, seed=3).targets[0]
    np.testing.assert_allclose(border_weight_map(target, sigma=sigma), _brute_force_weights(target, 10.0, sigma),
                               atol=1e-4)


@needs_isbi
def test_border_weights_real_label_is_fast():
    target = read_target(ISBI / "train" / "label" / "0.png")   # 512x512, 136 cells
    start = time.perf_counter()
    weights = border_weight_map(target)
    assert time.perf_counter() - start < 2.0                   # about 0.06 s when measured
    assert weights.shape == (512, 512) and np.isfinite(weights).all()


# ---------------------------------------------------------------------------------- crops

def test_random_crops_shapes_and_errors():
    dataset = synthetic_membranes(2, size=64)
    images, targets = random_crops(dataset, 32, 5, np.random.default_rng(0))
    assert images.shape == targets.shape == (5, 1, 32, 32) and images.dtype == targets.dtype == np.float32
    again, _ = random_crops(dataset, 32, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(images, again)
    # Each crop is a window of one of the images, and its target the same window of its target.
    for image, target in zip(images[:, 0], targets[:, 0]):
        hits = [(i, r, c) for i in range(2) for r in range(33) for c in range(33)
                if np.array_equal(dataset.images[i][r:r + 32, c:c + 32], image)]
        assert len(hits) == 1
        i, r, c = hits[0]
        np.testing.assert_array_equal(dataset.targets[i][r:r + 32, c:c + 32], target)
    flipped, flipped_targets = random_crops(dataset, 32, 5, np.random.default_rng(0),
                                            augment=lambda image, target, rng: (image[::-1], target[::-1]))
    np.testing.assert_array_equal(flipped_targets[:, :, ::-1], targets)
    stream = batches(dataset, 32, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(next(stream)[0], images)
    assert not np.array_equal(next(stream)[0], images)
    with pytest.raises(DataError, match=r"crop size 65 is larger than image 'synthetic_000' \(64x64"):
        random_crops(dataset, 65, 1, np.random.default_rng(0))
    for size, batch in ((0, 1), (-32, 1), (32, 0), (32, -1), (32, 2.0)):
        with pytest.raises(DataError, match="random_crops: the (crop size|batch) must be a whole number >= 1"):
            random_crops(dataset, size, batch, np.random.default_rng(0))


def test_a_float_image_file_with_nan_is_named(tmp_path):
    Image.fromarray(np.full((4, 4), np.nan, np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"image .*nan\.tif holds 16 NaN or infinite pixels"):
        read_image(tmp_path / "nan.tif")
