"""The U-Net against PyTorch: same weights, same logits, same gradient for every parameter.

The PyTorch network below is written independently from tinyunet/unet.py, from the Keras
reference model (zhixuhao/unet) and the U-Net paper, so that a wiring mistake in either one
(a skip to the wrong level, the concat order, a missing crop) shows as a difference. Dropout
uses the masks tinyunet drew, so both compute the same function. float64, relative error < 1e-8.
"""
from __future__ import annotations

import numpy as np
import pytest

from tinyunet.gradcheck import relative_error
from tinyunet.losses import bce_with_logits, softmax_cross_entropy
from tinyunet.unet import UNet, nearest_valid_sizes

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

pytestmark = pytest.mark.torch


class TorchUNet(nn.Module):
    """zhixuhao/unet's model.py in PyTorch ('same'), or the paper's unpadded net ('valid')."""

    def __init__(self, in_channels, base, depth, padding, head_relu, classes=1):
        super().__init__()
        self.depth, self.valid, self.head_relu = depth, padding == "valid", head_relu
        pad = 0 if self.valid else 1
        w = [base * 2 ** i for i in range(depth + 1)]
        conv = nn.ModuleDict()
        cin = in_channels
        for i in range(1, depth + 1):
            conv[f"down{i}_conv1"] = nn.Conv2d(cin, w[i - 1], 3, padding=pad)
            conv[f"down{i}_conv2"] = nn.Conv2d(w[i - 1], w[i - 1], 3, padding=pad)
            cin = w[i - 1]
        conv["bottom_conv1"] = nn.Conv2d(w[depth - 1], w[depth], 3, padding=pad)
        conv["bottom_conv2"] = nn.Conv2d(w[depth], w[depth], 3, padding=pad)
        for i in range(depth, 0, -1):
            conv[f"up{i}_upconv"] = nn.Conv2d(w[i], w[i - 1], 2)     # padded by hand: Keras 'same'
            conv[f"up{i}_conv1"] = nn.Conv2d(2 * w[i - 1], w[i - 1], 3, padding=pad)
            conv[f"up{i}_conv2"] = nn.Conv2d(w[i - 1], w[i - 1], 3, padding=pad)
        if not self.valid and classes == 1:       # the Keras sigmoid head
            conv["head_conv"] = nn.Conv2d(base, 2, 3, padding=1)
            conv["head_out"] = nn.Conv2d(2, 1, 1)
        else:                                      # the paper's head: 1x1 to the K class scores
            conv["head_out"] = nn.Conv2d(base, classes, 1)
        self.conv = conv

    @staticmethod
    def center_crop(t, size):
        top, left = (t.shape[2] - size[0]) // 2, (t.shape[3] - size[1]) // 2
        return t[:, :, top:top + size[0], left:left + size[1]]

    def forward(self, x, masks):
        c = self.conv
        skips = []
        for i in range(1, self.depth + 1):
            x = F.relu(c[f"down{i}_conv2"](F.relu(c[f"down{i}_conv1"](x))))
            if i == self.depth and "down" in masks:
                x = x * masks["down"]
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = F.relu(c["bottom_conv2"](F.relu(c["bottom_conv1"](x))))
        if "bottom" in masks:
            x = x * masks["bottom"]
        for i in range(self.depth, 0, -1):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = F.relu(c[f"up{i}_upconv"](F.pad(x, (0, 1, 0, 1))))  # TF 'same' for 2x2: 0 before, 1 after
            skip = skips[i - 1]
            if self.valid:
                skip = self.center_crop(skip, x.shape[2:])
            x = torch.cat([skip, x], dim=1)
            x = F.relu(c[f"up{i}_conv2"](F.relu(c[f"up{i}_conv1"](x))))
        if "head_conv" in c:
            x = c["head_conv"](x)
            if self.head_relu:
                x = F.relu(x)
        return c["head_out"](x)


def compare(model: UNet, x: np.ndarray, seed: int):
    """Run both networks forward and backward; return {what: relative error}."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    for p in model.parameters().values():          # nonzero biases too, so that they count
        if p.ndim == 1:
            p[...] = rng.normal(0, 0.05, p.shape)

    logits = model.forward(x)
    masks = {}                 # the dropout masks, read before the backward releases them
    if f"down{cfg.depth}.dropout" in model.layers:
        masks["down"] = torch.from_numpy(model.layers[f"down{cfg.depth}.dropout"].mask.copy())
        masks["bottom"] = torch.from_numpy(model.layers["bottom.dropout"].mask.copy())
    if cfg.classes == 1:
        target = (rng.random(logits.shape) > 0.5).astype(np.float64)
        loss, dlogits = bce_with_logits(logits, target)
    else:                                          # K classes: softmax cross-entropy on labels
        target = rng.integers(0, cfg.classes, (logits.shape[0],) + logits.shape[2:])
        loss, dlogits = softmax_cross_entropy(logits, target)
    dx = model.backward(dlogits)

    net = TorchUNet(cfg.in_channels, cfg.base_width, cfg.depth, cfg.padding, cfg.head_relu, cfg.classes).double()
    ours = model.parameters()
    with torch.no_grad():
        for name, p in net.conv.named_parameters():      # 'down1_conv1.weight' <- 'down1.conv1.weight'
            p.copy_(torch.from_numpy(ours[name.replace("_", ".")]))
    assert len(list(net.parameters())) == len(ours)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    t_logits = net(tx, masks)
    t_loss = (F.binary_cross_entropy_with_logits(t_logits, torch.from_numpy(target)) if cfg.classes == 1
              else F.cross_entropy(t_logits, torch.from_numpy(target)))
    t_loss.backward()

    errors = {"logits": relative_error(logits, t_logits.detach().numpy()),
              "loss": relative_error(np.array([loss]), np.array([t_loss.item()])),
              "x": relative_error(dx, tx.grad.numpy())}
    grads = model.gradients()
    for name, p in net.conv.named_parameters():
        errors[name.replace("_", ".")] = relative_error(grads[name.replace("_", ".")], p.grad.numpy())
    return errors


def assert_agree(errors):
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-8, (worst, errors[worst])


def test_same_exact_network_matches_torch():
    """The exact Keras model (31M parameters), dropout on, at 16x16, batch 2."""
    model = UNet(dtype="float64", seed=4)
    x = np.random.default_rng(1).random((2, 1, 16, 16))
    errors = compare(model, x, seed=2)
    assert len(errors) == 3 + 48
    assert_agree(errors)


@pytest.mark.parametrize("head_relu,dropout,in_channels", [(False, 0.5, 1), (True, 0.0, 3)])
def test_same_variants_match_torch(head_relu, dropout, in_channels):
    model = UNet(base_width=4, depth=3, head_relu=head_relu, dropout=dropout, in_channels=in_channels,
                 dtype="float64", seed=5)
    x = np.random.default_rng(3).random((2, in_channels, 24, 16))
    assert_agree(compare(model, x, seed=6))


@pytest.mark.parametrize("depth,base", [(4, 4), (2, 8)])
def test_valid_network_matches_torch(depth, base):
    """The paper's unpadded network: the smallest valid input, crops at every level."""
    model = UNet(base_width=base, depth=depth, padding="valid", dtype="float64", seed=7)
    size = nearest_valid_sizes(1, depth, "valid")[1]
    x = np.random.default_rng(4).random((1, 1, size, size + 2 ** depth))
    errors = compare(model, x, seed=8)
    assert model.output_shape(x.shape)[2] < size             # it really is unpadded
    assert_agree(errors)


@pytest.mark.parametrize("padding,dropout", [("same", 0.5), ("valid", 0.0)])
def test_k_class_network_matches_torch(padding, dropout):
    """K = 3: the paper's 1x1 head to three class scores, softmax cross-entropy on both sides."""
    model = UNet(base_width=4, depth=2, classes=3, padding=padding, dropout=dropout, dtype="float64", seed=9)
    size = 16 if padding == "same" else nearest_valid_sizes(1, 2, "valid")[1]
    x = np.random.default_rng(5).random((2, 1, size, size))
    errors = compare(model, x, seed=10)
    assert model.forward(x).shape[1] == 3 and "head.conv.weight" not in errors
    assert_agree(errors)
