"""benchmarks/bench_points_per_prompt.py: points decoder vs plain decoder by points per prompt (a smoke run)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_points_per_prompt  # noqa: E402


@pytest.mark.torch  # the test model is exported with torch
def test_both_decoders_give_the_same_masks_at_every_size(fp32_model_dir, tmp_path, capsys):
    out = tmp_path / "points.json"
    code = bench_points_per_prompt.main(["--model", str(fp32_model_dir), "--batches", "1", "2", "--points", "2", "30",
                                         "--rounds", "1", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["batch"], row["points"]) for row in rows] == [(1, 2), (1, 30), (2, 2), (2, 30)]
    assert all(row["max_abs_logit_diff"] < 1e-4 for row in rows)  # the same function
    assert "| 2 | 30 |" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [(["--points", "1"], "--points >= 2"), (["--rounds", "0"], "--rounds must be >= 1")])
def test_bad_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_points_per_prompt.main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
