"""The package layout of docs/design.md §2: every installed name is this repository's, imports flow one
way, and the encoders and data sets load without Triton."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lowrank_util", "kernels", "lowrank", "models", "mmdata", "lowrank_train", "lowrank_methods", "bench")
OURS = set(PACKAGES) | {"train"}


@pytest.mark.parametrize("name", PACKAGES)
def test_each_package_imports_from_this_repository(name):
    """Generic names (there is an unrelated ``kernels`` on PyPI, and ``models``, ``bench`` are common): ours win."""
    assert Path(importlib.import_module(name).__file__).resolve().parent == REPO / name


def imported_after(statement: str, block_triton: bool = False) -> set[str]:
    """Our top-level packages that a fresh interpreter has loaded after ``statement``; with
    ``block_triton``, importing triton raises ImportError, as on a machine without it."""
    blocker = (
        "import importlib.abc, sys\n"
        "class NoTriton(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton is blocked by the test')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
    )
    code = (blocker if block_triton else "import sys\n") + f"{statement}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return {name for name in result.stdout.split() if name in OURS}


@pytest.mark.parametrize("statement", ["import models", "import mmdata", "from models.multimodal import *"])
def test_encoders_and_data_sets_import_without_triton(statement):
    assert "kernels" not in imported_after(statement, block_triton=True)


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("lowrank_util", {"lowrank_util"}),
        ("kernels", {"kernels"}),
        ("lowrank", {"lowrank_util", "kernels", "lowrank"}),
        ("models", {"lowrank_util", "models"}),
        ("mmdata", {"lowrank_util", "mmdata"}),
        ("lowrank_train.stage1", OURS - {"lowrank_methods", "train", "bench"}),
        ("lowrank_methods", OURS - {"train", "bench"}),
    ],
)
def test_imports_flow_one_way(package, allowed):
    assert imported_after(f"import {package}") <= allowed
