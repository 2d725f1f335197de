"""Multi-host use as users run it, on one machine: two CPU processes join a jax.distributed cluster on localhost
(4 devices each, gloo collectives) and run tests/multi_process_worker.py, which checks batch x head sharding
under jit and context-parallel attention across both processes against one device."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi_process_worker.py")
CHECKS = ("jit batch x heads", "context parallel ring", "context parallel all_gather")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device():
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    # cwd outside the source tree: the installed package (with its extension) must be the one imported
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", port], cwd=os.path.dirname(WORKER), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process of the 2-process cluster did not finish in 600 s")
        outputs.append(out)
    for i, (p, out) in enumerate(zip(procs, outputs)):
        tail = "\n".join(out.splitlines()[-30:])
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{tail}"
        for check in CHECKS:
            assert f"OK {check}" in out, f"process {i} did not pass {check!r}:\n{tail}"
