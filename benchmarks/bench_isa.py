"""Encoder speed on the AVX2 code path, measured on this CPU: ORT with its AVX-512 kernels switched off.

The project's machines have been Xeons/EPYCs with AVX-512 (+ VNNI, AMX) and EPYCs with AVX2 only,
and INT8 speed depends on which: ONNX Runtime's MLAS picks its kernels from CPUID once, when the
library loads. To time the AVX2 kernels here, this script copies the installed onnxruntime package
and patches, in the copy, the one branch of MLAS's platform set-up that installs the AVX-512
kernels so that it is never taken (the AVX2/FMA kernels it set before stay). The copy is checked
before use: its uint8 x int8 kernel must saturate 16-bit pair sums (`gemm_peak.u8s8_kernel_saturates`,
the signature of the AVX2 kernel) while the installed one must not.

It then times the same encoder variants as bench_quantize.py in child processes, alternately
native and AVX2 (`--rounds` times each, `--runs` interleaved rounds per child), and reports per
code path p50/min, the ratio to that path's FP32, the cosine to native FP32, and the GEMM limits.

What it is not: an AVX2-only CPU. The core, caches and clock are this machine's (a Zen 4 core
runs AVX-512 as two 256-bit halves, so its AVX2 FP32 kernels lose little); an older AVX2-only
EPYC has other absolute times. What carries over is the INT8-vs-FP32 ratio of the AVX2 kernels.

    python benchmarks/bench_isa.py --model models/vit_t --int8 models/vit_t-int8 \\
        --calib '../shared/images/*.jpg' --json benchmarks/results/isa.json

The patch is found by its bytes (`test $0x10000, %r10d; je` after CPUID leaf 7, onnxruntime 1.32.0's
x86-64 Linux wheel); any other build is refused with that message, not guessed at.
Needs onnx (the quantize extra), no torch.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# MLAS platform set-up: `test $0x10000, %r10d` (CPUID.7:EBX bit 16, AVX512F) then `je +0x0e`
# over the AVX-512 branch. Rewriting `je` (0x74) as `jmp` (0xeb) skips that branch always.
AVX512F_BRANCH = bytes.fromhex("41f7c200000100740e")
JE_OFFSET, JMP = 7, 0xEB
PYBIND = "onnxruntime_pybind11_state"


def patched_onnxruntime(dest):
    """Copy the installed onnxruntime package under `dest` with MLAS's AVX-512 branch disabled.

    Returns:
        Path: the directory to put first on PYTHONPATH.
    """
    import onnxruntime

    source = Path(onnxruntime.__file__).parent
    target = Path(dest) / "onnxruntime"
    shutil.copytree(source, target)
    (library,) = (target / "capi").glob(f"{PYBIND}*.so")
    data = bytearray(library.read_bytes())
    found = data.count(AVX512F_BRANCH)
    if found != 1:
        raise SystemExit(f"bench_isa: {library.name} (onnxruntime {onnxruntime.__version__}) has {found} copies "
                         f"of the AVX512F dispatch branch {AVX512F_BRANCH.hex()}, expected 1: this patch is "
                         "for onnxruntime 1.32.0's x86-64 Linux wheel only")
    data[data.find(AVX512F_BRANCH) + JE_OFFSET] = JMP
    library.write_bytes(bytes(data))
    return Path(dest)


def child_env(isa, patched):
    """The environment of a child: the AVX2 one imports the patched copy first."""
    env = dict(os.environ)
    if isa == "avx2":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(patched), env.get("PYTHONPATH")]))
    return env


def run_child(isa, patched, job, script=__file__):
    """One child process on the `isa` code path: `script --child ISA JOB OUT`; `job` and its
    answer (OUT, parsed and returned; the child may put files beside it) are JSON files."""
    out = Path(job).with_name(f"{isa}.{Path(job).stem}.out.json")
    proc = subprocess.run([sys.executable, str(script), "--child", isa, str(job), str(out)],
                          env=child_env(isa, patched), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{Path(script).stem}: the {isa} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def child(isa, job_path, out_path):
    """Time every variant interleaved on whatever ORT this process imported; write JSON."""
    import onnxruntime as ort

    from bench_quantize import time_interleaved
    from tinysam_export.fidelity import cosine
    from tinysam_rt import gemm_peak
    from tinysam_rt.atomic import atomic_write_text
    from tinysam_rt.sessions import make_session_options

    ort.set_default_logger_severity(3)
    job = json.loads(Path(job_path).read_text())
    saturates = gemm_peak.u8s8_kernel_saturates()
    if saturates is not (isa == "avx2"):
        raise SystemExit(f"bench_isa: the {isa} child's u8s8 kernel {'saturates' if saturates else 'is exact'}: "
                         f"not the {isa} kernel ({ort.__file__})")
    tensor, reference = np.load(job["tensor"]), np.load(job["reference"])
    variants = {name: (path, "") for name, path in job["variants"].items()}
    cosines = {}
    for name, (path, _) in variants.items():
        session = ort.InferenceSession(path, make_session_options(job["threads"]), providers=["CPUExecutionProvider"])
        cosines[name] = cosine(session.run(None, {"image": tensor})[0], reference)
    limits = {kind: gemm_peak.ort_matmul_peak(job["threads"], kind, job["gemm_n"])["best_gflops"]
              for kind in ("float32", "u8s8")}
    times = time_interleaved(variants, tensor, job["threads"], job["runs"], job["warmup"])
    atomic_write_text(Path(out_path), json.dumps({"onnxruntime_file": ort.__file__, "u8s8_saturates": saturates,
                                                  "gemm_limits": limits, "cosine": cosines, "times": times}))


def summarise(children, variants):
    """Per code path: p50/min over every child's runs, ratio to that path's FP32, cosine, limits."""
    out = {}
    for isa, runs in children.items():
        rows = {}
        for name, (_, what) in variants.items():
            values = [t for r in runs for t in r["times"][name]]
            rows[name] = {"what": what, "p50_ms": 1000 * statistics.median(values), "min_ms": 1000 * min(values),
                          "runs": len(values), "cosine_vs_native_fp32": runs[0]["cosine"][name]}
        for row in rows.values():
            row["fp32_over_p50"] = rows["fp32"]["p50_ms"] / row["p50_ms"]
            row["fp32_over_min"] = rows["fp32"]["min_ms"] / row["min_ms"]
        out[isa] = {"u8s8_saturates": runs[0]["u8s8_saturates"], "onnxruntime_file": runs[0]["onnxruntime_file"],
                    "gemm_limits": {k: max(r["gemm_limits"][k] for r in runs) for k in ("float32", "u8s8")},
                    "variants": rows}
    return out


def markdown(result):
    info, paths = result["system"], result["code_paths"]
    lines = [f"Command: `{result['command']}`", "",
             f"CPU: {info['cpu_model']}, {info['usable_cores']} usable cores; ISA: {', '.join(info['isa'])}; "
             f"onnxruntime {info['onnxruntime']}; {result['threads']} intra-op threads; {result['rounds']} child "
             f"process(es) per code path, alternating, {result['runs']} interleaved rounds each after "
             f"{result['warmup']} warm-up; load average at start {result['load_start']}, at end {result['load_end']}.",
             ""]
    for isa, path in paths.items():
        limits = path["gemm_limits"]
        lines.append(f"- {isa}: u8s8 kernel {'saturates 16-bit pair sums' if path['u8s8_saturates'] else 'exact'}; "
                     f"ORT MatMul float32 {limits['float32']:.0f} GFLOP/s, MatMulInteger u8s8 {limits['u8s8']:.0f} "
                     f"GOP/s ({result['gemm_n']}^3)")
    native, avx2 = paths["native"]["variants"], paths["avx2"]["variants"]
    lines += ["", "| encoder variant | native p50 ms | native FP32/p50 | AVX2 p50 ms | AVX2 FP32/p50 | AVX2 FP32/min "
              "| cosine vs FP32, native | cosine vs FP32, AVX2 | what it is |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in avx2.items():
        n = native[name]
        lines.append(f"| {name} | {n['p50_ms']:.0f} | {n['fp32_over_p50']:.2f}x | {row['p50_ms']:.0f} | "
                     f"{row['fp32_over_p50']:.2f}x | {row['fp32_over_min']:.2f}x | {n['cosine_vs_native_fp32']:.5f} | "
                     f"{row['cosine_vs_native_fp32']:.5f} | {row['what']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="FP32 tinysam-rt model directory")
    parser.add_argument("--calib", help="calibration images (dir or glob); the last one is held out and timed")
    parser.add_argument("--int8", type=Path, default=None, help="a `tinysam quantize` output directory to include")
    parser.add_argument("--only", nargs="*", default=None, help="time only these variants (plus fp32)")
    parser.add_argument("--runs", type=int, default=10, help="interleaved rounds per child process")
    parser.add_argument("--rounds", type=int, default=2, help="child processes per code path, alternating")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gemm-n", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("ISA", "JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.model is None or args.calib is None:
        parser.error("--model and --calib are required")
    import onnxruntime as ort

    from bench_quantize import build_variants, publish
    from tinysam_export import calibration
    from tinysam_rt import gemm_peak, io, sysinfo
    from tinysam_rt.manifest import load_manifest

    ort.set_default_logger_severity(3)
    if gemm_peak.u8s8_kernel_saturates():
        raise SystemExit("bench_isa: this CPU's own u8s8 kernel already saturates (AVX2-class): "
                         "run bench_quantize.py, there is no faster path to compare with")
    paths = calibration.list_images(args.calib)
    manifest = load_manifest(args.model)
    tensor = calibration.encoder_input(io.load_image(paths[-1]), manifest.preprocess)[0]
    load_start = sysinfo.load_average()
    with tempfile.TemporaryDirectory(prefix="bench-isa-") as tmp:
        work = Path(tmp)
        variants = build_variants(args.model, paths[:-1], work, args.int8)
        if args.only:
            variants = {k: v for k, v in variants.items() if k == "fp32" or k in args.only}
        patched = patched_onnxruntime(work / "ort-avx2")
        np.save(work / "tensor.npy", tensor)
        fp32 = ort.InferenceSession(str(variants["fp32"][0]), providers=["CPUExecutionProvider"])
        np.save(work / "reference.npy", fp32.run(None, {"image": tensor})[0])
        job = work / "job.json"
        job.write_text(json.dumps({"variants": {k: str(p) for k, (p, _) in variants.items()},
                                   "tensor": str(work / "tensor.npy"), "reference": str(work / "reference.npy"),
                                   "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
                                   "gemm_n": args.gemm_n}))
        children = {"native": [], "avx2": []}
        for _ in range(args.rounds):
            for isa in children:
                children[isa].append(run_child(isa, patched, job))
    result = {"command": "python benchmarks/bench_isa.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "system": sysinfo.system_info(), "threads": args.threads, "runs": args.runs, "rounds": args.rounds,
              "warmup": args.warmup, "gemm_n": args.gemm_n, "load_start": load_start, "load_end": sysinfo.load_average(),
              "code_paths": summarise(children, variants)}
    publish(result, markdown(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
