"""Two model directories' points decoders head to head, interleaved in one process.

    python benchmarks/ab_points_decoder.py --a /tmp/old/vit_t --b models/vit_t \\
        --json benchmarks/results/ab_points_decoder.json

For two exports of the same weights (e.g. before and after a change to the points decoder graph).
A and B alternate call by call and run by run, so load drift lands on both alike:
- per prompt: everything-mode grid prompts (one point + SAM's padding point) in calls of each
  `--batches` size, image side cached, every mask computed, and one prompt computing the image
  side (an image's first click); `--rounds` calls each. The same embedding (A's encoder) feeds
  both points decoders, so only they differ;
- whole run: a 32 x 32 standard everything run with every mask computed (upscaler gate off),
  each side's own encoder included, `--mode-rounds` runs each.
It also reports how far apart their masks are on the same prompts. Not a test: nothing here
asserts speed.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from tinysam_rt.everything import AmgConfig
from tinysam_rt.io import load_image
from tinysam_rt.predictor import TinySAMPredictor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_everything import DEFAULT_IMAGE, WithoutGate, _grid_prompts, _run_ours, _stats, _table, finish_report, report_head  # noqa: E402

SIDES = ("A", "B")


def bench_calls(predictors, image, batches, rounds):
    """Per-prompt time of each side's points decoder at each batch size (image side cached) and for
    one prompt computing the image side; then the two sides' masks on the same prompts compared."""
    features = predictors["A"].embed(image).features
    caches = {side: {} for side in SIDES}  # each graph keeps its own image side
    decoders = {side: p._decoder.points_decoder for side, p in predictors.items()}
    calls = {b: _grid_prompts(image.shape[:2], b) for b in batches}
    # (label, batch, cache): the cached sizes, and one prompt computing the image side (an image's first click)
    cases = [(str(b), b, True) for b in batches] + [("1, image side computed", 1, False)]
    if 1 not in calls:
        calls[1] = _grid_prompts(image.shape[:2], 1)
    for side in SIDES:
        for b in calls:  # warm-up: the first call fills the cache and allocates each shape
            decoders[side].run(features, *calls[b], cache=caches[side])
    times = {(side, label): [] for side in SIDES for label, _, _ in cases}
    for _ in range(rounds):
        for label, b, cached in cases:
            for side in SIDES:
                start = time.perf_counter()
                decoders[side].run(features, *calls[b], cache=caches[side] if cached else None)
                times[(side, label)].append(time.perf_counter() - start)
    rows = []
    for label, b, _ in cases:
        stats = {side: _stats(times[(side, label)]) for side in SIDES}
        rows.append({"batch": label, **{f"{side}_ms_per_prompt_p50": stats[side]["p50_s"] / b * 1e3 for side in SIDES},
                     **{f"{side}_ms_per_prompt_min": stats[side]["min_s"] / b * 1e3 for side in SIDES}})
    masks = {side: decoders[side].run(features, *calls[max(batches)], cache=caches[side])[0] for side in SIDES}
    agreement = {"prompts": max(batches), "max_abs_logit_diff": float(np.abs(masks["A"] - masks["B"]).max()),
                 "mask_pixels_equal": float(((masks["A"] > 0) == (masks["B"] > 0)).mean())}
    return {"rows": rows, "agreement": agreement}


def bench_runs(predictors, image, points_per_side, points_per_batch, rounds):
    """Whole standard runs with every mask computed, A and B alternating."""
    config = AmgConfig(points_per_side=points_per_side, points_per_batch=points_per_batch)
    runs = {side: [] for side in SIDES}
    for _ in range(rounds):
        for side in SIDES:
            runs[side].append(_run_ours(WithoutGate(predictors[side]), image, config, None))
    return {side: {**_stats([r["seconds"] for r in entries]), "all_seconds": [r["seconds"] for r in entries],
                   "decoder_seconds": [r["decoder_seconds"] for r in entries], "masks": entries[0]["masks"]}
            for side, entries in runs.items()}


def render(report):
    calls = report["calls"]
    rows = [[r["batch"], *(f"{r[f'{s}_ms_per_prompt_p50']:.2f}" for s in SIDES),
             *(f"{r[f'{s}_ms_per_prompt_min']:.2f}" for s in SIDES),
             f"{r['A_ms_per_prompt_p50'] / r['B_ms_per_prompt_p50']:.3f}x"] for r in calls["rows"]]
    parts = [f"A = `{report['settings']['a']}`, B = `{report['settings']['b']}`; {report['settings']['rounds']} "
             f"calls per size, alternating A and B; every mask computed, image side cached unless said.",
             _table(["batch", "A p50 ms/prompt", "B p50 ms/prompt", "A min", "B min", "A / B (p50)"], rows),
             f"Same {calls['agreement']['prompts']} prompts: max |logit diff| A vs B "
             f"{calls['agreement']['max_abs_logit_diff']:.1e}, "
             f"{100 * calls['agreement']['mask_pixels_equal']:.4f}% of mask pixels equal."]
    if "runs" in report:
        runs, s = report["runs"], report["settings"]
        parts += [f"Whole {s['points_per_side']}x{s['points_per_side']} standard run, every mask computed, "
                  f"encoder included, points_per_batch {s['points_per_batch']}, runs alternating:",
                  _table(["side", "p50 s", "min s", "all runs s"],
                         [[side, f"{runs[side]['p50_s']:.2f}", f"{runs[side]['min_s']:.2f}",
                           ", ".join(f"{t:.2f}" for t in runs[side]["all_seconds"])] for side in SIDES]),
                  f"A / B (p50): {runs['A']['p50_s'] / runs['B']['p50_s']:.3f}x"]
    return "\n\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="model directory A (e.g. the previous export)")
    parser.add_argument("--b", type=Path, required=True, help="model directory B")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=20, help="timed calls per batch size and side")
    parser.add_argument("--mode-rounds", type=int, default=3, help="whole runs per side (0: none)")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=AmgConfig().points_per_batch)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.rounds < 1 or args.mode_rounds < 0:
        parser.error("--batches and --rounds must be >= 1, --mode-rounds >= 0")
    predictors = {side: TinySAMPredictor(model_dir=path, threads=args.threads, cache_size=0)
                  for side, path in zip(SIDES, (args.a, args.b))}
    weights = {side: p.manifest.weights_id for side, p in predictors.items()}
    if weights["A"] != weights["B"]:
        parser.error(f"A and B must hold the same weights, got {weights['A']!r} and {weights['B']!r}")
    for side, p in predictors.items():
        if p._decoder.points_decoder is None:
            parser.error(f"{side} ({p.manifest.model_dir}) has no points decoder")
    image = load_image(args.image)
    report = report_head("ab_points_decoder.py", argv, {
        "a": str(args.a), "b": str(args.b), "image": args.image.name, "threads": args.threads, "rounds": args.rounds,
        "points_per_side": args.points_per_side, "points_per_batch": args.points_per_batch})
    report["calls"] = bench_calls(predictors, image, args.batches, args.rounds)
    if args.mode_rounds:
        report["runs"] = bench_runs(predictors, image, args.points_per_side, args.points_per_batch, args.mode_rounds)
    return finish_report(report, args.json, render)


if __name__ == "__main__":
    sys.exit(main())
