"""Export TinySAM vit_t to a tinysam-rt model directory: encoder.onnx, decoder.onnx,
points_decoder.onnx, manifest.json.

Everything is written into a temp directory beside the target, every graph is loaded and run
once in ONNX Runtime through the runtime's own manifest and session checks, and only then is the
directory swapped into place (`tinysam_rt.atomic.atomic_directory`). A failure at any step leaves
no output and any previous output untouched.

Uses the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`), as SAM's own
`scripts/export_onnx_model.py` does: it folds BatchNorm and the attention-bias gathers into
constants and handles the dynamic B and N axes of the decoder.

    python -m tinysam_export.export_onnx --random-seed 0 --out DIR
"""

import argparse
import datetime
import json
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import tinysam_rt
from tinysam_rt import manifest as manifest_mod
from tinysam_rt.atomic import atomic_directory
from tinysam_rt.sessions import DecoderSession, EncoderSession, PointsDecoderSession
from tinysam_export.metadata import set_weights_id
from tinysam_export.model.build import IMAGE_SIZE, MASK_TOKENS, PIXEL_MEAN, PIXEL_STD, build_tinysam
from tinysam_export.onnx_scan import cached_or_computed, gate_body, scan_over_batch
from tinysam_export.onnx_wrappers import (
    IMAGE_SIDE_PIECES, CachedImageSideOnnx, DecoderOnnx, EncoderOnnx, ImageSideOnnx, PointsDecoderOnnx, UpscalerOnnx,
)
from tinysam_export.out_dir import check_model_out_dir

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
POINTS_DECODER_FILE = "points_decoder.onnx"
MODEL_NAME = "tinysam_vit_t"
EXPORTER = "torch.onnx.export (TorchScript tracer, dynamo=False)"
# Trace the decoder with B and N other than 1 so the tracer cannot specialise a size-1 axis.
TRACE_B, TRACE_N = 2, 3
# ORT vs eager PyTorch in the pre-publish check; ~1e-5 is typical, so this catches a wrong graph,
# not float noise (the tests hold the graphs to 1e-4).
VERIFY_TOLERANCE = 1e-3


def weights_info(checkpoint, seed):
    """The manifest's "weights" block.

    Returns:
        dict: source, checkpoint_sha256, seed, weights_id ("sha256:<hex>" | "random-seed-<N>").
    """
    if checkpoint is not None:
        digest = manifest_mod.sha256_file(checkpoint)
        return {"source": "checkpoint", "checkpoint_sha256": digest, "seed": None, "weights_id": f"sha256:{digest}"}
    return {"source": "random", "checkpoint_sha256": None, "seed": seed, "weights_id": f"random-seed-{seed}"}


def _example_decoder_inputs(batch, num_points):
    """Decoder feeds in the contract's order: (embeddings, coords, labels, mask_input, has_mask)."""
    gen = torch.Generator().manual_seed(0)
    image_embeddings = torch.randn(1, 256, 64, 64, generator=gen)
    coords = torch.rand(batch, num_points, 2, generator=gen) * IMAGE_SIZE  # (B, N, 2) XY, 1024 frame
    labels = torch.randint(-1, 4, (batch, num_points), generator=gen).float()  # (B, N) every label kind
    mask_input = torch.randn(batch, 1, 256, 256, generator=gen)
    has_mask_input = (torch.arange(batch) % 2).float()  # (B,) with and without a mask
    return image_embeddings, coords, labels, mask_input, has_mask_input


def _write_graph(model, path, outputs, weights_id):
    """Save a traced graph once: the contract's output shapes written in (the tracer leaves some
    axes unnamed), the weights_id stamped in its metadata, checked by onnx.checker."""
    by_name = {out.name: out for out in model.graph.output}
    for name, shape in outputs:
        dims = by_name[name].type.tensor_type.shape.dim
        del dims[:]
        for axis in shape:
            dim = dims.add()
            if isinstance(axis, int):
                dim.dim_value = axis
            else:
                dim.dim_param = axis
    set_weights_id(model, weights_id)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _torch_export(module, args, inputs, outputs, dynamic_axes, opset):
    """Trace `module` to an in-memory ModelProto with the contract's input and output names."""
    names = [name for name, _ in inputs], [name for name, _ in outputs]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # Expected and harmless here: the TorchScript exporter is chosen deliberately (see module
        # docstring), B and N are declared dynamic, and unfoldable slices are left to ORT.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            module, args, buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=names[0], output_names=names[1], dynamic_axes=dynamic_axes,
        )
    return onnx.load_from_string(buffer.getvalue())


def export_encoder(model, path, weights_id, opset=17):
    """Write the image encoder graph (ENCODER_INPUTS -> ENCODER_OUTPUTS) to `path`."""
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    outputs = manifest_mod.ENCODER_OUTPUTS
    graph = _torch_export(EncoderOnnx(model).eval(), (image,), manifest_mod.ENCODER_INPUTS, outputs, None, opset)
    _write_graph(graph, path, outputs, weights_id)


def _dynamic_axes(tensors):
    """torch.onnx.export's dynamic_axes for contract (name, shape) pairs: the str axes."""
    return {name: {axis: dim for axis, dim in enumerate(shape) if isinstance(dim, str)}
            for name, shape in tensors if any(isinstance(dim, str) for dim in shape)}


def export_decoder(model, path, weights_id, opset=17):
    """Write the prompt-encoder + mask-decoder graph (DECODER_INPUTS -> DECODER_OUTPUTS), B and N dynamic."""
    inputs, outputs = manifest_mod.DECODER_INPUTS, manifest_mod.DECODER_OUTPUTS
    graph = _torch_export(DecoderOnnx(model).eval(), _example_decoder_inputs(TRACE_B, TRACE_N), inputs, outputs,
                          _dynamic_axes(inputs + outputs), opset)
    _write_graph(graph, path, outputs, weights_id)


def export_points_decoder(model, path, weights_id, opset=17):
    """Write the points-only decoder graph (POINTS_DECODER_INPUTS -> POINTS_DECODER_OUTPUTS).

    Four traces joined with `onnx_scan`: `PointsDecoderOnnx` for the B prompts up to the
    upscaler, reading the per-image pieces (IMAGE_SIDE_PIECES) that `cached_or_computed` takes
    from the caller's cache (`CachedImageSideOnnx`) or computes (`ImageSideOnnx`); then a Scan
    running `UpscalerOnnx` once per prompt, gated by `gate_body` on the prompt's predicted IoUs
    and `upscale_iou_threshold`. The Scan slices the per-prompt values and reads the two per-image
    ones (`shared0`, `shared1`) whole, from outside its body.
    """
    inputs, outputs = manifest_mod.POINTS_DECODER_INPUTS, manifest_mod.POINTS_DECODER_OUTPUTS
    (masks_name, (_, masks, h, w)), (iou_name, iou_shape), (side_name, side_shape) = outputs
    gate_name, gate_shape = manifest_mod.POINTS_DECODER_GATE
    cache_name, cache_shape = manifest_mod.POINTS_DECODER_CACHE
    grid_h, grid_w = model.prompt_encoder.image_embedding_size  # 64 x 64 image tokens
    hyper_channels = model.mask_decoder.output_upscaling[3].out_channels  # 32
    with torch.no_grad():
        embeddings, coords, labels = _example_decoder_inputs(TRACE_B, TRACE_N)[:3]
        *pieces, packed = ImageSideOnnx(model).eval()(embeddings)
        head_example = PointsDecoderOnnx(model).eval()(coords, labels, *pieces)
    *_, rows0, rows1, _, _, shared0, shared1 = head_example  # see PointsDecoderOnnx.forward
    piece_specs = tuple((name, tuple(piece.shape)) for name, piece in zip(IMAGE_SIDE_PIECES, pieces))
    shared = (("shared0", tuple(shared0.shape)), ("shared1", tuple(shared1.shape)))  # per image, read whole
    # (name, shape) of every value the head hands the Scan; "B" is the batch, "hT" heads x tokens.
    positions = grid_h * grid_w
    to_body = (("weights0", ("B", positions, "hT")), ("weights1", ("B", positions, "hT")),
               ("rstd0", ("B", positions, 1)), ("rstd1", ("B", positions, 1)),
               ("rows0", ("B", "2hT", rows0.shape[-1])), ("rows1", ("B", "2hT", rows1.shape[-1])),
               ("hyper_in", ("B", masks, hyper_channels)))
    # The head reads the image side's pieces as inputs; cached_or_computed then makes them an If's outputs.
    prompt_inputs = tuple(item for item in inputs if item[0] in ("point_coords", "point_labels"))
    head_inputs = prompt_inputs + piece_specs
    head_outputs = to_body + ((iou_name, iou_shape),) + shared
    head = _torch_export(PointsDecoderOnnx(model).eval(), (coords, labels, *pieces), head_inputs,
                         head_outputs, _dynamic_axes(head_inputs + head_outputs), opset)
    branch_outputs = list(piece_specs) + [(side_name, side_shape)]
    compute_side = _torch_export(ImageSideOnnx(model).eval(), (embeddings,), inputs[:1], branch_outputs, None, opset)
    side_from_cache = _torch_export(CachedImageSideOnnx().eval(), (packed,), [(cache_name, cache_shape)],
                                    branch_outputs, _dynamic_axes([(cache_name, cache_shape), (side_name, side_shape)]),
                                    opset)
    cached_or_computed(head, IMAGE_SIDE_PIECES, side_name, side_from_cache, compute_side, prefix="image_side/")
    head.graph.input.append(onnx.helper.make_tensor_value_info(gate_name, onnx.TensorProto.FLOAT, list(gate_shape)))
    body_inputs = [(name, shape[1:]) for name, shape in to_body] + list(shared)
    body_example = tuple(x[0] for x in head_example[:len(to_body)]) + (shared0, shared1)  # one prompt's
    body = _torch_export(UpscalerOnnx(model).eval(), body_example,
                         body_inputs, [(masks_name, (masks, h, w))], _dynamic_axes(body_inputs), opset)
    body = gate_body(body, (iou_name, iou_shape[1:]), gate_name)
    joined = scan_over_batch(head, body, [name for name, _ in to_body] + [iou_name], [masks_name],
                             [masks_name, iou_name, side_name], prefix="upscale/",
                             outer_values=[name for name, _ in shared])
    _reorder_inputs(joined, [name for name, _ in inputs])
    _write_graph(joined, path, outputs, weights_id)


def _reorder_inputs(model, names):
    """Put the graph inputs in the contract's order (sessions match by name; this is for readers)."""
    by_name = {value.name: value for value in model.graph.input}
    ordered = [by_name[name] for name in names]
    del model.graph.input[:]
    model.graph.input.extend(ordered)


def build_manifest(model_dir, weights, opset):
    """The manifest document (see tinysam_rt/manifest.py) for the graphs in `model_dir`."""
    graph = manifest_mod.graph_entry
    weights_id = weights["weights_id"]
    return {
        "format": manifest_mod.MANIFEST_FORMAT,
        "format_version": manifest_mod.FORMAT_VERSION,
        "model": MODEL_NAME,
        "tinysam_rt_version": tinysam_rt.__version__,
        "weights": weights,
        "opset": opset,
        "preprocess": {
            "image_size": IMAGE_SIZE,
            "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD),
            "resize": "longest_side",
            "resize_filter": "bilinear_antialias",  # SAM resizes with PIL's antialiased bilinear
            "pad": "bottom_right",
            "pad_value": 0.0,
            "normalize": "runtime",  # the encoder graph takes an already normalised image
        },
        "postprocess": {"mask_threshold": 0.0, "low_res_size": 256, "mask_tokens": list(MASK_TOKENS)},
        "graphs": {
            "encoder": graph("encoder", model_dir / ENCODER_FILE, "fp32", weights_id,
                             manifest_mod.ENCODER_INPUTS, manifest_mod.ENCODER_OUTPUTS),
            "decoder": graph("decoder", model_dir / DECODER_FILE, "fp32", weights_id,
                             manifest_mod.DECODER_INPUTS, manifest_mod.DECODER_OUTPUTS),
            "points_decoder": graph("points_decoder", model_dir / POINTS_DECODER_FILE, "fp32", weights_id,
                                    manifest_mod.POINTS_DECODER_INPUTS, manifest_mod.POINTS_DECODER_OUTPUTS),
        },
        "quantization": None,
        "export": {
            "exporter": EXPORTER,
            "opset": opset,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime_smoke_run": onnxruntime.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def smoke_run(model_dir, model):
    """Load `model_dir` as the runtime would (sha256, I/O contract), run each graph once and
    compare with the eager PyTorch modules that were traced.

    Args:
        model_dir: Path of the not yet published model directory.
        model: the Sam the graphs were exported from.
    Raises:
        ModelFileError: from the runtime's checks.
        RuntimeError: an output has the wrong shape, is not finite, or differs from PyTorch by
            more than VERIFY_TOLERANCE.
    """
    manifest = manifest_mod.load_manifest(model_dir)
    encoder = EncoderSession(manifest.encoder)
    decoder = DecoderSession(manifest.decoder)
    points_decoder = PointsDecoderSession(manifest.points_decoder)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    embeddings = encoder.run(image.numpy())  # (1, 256, 64, 64)
    prompts = _example_decoder_inputs(TRACE_B + 1, TRACE_N + 1)[1:]  # a B and N not traced with
    masks, iou = decoder.run(embeddings, *(t.numpy() for t in prompts))
    points_masks, points_iou = points_decoder.run(embeddings, *(t.numpy() for t in prompts[:2]))
    no_mask = (prompts[2], torch.zeros_like(prompts[3]))
    with torch.no_grad():
        want_masks, want_iou = DecoderOnnx(model)(torch.from_numpy(embeddings), *prompts)
        # The points decoder must equal the plain decoder without mask inputs.
        want_points = DecoderOnnx(model)(torch.from_numpy(embeddings), *prompts[:2], *no_mask)
        expected = {"image_embeddings": EncoderOnnx(model)(image), "low_res_masks": want_masks,
                    "iou_predictions": want_iou, "points_decoder low_res_masks": want_points[0],
                    "points_decoder iou_predictions": want_points[1]}
    for (name, want), got in zip(expected.items(), (embeddings, masks, iou, points_masks, points_iou)):
        want = want.numpy()
        if got.shape != want.shape or not np.isfinite(got).all():
            raise RuntimeError(f"smoke run of {model_dir}: {name} has shape {got.shape} (expected {want.shape}) "
                               f"or non-finite values")
        diff = float(np.abs(got - want).max())
        if diff > VERIFY_TOLERANCE:
            raise RuntimeError(f"smoke run of {model_dir}: ONNX Runtime {name} differs from PyTorch by {diff:.2e} "
                               f"(> {VERIFY_TOLERANCE}); the exported graph is wrong")


def export_model(out_dir, checkpoint=None, seed=0, opset=17):
    """Export TinySAM vit_t to `out_dir` (replaced whole, atomically).

    Args:
        out_dir: str or Path of the model directory to create, or to replace when it is empty or
            an earlier model directory (the rule of `tinysam_export.out_dir`).
        checkpoint: path of a vit_t checkpoint, or None for random weights from `seed`.
        seed: int, used only when `checkpoint` is None.
        opset: ONNX opset (17 is the tested one).
    Returns:
        Path of the published manifest.json.
    Raises:
        ValueError: bad arguments, an `out_dir` that would delete other files, or a checkpoint
            that does not match (keys named).
    """
    check_model_out_dir(out_dir)  # before the model is built: nothing slow for a refused --out
    if checkpoint is None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int when no checkpoint is given, got {seed!r}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint must be an existing file, got {checkpoint}")
    out_dir = Path(out_dir)
    model = build_tinysam(checkpoint, seed)
    weights = weights_info(checkpoint, seed)
    with atomic_directory(out_dir) as tmp:
        export_encoder(model, tmp / ENCODER_FILE, weights["weights_id"], opset)
        export_decoder(model, tmp / DECODER_FILE, weights["weights_id"], opset)
        export_points_decoder(model, tmp / POINTS_DECODER_FILE, weights["weights_id"], opset)
        doc = build_manifest(tmp, weights, opset)
        (tmp / manifest_mod.MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        smoke_run(tmp, model)
    return out_dir / manifest_mod.MANIFEST_NAME


def main(argv=None):
    """`python -m tinysam_export.export_onnx (--checkpoint PATH | --random-seed N) --out DIR`."""
    parser = argparse.ArgumentParser(prog="python -m tinysam_export.export_onnx", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="TinySAM vit_t checkpoint, e.g. tinysam_42.3.pth")
    source.add_argument("--random-seed", type=int, metavar="N", help="export seeded random weights instead")
    parser.add_argument("--out", type=Path, required=True,
                        help="output model directory: new, empty, or an earlier export (replaced whole)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    args = parser.parse_args(argv)
    try:
        path = export_model(args.out, checkpoint=args.checkpoint, seed=args.random_seed, opset=args.opset)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path.parent}/ ({ENCODER_FILE}, {DECODER_FILE}, {POINTS_DECODER_FILE}, {manifest_mod.MANIFEST_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
