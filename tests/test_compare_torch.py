"""benchmarks/compare_torch.py: torch and ORT run the same weights; the report has every field."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_torch.py"


@pytest.mark.torch
@pytest.mark.slow
def test_one_tiny_run(fp32_model_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_torch", SCRIPT)
    compare_torch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_torch)
    out = tmp_path / "ct.json"
    assert compare_torch.main(["--model", str(fp32_model_dir), "--threads", "1", "--runs", "1", "--warmup", "0",
                               "--batch", "2", "--no-cold-start", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["stages"]) == ["torch eager (fp32)", "ORT vit_t (fp32)"]
    for stages in report["stages"].values():
        assert set(stages) == set(compare_torch.STAGES)
        assert all(s["runs"] == 1 and s["p50_s"] > 0 for s in stages.values())
    # The torch model is rebuilt from the manifest's seed: the same weights as the ONNX export.
    agreement = report["embedding_agreement_vs_torch"]["ORT vit_t (fp32)"]
    assert agreement["cosine"] > 0.99999 and agreement["max_abs_diff"] < 1e-3
    assert "| encoder |" not in capsys.readouterr().out  # text tables unless --markdown
