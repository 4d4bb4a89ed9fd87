"""Everything-mode benchmark: decoder batching, standard vs hierarchical vs eager SAM, forced skip
fractions, peak memory, and where the decoder's time goes.

    python benchmarks/bench_everything.py --model models/vit_t --threads 2 \\
        --json benchmarks/results/everything.json --update-results

Parts (`--parts`, default all):
- decoder: time per prompt at several batch sizes of both decoder graphs of the model: the plain
  `decoder` (what a prompt with a mask input runs) and the `points_decoder` (what every
  everything-mode prompt runs), same prompts, round-robin within each run;
- modes: one photo, 32 x 32 points: standard, hierarchical (TinySAM's points), hierarchical
  (exact grid), standard on the plain decoder graph only, and eager
  `segment_anything.SamAutomaticMaskGenerator` on the same weights (needs torch); every run
  includes the encoder (cache disabled), as SAM's `generate` does;
- skip: hierarchical time when a forced fraction of the dense points is skipped (random weights
  give no confident masks, so nothing is skipped naturally; see `ForcedCoverage`);
- gate: standard mode with the points decoder's upscaler gate on and off, at IoU thresholds that
  gate a known share of the prompts (see `bench_gate`);
- rss: peak RSS of a 32 x 32 run on a 1024 x 1024 image, each configuration in a fresh process
  (and of SAM's generator for one 64-prompt batch, for contrast);
- profile: share of the points decoder's time per ONNX op type at batch 64 (ORT's profiler);
- stability: low-res (prefilter) vs full-resolution stability score;
- agreement: points decoder vs plain decoder outputs on the same everything-mode prompts.

With `--int8 DIR` (a `tinysam quantize --upscaler int8` directory), its points decoder joins the
decoder part (image side cached) and the profile part, its standard run (gate on and off) joins
the modes part, and the agreement part compares its masks with the FP32 points decoder's.
`--reference-runs N` repeats eager SAM and the official TinySAM generator, one of each per round
of our strategies.
`--decoder-workers N` (default 2) adds the standard runs with every mask computed on
`AmgConfig(decoder_workers=N)` to the modes part (1: not).
Not a test: nothing here asserts speed.
"""

import argparse
import collections
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tinysam_rt import amg, preprocess, prompts, sysinfo
from tinysam_rt.atomic import atomic_write_text
from tinysam_rt.everything import AmgConfig, HierarchicalConfig, TinySAMAutomaticMaskGenerator
from tinysam_rt.io import load_image
from tinysam_rt.predictor import TinySAMPredictor
from tinysam_rt.sessions import PromptDecoder

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTION = "## Everything mode"
DEFAULT_IMAGE = REPO.parent / "shared" / "images" / "picture1.jpg"
RSS_IMAGE = REPO.parent / "shared" / "images" / "picture3.jpg"
BATCH_SIZES = (1, 4, 8, 16, 32, 64, 128)
SKIP_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9)
GATE_FRACTIONS = (0.25, 0.5, 0.75)


def report_head(script, argv, settings):
    """The head of a benchmark's JSON report: the command that made it, when, on which machine.

    Args:
        script: file name under benchmarks/; argv: the arguments (None: sys.argv[1:]); settings: dict.
    """
    return {"command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "system": sysinfo.system_info(),
            "settings": settings}


def finish_report(report, json_path, render):
    """Stamp the end load average, write the JSON report (when a path is given), print it rendered.

    Returns:
        0, the exit code.
    """
    report["load_average_end"] = sysinfo.load_average()
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    sys.stdout.write(render(report))
    return 0


def _stats(times):
    times = np.asarray(times, dtype=np.float64)
    return {"p50_s": float(np.percentile(times, 50)), "p95_s": float(np.percentile(times, 95)),
            "min_s": float(times.min()), "runs": len(times)}


def _random_seed(manifest):
    """The seed a random-weight export was made from (eager SAM is rebuilt from it)."""
    weights = manifest.raw["weights"]
    if weights["source"] != "random":
        raise SystemExit("bench_everything: eager SAM comparisons need a --random-seed export "
                         "(or pass --no-torch)")
    return int(weights["seed"])


def _grid_prompts(image_size, count):
    """`count` everything-mode prompts (grid points + SAM's padding point), 1024 frame."""
    side = math.ceil(math.sqrt(count))
    points = amg.build_point_grid(side)[:count] * np.array(image_size[::-1])
    coords = preprocess.coords_to_input_frame(points, image_size, 1024)
    feed = np.stack([coords, np.zeros_like(coords)], axis=1)  # (B, 2, 2)
    return feed, np.tile(np.array([[1.0, -1.0]], np.float32), (count, 1))


# -- decoder batching ----------------------------------------------------------------------------


def _graph_runners(predictor):
    """{graph role: callable(coords, labels, embedding)} for the decoder graphs of the model."""
    decoder = predictor._decoder  # the PromptDecoder: both sessions, already loaded
    runners = {"decoder": lambda c, l, e: decoder.decoder.run(e.features, c, l, *prompts.mask_feeds(None, len(c)))}
    if decoder.points_decoder is not None:
        runners["points_decoder"] = lambda c, l, e: decoder.points_decoder.run(e.features, c, l)
        if decoder.points_decoder.gated:  # what predict and everything mode run after an image's first call
            runners["points_decoder, image side cached"] = \
                lambda c, l, e: decoder.points_decoder.run(e.features, c, l, cache=e.decoder_cache)
    return runners


def bench_decoder(predictor, image, runs, sizes=BATCH_SIZES, int8=None):
    embedding = predictor.embed(image)
    batches = {b: _grid_prompts(image.shape[:2], b) for b in sizes}
    runners = _graph_runners(predictor)
    if int8 is not None and int8._decoder.points_decoder is not None:
        points = int8._decoder.points_decoder  # same FP32 embedding: the decoder's own cost
        runners[f"points_decoder {points.graph.precision}, image side cached"] = \
            lambda c, l, e: points.run(e.features, c, l, cache=e.decoder_cache)
    for run in runners.values():
        for b in sizes:  # warm-up: first call at each shape allocates
            run(*batches[b], embedding)
    times = {(g, b): [] for g in runners for b in sizes}
    cpu = {(g, b): [] for g in runners for b in sizes}
    wait0 = sysinfo.runqueue_wait_s()
    for _ in range(runs):
        for b in sizes:  # round-robin: background load lands on every size and graph alike
            for graph, run in runners.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                run(*batches[b], embedding)
                times[(graph, b)].append(time.perf_counter() - start)
                cpu[(graph, b)].append(time.process_time() - cpu_start)
    rows = []
    for (graph, b), samples in times.items():
        s = _stats(samples)
        rows.append({"graph": graph, "batch": b, **s, "ms_per_prompt_p50": s["p50_s"] / b * 1e3,
                     "ms_per_prompt_min": s["min_s"] / b * 1e3, "prompts_per_s_p50": b / s["p50_s"],
                     "prompts_per_s_best": b / s["min_s"],
                     "cpu_ms_per_prompt_p50": float(np.median(cpu[(graph, b)])) / b * 1e3})
    return {"rows": rows, "runqueue_wait_s": sysinfo.runqueue_wait_s() - wait0}


def _agreement(reference, other, batch):
    """Two decoders' (logits, IoUs) on the same prompts: how far apart, per mask of each token."""
    from tinysam_export.fidelity import mask_iou  # numpy only, no torch

    (ref, ref_iou), (out, out_iou) = reference, other  # (B, 3, 256, 256), (B, 3)
    a, b = ref > 0, out > 0
    iou = mask_iou(a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]))  # (B * 3,)
    return {"batch": batch, "max_abs_logit_diff": float(np.abs(out - ref).max()),
            "mean_abs_logit_diff": float(np.abs(out - ref).mean()), "logit_std": float(ref.std()),
            "max_abs_iou_diff": float(np.abs(out_iou - ref_iou).max()),
            "mask_pixel_agreement": float((a == b).mean()),
            "mask_iou_mean": float(iou.mean()), "mask_iou_min": float(iou.min())}


def bench_agreement(predictor, image, batch=64, int8=None):
    """Points decoder vs plain decoder on the same everything-mode prompts (and the INT8-upscaler
    points decoder vs the FP32 one, on the same FP32 embedding)."""
    embedding = predictor.embed(image)
    runners = _graph_runners(predictor)
    if "points_decoder" not in runners:
        return None
    coords, labels = _grid_prompts(image.shape[:2], batch)
    plain, points = (runners[g](coords, labels, embedding) for g in ("decoder", "points_decoder"))
    result = _agreement(plain, points, batch)
    if int8 is not None and int8._decoder.points_decoder is not None:
        quantized = int8._decoder.points_decoder
        result["int8"] = {"precision": quantized.graph.precision,
                          **_agreement(points, quantized.run(embedding.features, coords, labels), batch)}
    return result


# -- strategies ----------------------------------------------------------------------------------


def _run_ours(predictor, image, config, hierarchical):
    wait0, start, cpu_start = sysinfo.runqueue_wait_s(), time.perf_counter(), time.process_time()
    result = TinySAMAutomaticMaskGenerator(predictor, config, hierarchical).run(image)
    seconds = time.perf_counter() - start
    stats = result.stats
    return {"mode": stats.mode, "seconds": seconds, "cpu_seconds": time.process_time() - cpu_start,
            "decoder_seconds": stats.decoder_seconds,
            "points_run": stats.points_run, "points_upscaled": stats.points_upscaled,
            "decoder_calls": stats.decoder_calls, "masks": stats.masks,
            "dense_skipped": stats.dense_skipped, "dense_candidates": stats.dense_candidates,
            "runqueue_wait_s": sysinfo.runqueue_wait_s() - wait0}


def _run_sam(torch_model, image, points_per_side, points_per_batch):
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(torch_model, points_per_side=points_per_side, points_per_batch=points_per_batch)
    wait0, start, cpu_start = sysinfo.runqueue_wait_s(), time.perf_counter(), time.process_time()
    records = generator.generate(image)
    return {"mode": "eager SamAutomaticMaskGenerator", "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,
            "points_run": points_per_side ** 2, "masks": len(records),
            "runqueue_wait_s": sysinfo.runqueue_wait_s() - wait0}


def _run_official_tinysam(repo, manifest, image, points_per_side):
    """The official TinySAM hierarchical generator (its defaults) on the predictor's weights."""
    sys.path.insert(0, str(HERE))
    from compare_official_tinysam import run_official

    from tinysam_export.model.build import save_random_checkpoint

    thresholds = dict(pred_iou_thresh=0.88, stability_score_thresh=0.95, high_score_thresh=8.5, box_nms_thresh=0.7)
    with tempfile.TemporaryDirectory(prefix="tinysam-official-") as tmp:
        checkpoint = save_random_checkpoint(Path(tmp) / "random.pth", seed=_random_seed(manifest))
        wait0, cpu_start = sysinfo.runqueue_wait_s(), time.process_time()
        records, passes, seconds = run_official(repo, checkpoint, image, points_per_side, thresholds)
    return {"mode": "eager TinySAM hierarchical (official code)", "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu_start, "points_run": sum(len(p) for p in passes),
            "masks": len(records), "runqueue_wait_s": sysinfo.runqueue_wait_s() - wait0}


def _run_ours_round(predictor, plain, int8, image, configs, results, decoder_workers=1):
    """One run of each of our strategies, appended to `results[mode]`."""
    for config, hierarchical in configs:
        entry = _run_ours(predictor, image, config, hierarchical)
        results[entry["mode"]].append(entry)
    standard = configs[0][0]
    extra = []
    if predictor.skips_low_iou_upscaling:
        extra.append(("standard, upscaler gate off", WithoutGate(predictor), standard))
    if predictor._decoder.points_decoder is not None:
        extra.append(("standard, plain decoder graph", plain, standard))
    if int8 is not None:
        extra += [("standard, INT8 model", int8, standard),
                  ("standard, INT8 model, upscaler gate off", WithoutGate(int8), standard)]
    if decoder_workers > 1:  # opt-in: AmgConfig.decoder_workers
        workers = dataclasses.replace(standard, decoder_workers=decoder_workers)
        suffix = f", {decoder_workers} decoder workers"
        extra.append(("standard, upscaler gate off" + suffix, WithoutGate(predictor), workers))
        if int8 is not None:
            extra.append(("standard, INT8 model, upscaler gate off" + suffix, WithoutGate(int8), workers))
    for name, runner, config in extra:
        entry = _run_ours(runner, image, config, None)
        entry["mode"] = name
        results[name].append(entry)


def bench_modes(predictor, image, points_per_side, points_per_batch, runs, torch_model, tinysam_repo=None, int8=None,
                reference_runs=1, decoder_workers=1):
    configs = [
        (AmgConfig(points_per_side=points_per_side, points_per_batch=points_per_batch), None),
        (AmgConfig(points_per_side=points_per_side, points_per_batch=points_per_batch), HierarchicalConfig()),
        (AmgConfig(points_per_side=points_per_side, points_per_batch=points_per_batch), HierarchicalConfig(dense_points="grid")),
    ]
    if decoder_workers > 1:  # load the single-thread sessions now, as the predictors' own were before timing
        for runner in (predictor, int8):
            if runner is not None:
                runner._decoder.single_threaded()
    # The same predictor on the plain decoder graph alone (a model directory without a points decoder).
    plain = predictor.clone()
    plain._decoder = PromptDecoder(predictor._decoder.decoder)
    results = collections.defaultdict(list)
    for round_index in range(max(runs, reference_runs)):  # interleaved: load drift lands on all alike
        if round_index < runs:
            _run_ours_round(predictor, plain, int8, image, configs, results, decoder_workers)
        if round_index < reference_runs:  # the eager references vary by a quarter run to run
            if torch_model is not None:
                entry = _run_sam(torch_model, image, points_per_side, points_per_batch)
                results[entry["mode"]].append(entry)
            if tinysam_repo is not None:
                entry = _run_official_tinysam(tinysam_repo, predictor.manifest, image, points_per_side)
                results[entry["mode"]].append(entry)
    summary = {}
    for mode, entries in results.items():
        seconds = [e["seconds"] for e in entries]
        summary[mode] = {**entries[0], **_stats(seconds), "all_seconds": seconds}
    return summary


class WithoutGate:
    """A predictor whose decoder computes every mask: `upscale_iou_threshold` is not passed on
    (what a points decoder exported before the gate does; the results are the same)."""

    skips_low_iou_upscaling = False

    def __init__(self, inner):
        self.inner, self.manifest = inner, inner.manifest

    def embed(self, image):
        return self.inner.embed(image)

    def predict_batch(self, point_coords, point_labels, mask_input=None, embedding=None, upscale_iou_threshold=None,
                      workers=1):
        return self.inner.predict_batch(point_coords, point_labels, mask_input, embedding, workers=workers)


def grid_best_iou(predictor, image, points_per_side, points_per_batch):
    """(P,) best of the 3 predicted IoUs of every standard-grid prompt (one decoder pass)."""
    embedding = predictor.embed(image)
    feed, labels = _grid_prompts(image.shape[:2], points_per_side ** 2)  # the standard grid, in order
    best = [predictor.predict_batch(feed[i:i + points_per_batch], labels[i:i + points_per_batch],
                                    embedding=embedding)[1].max(axis=1)
            for i in range(0, len(feed), points_per_batch)]
    return np.concatenate(best)


def bench_gate(predictor, image, points_per_side, points_per_batch, fractions=GATE_FRACTIONS):
    """Standard mode with the upscaler gate on and off, at pred_iou_thresh = the quantile of the
    grid's best predicted IoUs that leaves `fraction` of the prompts with every IoU at or below it.

    Random weights predict IoUs far below SAM's 0.88 (every prompt is skipped at the default), so
    the thresholds come from this model's own IoUs: real runs with real thresholds, a known share
    of prompts gated. Same outputs either way (checked: same masks)."""
    best = grid_best_iou(predictor, image, points_per_side, points_per_batch)
    rows = []
    for fraction in fractions:
        threshold = float(np.quantile(best, fraction))
        if not 0.0 <= threshold <= 1.0:
            continue
        config = AmgConfig(points_per_side=points_per_side, points_per_batch=points_per_batch,
                           pred_iou_thresh=threshold)
        gated = _run_ours(predictor, image, config, None)
        plain = _run_ours(WithoutGate(predictor), image, config, None)
        if gated["masks"] != plain["masks"]:
            raise RuntimeError(f"the gate changed the result at {threshold}: {gated['masks']} vs {plain['masks']} masks")
        rows.append({"fraction": fraction, "pred_iou_thresh": threshold, "gated": gated, "ungated": plain})
    return {"best_iou_range": [float(best.min()), float(best.max())], "rows": rows}


class ForcedCoverage:
    """A predictor that runs the real decoder for every prompt, then makes the sparse pass cover
    the top `fraction` of the image: for the first `n_sparse` prompts, token 1 becomes a band
    mask (logit +20 above the line, -20 below) with predicted IoU 0.99.

    The dense points above the line are then skipped by the generator's own logic, so the decoder
    work really shrinks; everything else (decoding, filters, NMS) is the real thing.
    """

    def __init__(self, inner, fraction, n_sparse):
        self.inner, self.manifest = inner, inner.manifest
        self.fraction, self.remaining = fraction, n_sparse

    def embed(self, image):
        return self.inner.embed(image)

    skips_low_iou_upscaling = False

    def predict_batch(self, point_coords, point_labels, mask_input=None, embedding=None, upscale_iou_threshold=None):
        # No upscaler gate: this sweep measures coverage skipping alone (random weights would let
        # the gate skip nearly every upscale; `bench_gate` measures that on its own).
        low_res, iou = self.inner.predict_batch(point_coords, point_labels, mask_input, embedding)
        count = min(self.remaining, len(low_res))
        if count and self.fraction > 0:
            rows = int(round(self.fraction * embedding.input_size[0] * low_res.shape[-1] / 1024))
            low_res[:count, 0] = -20.0
            low_res[:count, 0, :rows] = 20.0
            iou[:count, 0] = 0.99
        self.remaining -= count
        return low_res, iou


def bench_skip(predictor, image, points_per_side, points_per_batch, fractions=SKIP_FRACTIONS):
    rows = []
    config = AmgConfig(points_per_side=points_per_side, points_per_batch=points_per_batch)
    n_sparse = (points_per_side // 4) ** 2
    for fraction in fractions:
        entry = _run_ours(ForcedCoverage(predictor, fraction, n_sparse), image, config, HierarchicalConfig())
        entry["forced_fraction"] = fraction
        entry["skipped_fraction"] = entry["dense_skipped"] / max(entry["dense_candidates"], 1)
        rows.append(entry)
    return rows


# -- memory (fresh processes) --------------------------------------------------------------------


def rss_image():
    """A 1024 x 1024 RGB photo: the centre square of picture3.jpg, area-resized."""
    import cv2

    photo = load_image(RSS_IMAGE)
    side = min(photo.shape[:2])
    y0, x0 = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    return cv2.resize(photo[y0:y0 + side, x0:x0 + side], (1024, 1024), interpolation=cv2.INTER_AREA)


RSS_CONFIGS = {
    # SAM's defaults: with random weights almost nothing passes, so this is the decode-only floor.
    "ours 32x32 defaults (points_per_batch 16)": dict(points_per_side=32),
    "ours 32x32, points_per_batch 64 (SAM's default)": dict(points_per_side=32, points_per_batch=64),
    # Every mask of every prompt is upsampled to 1024 x 1024 (IoU filter off, no low-res prefilter)
    # and then rejected on its exact stability: the worst case of the bounded upsampling path.
    "ours 32x32 upsample every mask (points_per_batch 16)": dict(points_per_side=32, pred_iou_thresh=0.0, stability_prefilter_margin=1.0),
}


def rss_child(name, model_dir, threads):
    """Run one configuration in this (fresh) process; print JSON with RSS figures."""
    image = rss_image()
    if name == "sam":
        from segment_anything import SamAutomaticMaskGenerator
        from tinysam_export.model.build import build_tinysam

        from tinysam_rt.manifest import load_manifest

        model = build_tinysam(checkpoint=None, seed=_random_seed(load_manifest(model_dir)))
        generator = SamAutomaticMaskGenerator(model, points_per_side=8)  # one batch of 64 prompts
        generator.predictor.set_image(image)
        before = sysinfo.current_rss_bytes(), sysinfo.peak_rss_bytes()
        generator.generate(image)
    elif name.startswith("decoder-"):  # one predict_batch call of B prompts
        predictor = TinySAMPredictor(model_dir=model_dir, threads=threads)
        embedding = predictor.embed(image)
        batch = int(name.split("-")[1])
        before = sysinfo.current_rss_bytes(), sysinfo.peak_rss_bytes()
        predictor.predict_batch(*_grid_prompts(image.shape[:2], batch), embedding=embedding)
    else:
        predictor = TinySAMPredictor(model_dir=model_dir, threads=threads)
        predictor.embed(image)
        before = sysinfo.current_rss_bytes(), sysinfo.peak_rss_bytes()
        TinySAMAutomaticMaskGenerator(predictor, AmgConfig(**RSS_CONFIGS[name])).run(image)
    print(json.dumps({"rss_after_setup_bytes": before[0], "peak_before_run_bytes": before[1],
                      "peak_bytes": sysinfo.peak_rss_bytes()}))


def bench_rss(model_dir, threads, with_torch):
    names = [f"decoder-{b}" for b in (1, 8, 16, 32, 64)] + list(RSS_CONFIGS) + (["sam"] if with_torch else [])
    out = {}
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--rss-child", name, "--model", str(model_dir),
                               "--threads", str(threads)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"rss child {name!r} failed:\n{proc.stderr}")
        label = {"sam": "eager SAM, 8x8 (one 64-prompt batch)"}.get(name, name.replace("decoder-", "one predict_batch, B="))
        out[label] = json.loads(proc.stdout.splitlines()[-1])
    return out


# -- decoder profile -----------------------------------------------------------------------------


CONTROL_FLOW_OPS = ("Scan", "Loop", "If")


def bench_profile(model_dir, threads, image, batch=64, runs=3, int8_dir=None):
    """Share of ORT node time per op type, for each decoder graph at `batch` (profiling sessions),
    and for the points decoder of `int8_dir` if given."""
    import onnxruntime as ort

    from tinysam_rt.manifest import load_manifest
    from tinysam_rt.sessions import make_session_options

    manifest = load_manifest(model_dir)
    predictor = TinySAMPredictor(model_dir=model_dir, threads=threads)
    embedding = predictor.embed(image)
    coords, labels = _grid_prompts(image.shape[:2], batch)
    feeds = {"image_embeddings": embedding.features, "point_coords": coords, "point_labels": labels,
             "mask_input": np.zeros((batch, 1, 256, 256), np.float32), "has_mask_input": np.zeros(batch, np.float32),
             "upscale_iou_threshold": np.array(-np.inf, np.float32)}  # the points decoder's gate: every mask
    if predictor.skips_low_iou_upscaling:  # its image side cached, as everything mode runs it
        predictor.predict_batch(coords[:1], labels[:1], embedding=embedding)
        (feeds["image_side_cache"],) = embedding.decoder_cache.values()
    out = {}
    extra = None if int8_dir is None else load_manifest(int8_dir).points_decoder
    for graph in (manifest.decoder, manifest.points_decoder, extra):
        if graph is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            options = make_session_options(threads)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / graph.role)
            session = ort.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])
            graph_feeds = {arg.name: feeds[arg.name] for arg in session.get_inputs()}
            for _ in range(runs + 1):
                session.run(None, graph_feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        by_op = collections.Counter()
        for event in events:
            # A Scan's time is its body's nodes, which the profile lists too: count those only.
            if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                    and event["args"]["op_name"] not in CONTROL_FLOW_OPS):
                by_op[event["args"]["op_name"]] += event["dur"]
        total = sum(by_op.values())
        name = graph.role if graph is not extra else f"{graph.role} ({graph.precision})"
        out[name] = {"ms_per_prompt": total / 1e3 / (runs + 1) / batch,
                     "shares": {k: v / total for k, v in by_op.most_common(10)}}
    return {"batch": batch, "runs": runs + 1, "graphs": out}


# -- low-res vs full-resolution stability score ----------------------------------------------------


def bench_stability(predictor, image, fields=300, seed=0):
    """How far the 256 x 256 stability score (the prefilter) is from SAM's full-resolution one.

    On smooth random logit fields (Gaussian-blurred noise, random slopes: the shape of trained
    mask logits) and on the random-weight decoder's outputs for an 8 x 8 grid on the photo.
    """
    import cv2

    from tinysam_rt import postprocess

    rng = np.random.default_rng(seed)
    input_size = preprocess.preprocess_shape(*image.shape[:2], 1024)
    rows, cols = math.ceil(input_size[0] / 4), math.ceil(input_size[1] / 4)

    def scores(low_res):  # (K, 256, 256) -> (low-res, full-res) stability
        coarse = amg.calculate_stability_score(low_res[:, :rows, :cols], 0.0, 1.0)
        full = np.concatenate([amg.calculate_stability_score(
            postprocess.upscale_logits(low_res[i:i + 8, None], input_size, image.shape[:2])[:, 0], 0.0, 1.0)
            for i in range(0, len(low_res), 8)])
        return coarse, full

    smooth = []
    for _ in range(fields):
        field = cv2.GaussianBlur(rng.normal(size=(256, 256)).astype(np.float32), (0, 0), sigmaX=rng.uniform(4, 20))
        field = (field - np.median(field) * rng.uniform(0.5, 1.5)) / field.std()
        smooth.append(field * rng.uniform(3, 24))  # 3..24 logits per field std
    out = {}
    embedding = predictor.embed(image)
    low_res, _ = predictor.predict_batch(*_grid_prompts(image.shape[:2], 64), embedding=embedding)
    for name, low in (("smooth random fields", np.stack(smooth).astype(np.float32)),
                      ("random-weight decoder, 64 prompts x 3", low_res.reshape(-1, 256, 256))):
        coarse, full = scores(low)
        diff = full - coarse
        out[name] = {"count": len(diff), "full_res_range": [float(full.min()), float(full.max())],
                     "diff_min": float(diff.min()), "diff_p50": float(np.median(diff)), "diff_max": float(diff.max())}
    return out


# -- report --------------------------------------------------------------------------------------


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


TINYSAM_EAGER_HIERARCHICAL_S = 142.8  # the issue's measurement (official TinySAM code, same photo, 2 cores)


def findings(report):
    """The conclusions the tables support, as Markdown bullets (numbers read from the report)."""
    lines = []
    if "decoder" in report:
        rows = report["decoder"]["rows"]
        by_graph = {g: [r for r in rows if r["graph"] == g] for g in ("decoder", "points_decoder")}
        plain = by_graph["decoder"]
        best_plain = max(plain, key=lambda r: r["prompts_per_s_p50"])
        text = (f"- The plain decoder graph does not gain from batching: {min(r['prompts_per_s_p50'] for r in plain):.0f}"
                f"-{best_plain['prompts_per_s_p50']:.0f} prompts/s (p50) at every batch size, because every prompt "
                "drags its own copy of the image side through the two-way transformer.")
        points = by_graph["points_decoder"]
        if points:
            best = max(points, key=lambda r: r["prompts_per_s_p50"])
            same = next(r for r in plain if r["batch"] == best["batch"])
            one = next((r for r in points if r["batch"] == 1), None)
            text += (f" The points decoder (layer 0's image side once per call, or once per image from its cache, "
                     f"later image-side projections "
                     f"multiplied through the tokens, final attention for the 4 tokens read after it, GEMM upscaler "
                     f"one prompt at a time, its first GEMM factored in exports since session 11) reaches {best['prompts_per_s_p50']:.1f} prompts/s "
                     f"(p50; best run {best['prompts_per_s_best']:.1f}) at B={best['batch']}, "
                     f"{same['p50_s'] / best['p50_s']:.2f}x the plain graph at that batch; the goal is 60.")
            if one:
                text += f" At B=1 (interactive clicks) it takes {one['p50_s'] * 1e3:.1f} ms per call."
        cached = [r for r in rows if r["graph"] == "points_decoder, image side cached"]
        if points and cached:
            pairs = [(next(r for r in points if r["batch"] == c["batch"]), c) for c in cached if c["batch"] in (1, 16)]
            text += (" Reading the per-image part of layer 0 from the image's cache (as predict and everything mode "
                     "do after an image's first call): " + ", ".join(
                         f"B={c['batch']} {u['ms_per_prompt_p50']:.1f} -> {c['ms_per_prompt_p50']:.1f} ms per prompt"
                         for u, c in pairs) + ".")
        lines.append(text)
    if "rss" in report:
        rss = {k: v["peak_bytes"] / 2**20 for k, v in report["rss"].items()}
        ours = next((v for k, v in rss.items() if k.startswith("ours 32x32 defaults")), None)
        big = next((v for k, v in rss.items() if "points_per_batch 64" in k), None)
        every = next((v for k, v in rss.items() if "upsample every mask" in k), None)
        b16, b64 = rss.get("one predict_batch, B=16"), rss.get("one predict_batch, B=64")
        if ours and big and every and b16 and b64:
            lines.append(f"- Memory is ONNX Runtime's arena: one decoder call needs ~{(b64 - b16) / 48:.0f} MiB more per "
                         f"prompt, and the arena grows again on the second call, so a 32x32 run peaks at {big:.0f} MiB "
                         f"with 64 prompts per batch and {ours:.0f} MiB with 16. Hence `points_per_batch` defaults to 16 "
                         "(not SAM's 64): same speed, a third of the memory. Our own buffers are small: upsampling "
                         f"every mask of every prompt to 1024 x 1024 adds {every - ours:.0f} MiB.")
    modes = report.get("modes", {})
    std, sam = modes.get("standard"), modes.get("eager SamAutomaticMaskGenerator")
    official = modes.get("eager TinySAM hierarchical (official code)")
    off = modes.get("standard, upscaler gate off")
    reference_s = official["p50_s"] if official else TINYSAM_EAGER_HIERARCHICAL_S
    reference = ("the official TinySAM code's eager hierarchical run on the same weights in this run "
                 f"({reference_s:.1f} s, {official['points_run']} prompts; the issue measured "
                 f"{TINYSAM_EAGER_HIERARCHICAL_S} s on its machine)" if official else
                 f"TinySAM's eager hierarchical run ({reference_s} s, the issue's measurement; not run here "
                 "without --tinysam-repo)")
    if std and sam:
        side = report["settings"]["points_per_side"]
        text = (f"- Standard {side}x{side} on the photo at SAM's thresholds: {std['p50_s']:.1f} s vs eager "
                f"SamAutomaticMaskGenerator {sam['p50_s']:.1f} s on the same weights ({sam['p50_s'] / std['p50_s']:.1f}x), "
                f"{reference_s / std['p50_s']:.1f}x faster than {reference}; the goal is 10x.")
        if off and std.get("points_upscaled") is not None:
            text += (f" Masks were upscaled for {std['points_upscaled']} of {std['points_run']} prompts: the gate "
                     "skips the upscaler of prompts whose 3 predicted IoUs are all <= pred_iou_thresh (0.88), and "
                     "these random weights predict every IoU below it, so this is the gate's best case. With the "
                     f"gate off, every mask computed (a real checkpoint's cost when every prompt passes): "
                     f"{off['p50_s']:.1f} s, {sam['p50_s'] / off['p50_s']:.1f}x SAM and {reference_s / off['p50_s']:.1f}x "
                     "the TinySAM run.")
            if std["points_upscaled"] == 0 and off["p50_s"] > reference_s / 10 > std["p50_s"]:
                needed = (off["p50_s"] - reference_s / 10) / (off["p50_s"] - std["p50_s"])
                text += (f" Interpolating between the two, 10x needs about {needed * 100:.0f}% of prompts gated, "
                         "which only a real checkpoint can show (measured below with real thresholds that gate a "
                         "known share).")
        lines.append(text)
    plain_mode = modes.get("standard, plain decoder graph")
    ungated = off or std
    if ungated and plain_mode:
        lines.append(f"- The same standard run on the plain decoder graph alone takes {plain_mode['p50_s']:.1f} s: the "
                     f"points decoder, every mask computed, makes the whole run "
                     f"{plain_mode['p50_s'] / ungated['p50_s']:.2f}x faster.")
    gate = report.get("gate")
    if gate and gate["rows"]:
        shares = ", ".join(f"{r['fraction'] * 100:.0f}%: {r['ungated']['seconds'] / r['gated']['seconds']:.2f}x"
                           for r in gate["rows"])
        lines.append(f"- The upscaler gate at thresholds that gate a known share of the prompts speeds the "
                     f"standard run up by {shares}.")
    hier = modes.get("hierarchical-tinysam")
    if hier and std and report.get("skip"):
        half = min(report["skip"], key=lambda r: abs(r["skipped_fraction"] - 0.5))
        sparse = hier["points_run"] - hier["dense_candidates"]
        needed = 1 - (std["points_run"] / 2 - sparse) / hier["dense_candidates"]
        lines.append(f"- Hierarchical mode only pays when sparse masks are confident: with random weights nothing "
                     f"is covered and it runs {hier['points_run']} prompts ({sparse} sparse + "
                     f"{hier['dense_candidates']} dense), as many as the standard grid. Forcing coverage, time falls "
                     f"with the prompts run: {half['skipped_fraction'] * 100:.0f}% of dense points skipped gives "
                     f"{report['skip'][0]['cpu_seconds'] / half['cpu_seconds']:.2f}x (CPU time); TinySAM's ~2x over "
                     f"the standard grid needs {needed * 100:.0f}% of dense points skipped.")
    int8_on, int8_off = modes.get("standard, INT8 model"), modes.get("standard, INT8 model, upscaler gate off")
    agreement = report.get("agreement")
    if int8_off and off:
        kinds = report["settings"]["int8"]
        text = (f"- The INT8 model ({kinds['encoder']} encoder, {kinds.get('points_decoder', 'no')} points decoder), "
                f"every mask computed: {int8_off['p50_s']:.1f} s vs FP32 {off['p50_s']:.1f} s "
                f"({off['p50_s'] / int8_off['p50_s']:.2f}x; decoder {int8_off['decoder_seconds']:.1f} vs "
                f"{off['decoder_seconds']:.1f} s), {reference_s / int8_off['p50_s']:.1f}x the TinySAM run"
                + (f" and {sam['p50_s'] / int8_off['p50_s']:.1f}x eager SAM" if sam else "")
                + (f"; gate on (best case here): {int8_on['p50_s']:.1f} s." if int8_on else "."))
        quantized = (agreement or {}).get("int8")
        if quantized:
            text += (f" Its points decoder vs the FP32 one on {quantized['batch']} grid prompts, same FP32 embedding: "
                     f"predicted IoUs differ by at most {quantized['max_abs_iou_diff']:.1e} (the IoU head runs before "
                     f"the upscaler), mask IoU per token mean {quantized['mask_iou_mean']:.4f}, worst "
                     f"{quantized['mask_iou_min']:.4f}, {quantized['mask_pixel_agreement'] * 100:.2f}% of pixels equal; "
                     f"|logit diff| mean {quantized['mean_abs_logit_diff']:.3f}, max {quantized['max_abs_logit_diff']:.3f} "
                     f"against a logit spread (std) of {quantized['logit_std']:.2f}: these random weights put much of "
                     "every mask near the 0 threshold, which a real checkpoint's masks may not (not measurable here).")
        lines.append(text)
    workers = report.get("settings", {}).get("decoder_workers", 1)
    suffix = f", {workers} decoder workers"
    pairs = [(name, modes.get(name), modes.get(name + suffix)) for name in
             ("standard, upscaler gate off", "standard, INT8 model, upscaler gate off")]
    pairs = [(name, one, many) for name, one, many in pairs if one and many]
    if pairs:
        lines.append(f"- {workers} decoder workers (opt-in `AmgConfig.decoder_workers` / `--decoder-workers`: "
                     f"{workers} batches side by side, each on a single-thread session), every mask computed: " + "; ".join(
                         f"{'INT8' if 'INT8' in name else 'FP32'} {many['p50_s']:.1f} vs {one['p50_s']:.1f} s "
                         f"({one['p50_s'] / many['p50_s']:.2f}x), {reference_s / many['p50_s']:.1f}x the TinySAM run"
                         for name, one, many in pairs) + ".")
    if agreement:
        lines.append(f"- Points decoder vs plain decoder on {agreement['batch']} everything-mode prompts: max |logit "
                     f"diff| {agreement['max_abs_logit_diff']:.1e}, max |IoU diff| {agreement['max_abs_iou_diff']:.1e}, "
                     f"{agreement['mask_pixel_agreement'] * 100:.4f}% of mask pixels equal (only the order of "
                     "summation differs).")
    return "\n".join(lines)


def render(report):
    parts = []
    summary = findings(report)
    if summary:
        parts.append("Findings:\n\n" + summary)
    if "decoder" in report:
        rows = [[r["graph"], r["batch"], f"{r['p50_s'] * 1e3:.0f}", f"{r['p95_s'] * 1e3:.0f}", f"{r['min_s'] * 1e3:.0f}",
                 f"{r['ms_per_prompt_p50']:.1f}", f"{r['ms_per_prompt_min']:.1f}", f"{r['prompts_per_s_p50']:.1f}",
                 f"{r['cpu_ms_per_prompt_p50']:.1f}"]
                for r in sorted(report["decoder"]["rows"], key=lambda r: (r["graph"], r["batch"]))]
        parts.append("Decoder graphs (FP32 unless named, everything-mode prompts: one grid point + SAM's padding point) by batch "
                     f"size, {report['settings']['runs']} runs after one warm-up, round-robin over sizes and graphs "
                     f"(run-queue wait during the part: {report['decoder']['runqueue_wait_s']:.1f} s):\n\n"
                     + _table(["graph", "batch", "p50 ms/call", "p95 ms/call", "min ms/call", "p50 ms/prompt",
                               "min ms/prompt", "prompts/s (p50)", "CPU ms/prompt (p50, all threads)"], rows))
    if "modes" in report:
        modes = report["modes"]
        sam = modes.get("eager SamAutomaticMaskGenerator")
        rows = []
        for mode, r in modes.items():
            ratio = f"{sam['p50_s'] / r['p50_s']:.1f}x" if sam else "n/a"
            decoder = f"{r['decoder_seconds']:.1f}" if "decoder_seconds" in r else "n/a"
            cpu_ratio = f"{sam['cpu_seconds'] / r['cpu_seconds']:.1f}x" if sam else "n/a"
            rows.append([mode, r["points_run"], r.get("points_upscaled", "n/a"), f"{r['p50_s']:.1f}", f"{r['min_s']:.1f}", decoder,
                         f"{r['points_run'] / r['p50_s']:.1f}", r["masks"], ratio, f"{r['cpu_seconds']:.0f}",
                         cpu_ratio, f"{r['runqueue_wait_s']:.1f}"])
        parts.append(f"{report['settings']['points_per_side']}x{report['settings']['points_per_side']} on "
                     f"`{report['settings']['image']}` {report['settings']['image_size']}, SAM's default "
                     f"thresholds, encoder included, points_per_batch {report['settings']['points_per_batch']}:\n\n"
                     + _table(["strategy", "prompts run", "masks upscaled for", "p50 s", "min s", "decoder s (1st run)", "prompts/s",
                               "masks", "eager SAM / this (wall)", "CPU s (1st run)", "eager SAM / this (CPU)",
                               "run-queue wait s"], rows))
    if "skip" in report:
        base, base_cpu = report["skip"][0]["seconds"], report["skip"][0]["cpu_seconds"]
        rows = [[f"{r['forced_fraction']:.2f}", f"{r['skipped_fraction']:.3f}", r["points_run"], f"{r['seconds']:.1f}",
                 f"{r['decoder_seconds']:.1f}", f"{base / r['seconds']:.2f}x", f"{r['cpu_seconds']:.0f}",
                 f"{base_cpu / r['cpu_seconds']:.2f}x"] for r in report["skip"]]
        std = report.get("modes", {}).get("standard")
        side = report["settings"]["points_per_side"]
        note = (f" Standard {side}x{side} in the table above: {std['p50_s']:.1f} s (p50)." if std else "")
        parts.append("Hierarchical (TinySAM points) with a forced skip fraction (`ForcedCoverage`: the sparse "
                     "masks are replaced by a confident band over the top fraction of the image; the real "
                     "decoder still runs every prompt), one run each:" + note + "\n\n"
                     + _table(["forced", "dense skipped", "prompts run", "total s", "decoder s",
                               "speed-up vs no skip (wall)", "CPU s", "speed-up (CPU)"], rows))
    if "gate" in report:
        rows = [[f"{r['fraction']:.2f}", f"{r['pred_iou_thresh']:.4f}", r["gated"]["points_upscaled"],
                 f"{r['gated']['seconds']:.1f}", f"{r['ungated']['seconds']:.1f}",
                 f"{r['ungated']['seconds'] / r['gated']['seconds']:.2f}x",
                 f"{r['gated']['decoder_seconds']:.1f}", f"{r['ungated']['decoder_seconds']:.1f}", r["gated"]["masks"]]
                for r in report["gate"]["rows"]]
        side = report["settings"]["points_per_side"]
        low, high = report["gate"]["best_iou_range"]
        parts.append(f"Upscaler gate, standard {side}x{side}, one run each: pred_iou_thresh set to the quantile of "
                     "this model's best predicted IoU per grid prompt that leaves the given share of prompts with "
                     f"all 3 IoUs at or below it (random weights predict IoUs {low:.2f}..{high:.2f}, "
                     "so SAM's 0.88 would gate them all); 'off' computes every mask; the mask counts are checked equal "
                     "(here 0: SAM's 0.95 stability filter leaves no random-weight mask), identical records "
                     "on and off are a test (tests/test_everything.py):\n\n"
                     + _table(["gated share", "pred_iou_thresh", "prompts upscaled", "gate on s", "gate off s",
                               "speed-up", "decoder s (on)", "decoder s (off)", "masks"], rows))
    if "rss" in report:
        rows = [[name, f"{r['rss_after_setup_bytes'] / 2**20:.0f}", f"{r['peak_before_run_bytes'] / 2**20:.0f}",
                 f"{r['peak_bytes'] / 2**20:.0f}"] for name, r in report["rss"].items()]
        parts.append("Peak RSS, 1024 x 1024 image (centre square of picture3.jpg), each row a fresh process:\n\n"
                     + _table(["configuration", "RSS after model + embedding MiB", "peak before run MiB",
                               "peak after run MiB"], rows))
    if "profile" in report:
        prof = report["profile"]
        roles = list(prof["graphs"])
        ops = list(dict.fromkeys(op for g in prof["graphs"].values() for op in g["shares"]))
        rows = [[op] + [f"{prof['graphs'][g]['shares'].get(op, 0) * 100:.1f}%" for g in roles] for op in ops]
        rows.append(["kernel ms per prompt"] + [f"{prof['graphs'][g]['ms_per_prompt']:.1f}" for g in roles])
        parts.append(f"Where the decoder graphs' time goes at batch {prof['batch']} (ORT profiler, node kernel time "
                     f"per op type summed over {prof['runs']} runs, a Scan counted through its body's nodes; "
                     f"profiling adds overhead"
                     + (f"; re-measured alone with `{report['profile_command']}`" if "profile_command" in report else "")
                     + "):\n\n"
                     + _table(["op type", *roles], rows))
    if "stability" in report:
        rows = [[name, r["count"], f"{r['full_res_range'][0]:.3f}..{r['full_res_range'][1]:.3f}",
                 f"{r['diff_min']:+.4f}", f"{r['diff_p50']:+.4f}", f"{r['diff_max']:+.4f}"]
                for name, r in report["stability"].items()]
        parts.append("Stability score at full resolution (SAM) minus at 256 x 256 inside the unpadded area "
                     "(the prefilter, margin 0.05):\n\n"
                     + _table(["logits", "masks", "full-res score range", "min diff", "median diff", "max diff"], rows))
    return "\n\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="FP32 model directory (required unless --render)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of the decoder part")
    parser.add_argument("--mode-runs", type=int, default=1, help="timed runs of each of our strategies")
    parser.add_argument("--reference-runs", type=int, default=1,
                        help="timed runs of eager SAM and the official TinySAM generator (modes part)")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=AmgConfig().points_per_batch)
    parser.add_argument("--decoder-workers", type=int, default=2, metavar="N",
                        help="modes part: also run the ungated standard strategies with AmgConfig.decoder_workers=N "
                             "(1: not)")
    parser.add_argument("--parts", default="decoder,modes,skip,gate,rss,profile,stability,agreement")
    parser.add_argument("--tinysam-repo", type=Path, help="checkout of xinghaochen/TinySAM: also time its eager "
                        "hierarchical generator (modes part)")
    parser.add_argument("--no-torch", action="store_true", help="skip eager SAM (modes, rss)")
    parser.add_argument("--int8", type=Path, default=None, metavar="DIR",
                        help="also time this INT8 model directory (e.g. tinysam quantize --upscaler int8) in the "
                             "decoder, modes and agreement parts")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--update-results", action="store_true", help=f"rewrite '{SECTION}' in RESULTS.md")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="re-render a saved --json report (no measuring); with --update-results")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.model, args.threads)
        return 0
    if args.render:
        return _publish(json.loads(args.render.read_text()), args.update_results)

    if args.model is None:
        parser.error("--model is required")
    parts = set(args.parts.split(","))
    image = load_image(args.image)
    report = report_head("bench_everything.py", argv, {
        "runs": args.runs, "threads": args.threads, "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch, "decoder_workers": args.decoder_workers,
        "image": args.image.name, "image_size": list(image.shape[:2])})
    predictor = TinySAMPredictor(model_dir=args.model, threads=args.threads, cache_size=0)
    int8 = None if args.int8 is None else TinySAMPredictor(model_dir=args.int8, threads=args.threads, cache_size=0)
    if int8 is not None:
        report["settings"]["int8"] = {"model": str(args.int8), **{g.role: g.precision for g in int8.manifest.graphs}}

    def save():  # after every part: a late failure keeps what was measured
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")

    if "decoder" in parts:
        report["decoder"] = bench_decoder(predictor, image, args.runs, int8=int8)
        save()
    if "modes" in parts:
        torch_model = None
        if not args.no_torch:
            import torch

            from tinysam_export.model.build import build_tinysam

            torch.set_num_threads(args.threads)
            torch_model = build_tinysam(checkpoint=None, seed=_random_seed(predictor.manifest))
        report["modes"] = bench_modes(predictor, image, args.points_per_side, args.points_per_batch,
                                      args.mode_runs, torch_model, args.tinysam_repo, int8, args.reference_runs,
                                      args.decoder_workers)
        save()
    if "skip" in parts:
        report["skip"] = bench_skip(predictor, image, args.points_per_side, args.points_per_batch)
        save()
    if "gate" in parts and predictor.skips_low_iou_upscaling:
        report["gate"] = bench_gate(predictor, image, args.points_per_side, args.points_per_batch)
        save()
    if "rss" in parts:
        report["rss"] = bench_rss(args.model, args.threads, not args.no_torch)
        save()
    if "profile" in parts:
        report["profile"] = bench_profile(args.model, args.threads, image, int8_dir=args.int8)
        save()
    if "stability" in parts:
        report["stability"] = bench_stability(predictor, image)
        save()
    if "agreement" in parts:
        report["agreement"] = bench_agreement(predictor, image, int8=int8)
        save()
    report["load_average_end"] = sysinfo.load_average()
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return _publish(report, args.update_results)


def _publish(report, update_results):
    """Print the Markdown tables; with update_results, rewrite this benchmark's RESULTS.md section."""
    markdown = render(report)
    sys.stdout.write(markdown)
    if update_results:
        sys.path.insert(0, str(HERE))
        from update_results import _machine_line, replace_section

        system = report["system"]
        results = HERE / "RESULTS.md"
        body = "\n\n".join([
            f"Command ({report['started_at']}; the model directory is `tinysam export --random-seed 0`):\n\n"
            f"    {report['command']}",
            _machine_line(system, system["load_average"], report["load_average_end"]),
            markdown,
        ])
        text = results.read_text() if results.exists() else "# Benchmark results\n"
        atomic_write_text(results, replace_section(text, SECTION, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
