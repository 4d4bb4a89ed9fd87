"""The built wheel's metadata: a torch-free runtime whose every dependency ships aarch64 wheels.

`pip install tinysam-rt` on a 64-bit Raspberry Pi OS must resolve to wheels only (no source
build of numpy/onnxruntime/opencv on a Pi). The floors below were checked against PyPI with
`pip download --no-deps --only-binary=:all: --implementation cp --platform manylinux2014_aarch64
--platform manylinux_2_28_aarch64 --python-version 3.X NAME==VERSION`; scripts/arm64-check runs
the resolved set for real under qemu (docs/ARM.md has the results).
"""

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
RUNTIME = {"numpy", "onnxruntime", "opencv-python-headless"}
TORCH_STACK = {"torch", "torchvision", "segment-anything", "mobilesam-mirror", "timm", "onnx"}

# A bound at or above these admits only releases checked to publish manylinux aarch64 CPython
# wheels (numpy 1.22.0: cp38-cp310; onnxruntime 1.17.0: cp38-cp311; opencv-python-headless: the
# first 4.6 release, 4.6.0.66, has abi3 aarch64 wheels). Later releases kept publishing them.
AARCH64_WHEEL_FLOOR = {"numpy": "1.22.0", "onnxruntime": "1.17.0", "opencv-python-headless": "4.6"}

# onnxruntime releases an aarch64 user must not get (scripts/arm64/ort_matrix.py, docs/ARM.md):
# 1.17.0 is built against NumPy 1.x and fails to import next to NumPy 2, which `numpy>=1.22`
# resolves to (1.18.1 is the oldest release checked to import and run with it); 1.21.0 dies with
# SIGILL at import on the Pi 4's Cortex-A72 (reproduced under qemu -cpu cortex-a72; upstream
# microsoft/onnxruntime#23957).
ORT_OLDEST_VERIFIED = "1.18.1"
ORT_BAD_ON_AARCH64 = ("1.17.0", "1.21.0")


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """METADATA of a wheel built from a copy of the repo (the shared tree gets no build/ dir)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.onnx")
    for name in ("tinysam_rt", "export"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (wheel,) = (tmp / "dist").glob("tinysam_rt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(archive.read(name).decode())


@pytest.fixture(scope="module")
def runtime_requirements(metadata):
    """Requires-Dist entries that apply without extras, as packaging Requirements."""
    requirements = [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]
    return {r.name.lower(): r for r in requirements if r.marker is None or "extra" not in str(r.marker)}


def lower_bound(specifier):
    """The smallest version a SpecifierSet admits through >=, ==, ~= or >, or None."""
    bounds = [Version(s.version.rstrip(".*")) for s in specifier if s.operator in (">=", "==", "~=", ">")]
    return max(bounds) if bounds else None


def test_runtime_requires_exactly_numpy_onnxruntime_opencv_headless(runtime_requirements):
    assert set(runtime_requirements) == RUNTIME


def test_no_torch_stack_in_runtime_requirements(metadata, runtime_requirements):
    assert not TORCH_STACK & set(runtime_requirements)
    # torch may appear only behind an extra (`pip install tinysam-rt[export]`).
    for text in metadata.get_all("Requires-Dist"):
        requirement = Requirement(text)
        if requirement.name.lower() in TORCH_STACK:
            assert requirement.marker is not None and "extra" in str(requirement.marker), text
            assert not requirement.marker.evaluate({"extra": ""}), text


@pytest.mark.parametrize("name", sorted(RUNTIME))
def test_every_admitted_release_is_at_or_above_an_aarch64_wheel_release(runtime_requirements, name):
    bound = lower_bound(runtime_requirements[name].specifier)
    assert bound is not None, f"{name} has no lower bound: pip could pick a release without aarch64 wheels"
    assert bound >= Version(AARCH64_WHEEL_FLOOR[name]), (
        f"{name}{runtime_requirements[name].specifier} admits releases older than {AARCH64_WHEEL_FLOOR[name]}, "
        f"the oldest checked to publish aarch64 wheels")


def test_lower_bound_parses_specifier_sets():
    assert lower_bound(SpecifierSet(">=1.19,!=1.21.0")) == Version("1.19")
    assert lower_bound(SpecifierSet("==1.22.*")) == Version("1.22")
    assert lower_bound(SpecifierSet("<2")) is None


def test_onnxruntime_requirement_excludes_releases_broken_on_aarch64(runtime_requirements):
    specifier = runtime_requirements["onnxruntime"].specifier
    assert lower_bound(specifier) >= Version(ORT_OLDEST_VERIFIED), specifier
    admitted = [v for v in ORT_BAD_ON_AARCH64 if specifier.contains(v)]
    assert not admitted, f"onnxruntime{specifier} admits {admitted}, which fail on aarch64"
    # No upper bound: the newest release (1.32.0 when checked) runs on aarch64.
    assert specifier.contains("1.32.0"), specifier
