"""The README is the project's front page: every ```python block in it runs unchanged in a fresh interpreter, every
path its Layout table names exists, the table covers the sources, and every image it shows is committed.

A block is skipped only when it says so with a comment line "# requires a GPU" (then it is skipped on machines
without one).
"""

import glob
import os
import re
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
GPU_MARK = "# requires a GPU"


def _readme() -> str:
    with open(README) as f:
        return f.read()


def _python_blocks():
    text = _readme()
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        blocks.append(pytest.param(m.group(1), id=f"line{line}"))
    return blocks


def test_readme_has_python_blocks():
    assert len(_python_blocks()) >= 3  # quick start, Flax, the differences from jax.nn


@pytest.mark.parametrize("code", _python_blocks())
def test_readme_python_block_runs(code, tmp_path):
    if GPU_MARK in code and jax.default_backend() != "gpu":
        pytest.skip("the block is marked '# requires a GPU'")
    # A fresh interpreter, outside the source tree: what a reader gets who pastes the block after `pip install .`.
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def _section(title: str) -> str:
    text = _readme()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _layout_paths() -> list[str]:
    paths = []
    for cell in re.findall(r"`([^`]+)`", _section("Layout")):
        if "/" in cell or re.fullmatch(r"[\w.-]+\.(toml|txt|py|md)", cell):
            paths.append(cell)
    return paths


def _expand(pattern: str) -> list[str]:
    """Paths a Layout entry names: brace alternatives ({h,cu}), globs (*), a trailing / for a folder."""
    m = re.search(r"\{([^}]*)\}", pattern)
    if m:
        return [p for alt in m.group(1).split(",")
                for p in _expand(pattern[:m.start()] + alt + pattern[m.end():])]
    return glob.glob(os.path.join(ROOT, pattern))


def test_layout_paths_exist():
    paths = _layout_paths()
    assert paths
    missing = [p for p in paths if not _expand(p)]
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def _sources() -> list[str]:
    """What the Layout table must cover: the package's top-level files, csrc's files and subfolders, the benchmark
    and example files."""
    files = glob.glob(os.path.join(ROOT, "jax_dmattn", "*.py"))
    files += [f for f in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True) if os.path.isfile(f)]
    files += [f for f in glob.glob(os.path.join(ROOT, "benchmarks", "*")) if os.path.isfile(f)]
    files += [f for f in glob.glob(os.path.join(ROOT, "examples", "*")) if os.path.isfile(f)]
    return sorted(os.path.relpath(f, ROOT) for f in files)


def test_layout_covers_the_sources():
    covered = set()
    for pattern in _layout_paths():
        for path in _expand(pattern):
            rel = os.path.relpath(path, ROOT)
            if os.path.isdir(path):
                covered |= {os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)}
            covered.add(rel)
    uncovered = [f for f in _sources() if f not in covered]
    assert not uncovered, f"README Layout does not mention: {uncovered}"


def test_readme_images_exist():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _readme())
    assert images
    for image in images:
        assert os.path.getsize(os.path.join(ROOT, image)) > 0, image


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", _readme()):
        assert os.path.exists(os.path.join(ROOT, target)), target
