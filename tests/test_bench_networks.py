"""examples/bench_networks.py builds the same FCN-8s and SegNet on both sides: the PyTorch
models have tinyunet's parameter counts (trainable ones in Adam included), give logits of the
input's size (FCN's crops at tinyunet's derived offsets), and one step of each runs. In this
process, at a tiny width and size (the timed runs are the script's, never a test's)."""
from __future__ import annotations

import pytest
from scripts import load_example


@pytest.fixture(scope="module")
def bench():
    return load_example("bench_networks")     # which puts examples/ on sys.path for bench_unet's helpers


@pytest.mark.torch
@pytest.mark.parametrize("network", ["fcn8s", "segnet"])
def test_both_frameworks_build_the_same_network_and_step(bench, network):
    torch = pytest.importorskip("torch")
    size, width = 32, 2
    if network == "fcn8s":
        from tinyunet.fcn import FCN
        pad = bench.smallest_input_pad(size, width, 3)
        settings = bench.fcn_settings(width, 4 * width, pad, 3)
        offsets = FCN(**settings).offsets
    else:
        settings, offsets = dict(classes=3, in_channels=3, base_width=width), {}
    step, ours = bench.tinyunet_step_fn(network, settings, size, 1)
    torch_step, theirs = bench.torch_step_fn(network, settings, size, 1, offsets)
    assert sum(v.size for v in ours.parameters().values()) == sum(p.numel() for p in theirs.parameters())
    assert sum(v.size for v in ours.trainable_parameters().values()) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    with torch.no_grad():
        assert tuple(theirs(torch.zeros(1, 3, size, size)).shape) == (1, 3, size, size)
    step()
    torch_step()


def test_the_smallest_input_pad_fits_and_one_less_step_does_not(bench):
    from tinyunet.fcn import FCN
    pad = bench.smallest_input_pad(128, 16, 3)
    assert 0 < pad < 100
    FCN(**bench.fcn_settings(16, 64, pad, 3)).layer_shapes((1, 3, 128, 128))
    with pytest.raises(ValueError):
        model = FCN(**bench.fcn_settings(16, 64, pad - 4, 3))
        model.layer_shapes((1, 3, 128, 128))
