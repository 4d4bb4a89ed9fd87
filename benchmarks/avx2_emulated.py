"""INT8 encoder outputs on an AVX2-only CPU, emulated: do the integer kernels saturate there?

This machine has AVX-512-VNNI; MLAS picks its u8 x s8 GEMM kernel from CPUID, and on AVX2-only
CPUs that kernel sums pairs of u8 x s8 products in 16 bits (VPMADDUBSW), which saturates for
8-bit weights. qemu-user with `-cpu Haswell` reports an AVX2-only CPU, so ORT under it takes the
AVX2 path. Each variant's embedding is computed natively and under qemu and compared.
Emulated timings are meaningless (TCG); only outputs are compared.

    python benchmarks/avx2_emulated.py --model models/vit_t --int8 models/vit_t-int8 \\
        --calib '../shared/images/*.jpg' --json benchmarks/results/avx2_emulated.json

Needs onnx (the quantize extra) and qemu-x86_64-static (Debian package qemu-user-static).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QEMU = "qemu-x86_64-static"
QEMU_CPU = "Haswell"  # AVX2 + FMA, no AVX-512, no VNNI


def embed(path, image_npy, out_npy):
    """Run one encoder graph on a saved input tensor (this is what runs under qemu)."""
    import onnxruntime as ort

    from tinysam_rt.sessions import make_session_options

    session = ort.InferenceSession(str(path), make_session_options(2), providers=["CPUExecutionProvider"])
    np.save(out_npy, session.run(None, {"image": np.load(image_npy)})[0])


def build_variants(model_dir, int8_dir, calib, work):
    """{name: (path, what)}: FP32, the shipped INT8 encoder, all-ops static with 7- and 8-bit weights."""
    from tinysam_export import calibration, quantize
    from tinysam_rt import io
    from tinysam_rt.manifest import load_manifest

    manifest = load_manifest(model_dir)
    images = calibration.load_images(calibration.list_images(calib)[:2], 1)
    feeds = [{"image": calibration.encoder_input(io.load_image(img.path), manifest.preprocess)[0]} for img in images]
    reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
    prepared = quantize.prepare_graph(manifest.encoder.path, work / "prepared.onnx")
    ops, cache = ("Gemm", "MatMul", "Conv"), work / "ranges.json"
    variants = {"fp32": (manifest.encoder.path, "FP32 export")}
    if int8_dir is not None:
        variants["shipped"] = (load_manifest(int8_dir).encoder.path, f"`tinysam quantize` output in {int8_dir}")
    for name, reduce_range, what in (("all_ops_7bit", True, "all recipe ops, 7-bit weights (reduce_range, the default)"),
                                     ("all_ops_8bit", False, "all recipe ops, 8-bit weights (--no-reduce-range)")):
        variants[name] = (quantize.quantize_qdq(prepared, work / f"{name}.onnx", reader, "minmax", ops, (), cache,
                                                reduce_range), what)
    return variants, feeds[-1]["image"]


def compare(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return {"max_abs_diff": float(np.abs(a - b).max()), "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="FP32 model directory")
    parser.add_argument("--int8", type=Path, default=None, help="a `tinysam quantize` output directory")
    parser.add_argument("--calib", help="images (dir or glob): the first two calibrate, the second is the input")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("GRAPH", "INPUT_NPY", "OUTPUT_NPY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        embed(*args.child)
        return 0
    if shutil.which(QEMU) is None:
        raise SystemExit(f"avx2_emulated: {QEMU} not found (apt install qemu-user-static)")
    import logging

    import onnxruntime as ort

    logging.getLogger().setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="avx2-") as tmp:
        work = Path(tmp)
        variants, tensor = build_variants(args.model, args.int8, args.calib, work)
        np.save(work / "input.npy", tensor)
        outputs = {}
        for name, (path, what) in variants.items():
            native, emulated = work / f"{name}.native.npy", work / f"{name}.emulated.npy"
            embed(path, work / "input.npy", native)
            start = time.perf_counter()
            proc = subprocess.run([QEMU, "-cpu", QEMU_CPU, sys.executable, __file__, "--child", str(path),
                                   str(work / "input.npy"), str(emulated)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"avx2_emulated: {name} under qemu failed:\n{proc.stderr[-2000:]}")
            outputs[name] = (np.load(native), np.load(emulated))
            rows[name] = {"what": what, "emulated_seconds": time.perf_counter() - start,
                          "native_vs_emulated": compare(*outputs[name])}
        for name, (native, emulated) in outputs.items():
            rows[name]["native_vs_fp32_native"] = compare(native, outputs["fp32"][0])
            rows[name]["emulated_vs_fp32_native"] = compare(emulated, outputs["fp32"][0])
    result = {"command": "python benchmarks/avx2_emulated.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "qemu_cpu": QEMU_CPU, "onnxruntime": ort.__version__, "variants": rows}
    lines = [f"Command: `{result['command']}` (qemu-user `-cpu {QEMU_CPU}`: AVX2 + FMA, no AVX-512/VNNI; "
             f"native: this machine's CPU)", "",
             "| encoder | native vs emulated AVX2: cosine | max abs diff | cosine vs FP32, native | cosine vs FP32, AVX2 |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name}: {r['what']} | {r['native_vs_emulated']['cosine']:.6f} | "
                     f"{r['native_vs_emulated']['max_abs_diff']:.2e} | {r['native_vs_fp32_native']['cosine']:.5f} | "
                     f"{r['emulated_vs_fp32_native']['cosine']:.5f} |")
    print("\n".join(lines))
    if args.json:
        from tinysam_rt.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
