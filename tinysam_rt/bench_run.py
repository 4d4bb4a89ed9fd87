"""The measurements behind `tinysam-bench`, built only from the runtime's public pieces.

Each timed call records wall time, the CPU time the whole process got (all ORT threads) and the
time its threads sat runnable waiting for a core. On a shared machine a slow run with a low
cpu/wall ratio or a large run-queue wait was slowed by other load, not by the model.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

from tinysam_rt import flops, gemm_peak, postprocess, preprocess, prompts, sysinfo
from tinysam_rt.everything import AmgConfig
from tinysam_rt.io import write_png
from tinysam_rt.manifest import load_manifest
from tinysam_rt.predictor import TinySAMPredictor
from tinysam_rt.sessions import DecoderSession, EncoderSession, PointsDecoderSession, load_decoder

# TinySAM (Shu et al. 2023, arXiv:2312.13789) reports "42.0 GFLOPs" for its vit_t model; the number
# counts multiply-accumulates (fvcore's convention), so it compares with our MACs, not our FLOPs.
PUBLISHED_GMACS = 42.0


def synthetic_image(height=960, width=1280, seed=0):
    """A deterministic test scene: smooth background, a few filled shapes, mild noise.

    Returns:
        (height, width, 3) uint8 RGB.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 1 - x / width], axis=2) * 160 + 40  # (H, W, 3)
    image = np.ascontiguousarray(base.astype(np.uint8))
    for _ in range(6):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(width // 20, width // 5)), int(rng.integers(height // 20, height // 5)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
    noise = rng.normal(0, 4, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def time_call(fn):
    """Run fn() once. Returns (its result, (wall_s, cpu_s, runqueue_wait_s or None))."""
    wait0, cpu0, wall0 = sysinfo.runqueue_wait_s(), time.process_time(), time.perf_counter()
    result = fn()
    wall, cpu, wait1 = time.perf_counter() - wall0, time.process_time() - cpu0, sysinfo.runqueue_wait_s()
    return result, (wall, cpu, None if wait0 is None or wait1 is None else wait1 - wait0)


def summarize(samples):
    """Statistics of (wall_s, cpu_s, wait_s) samples: p50/p95 (numpy linear percentiles), min."""
    wall = np.array([s[0] for s in samples])
    cpu = np.array([s[1] for s in samples])
    waits = [s[2] for s in samples if s[2] is not None]
    return {
        "runs": len(samples),
        "p50_s": float(np.percentile(wall, 50)),
        "p95_s": float(np.percentile(wall, 95)),
        "min_s": float(wall.min()),
        "mean_s": float(wall.mean()),
        "cpu_p50_s": float(np.percentile(cpu, 50)),
        "cpu_per_wall": float(np.median(cpu / np.maximum(wall, 1e-9))),
        "runqueue_wait_p50_s": float(np.percentile(waits, 50)) if waits else None,
        "runqueue_wait_max_s": float(max(waits)) if waits else None,
    }


MIN_RUNS_IN_BUDGET = 3  # a time budget never cuts a stage below this many timed runs


def time_stage(fn, runs, warmup, budget_s=None):
    """`warmup` untimed calls, then `runs` timed ones -> `summarize` dict.

    Args:
        budget_s: optional seconds after which timing stops early (never below
            MIN_RUNS_IN_BUDGET runs); the result's "runs" says how many ran.
    """
    for _ in range(warmup):
        fn()
    samples, start = [], time.perf_counter()
    while len(samples) < runs:
        samples.append(time_call(fn)[1])
        if budget_s and len(samples) >= MIN_RUNS_IN_BUDGET and time.perf_counter() - start > budget_s:
            break
    return summarize(samples)


def model_info(model_dir):
    """Manifest facts and file sizes of a model directory (sha256-verified)."""
    manifest = load_manifest(model_dir)
    files = {g.role: {"file": g.path.name, "bytes": g.path.stat().st_size, "precision": g.precision}
             for g in manifest.graphs}
    return manifest, {
        "model_dir": str(model_dir),
        "model": manifest.model,
        "weights_id": manifest.weights_id,
        "weights_source": manifest.raw.get("weights", {}).get("source"),
        "quantization": manifest.quantization,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
    }


def decoder_feeds(original_size, long_side, batch):
    """Decoder feeds for `batch` one-point prompts on a grid over the image (SAM padding point).

    Returns:
        coords (B, 2, 2) float32 1024 frame, labels (B, 2), mask (B, 1, 256, 256), has_mask (B,).
    """
    side = math.ceil(math.sqrt(batch))
    height, width = original_size
    cells = (np.arange(side) + 0.5) / side
    grid = np.stack(np.meshgrid(cells * width, cells * height), axis=-1).reshape(-1, 2)[:batch]  # (B, 2) xy
    if batch == 1:
        grid = np.array([[width / 2, height / 2]])
    coords_1024 = preprocess.coords_to_input_frame(grid, original_size, long_side)
    packed = [prompts.pack_prompt(c[None], np.ones(1, np.float32), None) for c in coords_1024]
    coords = np.concatenate([p[0] for p in packed])
    labels = np.concatenate([p[1] for p in packed])
    return (coords, labels, *prompts.mask_feeds(None, batch))


def serving_decoder_graph(manifest):
    """(GraphSpec, session class) of the graph that serves prompts without a mask input: the
    points decoder when the model has one (see sessions.PromptDecoder), else the decoder."""
    if manifest.points_decoder is not None:
        return manifest.points_decoder, PointsDecoderSession
    return manifest.decoder, DecoderSession


def count_model_flops(manifest, batch):
    """MACs of the encoder and of the decoder at B=1 and B=batch, from ORT-profiled shapes."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, 1024, 1024), dtype=np.float32)
    result = {"method": "onnxruntime profile (optimisations off)", "counted_ops": list(flops.COUNTED_OPS)}
    result["encoder"] = flops.count_macs(flops.profile_node_shapes(
        lambda o: EncoderSession(manifest.encoder, session_options=o), lambda s: s.run(image)))
    embeddings = rng.standard_normal((1, 256, 64, 64), dtype=np.float32)
    graph, kind = serving_decoder_graph(manifest)
    for key, b in (("decoder_1", 1), ("decoder_batch", batch)):
        feeds = decoder_feeds((1024, 1024), 1024, b)
        feeds = feeds[:2] if kind is PointsDecoderSession else feeds  # no mask inputs
        result[key] = flops.count_macs(flops.profile_node_shapes(
            lambda o: kind(graph, session_options=o), lambda s, f=feeds: s.run(embeddings, *f)))
        result[key]["batch"] = b
        result[key]["graph"] = graph.role
    ours = result["encoder"]["macs"] + result["decoder_1"]["macs"]
    result["published"] = {
        "tinysam_gmacs": PUBLISHED_GMACS,
        "ours_encoder_plus_one_prompt_gmacs": ours / 1e9,
        "ours_over_published": ours / 1e9 / PUBLISHED_GMACS,
        "note": "TinySAM's '42.0 GFLOPs' counts multiply-accumulates (fvcore), i.e. GMACs",
    }
    return result


def machine_limits(threads_list, gemm_n):
    """Measured GEMM peaks: numpy float32 once, ORT float32 and u8s8 per thread count; and
    whether ORT's u8s8 kernel here saturates 16-bit pair sums (the AVX2-class kernel)."""
    return {
        "numpy_float32": gemm_peak.numpy_sgemm_peak(gemm_n),
        "ort_float32": {str(t): gemm_peak.ort_matmul_peak(t, "float32", gemm_n) for t in threads_list},
        "ort_u8s8": {str(t): gemm_peak.ort_matmul_peak(t, "u8s8", gemm_n) for t in threads_list},
        "ort_u8s8_saturates": gemm_peak.u8s8_kernel_saturates(),
    }


def merge_limits(first, second):
    """Per kernel and thread count, the better of two `machine_limits` measurements.

    A limit is the best the machine showed; measuring before and after the model runs keeps one
    burst of outside load from lowering it (which would inflate every "% of machine limit").
    Each kept entry lists both measurements' best_gflops under "best_gflops_samples".
    """

    def better(a, b):
        kept = dict(max(a, b, key=lambda r: r["best_gflops"]))
        kept["best_gflops_samples"] = [a["best_gflops"], b["best_gflops"]]
        return kept

    return {"numpy_float32": better(first["numpy_float32"], second["numpy_float32"]),
            **{kind: {t: better(first[kind][t], second[kind][t]) for t in first[kind]}
               for kind in ("ort_float32", "ort_u8s8")},
            "ort_u8s8_saturates": first["ort_u8s8_saturates"]}


def measure_threads(manifest, image, threads, runs, warmup, batch, budget_s=None):
    """Cold and warm timings of every stage at one intra-op thread count."""
    pre = manifest.preprocess

    def run_preprocess():
        resized = preprocess.resize_longest_side(image, pre.image_size)  # (h, w, 3)
        return preprocess.normalize_pad(resized, pre.pixel_mean, pre.pixel_std, pre.image_size, pre.pad_value)

    cold = {}
    encoder, (cold["encoder_session_s"], _, _) = time_call(lambda: EncoderSession(manifest.encoder, threads))
    tensor = run_preprocess()  # (1, 3, 1024, 1024)
    embeddings, (cold["encoder_first_call_s"], _, _) = time_call(lambda: encoder.run(tensor))
    # The decoder stage as `predict` runs it: point prompts go to the points decoder if there is one.
    decoder, (cold["decoder_session_s"], _, _) = time_call(lambda: load_decoder(manifest, threads))
    input_size = preprocess.preprocess_shape(*image.shape[:2], pre.image_size)
    feeds_1 = decoder_feeds(image.shape[:2], pre.image_size, 1)
    feeds_b = decoder_feeds(image.shape[:2], pre.image_size, batch)
    (low_res, _), (cold["decoder_first_call_s"], _, _) = time_call(lambda: decoder.run(embeddings, *feeds_1))
    stages = {
        "preprocess": time_stage(run_preprocess, runs, warmup, budget_s),
        "encoder": time_stage(lambda: encoder.run(tensor), runs, warmup, budget_s),
        "decoder_1": time_stage(lambda: decoder.run(embeddings, *feeds_1), runs, warmup, budget_s),
        "decoder_batch": time_stage(lambda: decoder.run(embeddings, *feeds_b), runs, warmup, budget_s),
        "postprocess": time_stage(
            lambda: postprocess.upscale_logits(low_res, input_size, image.shape[:2]) > manifest.mask_threshold,
            runs, warmup, budget_s),
    }
    stages["decoder_batch"]["batch"] = batch
    del encoder, decoder  # free them before the predictor makes its own pair
    predictor = TinySAMPredictor(model_dir=manifest.model_dir, threads=threads, cache_size=0)
    center = [[image.shape[1] / 2, image.shape[0] / 2]]  # (x, y)

    def end_to_end():
        predictor.set_image(image)
        return predictor.predict(point_coords=center, point_labels=[1])

    stages["end_to_end"] = time_stage(end_to_end, runs, warmup, budget_s)
    entry = {"threads": threads, "cold": cold, "stages": stages}
    if threads > 1:
        # end_to_end left `image` set on the predictor: its embedding is reused, not recomputed
        entry["decoder_workers"] = measure_decoder_workers(predictor, threads, runs, warmup, budget_s)
    return entry


def measure_decoder_workers(predictor, workers, runs, warmup, budget_s=None,
                            prompts_per_worker=AmgConfig.points_per_batch):
    """Everything mode's decoder call with one session of the predictor's threads vs `workers`
    single-thread sessions side by side (`tinysam everything --decoder-workers`), on the image
    set on `predictor`.

    Both run the same `workers * prompts_per_worker` grid prompts per call through
    `predict_batch`, image side cached, every mask computed (a real checkpoint's cost when every
    prompt passes the IoU filter). Which is faster depends on the board (benchmarks/RESULTS.md,
    "Everything mode, session 7": 1.02x-1.25x on 2 Zen 4 cores); this measures it here.

    Returns:
        {"workers", "prompts_per_call", "load_s" (the single-thread sessions, first call),
        "one_session": stage summary, "workers_run": stage summary, "speedup_p50", "speedup_min"}.
    """
    batch = workers * prompts_per_worker
    coords, labels, _, _ = decoder_feeds(predictor.original_size, predictor.manifest.preprocess.image_size, batch)
    _, (load_s, _, _) = time_call(lambda: predictor.predict_batch(coords, labels, workers=workers))
    one = time_stage(lambda: predictor.predict_batch(coords, labels), runs, warmup, budget_s)
    many = time_stage(lambda: predictor.predict_batch(coords, labels, workers=workers), runs, warmup, budget_s)
    return {"workers": workers, "prompts_per_call": batch, "load_s": load_s, "one_session": one,
            "workers_run": many, "speedup_p50": one["p50_s"] / many["p50_s"],
            "speedup_min": one["min_s"] / many["min_s"]}


def achieved(stages, model_flops, limits, threads):
    """Achieved GFLOP/s of the graph stages and their share of the measured GEMM peaks.

    The float32 share is the headline; the u8s8 share (integer GOP/s of MatMulInteger) is the
    ceiling an INT8 model could approach if all its MACs ran in integer kernels.
    """
    peaks = {kind: limits[kind][str(threads)]["best_gflops"] if limits else None
             for kind in ("ort_float32", "ort_u8s8")}
    out = {}
    for stage in ("encoder", "decoder_1", "decoder_batch"):
        gflop = model_flops[stage]["flops"] / 1e9
        rate, best = gflop / stages[stage]["p50_s"], gflop / stages[stage]["min_s"]
        out[stage] = {"gflops_per_s_p50": rate, "gflops_per_s_best": best}
        for kind, peak in peaks.items():
            short = kind.removeprefix("ort_")
            out[stage][f"pct_of_ort_{short}_peak_p50"] = 100 * rate / peak if peak else None
            out[stage][f"pct_of_ort_{short}_peak_best"] = 100 * best / peak if peak else None
    return out


def cold_start(model_dir, image_path, threads, timeout_s=600):
    """Time from a fresh process's start to its first mask (see `bench.cold_start_child`)."""
    request = json.dumps({"model_dir": str(model_dir), "image": str(image_path), "threads": threads})
    command = [sys.executable, "-c", "from tinysam_rt.bench import cold_start_child; cold_start_child()", request]
    start = time.monotonic()  # CLOCK_MONOTONIC is system-wide on Linux, so the child can use it
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout or "no output").strip().splitlines()
        return {"threads": threads, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    marks = json.loads(proc.stdout.strip().splitlines()[-1])  # monotonic timestamps, see the child
    return {
        "threads": threads,
        "process_start_to_first_mask_s": marks["first_mask"] - start,
        "interpreter_s": marks["python_started"] - start,
        "import_s": marks["imported"] - marks["python_started"],
        "sessions_s": marks["sessions_ready"] - marks["imported"],
        "image_load_s": marks["image_loaded"] - marks["sessions_ready"],
        "first_set_image_s": marks["first_embedding"] - marks["image_loaded"],
        "first_predict_s": marks["first_mask"] - marks["first_embedding"],
        "cpu_s": marks["cpu_s"],
        "peak_rss_bytes": marks["peak_rss_bytes"],
    }


def write_image_for_child(image, directory):
    """Save the benchmark image as PNG so the cold-start child loads a file, as a user would."""
    path = os.path.join(directory, "bench_image.png")
    write_png(path, image)
    return path


def temp_dir():
    return tempfile.TemporaryDirectory(prefix="tinysam-bench-")
