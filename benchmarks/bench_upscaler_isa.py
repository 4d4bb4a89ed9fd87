"""The INT8-upscaler points decoder vs the FP32 one, on ORT's native and AVX2 code paths of this CPU.

`tinysam quantize --upscaler int8` makes the points decoder's per-prompt upscaler GEMMs
DynamicQuantizeMatMul. This times both points decoders in everything mode's setting (grid point +
padding point, 16 prompts per call, image side cached, every mask computed) in child processes,
alternately on the installed ORT and on bench_isa.py's patched copy with the AVX-512 kernels
switched off (its AVX2 u8s8 kernel saturates 16-bit pair sums: the 7-bit weights must not), and
compares the masks across paths.

    python benchmarks/bench_upscaler_isa.py --fp32 models/vit_t --int8 models/vit_t-int8-upscaler \\
        --json benchmarks/results/upscaler_isa.json

Same caveat as bench_isa.py: the AVX2 code path on this core, not an AVX2-only CPU.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_everything import _grid_prompts
from bench_isa import patched_onnxruntime, run_child
from bench_quantize import publish

BATCH, PROMPTS = 16, 512


def child(isa, job_path, out_path):
    """Time both points decoders interleaved on this process's ORT; save the first batch's logits."""
    import onnxruntime as ort

    from tinysam_rt import gemm_peak, io
    from tinysam_rt.manifest import load_manifest
    from tinysam_rt.predictor import TinySAMPredictor
    from tinysam_rt.sessions import PointsDecoderSession

    job = json.loads(Path(job_path).read_text())
    if gemm_peak.u8s8_kernel_saturates() is not (isa == "avx2"):
        raise SystemExit(f"bench_upscaler_isa: the {isa} child imported the wrong onnxruntime ({ort.__file__})")
    image = io.load_image(job["image"])
    features = TinySAMPredictor(image, model_dir=job["fp32"], threads=job["threads"]).embedding.features
    coords, labels = _grid_prompts(image.shape[:2], PROMPTS)  # (P, 2, 2) grid point + padding point, 1024 frame
    sessions = {name: PointsDecoderSession(load_manifest(d).points_decoder, job["threads"])
                for name, d in (("fp32", job["fp32"]), ("int8-upscaler", job["int8"]))}
    cache = {}  # the image side, kept per graph as the runtime keeps it with an embedding
    for session in sessions.values():  # untimed: computes and caches the image side, allocates
        session.run(features, coords[:BATCH], labels[:BATCH], cache=cache)
    times, first = {name: [] for name in sessions}, {}
    for start in range(0, PROMPTS, BATCH):
        part = slice(start, start + BATCH)
        for name, session in sessions.items():  # interleaved: drift lands on both alike
            began = time.perf_counter()
            masks, _ = session.run(features, coords[part], labels[part], cache=cache)  # every mask computed
            times[name].append((time.perf_counter() - began) / BATCH)
            first.setdefault(name, masks)
    logits = Path(out_path).with_suffix(".npz")
    np.savez(logits, **first)
    Path(out_path).write_text(json.dumps({"onnxruntime_file": ort.__file__, "times": times, "logits_file": str(logits)}))


def agreement(a, b):
    """(B, 3, 256, 256) logits of two runs: max |difference| and the share of mask pixels equal."""
    return {"max_abs_logit_diff": float(np.abs(a - b).max()), "pixels_equal": float(((a > 0) == (b > 0)).mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", type=Path, help="FP32 model directory (its encoder makes the embedding)")
    parser.add_argument("--int8", type=Path, help="a `tinysam quantize --upscaler int8` directory")
    parser.add_argument("--image", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "images" / "picture1.jpg")
    parser.add_argument("--rounds", type=int, default=2, help="child processes per code path, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("ISA", "JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.fp32 is None or args.int8 is None:
        parser.error("--fp32 and --int8 are required")
    from tinysam_rt import sysinfo

    load_start = sysinfo.load_average()
    runs = {"native": [], "avx2": []}
    with tempfile.TemporaryDirectory(prefix="bench-upscaler-isa-") as tmp:
        work = Path(tmp)
        patched = patched_onnxruntime(work / "ort-avx2")
        job = work / "job.json"
        job.write_text(json.dumps({"fp32": str(args.fp32.resolve()), "int8": str(args.int8.resolve()),
                                   "image": str(args.image), "threads": args.threads}))
        for _ in range(args.rounds):
            for isa in runs:
                answer = run_child(isa, patched, job, script=__file__)
                runs[isa].append({**answer, "logits": dict(np.load(answer["logits_file"]))})  # before the next child
    native_fp32 = runs["native"][0]["logits"]["fp32"]
    paths = {}
    for isa, children in runs.items():
        rows = {}
        for name in ("fp32", "int8-upscaler"):
            values = [t for child_run in children for t in child_run["times"][name]]
            rows[name] = {"p50_ms_per_prompt": 1000 * statistics.median(values), "min_ms_per_prompt": 1000 * min(values),
                          "vs_native_fp32": agreement(children[0]["logits"][name], native_fp32),
                          "vs_native_same_graph": agreement(children[0]["logits"][name], runs["native"][0]["logits"][name])}
        rows["fp32_over_int8_p50"] = rows["fp32"]["p50_ms_per_prompt"] / rows["int8-upscaler"]["p50_ms_per_prompt"]
        paths[isa] = rows
    result = {"command": "python benchmarks/bench_upscaler_isa.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "system": sysinfo.system_info(), "threads": args.threads, "rounds": args.rounds, "batch": BATCH,
              "prompts": PROMPTS, "load_start": load_start, "load_end": sysinfo.load_average(), "code_paths": paths}
    publish(result, markdown(result), args.json)
    return 0


def markdown(result):
    info = result["system"]
    lines = [f"Command: `{result['command']}`", "",
             f"CPU: {info['cpu_model']}, {info['usable_cores']} usable cores; ISA: {', '.join(info['isa'])}; "
             f"onnxruntime {info['onnxruntime']}; {result['threads']} threads; {result['rounds']} child process(es) per "
             f"code path, alternating; {result['prompts']} grid prompts in calls of {result['batch']}, image side cached, "
             f"every mask computed; load average {result['load_start']} -> {result['load_end']}.", "",
             "| code path | points decoder | p50 ms/prompt | min ms/prompt | FP32 / INT8-upscaler (p50) "
             "| max abs logit diff vs native FP32 | mask pixels equal vs native FP32 | max abs diff vs native, same graph |",
             "|---|---|---|---|---|---|---|---|"]
    for isa, rows in result["code_paths"].items():
        for name in ("fp32", "int8-upscaler"):
            row = rows[name]
            lines.append(f"| {isa} | {name} | {row['p50_ms_per_prompt']:.2f} | {row['min_ms_per_prompt']:.2f} | "
                         f"{rows['fp32_over_int8_p50']:.2f}x | {row['vs_native_fp32']['max_abs_logit_diff']:.3g} | "
                         f"{row['vs_native_fp32']['pixels_equal'] * 100:.3f}% | "
                         f"{row['vs_native_same_graph']['max_abs_logit_diff']:.3g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
