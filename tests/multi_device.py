"""Tests that need 8 CPU devices: ``@multi_device`` runs the test body here when this process has them (CI sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8``); otherwise (the flag is missing, JAX is already
initialised by other test modules, or the backend is a GPU) the test's file runs once more in a subprocess with
the flag and ``JAX_PLATFORMS=cpu``, and each test reports its own result from there.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import jax
import pytest

N_DEVICES = 8
_WORKER_ENV = "JAX_DMATTN_MULTI_DEVICE_WORKER"


def _here_has_devices() -> bool:
    return jax.default_backend() == "cpu" and jax.device_count() >= N_DEVICES


_subprocess_results: dict = {}  # per test file


def _run_worker(here: str):
    if here in _subprocess_results:
        return _subprocess_results[here]
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={N_DEVICES}".strip(),
               JAX_PLATFORMS="cpu", **{_WORKER_ENV: "1"})
    env.pop("PYTEST_ADDOPTS", None)
    root = os.path.dirname(os.path.dirname(here))
    # cwd is the tests folder, not the repository root: `python -m` puts cwd first on sys.path, and the source
    # tree's jax_dmattn (without the compiled extension) must not shadow the installed package.
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = os.path.join(tmp, "results.xml")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}",
             f"--rootdir={root}", here],
            cwd=os.path.dirname(here), env=env, capture_output=True, text=True, timeout=900)
        results = {}
        if os.path.exists(xml_path):
            for case in ET.parse(xml_path).getroot().iter("testcase"):
                status, text = "passed", ""
                for child in case:
                    if child.tag in ("failure", "error"):
                        status, text = "failed", (child.get("message") or "") + "\n" + (child.text or "")
                        break
                    if child.tag == "skipped":
                        status, text = "skipped", child.get("message") or ""
                results[case.get("name")] = (status, text)
    results["__output__"] = ("", (proc.stdout + proc.stderr)[-4000:])
    _subprocess_results[here] = results
    return results


def multi_device(fn):
    """Runs the test body here when there are 8 CPU devices, else reports its result from the subprocess."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _here_has_devices():
            return fn(*args, **kwargs)
        if os.environ.get(_WORKER_ENV):
            pytest.fail(f"the worker subprocess has {jax.device_count()} {jax.default_backend()} devices, "
                        f"needs {N_DEVICES} CPU devices")
        name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].rsplit(" (", 1)[0]
        results = _run_worker(os.path.abspath(fn.__code__.co_filename))
        if name not in results:
            pytest.fail(f"{name} did not run in the {N_DEVICES}-device subprocess:\n{results['__output__'][1]}")
        status, text = results[name]
        if status == "failed":
            pytest.fail(f"failed in the {N_DEVICES}-device subprocess:\n{text}", pytrace=False)
        if status == "skipped":
            pytest.skip(text)

    return wrapper
