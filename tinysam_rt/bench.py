"""`tinysam-bench`: latency, FLOPs, memory and size of tinysam-rt models on this machine.

    tinysam-bench --model models/vit_t --model models/vit_t-int8 --threads 1,2,4 --runs 20 \\
        --json bench.json --markdown

Answers "why is my first call slow" (cold numbers and time from process start to first mask, in
a fresh subprocess), "what do I get on this board" (warm p50/p95/min per stage, thread sweep,
achieved GFLOP/s against this machine's measured GEMM limit) and "is INT8 really faster" (several
models side by side, with ratios). The terminal table and the JSON hold the same numbers.

Only argparse and the standard library are imported until the flags are valid, so `--help` and
`--version` answer without loading onnxruntime; bad flags print one line and exit 2.
"""

import argparse
import json
import os
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tinysam_rt import __version__

EXIT_RUNTIME = 1
EXIT_USAGE = 2
SCHEMA = "tinysam-bench/1"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not usage + message."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """A flag value argparse cannot check by itself (exit 2)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the uninformative None/False ones."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _int(text, minimum, what="value"):
    message = f"{what} must be an integer >= {minimum}, got {text!r}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(message)
    return value


def thread_list(text):
    """'1,2,4' -> [1, 2, 4]: distinct ints in [1, sysinfo.max_threads()], in the given order."""
    from tinysam_rt.sysinfo import THREADS_PER_CPU, max_threads

    parts = text.split(",")
    if not text.strip() or any(not p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list like 1,2,4, got {text!r}")
    values = [_int(p.strip(), 1, "each thread count") for p in parts]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a thread count is listed twice in {text!r}")
    too_many = [v for v in values if v > max_threads()]
    if too_many:  # the sessions would refuse it mid-run (ORT starts every thread up front)
        raise argparse.ArgumentTypeError(
            f"each thread count must be at most {max_threads()} ({THREADS_PER_CPU} per CPU), got {too_many[0]}")
    return values


def default_threads():
    """1, 2, 4, ... up to the usable cores, plus the core count itself: the scaling curve."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    values = [1 << i for i in range(cores.bit_length()) if 1 << i <= cores]
    return values + ([cores] if cores not in values else [])


def build_parser():
    parser = _Parser(
        prog="tinysam-bench",
        description="Benchmark tinysam-rt models on this machine: per-stage cold and warm latency, "
                    "thread sweep, FLOPs vs measured GEMM limit, peak memory, file sizes.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tinysam-bench {__version__}")
    parser.add_argument("--model", metavar="DIR", action="append", default=None,
                        help="model directory with manifest.json; repeat to compare models side by side "
                             "(ratios are against the first); default: $TINYSAM_MODEL_DIR, then "
                             "~/.cache/tinysam-rt/vit_t")
    parser.add_argument("--threads", type=thread_list, default=None,
                        help="comma-separated intra-op thread counts to sweep "
                             f"(default here: {','.join(map(str, default_threads()))})")
    parser.add_argument("--runs", type=lambda t: _int(t, 1), default=20,
                        help="timed runs per stage after warm-up")
    parser.add_argument("--warmup", type=lambda t: _int(t, 0), default=3,
                        help="untimed runs per stage before timing")
    parser.add_argument("--batch", type=lambda t: _int(t, 1), default=64,
                        help="prompts per decoder call in the batched decoder stage")
    parser.add_argument("--budget", metavar="SECONDS", type=lambda t: _int(t, 1), default=None,
                        help="stop a stage's timed runs after this many seconds (but never below 3 runs); "
                             "for slow boards, where 20 runs of a 64-prompt decoder take minutes")
    parser.add_argument("--image", metavar="PATH", default=None,
                        help="image to benchmark on (default: a generated 1280x960 scene)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables instead of text")
    parser.add_argument("--gemm-n", type=lambda t: _int(t, 16), default=1024,
                        help="matrix side of the GEMM microbenchmark that measures the machine limit")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (one unoptimised run per graph)")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="skip the fresh-process start-to-first-mask measurement")
    parser.add_argument("--no-peak", action="store_true", help="skip the GEMM machine-limit microbenchmark")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def check_args(args):
    """Resolve and check model directories and paths before anything heavy is imported.

    Returns:
        list of Paths of the model directories.

    Raises:
        UsageError: naming the flag and the problem.
    """
    from tinysam_rt.manifest import MANIFEST_NAME, resolve_model_dir

    if args.model is None:
        try:
            dirs = [resolve_model_dir(None)]
        except FileNotFoundError as exc:
            raise UsageError(f"no --model given and {exc}") from None
    else:
        dirs = []
        for text in args.model:
            path = Path(text)
            if not (path / MANIFEST_NAME).is_file():
                what = "does not exist" if not path.exists() else f"has no {MANIFEST_NAME}"
                raise UsageError(f"--model {text}: {what} (expected a tinysam-rt model directory)")
            if path.resolve() in [d.resolve() for d in dirs]:
                raise UsageError(f"--model {text} is given twice")
            dirs.append(path)
    if args.image is not None and not Path(args.image).is_file():
        raise UsageError(f"--image {args.image}: no such file")
    if args.json is not None:
        _check_json_path(args.json)
    return dirs


def _check_json_path(text):
    """Refuse now a --json the report could not be written to after the whole run."""
    from tinysam_rt.atomic import check_writable

    path = Path(text)
    if not text.strip():
        raise UsageError(f"--json expects a file path, got {text!r}")
    if path.is_dir():
        raise UsageError(f"--json {text} is a directory; give a file path")
    if not path.parent.is_dir():
        what = f"{path.parent} is not a directory" if path.parent.exists() else f"directory {path.parent} does not exist"
        raise UsageError(f"--json {text}: {what}")
    try:
        check_writable([path])
    except OSError as exc:
        raise UsageError(f"--json {exc}") from None


def _precisions(manifest):
    """'fp32'; the encoder's precision plus every other graph that is not FP32, e.g.
    'int8-dynamic, points_decoder int8-upscaler'."""
    others = [f"{g.role} {g.precision}" for g in manifest.graphs if g.role != "encoder" and g.precision != "fp32"]
    return ", ".join([manifest.encoder.precision, *others])


def _labels(dirs, manifests):
    """Short unique names: 'vit_t (fp32)'; the full path where two names would collide."""
    names = [f"{d.name} ({_precisions(m)})" for d, m in zip(dirs, manifests)]
    return [f"{d} ({_precisions(m)})" if names.count(n) > 1 else n for n, d, m in zip(names, dirs, manifests)]


def load_models(dirs):
    """[(Manifest, info dict)] of every model directory, manifest and sha256 verified.

    Done before any measurement, so a corrupt model fails at once, not after the GEMM
    machine-limit microbenchmark.
    """
    from tinysam_rt import bench_run

    return [bench_run.model_info(d) for d in dirs]


def run(args, dirs, image, progress, command, loaded=None):
    """Measure every model and return the JSON-ready report.

    Args:
        image: (H, W, 3) uint8 RGB, or None for the generated scene.
        command: the argv to record (the flags as the user gave them).
        loaded: `load_models(dirs)`, when the caller has it already.
    """
    from tinysam_rt import bench_report, bench_run, sysinfo

    threads = args.threads or default_threads()
    report = {
        "schema": SCHEMA,
        "tinysam_rt_version": __version__,
        "command": ["tinysam-bench", *command],
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"runs": args.runs, "warmup": args.warmup, "threads": threads, "batch": args.batch,
                     "budget_s": args.budget, "gemm_n": args.gemm_n},
        "system": sysinfo.system_info(),
    }
    image = bench_run.synthetic_image() if image is None else image
    report["image"] = {"source": args.image or "generated", "height": image.shape[0], "width": image.shape[1]}
    loaded = load_models(dirs) if loaded is None else loaded
    if not args.no_peak:
        progress(f"machine limit: {args.gemm_n}^3 GEMM, numpy and ORT at threads {threads}")
    limits = None if args.no_peak else bench_run.machine_limits(threads, args.gemm_n)
    models = [{"label": label, **info, "flops": None, "cold_start": None, "threads": []}
              for label, (_, info) in zip(_labels(dirs, [m for m, _ in loaded]), loaded)]
    with bench_run.temp_dir() as tmp:
        image_path = args.image or bench_run.write_image_for_child(image, tmp)
        for model, (manifest, _) in zip(models, loaded):
            if not args.no_flops:
                progress(f"{model['label']}: counting FLOPs (one unoptimised, profiled run per graph)")
                model["flops"] = bench_run.count_model_flops(manifest, args.batch)
            if not args.no_cold_start:
                progress(f"{model['label']}: fresh process, start to first mask ({max(threads)} threads)")
                model["cold_start"] = bench_run.cold_start(manifest.model_dir, image_path, max(threads))
    # Thread counts outside, models inside: models compared at one thread count are measured
    # back to back, so a burst of outside load is less likely to favour one of them.
    for t in threads:
        for model, (manifest, _) in zip(models, loaded):
            progress(f"{model['label']}: {t} thread(s), {args.warmup} warm-up + {args.runs} timed runs per stage")
            model["threads"].append(
                bench_run.measure_threads(manifest, image, t, args.runs, args.warmup, args.batch, args.budget))
    if limits is not None:
        progress("machine limit: measuring again after the models (the better of the two is kept)")
        limits = bench_run.merge_limits(limits, bench_run.machine_limits(threads, args.gemm_n))
    report["machine_limits"] = limits
    for model in models:
        for entry in model["threads"]:
            entry["achieved"] = (bench_run.achieved(entry["stages"], model["flops"], limits, entry["threads"])
                                 if model["flops"] else None)
        model["thread_scaling"] = bench_report.thread_scaling(model)
    report["models"] = models
    report["comparisons"] = bench_report.comparisons(models)
    report["main_process_peak_rss_bytes"] = sysinfo.peak_rss_bytes()
    report["load_average_end"] = sysinfo.load_average()
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        dirs = check_args(args)
    except UsageError as exc:
        print(f"tinysam-bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def progress(message):
        if not args.quiet:
            print(f"[tinysam-bench] {message}", file=sys.stderr, flush=True)

    from tinysam_rt import preprocess
    from tinysam_rt.errors import ModelFileError
    from tinysam_rt.io import load_image, opencv_log_silenced
    from tinysam_rt.manifest import ENCODER_INPUTS

    try:
        with opencv_log_silenced():  # the one-line error says what OpenCV would log
            image = load_image(args.image) if args.image else None
    except ValueError as exc:  # not a readable image, or too large; the message starts with the path
        print(f"tinysam-bench: error: --image {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if image is not None:  # refuse now what set_image would refuse mid-run
            preprocess.check_image(image)
            preprocess.preprocess_shape(*image.shape[:2], ENCODER_INPUTS[0][1][-1])
    except ValueError as exc:
        print(f"tinysam-bench: error: --image {args.image}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # ModelFileError, a manifest that vanished or cannot be read (OSError), other bad values
        loaded = load_models(dirs)
    except (ValueError, OSError) as exc:
        print(f"tinysam-bench: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    try:
        report = run(args, dirs, image, progress, sys.argv[1:] if argv is None else list(argv), loaded)
    except (ModelFileError, FileNotFoundError) as exc:
        print(f"tinysam-bench: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    from tinysam_rt import bench_report
    from tinysam_rt.atomic import atomic_write_text

    sys.stdout.write(bench_report.format_report(report, markdown=args.markdown))
    if args.json:
        try:
            atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            print(f"tinysam-bench: error: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
        progress(f"wrote {args.json}")
    return 0


def cold_start_child():
    """Entry of the fresh subprocess `bench_run.cold_start` times (request JSON in sys.argv[1]).

    Prints one JSON line of CLOCK_MONOTONIC timestamps (comparable with the parent's) at each
    milestone a user's first script passes, plus this process's CPU time and peak RSS.
    """
    marks = {"python_started": time.monotonic()}
    request = json.loads(sys.argv[1])
    from tinysam_rt.io import load_image
    from tinysam_rt.predictor import TinySAMPredictor

    marks["imported"] = time.monotonic()
    predictor = TinySAMPredictor(model_dir=request["model_dir"], threads=request["threads"], cache_size=0)
    marks["sessions_ready"] = time.monotonic()
    image = load_image(request["image"])
    marks["image_loaded"] = time.monotonic()
    predictor.set_image(image)
    marks["first_embedding"] = time.monotonic()
    predictor.predict(point_coords=[[image.shape[1] / 2, image.shape[0] / 2]], point_labels=[1])
    marks["first_mask"] = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    from tinysam_rt.sysinfo import peak_rss_bytes

    marks.update(cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_bytes=peak_rss_bytes())
    print(json.dumps(marks))


if __name__ == "__main__":
    sys.exit(main())
