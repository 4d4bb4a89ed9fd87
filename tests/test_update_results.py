"""benchmarks/update_results.py rewrites only its own RESULTS.md sections."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "update_results.py"
spec = importlib.util.spec_from_file_location("update_results", SCRIPT)
update_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(update_results)


def test_replaces_the_named_section_and_keeps_the_others():
    text = "# Results\n\n## quantize\n\nq table\n\n## tinysam-bench\n\nold\nlines\n\n## PyTorch vs ORT\n\nt\n"
    new = update_results.replace_section(text, "## tinysam-bench", "fresh")
    assert new == "# Results\n\n## quantize\n\nq table\n\n## tinysam-bench\n\nfresh\n\n## PyTorch vs ORT\n\nt\n"


def test_last_section_and_missing_section():
    text = "# Results\n\n## tinysam-bench\n\nold\n"
    assert update_results.replace_section(text, "## tinysam-bench", "new") == "# Results\n\n## tinysam-bench\n\nnew\n\n"
    added = update_results.replace_section("# Results\n", "## PyTorch vs ORT", "t")
    assert added == "# Results\n\n## PyTorch vs ORT\n\nt\n\n"


def test_a_heading_prefix_is_not_a_match():
    text = "## tinysam-bench extras\n\nkeep\n"
    assert update_results.replace_section(text, "## tinysam-bench", "x") == text.rstrip() + "\n\n## tinysam-bench\n\nx\n\n"


def test_quantization_provenance_line():
    recipe = {"tool": "tinysam quantize", "format": "QDQ", "graphs": {"encoder": {"method": "minmax"}},
              "fidelity": {"static": {"embedding_cosine_mean": 0.97, "mask_iou_mean": 0.72}},
              "gate": {"passed": False, "enforced": False}}
    lines = update_results.quantization_lines([{"label": "fp32", "quantization": None},
                                               {"label": "int8", "quantization": recipe}])
    assert lines == ("- int8: tinysam quantize (QDQ; calibration encoder minmax); held-out fidelity vs FP32: "
                     "embedding cosine mean 0.97, selected-mask IoU mean 0.72; accuracy gate FAILED (not enforced).")


def test_from_json_rerenders_only_its_sections(tmp_path):
    import shutil
    import subprocess
    import sys

    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    for name in ("update_results.py", "compare_torch.py"):
        shutil.copy(SCRIPT.parent / name, bench / name)
    for name in ("bench.json", "compare_torch.json"):
        shutil.copy(SCRIPT.parent / "results" / name, bench / "results" / name)
    other = "## Someone else's\n\nkeep this\n"
    (bench / "RESULTS.md").write_text(f"# Results\n\n## tinysam-bench\n\nstale\n\n{other}")
    result = subprocess.run([sys.executable, str(bench / "update_results.py"), "--from-json", "--note", "n1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = (bench / "RESULTS.md").read_text()
    assert "stale" not in text and other in text
    assert text.count("## tinysam-bench\n") == 1 and text.count("## PyTorch vs ORT\n") == 1
    assert "- n1" in text and "| model | threads | stage | runs | p50 ms |" in text
    # --skip-torch: only the tinysam-bench section and its JSON take the new note.
    torch_json = (bench / "results" / "compare_torch.json").read_text()
    result = subprocess.run([sys.executable, str(bench / "update_results.py"), "--from-json", "--skip-torch",
                             "--note", "n2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (bench / "results" / "compare_torch.json").read_text() == torch_json
    assert "- n2" in (bench / "RESULTS.md").read_text()
