"""benchmarks/ab_points_decoder.py: two exports' points decoders, interleaved (a smoke run)."""

import json
import sys
from pathlib import Path

import cv2
import pytest

from conftest import synthetic_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ab_points_decoder  # noqa: E402


@pytest.mark.torch  # the test model is exported with torch
def test_the_same_export_on_both_sides_agrees_exactly(fp32_model_dir, tmp_path, capsys):
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), synthetic_image(300, 400, seed=4)[:, :, ::-1])
    out = tmp_path / "ab.json"
    code = ab_points_decoder.main(["--a", str(fp32_model_dir), "--b", str(fp32_model_dir), "--image", str(image),
                                   "--batches", "1", "2", "--rounds", "1", "--mode-rounds", "0", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["calls"]["rows"]] == ["1", "2", "1, image side computed"]
    assert report["calls"]["agreement"] == {"prompts": 2, "max_abs_logit_diff": 0.0, "mask_pixels_equal": 1.0}
    assert "runs" not in report and report["system"]["cpu_model"]
    assert "| 2 |" in capsys.readouterr().out


def test_bad_counts_are_usage_errors(tmp_path):
    with pytest.raises(SystemExit) as exc:
        ab_points_decoder.main(["--a", str(tmp_path), "--b", str(tmp_path), "--rounds", "0"])
    assert exc.value.code == 2
