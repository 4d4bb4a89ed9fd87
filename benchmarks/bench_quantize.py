"""Encoder speed of FP32 vs dynamic INT8 vs static INT8 and the recipe steps between them.

Builds every variant (or those named by --only) from an FP32 model directory, then times them
interleaved in one process (round robin: each round runs every variant once, so load from other
processes hits all of them alike) and reports p50 / min beside the ratio to FP32, the embedding
cosine on a held-out image, the file size, which fused kernels ORT actually runs (from its
optimised graph), and an ORT profile by op type for FP32 and the shipped model.

    python benchmarks/bench_quantize.py --model models/vit_t --calib '../shared/images/*.jpg' \\
        --int8 models/vit_t-int8 --runs 20 --json benchmarks/results/quantize.json

Needs onnx (the quantize extra), no torch.
"""

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from tinysam_export import calibration, fidelity, quantize
from tinysam_rt import io, sysinfo
from tinysam_rt.manifest import load_manifest
from tinysam_rt.sessions import make_session_options

# Op types whose count in ORT's optimised graph shows what runs in integer arithmetic.
KERNELS = ("QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv",
           "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearSoftmax",
           "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Gemm", "MatMul", "FusedMatMul",
           "MatMulNBits", "Conv", "Gelu", "LayerNormalization", "Erf")


# Every encoder variant build_variants can write, in table order ("shipped" needs --int8).
RECIPE_STEPS = (
    ("gemm", ("Gemm",), True, {}, "recipe prep + Gemm only (QGemm, float out)"),
    ("gemm_matmul", ("Gemm", "MatMul"), True, {}, "+ attention MatMul (attn @ v)"),
    ("gemm_matmul_conv", ("Gemm", "MatMul", "Conv"), True, {}, "+ Conv (QLinearConv): all recipe ops, nothing excluded"),
    ("no_reduce_range", ("Gemm", "MatMul", "Conv"), False, {}, "same, 8-bit weights (no AVX2 guard)"),
    ("symmetric_act", ("Gemm", "MatMul", "Conv"), True, {"ActivationSymmetric": True}, "same, symmetric activations"),
)
DYNAMIC_LINEAR = (
    ("dynamic_linear", True, "recipe prep, every Gemm DynamicQuantizeMatMul, 7-bit per-column weights"),
    ("dynamic_linear_8bit", False, "same, 8-bit per-column weights"),
)
VARIANTS = (("fp32", "dynamic", "dynamic_matmul", "static_naive", "static_naive_s8")
            + tuple(step[0] for step in RECIPE_STEPS) + tuple(step[0] for step in DYNAMIC_LINEAR) + ("shipped",))


def build_variants(model_dir, calib_paths, work, int8_dir, only=None):
    """Write the encoder variants; returns {name: (path, what it is)} in table order.

    Args:
        only: None for every variant, else the names (of VARIANTS) to build; fp32 is always in.
    """
    def wanted(name):
        return name == "fp32" or only is None or name in only

    manifest = load_manifest(model_dir)
    fp32 = manifest.encoder.path
    images = calibration.load_images(calib_paths, 1)
    feeds = [{"image": calibration.encoder_input(io.load_image(img.path), manifest.preprocess)[0]} for img in images]
    reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
    v = {"fp32": (fp32, "ORT FP32 export")}

    if wanted("dynamic") or wanted("dynamic_matmul"):
        inferred = quant_pre_process_path(fp32, work / "inferred.onnx", skip_optimization=True)
    if wanted("dynamic"):
        quantize_dynamic(str(inferred), str(work / "dyn_all.onnx"), weight_type=QuantType.QInt8)
        v["dynamic"] = (work / "dyn_all.onnx", "quantize_dynamic defaults (all ops, per-tensor S8): what peers ship")
    if wanted("dynamic_matmul"):
        quantize_dynamic(str(inferred), str(work / "dyn_mm.onnx"), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        v["dynamic_matmul"] = (work / "dyn_mm.onnx", "quantize_dynamic, MatMul only")

    # quantize_static as documented: quant_pre_process (with its optimisation), all op types.
    naive = [(name, act) for name, act in (("static_naive", QuantType.QUInt8), ("static_naive_s8", QuantType.QInt8))
             if wanted(name)]
    if naive:
        pre = quant_pre_process_path(fp32, work / "pre.onnx")
    for name, act in naive:
        reader.rewind()
        quantize_static(str(pre), str(work / f"{name}.onnx"), reader, per_channel=True, activation_type=act,
                        weight_type=QuantType.QInt8, calibration_cache_path=str(work / "naive.ranges.json"),
                        extra_options={"CalibStridedMinMax": 1})
    if wanted("static_naive"):
        v["static_naive"] = (work / "static_naive.onnx", "quantize_static defaults after quant_pre_process: all ops, U8/S8")
    if wanted("static_naive_s8"):
        v["static_naive_s8"] = (work / "static_naive_s8.onnx", "same, S8 activations")

    # The recipe, one step at a time (ORT-fused prep, lookup tables unfolded; MinMax ranges).
    steps = [step for step in RECIPE_STEPS if wanted(step[0])]
    linear = [step for step in DYNAMIC_LINEAR if wanted(step[0])]
    if steps or linear:
        prepared = quantize.prepare_graph(fp32, work / "prepared.onnx")
    if steps:
        cache = work / "recipe.ranges.json"
        quantize.quantize_qdq(prepared, work / "calibrate.onnx", reader, "minmax", ("Gemm", "MatMul", "Conv"), (), cache)
    for name, ops, reduce_range, extra, what in steps:
        quantize.quantize_qdq(prepared, work / f"{name}.onnx", reader, "minmax", ops, (), cache, reduce_range,
                              extra_options=extra)
        v[name] = (work / f"{name}.onnx", what)
    for name, reduce_range, what in linear:
        quantize.dynamic_linear(prepared, prepared, (), work / f"{name}.onnx", reduce_range)
        v[name] = (work / f"{name}.onnx", what)
    if int8_dir is not None and wanted("shipped"):
        int8 = load_manifest(int8_dir)
        recipe = int8.quantization["graphs"].get("encoder", {})
        v["shipped"] = (int8.encoder.path, f"`tinysam quantize` output ({int8.encoder.precision}): "
                                            f"{recipe.get('method')}, linear {recipe.get('linear', 'static')}, "
                                            f"{len(recipe.get('excluded_nodes', []))} node(s) kept float")
    return v


def quant_pre_process_path(src, dst, **kwargs):
    quant_pre_process(str(src), str(dst), **kwargs)
    return dst


def kernel_counts(path, threads, work):
    """Op-type counts of the graph ORT runs (ORT_ENABLE_ALL, as the runtime's sessions)."""
    options = make_session_options(threads)
    options.optimized_model_filepath = str(work / "optimized_view.onnx")
    options.log_severity_level = 3  # the "hardware-specific optimisations" notice is expected
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {k: counts[k] for k in KERNELS if counts[k]}


def op_profile(path, tensor, threads, runs=3):
    """ms per run by op type from ORT's profiler, highest first."""
    options = make_session_options(threads)
    options.enable_profiling = True
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"image": tensor})  # warm-up, profiled too; subtracted below by averaging 1..runs
    for _ in range(runs):
        session.run(None, {"image": tensor})
    profile = Path(session.end_profiling())
    totals = collections.Counter()
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    profile.unlink()
    return {op: round(us / (runs + 1) / 1000, 1) for op, us in totals.most_common(10)}


def time_interleaved(variants, tensor, threads, runs, warmup):
    """Round-robin timing; returns {name: [seconds per run]}."""
    sessions = {name: ort.InferenceSession(str(path), make_session_options(threads), providers=["CPUExecutionProvider"])
                for name, (path, _) in variants.items()}
    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, {"image": tensor})
    times = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"image": tensor})
            times[name].append(time.perf_counter() - start)
    return times


def time_decoders(model_dir, int8_dirs, embedding, threads, runs, batch=16):
    """Decoder graphs per prompt at `batch` everything-mode prompts, interleaved: the FP32 decoder,
    the FP32 points decoder (what point prompts run when the model has one), and the INT8
    decoder of every directory in `int8_dirs` whose decoder is quantized."""
    from tinysam_rt.sessions import DecoderSession, PointsDecoderSession

    manifest = load_manifest(model_dir)
    side = int(np.ceil(np.sqrt(batch)))
    grid = (np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:batch] + 0.5) * 1024 / side
    coords = np.stack([grid, np.zeros_like(grid)], axis=1).astype(np.float32)  # (B, 2, 2): point + SAM padding
    labels = np.tile(np.array([[1.0, -1.0]], np.float32), (batch, 1))
    no_mask = (np.zeros((batch, 1, 256, 256), np.float32), np.zeros(batch, np.float32))
    runners = {"fp32 decoder": (DecoderSession(manifest.decoder, threads), (*no_mask,))}
    if manifest.points_decoder is not None:
        runners["fp32 points_decoder"] = (PointsDecoderSession(manifest.points_decoder, threads), ())
    for directory in int8_dirs:
        int8 = load_manifest(directory)
        if int8.decoder.precision != "fp32":
            runners[f"{int8.decoder.precision} decoder ({Path(directory).name})"] = (
                DecoderSession(int8.decoder, threads), (*no_mask,))
    for session, extra in runners.values():
        session.run(embedding, coords, labels, *extra)  # warm-up
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, (session, extra) in runners.items():
            start = time.perf_counter()
            session.run(embedding, coords, labels, *extra)
            times[name].append(time.perf_counter() - start)
    return {"batch": batch, "rows": {name: {"p50_ms_per_prompt": 1000 * statistics.median(v) / batch,
                                            "min_ms_per_prompt": 1000 * min(v) / batch} for name, v in times.items()}}


def markdown(result):
    info = result["system"]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"CPU: {info['cpu_model']}, {info['usable_cores']} usable cores; ISA: {', '.join(info['isa'])}; "
        f"onnxruntime {info['onnxruntime']}; {result['threads']} intra-op threads; {result['runs']} interleaved "
        f"rounds after {result['warmup']} warm-up; load average at start {result['load_start']}, "
        f"at end {result['load_end']}.",
        "",
        "| encoder variant | p50 ms | min ms | FP32/p50 | FP32/min | cosine vs FP32 | MB | what it is |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = result["variants"]["fp32"]
    for name, row in result["variants"].items():
        lines.append(f"| {name} | {row['p50_ms']:.0f} | {row['min_ms']:.0f} | {base['p50_ms'] / row['p50_ms']:.2f}x | "
                     f"{base['min_ms'] / row['min_ms']:.2f}x | {row['cosine']:.5f} | {row['mb']:.1f} | {row['what']} |")
    lines += ["", "Kernels ORT runs (op counts in its optimised graph):", "",
              "| variant | kernels |", "|---|---|"]
    for name, row in result["variants"].items():
        lines.append(f"| {name} | {', '.join(f'{k} {n}' for k, n in row['kernels'].items())} |")
    if result.get("decoders"):
        dec = result["decoders"]
        lines += ["", f"Decoder graphs, {dec['batch']} everything-mode prompts per call, {result['runs']} interleaved rounds:", "",
                  "| decoder graph | p50 ms/prompt | min ms/prompt | prompts/s (p50) |", "|---|---|---|---|"]
        for name, row in dec["rows"].items():
            lines.append(f"| {name} | {row['p50_ms_per_prompt']:.1f} | {row['min_ms_per_prompt']:.1f} | "
                         f"{1000 / row['p50_ms_per_prompt']:.1f} |")
    lines += ["", "ORT profile, ms per run by op type (1 run of each, same process):", ""]
    for name, ops in result["profiles"].items():
        lines.append(f"- {name}: " + ", ".join(f"{op} {ms}" for op, ms in ops.items()))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="FP32 tinysam-rt model directory")
    parser.add_argument("--calib", required=True, help="calibration images (dir or glob); the last one is held out")
    parser.add_argument("--int8", type=Path, default=None, help="a `tinysam quantize` output directory to include")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=None, choices=VARIANTS, metavar="VARIANT",
                        help="build and time only these variants (plus fp32); one of: " + ", ".join(VARIANTS))
    parser.add_argument("--decoder-int8", type=Path, nargs="*", default=[],
                        help="model directories with an INT8 decoder to time against the FP32 decoders")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.only and "shipped" in args.only and args.int8 is None:
        parser.error("--only shipped needs --int8 DIR (the `tinysam quantize` output to time)")
    ort.set_default_logger_severity(3)
    paths = calibration.list_images(args.calib)
    manifest = load_manifest(args.model)
    held = calibration.encoder_input(io.load_image(paths[-1]), manifest.preprocess)[0]
    load_start = sysinfo.load_average()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = Path(tmp)
        variants = build_variants(args.model, paths[:-1], work, args.int8, args.only)
        reference = ort.InferenceSession(str(variants["fp32"][0]), providers=["CPUExecutionProvider"]).run(None, {"image": held})[0]
        rows = {}
        for name, (path, what) in variants.items():
            out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": held})[0]
            rows[name] = {"what": what, "mb": Path(path).stat().st_size / 1e6, "cosine": fidelity.cosine(out, reference),
                          "kernels": kernel_counts(path, args.threads, work)}
        times = time_interleaved(variants, held, args.threads, args.runs, args.warmup)
        for name, values in times.items():
            rows[name].update(p50_ms=1000 * statistics.median(values), min_ms=1000 * min(values),
                              p95_ms=1000 * float(np.percentile(values, 95)))
        decoders = time_decoders(args.model, args.decoder_int8, reference, args.threads, args.runs)
        last = next((name for name in ("shipped", "gemm_matmul_conv") if name in variants), None)
        profiles = {name: op_profile(variants[name][0], held, args.threads) for name in ("fp32", last) if name}
    result = {
        "command": "python benchmarks/bench_quantize.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "system": sysinfo.system_info(), "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
        "load_start": load_start, "load_end": sysinfo.load_average(), "variants": rows, "profiles": profiles,
        "decoders": decoders,
    }
    publish(result, markdown(result), args.json)
    return 0


def publish(result, text, json_path):
    """Print the markdown; with a path, write the JSON there and the markdown beside it (.md)."""
    print(text)
    if json_path is not None:
        from tinysam_rt.atomic import atomic_write_text

        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
        atomic_write_text(json_path.with_suffix(".md"), text)


if __name__ == "__main__":
    sys.exit(main())
