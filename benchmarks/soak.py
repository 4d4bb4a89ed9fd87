"""Soak run: many set_image and predict calls on one predictor; memory, cache and file handles.

Not a test and not a timing benchmark. It runs `--images` set_image calls on distinct images
(plus periodic revisits that must hit or miss the LRU cache exactly as its size says) and
`--predicts` predict calls spread over them with varied prompts, sampling after every call:

- RSS and peak RSS (VmRSS / VmHWM): the slope after warm-up, in MiB per 100 calls, should be ~0;
- the embedding cache length, which must never exceed `--cache-size`;
- open file descriptors (/proc/self/fd) and threads, which must not grow.

With `--batch-memory B,...` it also measures, each in a fresh process, how much peak RSS one
`predict_batch` of B prompts adds (ORT's arena keeps that peak for the life of the session).

    python benchmarks/soak.py --model models/vit_t --json benchmarks/results/soak.json --batch-memory 1,16,64,256

Exit status 1 if the cache ever exceeded its size, a revisit missed/hit wrongly, or fds/threads
leaked; the memory slope is reported, not judged.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinysam_rt import sysinfo
from tinysam_rt.predictor import TinySAMPredictor

MIB = 1 << 20
# Image shapes cycled through (H, W): landscape, portrait, small, odd and larger than 1024.
SHAPES = ((480, 640), (640, 480), (720, 1280), (300, 300), (1024, 768), (97, 131), (1200, 1600))


def make_image(index):
    """A distinct (H, W, 3) uint8 RGB image per index: gradients plus random rectangles."""
    rng = np.random.default_rng(index)
    height, width = SHAPES[index % len(SHAPES)]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xx / width * 255, yy / height * 255, np.full_like(xx, index % 256)], axis=-1)
    for _ in range(6):
        y0, x0 = rng.integers(0, height - 1), rng.integers(0, width - 1)
        image[y0:y0 + rng.integers(1, height // 2 + 2), x0:x0 + rng.integers(1, width // 2 + 2)] = rng.uniform(0, 255, 3)
    return image.astype(np.uint8)


def prompt(kind, size, rng, previous_low_res):
    """predict() keyword arguments of one kind, inside an image of `size` (H, W)."""
    height, width = size

    def point():
        return [rng.uniform(0, width), rng.uniform(0, height)]  # (x, y)

    x0, x1 = sorted(rng.uniform(0, width, 2))
    y0, y1 = sorted(rng.uniform(0, height, 2))
    kinds = {
        "point": dict(point_coords=[point()]),
        "points_fg_bg": dict(point_coords=[point(), point()], point_labels=[1, 0]),
        "box": dict(box=[x0, y0, x1, y1]),
        "point_box": dict(point_coords=[point()], box=[x0, y0, x1, y1]),
        "point_mask": dict(point_coords=[point()], mask_input=previous_low_res),
        "single_mask": dict(point_coords=[point()], multimask_output=False),
        "logits": dict(point_coords=[point()], return_logits=True),
    }
    return kinds[kind]


KINDS = ("point", "points_fg_bg", "box", "point_box", "point_mask", "single_mask", "logits")


class CountingEncoder:
    """Wraps the predictor's encoder session to count real encoder runs (cache misses)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def run(self, tensor):
        self.calls += 1
        return self.inner.run(tensor)


def _status(field):
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def sample():
    """(rss MiB, peak rss MiB, open fds, threads) of this process now."""
    return (_status("VmRSS") / 1024, _status("VmHWM") / 1024, len(os.listdir("/proc/self/fd")), _status("Threads"))


def slope_per_100(values, start):
    """Least-squares slope of values[start:] against call index, per 100 calls."""
    y = np.asarray(values[start:], dtype=np.float64)
    if len(y) < 2:
        return 0.0
    x = np.arange(start, start + len(y), dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0] * 100)


def soak(model_dir, images, predicts, cache_size, threads, revisit_every, seed):
    predictor = TinySAMPredictor(model_dir=model_dir, threads=threads, cache_size=cache_size)
    counter = predictor._encoder = CountingEncoder(predictor._encoder)  # count real encoder runs
    rng = np.random.default_rng(seed)
    base = sample()
    log = []  # one row per call: (kind, rss, hwm, fds, threads, cache_len, seconds)
    problems = []
    per_image = [predicts // images + (1 if i < predicts % images else 0) for i in range(images)]
    low_res, warmup_calls = None, None
    hits_expected = hits_seen = misses_expected = misses_seen = 0
    started = time.perf_counter()

    def record(kind, seconds):
        row = (kind, *sample(), predictor.cache_len, seconds)
        if predictor.cache_len > cache_size:
            problems.append(f"call {len(log)}: cache holds {predictor.cache_len} > {cache_size}")
        log.append(row)

    for index in range(images):
        image = make_image(index)
        before = counter.calls
        t0 = time.perf_counter()
        predictor.set_image(image)
        record("set_image", time.perf_counter() - t0)
        if counter.calls != before + 1:
            problems.append(f"image {index}: a new image did not run the encoder once")
        if revisit_every and index % revisit_every == revisit_every - 1 and index >= cache_size + 1:
            # The previous image must still be cached; the one cache_size + 1 images back must not be.
            for back, expect_hit in ((1, True), (cache_size + 1, False)) if cache_size else ((1, False),):
                before = counter.calls
                t0 = time.perf_counter()
                predictor.set_image(make_image(index - back))
                record("revisit", time.perf_counter() - t0)
                hit = counter.calls == before
                hits_expected += expect_hit
                misses_expected += not expect_hit
                hits_seen += hit and expect_hit
                misses_seen += (not hit) and (not expect_hit)
                if hit != expect_hit:
                    problems.append(f"image {index}: revisit of image {index - back} {'hit' if hit else 'missed'} the cache")
            predictor.set_image(image)  # back to the current image (a cache hit)
            record("revisit", 0.0)
        size = predictor.original_size
        low_res = None
        for _ in range(per_image[index]):
            kind = KINDS[int(rng.integers(len(KINDS)))]
            if kind == "point_mask" and low_res is None:
                kind = "point"
            t0 = time.perf_counter()
            _, scores, low = predictor.predict(**prompt(kind, size, rng, low_res[:1] if low_res is not None else None))
            record("predict", time.perf_counter() - t0)
            low_res = low
        if warmup_calls is None and index + 1 >= cache_size + 2:
            warmup_calls = len(log)  # the cache has filled and evicted at least once
    warmup = max(warmup_calls or 0, len(log) // 10)
    return predictor, base, log, warmup, problems, dict(
        encoder_runs=counter.calls, revisit_hits=[hits_seen, hits_expected],
        revisit_misses=[misses_seen, misses_expected], wall_s=time.perf_counter() - started)


def _quantiles(sorted_seconds):
    """p50 / p95 / min of a sorted list of durations."""
    values = sorted_seconds
    return {"p50": values[len(values) // 2], "p95": values[int(len(values) * 0.95)], "min": values[0]}


def summarise(base, log, warmup, extra, args):
    rss = [row[1] for row in log]
    hwm = [row[2] for row in log]
    fds = [row[3] for row in log]
    threads = [row[4] for row in log]
    cache = [row[5] for row in log]
    predict_s = sorted(row[6] for row in log if row[0] == "predict")
    set_s = sorted(row[6] for row in log if row[0] == "set_image")
    after = slice(warmup, None)
    return {
        "calls": len(log),
        "set_image_distinct": sum(row[0] == "set_image" for row in log),
        "revisit_calls": sum(row[0] == "revisit" for row in log),
        "predict_calls": sum(row[0] == "predict" for row in log),
        "cache_size": args.cache_size,
        "cache_len_max": max(cache),
        "warmup_calls": warmup,
        "rss_mib": {"after_load": base[0], "at_warmup": rss[warmup], "end": rss[-1],
                    "min_after_warmup": min(rss[after]), "max_after_warmup": max(rss[after]),
                    "slope_per_100_calls": slope_per_100(rss, warmup)},
        "peak_rss_mib": {"at_warmup": hwm[warmup], "end": hwm[-1],
                         "slope_per_100_calls": slope_per_100(hwm, warmup)},
        "fds": {"after_load": base[2], "at_warmup": fds[warmup], "end": fds[-1], "max": max(fds)},
        "threads": {"after_load": base[3], "at_warmup": threads[warmup], "end": threads[-1], "max": max(threads)},
        "predict_s": _quantiles(predict_s),
        "set_image_s": _quantiles(set_s),
        **extra,
    }


def sample_columns(log):
    """The per-call samples as columns (one list per field), rounded for a compact JSON."""
    names = ("kind", "rss_mib", "peak_rss_mib", "fds", "threads", "cache_len", "seconds")
    columns = {name: [row[i] for row in log] for i, name in enumerate(names)}
    for name in ("rss_mib", "peak_rss_mib"):
        columns[name] = [round(v, 1) for v in columns[name]]
    columns["seconds"] = [round(v, 4) for v in columns["seconds"]]
    return columns


def batch_probe(model_dir, batch, threads):
    """In this (fresh) process: peak RSS before and after one predict_batch of `batch` prompts."""
    predictor = TinySAMPredictor(make_image(0), model_dir=model_dir, threads=threads, cache_size=1)
    predictor.predict([[10.0, 10.0]])  # decoder arena warmed with one prompt
    before = sample()
    rng = np.random.default_rng(batch)
    coords = np.concatenate([rng.uniform(0, 600, (batch, 1, 2)), np.zeros((batch, 1, 2))], axis=1)
    labels = np.tile([1.0, -1.0], (batch, 1))
    t0 = time.perf_counter()
    low_res, _ = predictor.predict_batch(coords, labels)
    seconds = time.perf_counter() - t0
    after = sample()
    output_mib = low_res.nbytes / MIB
    return {"batch": batch, "peak_before_mib": before[1], "peak_after_mib": after[1],
            "rss_after_mib": after[0], "outputs_mib": output_mib, "seconds": seconds}


def batch_memory(model_dir, batches, threads):
    rows = []
    for batch in batches:
        command = [sys.executable, __file__, "--model", str(model_dir), "--threads", str(threads), "--batch-probe", str(batch)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["added_peak_mib"] = row["peak_after_mib"] - row["peak_before_mib"]
        row["added_per_prompt_mib"] = row["added_peak_mib"] / batch
        rows.append(row)
        print(f"  B={batch}: +{row['added_peak_mib']:.0f} MiB peak ({row['added_per_prompt_mib']:.1f} MiB/prompt, "
              f"outputs {row['outputs_mib']:.1f} MiB), {row['seconds']:.1f} s", file=sys.stderr)
    return rows


def markdown(result, command):
    s = result["soak"]
    info = result["system"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu_model']} ({info['machine']}), {info['usable_cores']} usable cores; "
        f"ISA flags: {', '.join(info.get('isa') or ['?'])}; onnxruntime {info['onnxruntime']}, numpy {info['numpy']}; "
        f"load average at start {result['load_start']}, at end {result['load_end']}.",
        "",
        "| calls (set_image + revisits + predict) | cache size / max held | encoder runs | revisits hit / miss as expected | warm-up calls |",
        "|---|---|---|---|---|",
        f"| {s['calls']} ({s['set_image_distinct']} + {s['revisit_calls']} + {s['predict_calls']}) | {s['cache_size']} / {s['cache_len_max']} "
        f"| {s['encoder_runs']} | {s['revisit_hits'][0]}/{s['revisit_hits'][1]} hit, {s['revisit_misses'][0]}/{s['revisit_misses'][1]} miss | {s['warmup_calls']} |",
        "",
        "| measure | after load | at warm-up | end | min..max after warm-up | slope per 100 calls after warm-up |",
        "|---|---|---|---|---|---|",
        f"| RSS MiB | {s['rss_mib']['after_load']:.0f} | {s['rss_mib']['at_warmup']:.0f} | {s['rss_mib']['end']:.0f} "
        f"| {s['rss_mib']['min_after_warmup']:.0f}..{s['rss_mib']['max_after_warmup']:.0f} | {s['rss_mib']['slope_per_100_calls']:+.2f} MiB |",
        f"| peak RSS MiB | - | {s['peak_rss_mib']['at_warmup']:.0f} | {s['peak_rss_mib']['end']:.0f} | - "
        f"| {s['peak_rss_mib']['slope_per_100_calls']:+.2f} MiB |",
        f"| open fds | {s['fds']['after_load']} | {s['fds']['at_warmup']} | {s['fds']['end']} | max {s['fds']['max']} | - |",
        f"| threads | {s['threads']['after_load']} | {s['threads']['at_warmup']} | {s['threads']['end']} | max {s['threads']['max']} | - |",
        "",
        f"predict p50 {s['predict_s']['p50'] * 1000:.0f} / p95 {s['predict_s']['p95'] * 1000:.0f} / "
        f"min {s['predict_s']['min'] * 1000:.0f} ms; set_image (new image, encoder included) p50 "
        f"{s['set_image_s']['p50']:.2f} / p95 {s['set_image_s']['p95']:.2f} / min {s['set_image_s']['min']:.2f} s; "
        f"wall {s['wall_s']:.0f} s (timings on a shared, loaded VM: context only, not a benchmark).",
    ]
    if result.get("batch_memory"):
        lines += ["", "| predict_batch B | peak RSS added MiB | per prompt MiB | outputs MiB | seconds |", "|---|---|---|---|---|"]
        for row in result["batch_memory"]:
            lines.append(f"| {row['batch']} | {row['added_peak_mib']:.0f} | {row['added_per_prompt_mib']:.1f} "
                         f"| {row['outputs_mib']:.1f} | {row['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("TINYSAM_MODEL_DIR", "models/vit_t")))
    parser.add_argument("--images", type=int, default=200, help="distinct images (set_image calls)")
    parser.add_argument("--predicts", type=int, default=1000, help="predict calls, spread over the images")
    parser.add_argument("--cache-size", type=int, default=4, help="embedding LRU size k")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--revisit-every", type=int, default=10, help="every N images, revisit one cached and one evicted image (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-memory", default="", help="comma-separated B values to probe in fresh processes")
    parser.add_argument("--json", type=Path, default=None, help="write the full result here")
    parser.add_argument("--report", type=Path, default=None, help="only print the tables of a saved --json result")
    parser.add_argument("--batch-probe", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.batch_probe is not None:
        print(json.dumps(batch_probe(args.model, args.batch_probe, args.threads)))
        return 0
    if args.report is not None:
        result = json.loads(args.report.read_text())
        print(markdown(result, result["command"]))
        return 0
    load_start = sysinfo.load_average()
    predictor, base, log, warmup, problems, extra = soak(args.model, args.images, args.predicts, args.cache_size,
                                                          args.threads, args.revisit_every, args.seed)
    del predictor
    result = {"soak": summarise(base, log, warmup, extra, args), "problems": problems,
              "system": sysinfo.system_info(), "load_start": load_start}
    if args.batch_memory:
        result["batch_memory"] = batch_memory(args.model, [int(b) for b in args.batch_memory.split(",")], args.threads)
    result["load_end"] = sysinfo.load_average()
    result["command"] = "python benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["samples"] = sample_columns(log)
    if args.json:
        from tinysam_rt.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, separators=(",", ":")) + "\n")  # compact: 1000s of samples
    print(markdown(result, result["command"]))
    s = result["soak"]
    leaked = s["fds"]["end"] > s["fds"]["at_warmup"] or s["threads"]["end"] > s["threads"]["at_warmup"]
    if leaked:
        problems.append(f"fds {s['fds']['at_warmup']} -> {s['fds']['end']}, threads {s['threads']['at_warmup']} -> {s['threads']['end']}")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
