"""Test configuration shared by every test file.

Hypothesis profiles: "ci" (the default) is derandomized, so a run is reproducible and CI
cannot go red by chance; "dev" draws more, fresh examples: HYPOTHESIS_PROFILE=dev pytest.

The Numba CUDA kernels are tested on every machine: where no CUDA driver is installed,
Numba's CUDA simulator runs them (one Python thread per CUDA thread, so tests keep their
inputs tiny). The variable must be set before Numba is first imported, hence here, at the top
of the first file pytest loads; set NUMBA_ENABLE_CUDASIM=0 yourself to skip those tests.

Numba's low-occupancy warning is switched off for the tests, here and for the same reason of
timing. On a real GPU, Numba warns (NumbaPerformanceWarning) at every launch of fewer than 128
blocks; the tests launch tiny grids on purpose, and setup.cfg turns every warning into an error,
so each GPU kernel test would fail on advice meant for production sizes (the simulator never
warns, so the CPU runs cannot show it). A filter cannot do it: pytest puts setup.cfg's "error"
in front of any filter installed at import, and setup.cfg must not name a Numba class (that
would import Numba before the simulator switch above). The variable is read once, when Numba
loads its configuration, hence before any import of Numba. Every other Numba warning still
fails a test. Proof: tests/test_kernels_cuda.py::test_low_occupancy_warning_is_off_in_tests.
"""
import ctypes.util
import os

if "NUMBA_ENABLE_CUDASIM" not in os.environ and ctypes.util.find_library("cuda") is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests, with the reason, where no GPU can be used."""
    from tinyunet.backend import _why_no_gpu
    reason = _why_no_gpu()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"no GPU: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
