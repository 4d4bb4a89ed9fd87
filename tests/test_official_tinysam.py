"""Hierarchical everything mode vs the official TinySAM code (benchmarks/compare_official_tinysam.py).

The comparison itself runs only when TINYSAM_REPO names a checkout of github.com/xinghaochen/TinySAM
(not a dependency, not vendored); otherwise it is skipped with that reason. The script's matching
helpers are tested always.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_image
from tinysam_rt import io

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_official_tinysam.py"
REPO = os.environ.get("TINYSAM_REPO")


def _script():
    spec = importlib.util.spec_from_file_location("compare_official_tinysam", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _record(x, y, mask, iou=0.5, stability=0.9):
    return {"point_coords": [[x, y]], "segmentation": mask, "predicted_iou": iou, "stability_score": stability}


def test_point_sets_match_within_a_tolerance_not_by_rounding():
    script = _script()
    # 48.125 and 48.125 + 1e-12 round to different 2-decimal keys; they are the same point.
    ours, theirs = np.array([[48.125, 10.0], [1.0, 2.0]]), np.array([[48.125 + 1e-12, 10.0], [5.0, 5.0]])
    assert script._point_set_diff(ours, theirs) == (1, 1)
    assert script._point_set_diff(ours, ours[::-1]) == (0, 0)
    assert script._point_set_diff(np.zeros((0, 2)), theirs) == (0, 2)


def test_compare_matches_masks_by_prompt_point():
    script = _script()
    left, right = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    left[:, :2], right[:, 2:] = True, True
    half = left.copy()
    half[:2] = False
    ours = [_record(48.125, 1.0, right, iou=0.3), _record(48.125, 1.0, left, iou=0.5), _record(7.0, 7.0, half)]
    theirs = [_record(48.125 + 1e-12, 1.0, left, iou=0.5 + 1e-7), _record(7.0, 7.0, left), _record(9.0, 9.0, left)]
    result = script.compare(ours, theirs)
    # best of our two masks at the first point (IoU 1), the half mask (0.5), nothing at (9, 9) (0)
    assert result["matched_iou_mean"] == pytest.approx(0.5) and result["matched_iou_min"] == 0.0
    assert result["max_abs_predicted_iou_diff"] == pytest.approx(1e-7, abs=1e-9)


@pytest.mark.torch
@pytest.mark.skipif(not REPO, reason="set TINYSAM_REPO to a checkout of xinghaochen/TinySAM to compare with it")
def test_hierarchical_mode_matches_official_tinysam(tmp_path):
    script = _script()
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
