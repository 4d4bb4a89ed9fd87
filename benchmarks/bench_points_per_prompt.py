"""Points decoder vs plain decoder as the points per prompt grow, interleaved in one process.

    python benchmarks/bench_points_per_prompt.py --model models/vit_t \\
        --json benchmarks/results/points_per_prompt.json

The points decoder multiplies the later image-side projections through the prompt's tokens, so
its work grows with the points per prompt while the plain decoder's hardly does; the runtime sends
prompts of more than `sessions.POINTS_DECODER_MAX_POINTS` points to the plain decoder. This
measures where the two cross: prompts of N points (N - 1 random points and SAM's padding point, as
`predict` packs a click prompt), `--batches` prompts per call, the image side cached, every mask
computed; the two decoders alternate call by call, `--rounds` calls each. Not a test: nothing here
asserts speed.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from tinysam_rt.manifest import load_manifest
from tinysam_rt.prompts import PAD_LABEL
from tinysam_rt.sessions import POINTS_DECODER_MAX_POINTS, load_decoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_everything import finish_report, report_head  # noqa: E402


def _prompts(rng, batch, points):
    """(B, N, 2) float32 coords in the 1024 frame and (B, N) labels: N - 1 foreground points and
    the padding point."""
    coords = np.concatenate([rng.uniform(0, 1024, (batch, points - 1, 2)), np.zeros((batch, 1, 2))], axis=1)
    labels = np.concatenate([np.ones((batch, points - 1)), np.full((batch, 1), PAD_LABEL)], axis=1)
    return coords.astype(np.float32), labels.astype(np.float32)


def bench(decoder, batches, points_list, rounds, seed=0):
    """Rows of p50 ms per call for each decoder, (batch, points) case by case."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)  # the decoders' time does not depend on it
    cache = {}
    rows = []
    for batch in batches:
        no_mask = np.zeros((batch, 1, 256, 256), np.float32), np.zeros(batch, np.float32)
        for points in points_list:
            coords, labels = _prompts(rng, batch, points)
            runs = {
                "points decoder": lambda: decoder.points_decoder.run(features, coords, labels, None, cache),
                "plain decoder": lambda: decoder.decoder.run(features, coords, labels, *no_mask),
            }
            outputs = {name: run() for name, run in runs.items()}  # warm-up; fills the image-side cache
            times = {name: [] for name in runs}
            for _ in range(rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            p50 = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
            diff = float(np.abs(outputs["points decoder"][0] - outputs["plain decoder"][0]).max())
            rows.append({"batch": batch, "points": points, "p50_ms": p50,
                         "plain_over_points": p50["plain decoder"] / p50["points decoder"], "max_abs_logit_diff": diff})
    return rows


def render(report):
    lines = [f"Command: `{report['command']}`", "", f"Machine: {report['system']['cpu_model']}, "
             f"ISA {', '.join(report['system']['isa'])}; onnxruntime {report['system']['onnxruntime']}; "
             f"{report['settings']['threads']} threads; runtime routing limit: {POINTS_DECODER_MAX_POINTS} points", "",
             "| prompts per call | points per prompt | points decoder p50 ms | plain decoder p50 ms | plain / points | max abs logit diff |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['batch']} | {row['points']} | {row['p50_ms']['points decoder']:.1f} | "
                     f"{row['p50_ms']['plain decoder']:.1f} | {row['plain_over_points']:.2f}x | {row['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/vit_t"), help="model directory with a points decoder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--points", type=int, nargs="+", default=[2, 5, 11, 17, 21, 24, 25, 28, 33, 51, 101])
    parser.add_argument("--rounds", type=int, default=9, help="timed calls per case and decoder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if min(args.batches) < 1 or min(args.points) < 2:
        parser.error("--batches must be >= 1 and --points >= 2 (a point and the padding point)")
    decoder = load_decoder(load_manifest(args.model), args.threads)
    if decoder.points_decoder is None:
        parser.error(f"{args.model} has no points decoder")
    report = report_head("bench_points_per_prompt.py", argv,
                         {"model": str(args.model), "threads": args.threads, "rounds": args.rounds})
    report["rows"] = bench(decoder, args.batches, args.points, args.rounds)
    return finish_report(report, args.json, render)


if __name__ == "__main__":
    sys.exit(main())
