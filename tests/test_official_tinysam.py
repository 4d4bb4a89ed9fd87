"""Hierarchical everything mode vs the official TinySAM code (benchmarks/compare_official_tinysam.py).

Runs only when TINYSAM_REPO names a checkout of github.com/xinghaochen/TinySAM (not a dependency,
not vendored); otherwise skipped with that reason.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from conftest import synthetic_image
from tinysam_rt import io

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_official_tinysam.py"
REPO = os.environ.get("TINYSAM_REPO")


@pytest.mark.torch
@pytest.mark.skipif(not REPO, reason="set TINYSAM_REPO to a checkout of xinghaochen/TinySAM to compare with it")
def test_hierarchical_mode_matches_official_tinysam(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_official_tinysam", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    image = tmp_path / "scene.png"
    io.write_png(image, synthetic_image(180, 240, seed=5))
    out = tmp_path / "report.json"
    assert script.main(["--tinysam-repo", REPO, "--image", str(image), "--points-per-side", "16",
                        "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    # The thresholds must make the skip logic do something, or the comparison proves little.
    assert report["tinysam_rt"]["dense_skipped"] > 0 and report["tinysam_rt"]["masks"] >= 10
    assert report["sparse_points_differ"] == [0, 0]
    assert (report["dense_points_only_ours"], report["dense_points_only_official"]) == (0, 0)
    assert report["tinysam_rt"]["masks"] == report["official"]["masks"]
    assert report["matched_iou_mean"] >= 0.98
