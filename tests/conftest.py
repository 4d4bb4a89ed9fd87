"""Shared fixtures: one random-weight export per test session, real photos when present."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_IMAGES = REPO.parent / "shared" / "images"
HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "segment_anything"))

requires_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs the dev extra: pip install -e '.[dev]'")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "torch" in item.keywords and not HAVE_TORCH:
            item.add_marker(pytest.mark.skip(reason="needs torch + segment_anything (dev extra)"))


@pytest.fixture(scope="session")
def fp32_model_dir(tmp_path_factory):
    """A full-size vit_t export with seeded random weights (seed 0), made once per session."""
    if not HAVE_TORCH:
        pytest.skip("exporting the test model needs torch (dev extra)")
    from tinysam_export.export_onnx import export_model

    out = tmp_path_factory.mktemp("models") / "vit_t"
    export_model(out, checkpoint=None, seed=0)
    return out


@pytest.fixture(scope="session")
def torch_model():
    """The PyTorch model behind `fp32_model_dir` (same seed, same weights)."""
    if not HAVE_TORCH:
        pytest.skip("needs torch (dev extra)")
    from tinysam_export.model.build import build_tinysam

    return build_tinysam(checkpoint=None, seed=0)


def _shared_image_paths():
    return sorted(SHARED_IMAGES.glob("*.jpg")) if SHARED_IMAGES.is_dir() else []


@pytest.fixture(scope="session")
def shared_image_paths():
    """Paths of the real photos in ../shared/images; skips when that folder is absent."""
    paths = _shared_image_paths()
    if not paths:
        pytest.skip(f"real photos not available ({SHARED_IMAGES} absent)")
    return paths


@pytest.fixture(scope="session")
def photo(shared_image_paths):
    """One real photo as (H, W, 3) uint8 RGB."""
    from tinysam_rt.io import load_image

    return load_image(shared_image_paths[0])


def synthetic_image(height, width, seed=0):
    """A structured (H, W, 3) uint8 RGB test image: smooth gradients plus a few solid shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), 0.5 + 0.0 * xx], axis=-1) * 200
    for _ in range(4):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.1, 0.3) * min(height, width)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture
def synthetic():
    return synthetic_image
