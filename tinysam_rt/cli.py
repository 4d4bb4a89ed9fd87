"""`tinysam` command line: one small function per subcommand (parse -> call library -> write).

Heavy imports (onnxruntime, cv2, torch) happen inside the subcommand functions, so `--help` and
`--version` answer at once. User errors print one line to stderr: exit 2 for usage, 1 at run
time; `--debug` shows the traceback instead.
"""

import argparse
import contextlib
import math
import re
import sys

from tinysam_rt import __version__

EXIT_RUNTIME = 1
EXIT_USAGE = 2


_NUMBER = r"(?:(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|inf(?:inity)?|nan)"
# "-1,5" or "-1.5,2,0": a value of --point/--box. argparse only takes "-1" and "-1.5" for
# negative numbers and would read the rest as an unknown option ("expected one argument").
_NEGATIVE_NUMBERS = re.compile(rf"^-{_NUMBER}(?:,[-+]?{_NUMBER})*$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not usage + message, and
    negative number lists are values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBERS  # argparse's own hook for this

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """A flag combination argparse cannot check by itself (exit 2)."""


def _floats(text, count, what):
    parts = text.split(",")
    if len(parts) not in count:
        raise argparse.ArgumentTypeError(f"{what} must be {'|'.join(map(str, count))} comma-separated numbers, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be finite numbers, got {text!r}")
    return values


def parse_point(text):
    """'X,Y' or 'X,Y,LABEL' -> (x, y, label); label 1 = foreground (default), 0 = background."""
    values = _floats(text, (2, 3), "--point")
    label = values[2] if len(values) == 3 else 1.0
    if label not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"--point label must be 1 (foreground) or 0 (background), got {text!r}")
    return values[0], values[1], label


def parse_box(text):
    """'X0,Y0,X1,Y1' -> [x0, y0, x1, y1]."""
    return _floats(text, (4,), "--box")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def thread_count(text):
    """A positive int up to sysinfo.max_threads() (the bound make_session_options enforces)."""
    from tinysam_rt.sysinfo import THREADS_PER_CPU, max_threads

    value = positive_int(text)
    if value > max_threads():
        raise argparse.ArgumentTypeError(
            f"expected at most {max_threads()} threads ({THREADS_PER_CPU} per CPU), got {text!r}")
    return value


def nonempty(text):
    """A path argument: "" would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def path_arg(text):
    from pathlib import Path

    return Path(nonempty(text))


class _SingleBox(argparse.Action):
    """Store --box, refusing a second one: SAM's decoder takes one box per prompt."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"argument {option_string}: given twice; a prompt takes one box (as in SAM)")
        setattr(namespace, self.dest, values)


class _Given(argparse.Action):
    """Store the value and record the flag in `namespace.given`, so a flag that only applies
    with another can be refused even when its value equals the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.option_strings[0]}


def _add_debug_flag(parser):
    # SUPPRESS: a subcommand that was not given --debug keeps the value from before it.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors (also accepted before the command)")


def _add_model_flags(parser):
    parser.add_argument("--model", metavar="DIR", type=nonempty, default=None,
                        help="model directory with manifest.json (default: $TINYSAM_MODEL_DIR, "
                             "then ~/.cache/tinysam-rt/vit_t)")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="ONNX Runtime intra-op threads (default: one per core)")


def _model_info(manifest):
    """What a result JSON records about the model that made it."""
    return {"dir": str(manifest.model_dir), "weights_id": manifest.weights_id,
            **{graph.role: graph.precision for graph in manifest.graphs}}


def _warn_if_random(manifest):
    if manifest.weights_id.startswith("random"):
        print("note: this model has RANDOM weights (no checkpoint was exported); masks are not meaningful")


def _read_image(args):
    """The image as (H, W, 3) uint8 RGB, refused now if set_image would refuse it later.

    OpenCV's own log lines for a corrupt file are silenced (unless --debug): the one-line error
    names the file and the reason.
    """
    from tinysam_rt import io, preprocess
    from tinysam_rt.manifest import ENCODER_INPUTS

    with contextlib.nullcontext() if args.debug else io.opencv_log_silenced():
        image = io.load_image(args.image)
    preprocess.check_image(image)
    preprocess.preprocess_shape(*image.shape[:2], ENCODER_INPUTS[0][1][-1])  # e.g. too elongated
    return image


def _cmd_segment(args):
    import numpy as np

    from tinysam_rt import io, prompts
    from tinysam_rt.atomic import atomic_write_files, check_writable
    from tinysam_rt.predictor import TinySAMPredictor

    if not args.point and args.box is None:
        raise UsageError("segment needs at least one --point or a --box")
    targets = [args.out / name for name in ("mask.png", "overlay.png", "result.json")]
    image = _read_image(args)
    coords = np.array([p[:2] for p in args.point], dtype=np.float64) if args.point else None
    labels = np.array([p[2] for p in args.point], dtype=np.float32) if args.point else None
    # The library's own checks (same messages), before the model is loaded and the encoder run.
    prompts.validate_points(coords, labels, image.shape[:2])
    prompts.validate_box(args.box, image.shape[:2])
    check_writable(targets)
    predictor = TinySAMPredictor(model_dir=args.model, threads=args.threads)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(coords, labels, box=args.box, multimask_output=True)
    best = int(np.argmax(scores))
    result = {
        "image": str(args.image),
        "image_size": list(image.shape[:2]),
        "points": [list(p) for p in args.point],
        "box": args.box,
        "scores": [float(s) for s in scores],
        "best_index": best,
        "best_score": float(scores[best]),
        "mask_area": int(masks[best].sum()),
        "model": _model_info(predictor.manifest),
    }
    overlay = io.overlay_masks(image, masks[best:best + 1])
    out = args.out
    # One set: all three files are staged before any is renamed, so a failure keeps the old set.
    atomic_write_files(dict(zip(targets, [io.encode_png(masks[best]), io.encode_png(overlay), io.encode_json(result)])))
    print(f"best mask score {scores[best]:.3f}, area {result['mask_area']} px -> {out}/mask.png, overlay.png, result.json")
    _warn_if_random(predictor.manifest)
    return 0


def _add_segment(subparsers):
    from pathlib import Path

    parser = subparsers.add_parser("segment", help="segment one object from point/box prompts",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("image", type=path_arg, help="image file (JPEG, PNG, ...)")
    parser.add_argument("--point", type=parse_point, action="append", default=[], metavar="X,Y[,LABEL]",
                        help="a point prompt in pixels; LABEL 1 = foreground (default), 0 = background; repeatable")
    parser.add_argument("--box", type=parse_box, action=_SingleBox, default=None, metavar="X0,Y0,X1,Y1",
                        help="a box prompt in pixels (one per prompt)")
    parser.add_argument("--out", type=path_arg, default=Path("out"),
                        help="output directory (mask.png, overlay.png, result.json)")
    _add_model_flags(parser)
    parser.set_defaults(func=_cmd_segment)


def _float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _tty_progress(stream):
    """A progress callback drawing `done/total prompts` on a terminal; None when not a TTY."""
    if not stream.isatty():
        return None

    def report(done, total):
        width = 30
        filled = width * done // max(total, 1)
        stream.write(f"\rdecoder [{'#' * filled}{'.' * (width - filled)}] {done}/{total} prompts")
        stream.flush()

    return report


def _overlay_records(image, records):
    """Colour-coded overlay of all records (largest drawn first), decoding a few masks at a time."""
    import numpy as np

    from tinysam_rt import amg, io

    order = sorted(range(len(records)), key=lambda i: -records[i]["area"])
    colors = io.palette(len(records))
    chunk = max(1, (256 << 20) // max(image.shape[0] * image.shape[1], 1))  # bounded bool masks
    overlay = image
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        masks = np.stack([amg.rle_to_mask(amg.coco_string_to_rle(records[i]["segmentation"])) for i in part])
        overlay = io.overlay_masks(overlay, masks, colors[part])
    return overlay


def _cmd_everything(args):
    import dataclasses

    from tinysam_rt import io
    from tinysam_rt.atomic import atomic_write_files, check_writable
    from tinysam_rt.everything import AmgConfig, HierarchicalConfig, TinySAMAutomaticMaskGenerator, check_configs
    from tinysam_rt.predictor import TinySAMPredictor

    hierarchical_only = sorted(getattr(args, "given", frozenset()) & {"--dense-points", "--high-score-thresh"})
    if hierarchical_only and not args.hierarchical:
        raise UsageError(f"{hierarchical_only[0]} only applies with --hierarchical")
    try:
        config = AmgConfig(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                           decoder_workers=args.decoder_workers, pred_iou_thresh=args.pred_iou_thresh,
                           stability_score_thresh=args.stability_score_thresh, box_nms_thresh=args.box_nms_thresh,
                           min_mask_region_area=args.min_mask_region_area, output_mode="coco_rle")
        hierarchical = HierarchicalConfig(high_score_thresh=args.high_score_thresh, dense_points=args.dense_points) \
            if args.hierarchical else None
        check_configs(config, hierarchical)  # flag combinations, before anything is loaded
    except ValueError as exc:
        raise UsageError(str(exc).replace("_", "-")) from None
    targets = [args.out / "overlay.png", args.out / "masks.json"]
    image = _read_image(args)
    check_writable(targets)  # before the model and the long run
    predictor = TinySAMPredictor(model_dir=args.model, threads=args.threads)
    generator = TinySAMAutomaticMaskGenerator(predictor, config, hierarchical)
    result = generator.run(image, progress=_tty_progress(sys.stderr))
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    stats = dataclasses.asdict(result.stats)
    report = {
        "image": str(args.image),
        "image_size": list(image.shape[:2]),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "point_grids"},
        "hierarchical": None if hierarchical is None else dataclasses.asdict(hierarchical),
        "stats": stats,
        "model": _model_info(predictor.manifest),
        "annotations": result.records,  # SAM's records; segmentation is COCO RLE (string counts)
    }
    overlay = _overlay_records(image, result.records)
    # Staged as one set: a failure while writing keeps the previous overlay.png + masks.json pair.
    atomic_write_files(dict(zip(targets, [io.encode_png(overlay), io.encode_json(report)])))
    gated = stats["points_run"] - stats["points_upscaled"]
    skipped = f"; {gated} with every IoU <= {config.pred_iou_thresh} were not upscaled" if gated else ""
    print(f"{len(result.records)} masks from {stats['points_run']} prompts ({stats['mode']}{skipped}) "
          f"-> {args.out}/overlay.png, masks.json")
    _warn_if_random(predictor.manifest)
    return 0


def _add_everything(subparsers):
    from pathlib import Path

    parser = subparsers.add_parser("everything", help="segment everything: masks from a grid of point prompts",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("image", type=path_arg, help="image file (JPEG, PNG, ...)")
    parser.add_argument("--hierarchical", action="store_true",
                        help="TinySAM's hierarchical strategy: sparse grid first, skip covered dense points")
    parser.add_argument("--dense-points", choices=("tinysam", "grid"), default="tinysam", action=_Given,
                        help="hierarchical dense points: TinySAM's published neighbours, or the exact grid")
    parser.add_argument("--points-per-side", type=positive_int, default=32, help="grid points per image side")
    parser.add_argument("--points-per-batch", type=positive_int, default=16,
                        help="prompts per decoder run (memory grows with it; see benchmarks/RESULTS.md)")
    parser.add_argument("--decoder-workers", type=positive_int, default=1, metavar="N",
                        help="decoder batches run side by side, each on one thread (2 on 2 cores: faster, "
                             "each batch in flight takes its own decoder memory)")
    parser.add_argument("--pred-iou-thresh", type=_float, default=0.88, help="predicted-IoU filter, in [0, 1]")
    parser.add_argument("--stability-score-thresh", type=_float, default=0.95, help="stability filter, in [0, 1]")
    parser.add_argument("--box-nms-thresh", type=_float, default=0.7, help="box NMS IoU, in [0, 1]")
    parser.add_argument("--high-score-thresh", type=_float, default=8.5, action=_Given,
                        help="hierarchical: logit above which a sparse mask covers a pixel")
    parser.add_argument("--min-mask-region-area", type=int, default=0,
                        help="fill holes / drop islands smaller than this many pixels (0: off)")
    parser.add_argument("--out", type=path_arg, default=Path("out"), help="output directory (overlay.png, masks.json)")
    _add_model_flags(parser)
    parser.set_defaults(func=_cmd_everything)


def _cmd_export(args):
    if (args.checkpoint is None) == (args.random_seed is None):
        raise UsageError("export needs exactly one of --checkpoint PATH or --random-seed N")
    _check_out(args.out)  # before torch is imported and the model built
    try:
        from tinysam_export.export_onnx import export_model
    except ImportError as exc:
        raise RuntimeError(f"`tinysam export` needs the export extra (torch): pip install 'tinysam-rt[export]' ({exc})") from None
    if args.checkpoint is None:
        print(f"exporting RANDOM weights (seed {args.random_seed}): fine for testing and benchmarks, masks are not meaningful")
    manifest_path = export_model(args.out, checkpoint=args.checkpoint, seed=args.random_seed, opset=args.opset)
    files = sorted(path.name for path in manifest_path.parent.iterdir())
    print(f"wrote {manifest_path.parent}/ ({', '.join(files)})")
    return 0


def _check_out(out_dir, model_dir=None):
    """The --out rule of export and quantize (tinysam_export.out_dir), as a usage error."""
    from tinysam_export.out_dir import check_model_out_dir

    try:
        check_model_out_dir(out_dir, model_dir)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _add_export(subparsers):
    from tinysam_rt.manifest import default_model_dir

    parser = subparsers.add_parser("export", help="export a TinySAM checkpoint to ONNX (needs torch)",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=path_arg, default=None, help="TinySAM/MobileSAM vit_t checkpoint, e.g. tinysam_42.3.pth")
    parser.add_argument("--random-seed", type=int, default=None, metavar="N", help="export seeded random weights instead")
    parser.add_argument("--out", type=path_arg, default=default_model_dir(),
                        help="output model directory: new, empty, or an earlier model directory (replaced whole)")
    parser.add_argument("--opset", type=positive_int, default=17, help="ONNX opset")
    parser.set_defaults(func=_cmd_export)


def _cmd_quantize(args):
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise RuntimeError("`tinysam quantize` needs the onnx package: pip install 'tinysam-rt[quantize]'")
    import logging

    import onnxruntime

    from tinysam_rt import io
    from tinysam_rt.manifest import load_manifest

    try:
        from tinysam_export.calibration import PromptSampling
        from tinysam_export.fidelity import report_markdown
        from tinysam_export.quantize import GateFailedError, QuantizeConfig, check_config, quantize_model
    except ImportError as exc:
        raise RuntimeError(f"`tinysam quantize` needs the quantize extra: pip install 'tinysam-rt[quantize]' ({exc})") from None

    if not args.debug:
        # onnxruntime.quantization warns through the root logger (per-channel axes of LayerNorm
        # weights, pre-processing hints) and ORT's C++ logger; the recipe handles both.
        logging.getLogger().setLevel(logging.ERROR)
        onnxruntime.set_default_logger_severity(3)
    config = QuantizeConfig(method=args.method, only=args.only, min_images=args.min_images, holdout=args.holdout,
                            synthetic=args.synthetic, gate=not args.no_gate, max_excluded=args.max_excluded,
                            reduce_range=not args.no_reduce_range, linear=args.linear,
                            weight_rounding=args.weight_rounding, upscaler=args.upscaler,
                            seed=args.seed, threads=args.threads, calibration_share=args.calibration_share,
                            sampling=PromptSampling())
    try:
        check_config(config)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    load_manifest(args.model, verify=False)  # a --model that is no model is named before --out
    _check_out(args.out, args.model)
    quiet = contextlib.nullcontext() if args.debug else io.opencv_log_silenced()  # calibration images
    try:
        with quiet:
            report = quantize_model(args.model, args.calib, args.out, config,
                                    progress=lambda line: print(f"tinysam quantize: {line}", file=sys.stderr, flush=True))
    except GateFailedError as exc:
        if args.report:  # the numbers behind the refusal, before the one-line error
            print(report_markdown(exc.report))
        raise
    if args.report:
        print(report_markdown(report))
    static = report["fidelity"]["static"]
    gate = "passed" if report["gate"]["passed"] else "FAILED (written because of --no-gate)"
    print(f"wrote {args.out}/ (gate {gate}: embedding cosine min {static['embedding_cosine_min']:.4f}, "
          f"mask IoU mean {static['mask_iou_mean']:.4f}; quantization_report.json/.md)")
    return 0


def _add_quantize(subparsers):
    parser = subparsers.add_parser("quantize", help="INT8 static quantization with calibration and an accuracy gate",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=path_arg, required=True, metavar="DIR", help="FP32 tinysam-rt model directory")
    parser.add_argument("--calib", type=nonempty, required=True, metavar="DIR_OR_GLOB",
                        help="calibration images: a folder holding only images, or a glob like 'photos/*.jpg'")
    parser.add_argument("--out", type=path_arg, required=True, metavar="DIR",
                        help="output INT8 model directory: new, empty, or an earlier model directory (replaced "
                             "whole); not inside --model nor holding it")
    parser.add_argument("--method", choices=("auto", "minmax", "entropy", "percentile"), default="auto",
                        help="activation calibration; auto measures all three and keeps the closest to FP32")
    parser.add_argument("--only", choices=("encoder", "decoder", "both"), default="encoder",
                        help="which graphs to quantize; the others are copied unchanged (FP32). An INT8 "
                             "decoder replaces the FP32 points decoder, which is faster for point prompts")
    parser.add_argument("--min-images", type=positive_int, default=4, metavar="N",
                        help="calibration images required (besides the held-out ones)")
    parser.add_argument("--holdout", type=int, default=2, metavar="K",
                        help="images kept out of calibration for the accuracy gate")
    parser.add_argument("--synthetic", type=int, default=2, metavar="K", help="synthetic images added to the gate set")
    parser.add_argument("--no-gate", action="store_true", help="write the model even if the accuracy gate fails")
    parser.add_argument("--max-excluded", type=int, default=32, metavar="N",
                        help="most nodes per graph the sensitivity search may keep in float (0: none)")
    parser.add_argument("--calibration-share", type=float, default=0.8, metavar="S",
                        help="share (0..1] of the gate's error budgets the search may use on the calibration "
                             "images; the rest is margin for images it has not seen")
    parser.add_argument("--no-reduce-range", action="store_true",
                        help="8-bit instead of 7-bit weights (only safe on CPUs with VNNI)")
    parser.add_argument("--linear", choices=("auto", "static", "dynamic"), default="auto",
                        help="linear (Gemm) layers: static QGemm, dynamic DynamicQuantizeMatMul (input quantized "
                             "per call), or auto: dynamic when it is within the error budget or no worse")
    parser.add_argument("--weight-rounding", choices=("gptq", "nearest"), default="gptq",
                        help="weights of the per-call linear layers: gptq rounds them against the calibration "
                             "inputs (less error, same speed), nearest rounds each alone")
    parser.add_argument("--upscaler", choices=("fp32", "int8"), default="fp32",
                        help="the points decoder's mask upscaler (with --only encoder): int8 quantizes its two "
                             "per-prompt GEMMs per call, 6-18%% less decoder time per prompt in everything mode "
                             "than the FP32 points decoder (measured on one x86 CPU); masks move slightly, "
                             "predicted IoUs do not")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt sampling and synthetic images")
    parser.add_argument("--report", action="store_true", help="print the fidelity and size tables (markdown)")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="ONNX Runtime intra-op threads (default: one per core)")
    parser.set_defaults(func=_cmd_quantize)


# Subcommands register here; each adds its parser and sets `func`.
SUBCOMMANDS = [_add_segment, _add_everything, _add_export, _add_quantize]


def build_parser():
    parser = _Parser(prog="tinysam", description="TinySAM segmentation on ONNX Runtime (no torch needed).")
    parser.add_argument("--version", action="version", version=f"tinysam-rt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(subparsers)
    for subparser in subparsers.choices.values():
        _add_debug_flag(subparser)  # `tinysam segment ... --debug` works too
    return parser


def _is_user_facing(exc):
    """Errors a user can act on: bad input, files, memory, and ONNX Runtime's own error types
    (which derive from Exception only)."""
    return (isinstance(exc, (ValueError, TypeError, OSError, RuntimeError, MemoryError))
            or type(exc).__module__.startswith("onnxruntime"))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print("tinysam: error: a command is required (see tinysam --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"tinysam {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if args.debug or not _is_user_facing(exc):
            raise  # a bug in tinysam-rt: keep the traceback
        print(f"tinysam {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print("tinysam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
