"""2-D batch normalisation, forward and backward, in training and in evaluation mode.

Shapes::

    x: (N, C, H, W)  ->  y: (N, C, H, W)      weight gamma: (C,)  bias beta: (C,)
    buffers (not learned, not counted as parameters): running_mean, running_var: (C,)

Training mode. Per channel c, over the m = N*H*W values of the batch:

    mu   = (1/m) sum x                  var = (1/m) sum (x - mu)^2      (biased: the batch's own)
    xhat = (x - mu) / sqrt(var + eps)   y   = gamma * xhat + beta

and the running statistics move toward the batch's, PyTorch's convention (momentum = 0.1):

    running_mean <- (1 - momentum) * running_mean + momentum * mu
    running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (UNBIASED)

Keras writes the same average with its momentum = 1 - PyTorch's (Keras 0.99 = PyTorch 0.01;
PyTorch's default 0.1 = Keras 0.9) and averages the BIASED batch variance; the two agree for
large m. Evaluation mode uses the running statistics instead of the batch's:

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta       (a fixed affine map)

Backward in training mode, given dy, per channel (sums over the m values). The parameters:

    dgamma = sum dy * xhat              dbeta = sum dy

The input: every x reaches y along three paths, directly through xhat, through mu (which
every x of the channel moves) and through var. With s = 1 / sqrt(var + eps) and
dxhat = dy * gamma:

    dL/dvar = sum dxhat * (x - mu) * (-1/2) s^3 = -(s / 2) * sum dxhat * xhat * s
    dL/dmu  = sum dxhat * (-s) + dL/dvar * (-2/m) sum (x - mu)  = -s * sum dxhat   (the second
              sum is 0: the deviations from the mean sum to zero)
    dx      = dxhat * s  +  dL/dvar * 2 (x - mu) / m  +  dL/dmu / m
            = s * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

the last line with (x - mu) = xhat / s. Drop the mean term or the variance term and the
gradient check fails (tests/test_batchnorm.py breaks each on purpose). In evaluation mode
mu and var are constants: dx = dy * gamma * s_running, and dgamma, dbeta as above with the
running statistics' xhat.

Two implementations of training mode with one result (to rounding): the NumPy expressions
below (any array module; the reference) and, for large NumPy arrays on the CPU, the Numba
kernels of kernels/cpu_networks.py, one task per channel, that read x three times and write
xhat and y once (forward), read dy and xhat twice and write dx once (backward), summing in
float64 (NumPy: about seven passes and three full-size temporaries each way; in a SegNet step
batch norm took a quarter of the time). TINYUNET_KERNELS=reference forces the NumPy path.

Proofs: tests/test_batchnorm.py (central differences in float64 in both modes, the running
averages, against torch.nn.functional.batch_norm: values, running statistics, gradients, on
both paths) and tests/test_network_kernels.py (the kernels against the NumPy path).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module, to_device
from tinyunet.kernels import cpu_layers, cpu_networks

from .base import FLOAT_DTYPES, Layer, LayerInputError


class BatchNorm2d(Layer):
    """Per-channel batch normalisation with learned scale and shift; see the module docstring."""
    _saved = ("_xhat", "_inv_std")

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5, dtype=np.float32,
                 name: str | None = None):
        super().__init__(name)
        if channels < 1:
            raise ValueError(f"{self._label()}: channels must be >= 1, got {channels}")
        if not 0.0 <= momentum <= 1.0 or eps <= 0:
            raise ValueError(f"{self._label()}: momentum must be in [0, 1] (PyTorch's convention: 0.1, "
                             f"which Keras calls 0.9) and eps > 0; got {momentum} and {eps}")
        self.channels, self.momentum, self.eps = int(channels), float(momentum), float(eps)
        self.params["weight"] = np.ones(self.channels, dtype=dtype)        # gamma
        self.params["bias"] = np.zeros(self.channels, dtype=dtype)         # beta
        self.buffers = {"running_mean": np.zeros(self.channels, dtype=dtype),
                        "running_var": np.ones(self.channels, dtype=dtype)}
        self.zero_grad()
        self._xhat = self._inv_std = None
        self._shape = self._dtype = None
        self._batch_stats = True                     # which statistics the last forward used

    def to(self, device: str):
        super().to(device)
        self.buffers = {k: to_device(v, device) for k, v in self.buffers.items()}
        return self

    def astype(self, dtype):
        super().astype(dtype)
        dtype = np.dtype(dtype)
        if dtype in FLOAT_DTYPES:
            self.buffers = {k: v.astype(dtype, copy=False) for k, v in self.buffers.items()}
        return self

    def forward(self, x):
        """x: (N, C, H, W) -> y: same shape. Training: batch statistics (and the running ones
        move); evaluation: the running statistics."""
        self._check_array(x, channels=self.channels)
        xp = get_array_module(x)
        shape = (1, self.channels, 1, 1)
        if self.training:
            m = x.shape[0] * x.shape[2] * x.shape[3]
            if m < 2:
                raise LayerInputError(f"{self._label()}: training mode needs more than one value per channel "
                                      f"to estimate a variance, got input shape {tuple(x.shape)}; use a "
                                      f"larger batch or crop, or eval()")
            if cpu_layers.serves(x):                                        # Numba: same formulas
                return self._train_forward_kernel(x, m)
            mu = x.mean(axis=(0, 2, 3))
            centered = x - mu.reshape(shape)
            var = (centered * centered).mean(axis=(0, 2, 3))                # biased: normalises
            inv_std = 1.0 / xp.sqrt(var + x.dtype.type(self.eps))
            xhat = centered * inv_std.reshape(shape)
            self._update_running(mu, var, m)
        else:
            inv_std = 1.0 / xp.sqrt(self.buffers["running_var"] + x.dtype.type(self.eps))
            xhat = (x - self.buffers["running_mean"].reshape(shape)) * inv_std.reshape(shape)
        self._keep(x, xhat, inv_std)
        return self.params["weight"].reshape(shape) * xhat + self.params["bias"].reshape(shape)

    def _update_running(self, mu, var, m):
        """running <- (1 - momentum) running + momentum batch, the variance unbiased (m / (m - 1))."""
        dtype = self.buffers["running_mean"].dtype
        mom = dtype.type(self.momentum)
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1 - mom
        rm += mom * mu
        rv *= 1 - mom
        rv += mom * var * dtype.type(m / (m - 1))                           # unbiased, as PyTorch

    def _keep(self, x, xhat, inv_std):
        if self._keeps_for_backward():      # inside no_grad(): keep nothing (the running statistics
            self._xhat, self._inv_std, self._shape, self._dtype = xhat, inv_std, x.shape, x.dtype
            self._batch_stats = self.training   # still move in training mode, as in PyTorch)

    def _train_forward_kernel(self, x, m):
        """Training-mode forward by kernels/cpu_networks.py (NumPy arrays): the same mu, var,
        xhat, y and running averages as the expressions in forward, summed in float64."""
        n, c, h, w = x.shape
        xhat, y = np.empty_like(x), np.empty_like(x)
        mu, var = np.empty(c), np.empty(c)                                  # float64
        cpu_networks.batchnorm_train_forward(x.reshape(n, c, h * w), self.params["weight"], self.params["bias"],
                                             self.eps, xhat.reshape(n, c, h * w), y.reshape(n, c, h * w), mu, var)
        self._update_running(mu.astype(x.dtype), var.astype(x.dtype), m)
        self._keep(x, xhat, (1.0 / np.sqrt(var + self.eps)).astype(x.dtype))
        return y

    def backward(self, dy):
        """dy: (N, C, H, W) -> dx: same shape; fills grads['weight'] (gamma) and grads['bias'] (beta)."""
        self._check_grad(dy, None if self._xhat is None else self._shape, self._dtype)
        shape = (1, self.channels, 1, 1)
        xhat, inv_std = self._xhat, self._inv_std
        if self._batch_stats and cpu_layers.serves(dy, xhat):             # Numba: same formulas
            n, c, h, w = dy.shape
            dx, dgamma, dbeta = np.empty_like(dy), np.empty(c), np.empty(c)
            cpu_networks.batchnorm_train_backward(dy.reshape(n, c, h * w), xhat.reshape(n, c, h * w),
                                                  self.params["weight"], inv_std, dx.reshape(n, c, h * w),
                                                  dgamma, dbeta)
            self.grads["weight"], self.grads["bias"] = dgamma.astype(dy.dtype), dbeta.astype(dy.dtype)
            return dx
        self.grads["weight"] = (dy * xhat).sum(axis=(0, 2, 3))
        self.grads["bias"] = dy.sum(axis=(0, 2, 3))
        dxhat = dy * self.params["weight"].reshape(shape)
        if not self._batch_stats:                     # running statistics: constants
            return dxhat * inv_std.reshape(shape)
        # the three paths: direct, through mu, through var (module docstring)
        mean_dxhat = dxhat.mean(axis=(0, 2, 3)).reshape(shape)
        mean_dxhat_xhat = (dxhat * xhat).mean(axis=(0, 2, 3)).reshape(shape)
        return inv_std.reshape(shape) * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
