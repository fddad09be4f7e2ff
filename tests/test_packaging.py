"""Packaging: `patches/` ships as `hf_flashattn.patches` (setuptools package-dir), never as a top-level
`patches` module; the patches registry refuses unknown model types by name."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_patches_under_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("hf_flashattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_flashattn/patches/__init__.py" in names
    assert "hf_flashattn/kernels/v2.py" in names
    top = {n.split("/")[0] for n in names}
    assert "patches" not in top and "tests" not in top and "benchmarks" not in top, sorted(top)
    # the licence as an SPDX expression with its text (setuptools >= 77; the table form is deprecated)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta.splitlines(), meta[:600]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names


def test_installed_package_has_no_top_level_patches(tmp_path):
    code = ("import importlib.util, hf_flashattn.patches as p; "
            "assert importlib.util.find_spec('patches') is None, 'top-level patches importable'; "
            "print(p.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hf_flashattn.patches"


def test_patch_registry_names_unknown_model_types():
    import hf_flashattn.patches as patches
    with pytest.raises(NotImplementedError, match=r"model_type='gpt2'.*supported"):
        patches.apply("gpt2")
