"""pytest configuration and fixtures for the jax_dmattn suite.

* ``implementation`` fixture: "xla" and "cpu" always; "cuda" only when ``jax.default_backend() == "gpu"``
  (otherwise skipped with a reason). The "cuda" parameter carries the ``gpu`` marker, so
  ``-m "not gpu"`` deselects it and ``-m gpu`` runs only it.
* ``kernel_route`` fixture: "default" and "sm80" (the sm80 kernels forced), for the tests of the Hopper kernels.
* ``rng`` fixture: a fresh numpy Generator seeded from the test id (reproducible per test).
* helpers (tolerance, assert_close, poison, input builders) live in helpers.py and are re-exported here.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # works under --import-mode=importlib too
    sys.path.insert(0, _HERE)

import jax  # noqa: E402
import pytest  # noqa: E402

from helpers import (  # noqa: E402,F401
    IMPLEMENTATIONS,
    implementation_params,
    Case,
    assert_close,
    check_dtype_supported,
    make_inputs,
    make_mask,
    make_rng,
    poison,
    tolerance,
)


@pytest.fixture(params=implementation_params())
def implementation(request):
    return request.param


@pytest.fixture(params=["default", "sm80"])
def kernel_route(request, monkeypatch):
    """The CUDA kernels a test runs: "default" (the Hopper kernels where they serve the call on this device) or
    "sm80" (JAX_DMATTN_CUDA_KERNELS=sm80 forces the sm80 kernels)."""
    if request.param == "default":
        monkeypatch.delenv("JAX_DMATTN_CUDA_KERNELS", raising=False)
    else:
        monkeypatch.setenv("JAX_DMATTN_CUDA_KERNELS", request.param)
    return request.param


@pytest.fixture
def rng(request):
    return make_rng(request)


@pytest.fixture
def jax_dmattn():
    import jax_dmattn as mod

    return mod


@pytest.fixture(autouse=True)
def _device_for_implementation(request):
    """implementation="cpu" on a machine whose default backend is not CPU (a GPU host) runs on the CPU device.

    A test says so by its "implementation" parameter or by the cpu_kernels marker (a gpu marker wins)."""
    callspec = getattr(request.node, "callspec", None)
    impl = callspec.params.get("implementation") if callspec is not None else None
    marked = request.node.get_closest_marker("cpu_kernels") is not None and request.node.get_closest_marker("gpu") is None
    if (impl == "cpu" or marked) and jax.default_backend() != "cpu":
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    else:
        yield
