"""Regenerate the '## tinysam-bench' and '## PyTorch vs ORT' sections of benchmarks/RESULTS.md.

    python benchmarks/update_results.py --model models/vit_t --model models/vit_t-int8

Runs `tinysam-bench` and `benchmarks/compare_torch.py` (each in its own process, one after the
other), keeps their JSON under benchmarks/results/, and rewrites only those two sections of
RESULTS.md (other sections belong to other tools and are left as they are). Every table carries
the exact command, CPU model, ISA flags and the load the machine was under.
"""

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from tinysam_rt.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BENCH_SECTION = "## tinysam-bench"
TORCH_SECTION = "## PyTorch vs ORT"


def replace_section(text, heading, body):
    """Replace `heading`'s section (up to the next '## ' heading) with `body`, or append it."""
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = f"{heading}\n\n{body.strip()}\n\n"
    if pattern.search(text):
        return pattern.sub(lambda _: section, text, count=1)
    return text.rstrip() + ("\n\n" if text.strip() else "") + section


def _run(command):
    print("$", " ".join(command), file=sys.stderr, flush=True)
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"update_results: command failed with exit {proc.returncode}: {' '.join(command)}")
    return proc.stdout


def _git_commit():
    proc = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def _contention(report_stages):
    """Median cpu/wall over the warm stages of one thread count (uncontended: close to it)."""
    ratios = sorted(s["cpu_per_wall"] for s in report_stages.values())
    return ratios[len(ratios) // 2] if ratios else None


def bench_summary(report):
    """Key figures of a tinysam-bench report, as Markdown bullets."""
    lines = []
    for model in report["models"]:
        flops = model.get("flops")
        if flops:
            lines.append(
                f"- {model['label']}: encoder {flops['encoder']['macs'] / 1e9:.2f} GMAC = "
                f"{flops['encoder']['flops'] / 1e9:.1f} GFLOP; {flops['decoder_1'].get('graph', 'decoder')} "
                f"{flops['decoder_1']['macs'] / 1e9:.3f} GMAC for one prompt, "
                f"{flops['decoder_batch']['macs'] / flops['decoder_batch']['batch'] / 1e9:.3f} per prompt at "
                f"B={flops['decoder_batch']['batch']}; encoder + 1 prompt {flops['published']['ours_encoder_plus_one_prompt_gmacs']:.1f} GMAC vs "
                f"TinySAM's published 42.0 \"GFLOPs\" (which are MACs).")
        for entry in model["threads"]:
            enc, ach = entry["stages"]["encoder"], entry.get("achieved") or {}
            pct = (ach.get("encoder") or {}).get("pct_of_ort_float32_peak_p50")
            pct_best = (ach.get("encoder") or {}).get("pct_of_ort_float32_peak_best")
            lines.append(
                f"- {model['label']} @ {entry['threads']} thread(s): encoder p50 {enc['p50_s'] * 1e3:.0f} ms "
                f"(min {enc['min_s'] * 1e3:.0f}), decoder p50 {entry['stages']['decoder_1']['p50_s'] * 1e3:.0f} ms "
                f"(1 prompt), {entry['stages']['decoder_batch']['p50_s'] / entry['stages']['decoder_batch']['batch'] * 1e3:.1f} "
                f"ms/prompt at B={entry['stages']['decoder_batch']['batch']}"
                + (f"; encoder at {pct:.0f}% (p50) / {pct_best:.0f}% (best run) of ORT's float32 MatMul peak"
                   if pct is not None else "")
                + f"; median cpu/wall {_contention(entry['stages']):.2f} (uncontended ≈ {entry['threads']})")
        cold = model.get("cold_start") or {}
        if "process_start_to_first_mask_s" in cold:
            lines.append(f"- {model['label']}: fresh process to first mask {cold['process_start_to_first_mask_s']:.2f} s "
                         f"({cold['threads']} threads), peak RSS {cold['peak_rss_bytes'] / 2**20:.0f} MiB, "
                         f"files {model['total_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def torch_summary(report):
    stages = report["stages"]
    labels = list(stages)
    lines = []
    for stage in ("encoder", "decoder_1"):
        parts = [f"{label} {stages[label][stage]['p50_s'] * 1e3:.0f} ms" for label in labels]
        lines.append(f"- {stage} p50 at {report['settings']['threads']} threads: " + ", ".join(parts))
    for label, cold in report["cold_start"].items():
        if "process_start_to_first_mask_s" in cold:
            lines.append(f"- {label}: fresh process to first mask {cold['process_start_to_first_mask_s']:.2f} s, "
                         f"peak RSS {cold['peak_rss_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def _int8_note(models):
    """A line saying so when no quantized model took part in the run."""
    if any("int8" in m["label"].lower() for m in models):
        return ""
    return ("\n- ORT INT8: not in this run (no INT8 model directory was given; `tinysam quantize` "
            "makes one, then rerun with a second --model).")


def _machine_line(system, load_start, load_end):
    isa = ", ".join(k for k, v in system["isa_summary"].items() if v) or "none"
    return (f"Machine: {system['cpu_model']} ({system['machine']}), {system['usable_cores']} usable cores; "
            f"ISA flags: {isa} (all detected: {' '.join(system['isa'])}); onnxruntime {system['onnxruntime']}, "
            f"numpy {system['numpy']}. Load average (1/5/15 min) at start {load_start}, at end {load_end}.")


CONTENTION_NOTE = (
    "This is a shared 2-vCPU VM; the load averages above say how busy it was. Read the min column "
    "beside p50, and the cpu/wall and run-queue-wait columns: cpu/wall well below the thread count, "
    "or a run-queue wait comparable to the stage time, means the process was waiting for a core, "
    "not computing.")


def quantization_lines(models):
    """Provenance of quantized models, from their manifests' recipe (fields read defensively)."""
    lines = []
    for model in models:
        recipe = model.get("quantization")
        if not isinstance(recipe, dict):
            continue
        methods = ", ".join(f"{g} {r.get('method')}" for g, r in (recipe.get("graphs") or {}).items())
        static = (recipe.get("fidelity") or {}).get("static") or {}
        gate = recipe.get("gate") or {}
        verdict = "passed" if gate.get("passed") else "FAILED" + ("" if gate.get("enforced") else " (not enforced)")
        lines.append(f"- {model['label']}: {recipe.get('tool')} ({recipe.get('format')}; calibration {methods}); "
                     f"held-out fidelity vs FP32: embedding cosine mean {static.get('embedding_cosine_mean')}, "
                     f"selected-mask IoU mean {static.get('mask_iou_mean')}; accuracy gate {verdict}.")
    return "\n".join(lines)


def _compare_torch_module():
    spec = importlib.util.spec_from_file_location("compare_torch", HERE / "compare_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_section(report):
    """Markdown body of the '## tinysam-bench' section, from a tinysam-bench JSON report."""
    from tinysam_rt import bench_report

    notes = "\n".join(f"- {n}" for n in report.get("notes", []))
    return "\n\n".join(part for part in [
        f"Command (repo commit {report.get('repo_commit', 'unknown')}, {report['started_at']}):\n\n"
        f"    {' '.join(report['command'])}",
        _machine_line(report["system"], report["system"]["load_average"], report["load_average_end"]),
        CONTENTION_NOTE,
        "\n".join(filter(None, [notes, quantization_lines(report["models"])])),
        bench_summary(report) + _int8_note(report["models"]),
        bench_report.format_report(report, markdown=True),
        "Raw numbers: `benchmarks/results/bench.json`. Measure again and rewrite this section and the next "
        f"with `python benchmarks/update_results.py {' '.join(report.get('update_command', []))}` "
        "(`--from-json` re-renders them from the JSON without measuring).",
    ] if part.strip())


def torch_section(report):
    """Markdown body of the '## PyTorch vs ORT' section, from a compare_torch JSON report."""
    return "\n\n".join([
        f"Command (repo commit {report.get('repo_commit', 'unknown')}, torch {report['settings']['torch']}):\n\n"
        f"    {' '.join(report['command'])}",
        _machine_line(report["system"], report["system"]["load_average"], report["load_average_end"]),
        "Same weights (the manifest's seed/checkpoint rebuilt with `build_tinysam`), same image, same "
        "preprocessed tensor; the backends take turns within every timed run. Eager torch uses "
        "`SamPredictor` for end_to_end. " + CONTENTION_NOTE,
        torch_summary(report) + _int8_note([{"label": k} for k in report["stages"]]),
        _compare_torch_module().format_tables(report, markdown=True),
        "Raw numbers: `benchmarks/results/compare_torch.json`.",
    ])


def _stamp(path, **fields):
    """Add provenance fields to a results JSON file (atomically)."""
    report = json.loads(path.read_text())
    report.update(fields)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", metavar="DIR", help="FP32 first, then INT8")
    parser.add_argument("--threads", default="1,2", help="tinysam-bench thread sweep")
    parser.add_argument("--torch-threads", default="2", help="threads for compare_torch")
    parser.add_argument("--batch", default="64", help="tinysam-bench decoder batch")
    parser.add_argument("--torch-batch", default="16", help="compare_torch decoder batch (eager torch is slow)")
    parser.add_argument("--runs", default="20")
    parser.add_argument("--warmup", default="3")
    parser.add_argument("--note", action="append", default=[], help="a line to add to both sections (repeatable)")
    parser.add_argument("--commit", default=None, help="repo commit to record (default: HEAD)")
    parser.add_argument("--skip-torch", action="store_true", help="only regenerate the tinysam-bench section")
    parser.add_argument("--from-json", action="store_true",
                        help="measure nothing: re-render the sections from benchmarks/results/*.json")
    args = parser.parse_args(argv)
    if not args.from_json and not args.model:
        parser.error("--model is required unless --from-json")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stamp = {"repo_commit": args.commit or _git_commit(), "notes": args.note,
             "update_command": list(argv if argv is not None else sys.argv[1:])}
    models = [a for m in args.model or [] for a in ("--model", m)]
    if args.from_json:  # fill in provenance the files lack (written by an older update_results)
        # --skip-torch: the torch section is not re-rendered, so its file keeps its own notes.
        for name in ("bench.json",) + (() if args.skip_torch else ("compare_torch.json",)):
            if (out / name).exists():
                report = json.loads((out / name).read_text())
                # the measuring command stays; notes given now replace older ones
                missing = {k: v for k, v in stamp.items()
                           if (k not in report and k != "update_command") or (k == "notes" and v)}
                if missing:
                    _stamp(out / name, **missing)
    else:
        _run([sys.executable, "-m", "tinysam_rt.bench", *models, "--threads", args.threads, "--runs", args.runs,
              "--warmup", args.warmup, "--batch", args.batch, "--json", "benchmarks/results/bench.json", "--quiet"])
        _stamp(out / "bench.json", **stamp)
        if not args.skip_torch:
            _run([sys.executable, str(HERE / "compare_torch.py"), *models, "--threads", args.torch_threads,
                  "--runs", args.runs, "--warmup", args.warmup, "--batch", args.torch_batch,
                  "--json", "benchmarks/results/compare_torch.json"])
            _stamp(out / "compare_torch.json", **stamp)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    text = replace_section(text, BENCH_SECTION, bench_section(json.loads((out / "bench.json").read_text())))
    if not args.skip_torch and (out / "compare_torch.json").exists():
        text = replace_section(text, TORCH_SECTION, torch_section(json.loads((out / "compare_torch.json").read_text())))
    atomic_write_text(RESULTS, text)
    print(f"updated {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
