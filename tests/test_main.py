"""``python -m jax_dmattn`` (jax_dmattn/__main__.py): its command line and a quick run of the main job."""

import os
import re
import subprocess
import sys

import pytest

from jax_dmattn import __main__ as main_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_renders_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        main_job.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m jax_dmattn")
    assert main_job.DESCRIPTION.split()[0] in text and "top-k" in text
    # no reST markup or unexpanded argparse fields
    for artifact in ("``", "%(", ":func:", "\\n"):
        assert artifact not in text, artifact
    # every option comes with a help text, and the defaults are spelled out
    actions = main_job.build_parser()._actions
    assert {a.dest for a in actions} == {"help", "lengths", "reps", "window"}
    assert all(a.help for a in actions)
    flat = " ".join(text.split())
    assert "(default: 3)" in flat and f"(default: {main_job.DEFAULT_WINDOW})" in flat
    assert "512 1024 2048 on cpu" in flat


@pytest.mark.parametrize("option", ["--reps", "--window", "--lengths"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_non_positive_counts_are_usage_errors(capsys, option, value):
    with pytest.raises(SystemExit) as info:
        main_job.main([option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "positive integer" in err, err


def test_reps_zero_from_the_command_line():
    """The module entry point itself (run from the source tree) refuses --reps 0 before any work."""
    proc = subprocess.run([sys.executable, "-m", "jax_dmattn", "--reps", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "argument --reps: must be a positive integer, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_quick_run_times_plain_and_top_k(capsys):
    assert main_job.main(["--lengths", "64", "--reps", "1", "--window", "16"]) == 0
    out = capsys.readouterr().out
    assert "self-check passed" in out and "FAIL " not in out
    header = next(line for line in out.splitlines() if line.split()[:2] == ["L", "pass"])
    assert header.split()[2:] == ["jax_dmattn", "top-k", "reference", "jax.nn.dpa"]
    assert "16 keys per row" in out
    for pass_name in ("fwd", "fwd+bwd"):
        row = next(line.split() for line in out.splitlines() if line.split()[:2] == ["64", pass_name])
        assert len(row) == 6 and all(re.fullmatch(r"\d+\.\d", x) for x in row[2:]), row
