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
