"""INT8 quantization of a tinysam-rt model: calibrated static QDQ, an accuracy gate, a recipe.

    tinysam quantize --model models/vit_t --calib ../shared/images --out models/vit_t-int8

Recipe (every choice measured; numbers and the commands in benchmarks/RESULTS.md):
1. Prepare each FP32 graph with ONNX Runtime's own extended-level fusions (MatMul+Add -> Gemm,
   Gelu, LayerNormalization) *before* inserting Q/DQ, so the quantized graph keeps fused float
   GELU/LayerNorm between integer GEMMs; then `quant_pre_process` for symbolic shape inference
   only. Its default optimisation pass also constant-folds TinyViT's attention-bias gathers into
   4.9 MB of float tables (the INT8 encoder would miss the 35 % size target), so lookup tables
   feeding a Gather are kept unfolded.
2. Static QDQ, U8 activations / S8 per-channel weights, `reduce_range` (7-bit weights) so u8 x s8
   products cannot saturate the 16-bit pairwise sums of AVX2's VPMADDUBSW on CPUs without VNNI.
   Only Gemm/MatMul/Conv are quantized (ORT fuses them into QGemm / MatMulIntegerToFloat /
   QLinearConv); Gemm/MatMul outputs stay float, which avoids a Q/DQ pair per linear layer.
3. Calibration method (MinMax / Entropy / Percentile) picked by measured fidelity on the
   calibration images. If that misses the calibration-set share of the gate's error budgets
   (embedding cosine; selected-mask IoU of each graph with the other in FP32), every node's
   sensitivity is measured alone and the most sensitive nodes are kept in float - their
   weights still stored int8 + DequantizeLinear, so the file stays small - until it holds.
4. Linear layers quantized per call instead (`dynamic_linear`: DynamicQuantizeMatMul, 7-bit
   per-column weights) when that stays within the budget or is no worse than static: on this
   encoder it was faster than QGemm with VNNI, as fast on the AVX2 kernels, and closer to FP32.
   Their weights are rounded by GPTQ against the Gram matrices of their calibration inputs
   (`gptq`; `weight_rounding="nearest"` to compare): same graph and speed, less error.
   Static Q/DQ stays where the search kept it (Conv, attention MatMul); the manifest names the
   result: int8-static-qdq, int8-hybrid, or int8-dynamic when no static Q/DQ is left. If the
   per-call graph is over budget, the Gemms with the most per-call error per MAC are kept float
   (float16 weights) while that lowers the budget use (`search_dynamic_gemms`).
5. Optionally (`upscaler="int8"`, CLI `--upscaler int8`) the points decoder's per-prompt mask
   upscaler GEMMs are quantized per call too (`upscaler_int8`; GPTQ-rounded against the
   calibration prompts' upscaler inputs): 6-19 % less decoder time per prompt in everything
   mode (6 % against an FP32 export whose first upscaler GEMM is factored, which `upscaler_int8`
   first undoes); masks move, predicted IoUs do not.
6. Accuracy gate on held-out photos + synthetic images against FP32, beside a
   `quantize_dynamic` baseline; output written only if the gate holds (atomic directory).

No torch: onnx, onnxruntime(.quantization), numpy and tinysam_rt only.
"""

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from tinysam_export import calibration, fidelity
from tinysam_export.gptq import GPTQ_DAMP, GemmInputGrams
from tinysam_export.metadata import stamp_weights_id
from tinysam_export.out_dir import REPORT_FILES, check_model_out_dir
from tinysam_export.upscaler_int8 import (UPSCALER_PRECISION, UpscalerInputGrams, dynamic_quantize_matmul, int8_upscaler,
                                          use_contrib_opset)
from tinysam_rt import io, manifest as manifest_mod, preprocess
from tinysam_rt.atomic import atomic_directory, atomic_write_text
from tinysam_rt.predictor import TinySAMPredictor
from tinysam_rt.sessions import DecoderSession, EncoderSession, PointsDecoderSession, PromptDecoder

logger = logging.getLogger(__name__)

PRECISION = "int8-static-qdq"
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
# Ops whose ORT integer kernels beat float on the encoder here; decoder: the transformer's
# projections/MLPs (its final ConvTranspose upscaling stays float).
OP_TYPES = {"encoder": ("Gemm", "MatMul", "Conv"), "decoder": ("Gemm", "MatMul")}
# When quantizing OP_TYPES is still over budget after the most sensitive nodes were kept in float,
# these smaller sets are tried in order (the lowest budget use wins, the first within budget
# stops): Conv first, where the encoder's accuracy goes, then attention MatMul, whose integer
# kernel buys least, then both (benchmarks/RESULTS.md, "INT8 quantization"). Dropped op types
# compute in float with compactly stored weights (`store_weights_compact`).
OP_TYPE_LADDER = {"encoder": (("Gemm", "MatMul"), ("Gemm", "Conv"), ("Gemm",)), "decoder": (("Gemm",),)}
FLOAT_OUTPUT_OPS = ("Gemm", "MatMul")  # -> QGemm / MatMulIntegerToFloat with float outputs
LINEAR_MODES = ("auto", "static", "dynamic")
WEIGHT_ROUNDINGS = ("gptq", "nearest")
UPSCALER_MODES = ("fp32", "int8")
INT8_FILES = {"encoder": "encoder.int8.onnx", "decoder": "decoder.int8.onnx"}


class GateFailedError(RuntimeError):
    """The accuracy gate failed; nothing was written. `report` holds the measured numbers."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of `quantize_model`; the defaults are the recipe `tinysam quantize` runs."""

    method: str = "auto"  # "auto" (measure all three) | "minmax" | "entropy" | "percentile"
    # Which graphs: "encoder" (default) | "decoder" | "both"; the others are copied as they are.
    # The encoder alone is the default: an INT8 decoder replaces the FP32 points decoder, which
    # runs point prompts ~2x faster than the INT8 plain decoder (benchmarks/RESULTS.md).
    only: str = "encoder"
    min_images: int = 4  # calibration images required after holding out `holdout`
    holdout: int = 2  # real images kept out of calibration for the gate (the last ones, sorted)
    synthetic: int = 2  # synthetic images added to the held-out gate set
    gate: bool = True  # refuse to write when the gate fails
    min_cosine: float = 0.99  # gate: worst held-out embedding cosine vs FP32
    min_mask_iou: float = 0.95  # gate: mean held-out selected-mask IoU vs FP32
    max_size_ratio: float = 0.35  # gate: INT8 encoder bytes / FP32 encoder bytes
    max_excluded: int = 32  # most nodes per graph the sensitivity search may keep in float
    # Share of the gate's error budgets the search may use on the calibration images (the rest is
    # margin for unseen images). 0.5 was tried (session 8): on these random weights the calibration
    # images' mask IoU does not respond to keeping Gemms float (0.9665 -> 0.9664 with 5), so it
    # only made the search longer (benchmarks/RESULTS.md, "INT8 quantization, session 8").
    calibration_share: float = 0.8
    reduce_range: bool = True  # 7-bit weights: no u8s8 saturation on AVX2-only CPUs
    # Gemm (linear) layers: "static" (QGemm: activation ranges from calibration), "dynamic"
    # (DynamicQuantizeMatMul: each call quantizes its own input) or "auto": dynamic when its
    # calibration-set error is within budget or no worse than static's. Per call was faster than
    # QGemm with VNNI and as fast on AVX2 (benchmarks/RESULTS.md, "AVX2 code path").
    linear: str = "auto"
    # Weights of the Gemms quantized per call: "gptq" rounds them against the Gram matrix of
    # their calibration inputs (`gptq`), "nearest" rounds each alone. Same grid, graph, size and
    # speed; on vit_t GPTQ took the held-out mask IoU from 0.944 to 0.975 (benchmarks/RESULTS.md,
    # "INT8 quantization, session 10").
    weight_rounding: str = "gptq"
    # The points decoder's mask upscaler (kept beside an FP32 decoder, i.e. only="encoder"):
    # "fp32" copies it; "int8" makes its per-prompt GEMMs DynamicQuantizeMatMul (7-bit per
    # column with reduce_range): everything mode 1.13x-1.26x faster when every mask is computed, at a
    # measured mask cost the gate sees (benchmarks/RESULTS.md, "Everything mode"). Opt-in: on
    # random weights its mask IoU cannot be judged for real checkpoints.
    upscaler: str = "fp32"
    seed: int = 0  # prompt sampling and synthetic images
    sampling: calibration.PromptSampling = field(default_factory=calibration.PromptSampling)
    threads: int = None  # ORT intra-op threads for calibration and evaluation


def check_config(config):
    """Raise ValueError naming the first bad field of a QuantizeConfig."""
    if config.method != "auto" and config.method not in METHODS:
        raise ValueError(f"method must be 'auto' or one of {sorted(METHODS)}, got {config.method!r}")
    if config.linear not in LINEAR_MODES:
        raise ValueError(f"linear must be one of {list(LINEAR_MODES)}, got {config.linear!r}")
    if config.weight_rounding not in WEIGHT_ROUNDINGS:
        raise ValueError(f"weight_rounding must be one of {list(WEIGHT_ROUNDINGS)}, got {config.weight_rounding!r}")
    if config.only not in ("encoder", "decoder", "both"):
        raise ValueError(f"only must be 'encoder', 'decoder' or 'both', got {config.only!r}")
    if config.upscaler not in UPSCALER_MODES:
        raise ValueError(f"upscaler must be one of {list(UPSCALER_MODES)}, got {config.upscaler!r}")
    if config.upscaler == "int8" and config.only != "encoder":
        raise ValueError(f"upscaler='int8' quantizes the points decoder, which is kept only with only='encoder' "
                         f"(an INT8 decoder replaces it), got only={config.only!r}")
    for name in ("min_images", "holdout", "synthetic", "max_excluded"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < (1 if name == "min_images" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'min_images' else 0}, got {value!r}")
    if config.holdout + config.synthetic < 1:
        raise ValueError("the gate needs at least one held-out image: holdout + synthetic must be >= 1")
    for name in ("min_cosine", "min_mask_iou", "max_size_ratio"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)!r}")
    if not 0.0 < config.calibration_share <= 1.0:  # 0: no budget, the search would keep every node float
        raise ValueError(f"calibration_share must be in (0, 1], got {config.calibration_share!r}")


def check_out_dir(model_dir, out_dir):
    """Raise ValueError unless `out_dir` may be replaced whole by the INT8 model: the rule of
    `tinysam_export.out_dir`, which also keeps it apart from the FP32 model it is measured against."""
    check_model_out_dir(out_dir, model_dir)


# -- graph preparation and quantization -----------------------------------------------------------

def prepare_graph(src, dst):
    """ORT extended-level fusions, then symbolic shape inference; see recipe step 1.

    Args:
        src: Path of an FP32 ONNX graph. dst: Path to write the prepared graph to.
    """
    model = onnx.load(str(src))
    initializers = {init.name: init for init in model.graph.initializer}
    # An initializer that is also a graph input may be overridden, so ORT never constant-folds
    # through it: TinyViT's attention_biases[:, idxs] stays a small table plus a Gather.
    tables = sorted({n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in initializers})
    for name in tables:
        init = initializers[name]
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    staged_in, fused = dst.with_suffix(".in.onnx"), dst.with_suffix(".fused.onnx")
    onnx.save(model, str(staged_in))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable fusions only
    options.optimized_model_filepath = str(fused)
    options.log_severity_level = 3  # the "initializer appears in graph inputs" notice is intended
    ort.InferenceSession(str(staged_in), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(fused))
    inputs = [i for i in model.graph.input if i.name not in tables]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(fused))
    quant_pre_process(str(fused), str(dst), skip_optimization=True, auto_merge=True, guess_output_rank=True)
    staged_in.unlink()
    fused.unlink()
    return dst


def quantize_qdq(prepared, out, reader, method, op_types, exclude, cache, reduce_range=True,
                 activation_type=QuantType.QUInt8, extra_options=None):
    """Static QDQ INT8 of a prepared graph: per-channel S8 weights, Gemm/MatMul outputs in float.

    Args:
        prepared: Path from `prepare_graph`. out: Path to write.
        reader: calibration.FeedReader (used only when `cache` does not exist yet).
        method: key of METHODS. op_types: op types to quantize. exclude: node names kept float.
        cache: Path of the calibration-range cache of this method, reused across calls (it must
            first be made with a superset of `op_types`).
        activation_type, extra_options: onnxruntime.quantization settings (recipe variants).
    """
    reader.rewind()
    options = {
        "OpTypesToExcludeOutputQuantization": list(FLOAT_OUTPUT_OPS),
        "CalibStridedMinMax": 1,  # one feed at a time: bounded calibration memory
        **(extra_options or {}),
    }
    printed = StringIO()
    with contextlib.redirect_stdout(printed):  # ORT's histogram calibrators print() their progress
        quantize_static(
            str(prepared), str(out), reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=activation_type,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            calibrate_method=METHODS[method],
            calibration_cache_path=str(cache),
            extra_options=options,
        )
    logger.debug("%s", printed.getvalue())
    return out


def quantize_graph(prepared, out, reader, method, role, exclude, config, cache, op_types=None):
    """`quantize_qdq` with the recipe's op types for `role` (or `op_types`) and the config's
    reduce_range; nodes of the role's other op types and `exclude` compute in float with compactly
    stored weights (`store_weights_compact`), so the file stays small."""
    op_types = op_types or OP_TYPES[role]
    quantize_qdq(prepared, out, reader, method, op_types, exclude, cache, config.reduce_range)
    floated = list(exclude) + graph_nodes(prepared, set(OP_TYPES[role]) - set(op_types))
    if floated:
        store_weights_compact(out, floated, out)
    return out


def quantize_dynamic_baseline(src, out, work):
    """What public SAM-on-ONNX projects ship: `quantize_dynamic` defaults (per-tensor S8 weights).

    Run after `quant_pre_process` shape inference, without which quantize_dynamic rejects graphs
    whose folded weights were deduplicated into Identity nodes.
    """
    inferred = work / f"{out.stem}.inferred.onnx"
    quant_pre_process(str(src), str(inferred), skip_optimization=True)
    quantize_dynamic(str(inferred), str(out), weight_type=QuantType.QInt8)
    inferred.unlink()
    return out


def store_weights_compact(path, nodes, out, float16_op_types=("Conv",)):
    """Keep `nodes` computing in float but store their weights compactly.

    Nodes kept in float by the sensitivity search would otherwise keep FP32 weights and push
    the file over the size target. Gemm / MatMul weights become symmetric int8 per output
    channel + DequantizeLinear (ORT runs them as weight-only int8 kernels). Conv weights become
    float16 + Cast instead: ORT folds the Cast at load and prepacks the weights as for any
    float Conv, but never folds a DequantizeLinear, and a Conv fed by one ran 60 % slower
    (measured: benchmarks/RESULTS.md, "INT8 quantization"). No activation is quantized, so the
    node's arithmetic stays float.

    Args:
        path: Path of a (quantized) ONNX graph; out: Path to write.
        nodes: names of Conv / Gemm / MatMul nodes; those whose input 1 is a float initializer
            used by no other node are converted, others are left as they are.
        float16_op_types: op types whose weights become float16 + Cast rather than int8 + DQ
            (`dynamic_linear` adds Gemm: its float Gemms then run at full float speed).

    Returns:
        list of the node names converted.
    """
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    uses = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    dequantize, converted = [], []
    for node in graph.node:
        if node.name not in nodes or len(node.input) < 2:
            continue
        name = node.input[1]
        init = initializers.get(name)
        if init is None or uses[name] != 1 or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
            continue
        weight = onnx.numpy_helper.to_array(init)
        if node.op_type in float16_op_types:
            graph.initializer.remove(init)
            graph.initializer.append(onnx.numpy_helper.from_array(weight.astype(np.float16), f"{name}_f16"))
            dequantize.append(onnx.helper.make_node("Cast", [f"{name}_f16"], [name], name=f"{name}_f16_Cast",
                                                    to=onnx.TensorProto.FLOAT))
            converted.append(node.name)
            continue
        # Output channels: Gemm B (N, K) if transB else (K, N); MatMul B (K, N).
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        axis = 0 if node.op_type == "Gemm" and trans_b else weight.ndim - 1
        reduce = tuple(i for i in range(weight.ndim) if i != axis)
        scale = (np.abs(weight).max(axis=reduce) / 127.0).astype(np.float32)  # (channels,)
        scale[scale == 0] = 1.0
        shape = [1] * weight.ndim
        shape[axis] = -1
        q = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
        graph.initializer.remove(init)
        graph.initializer.extend([
            onnx.numpy_helper.from_array(q, f"{name}_w8"),
            onnx.numpy_helper.from_array(scale, f"{name}_w8_scale"),
            onnx.numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_w8_zero_point"),
        ])
        dequantize.append(onnx.helper.make_node(
            "DequantizeLinear", [f"{name}_w8", f"{name}_w8_scale", f"{name}_w8_zero_point"], [name],
            name=f"{name}_w8_DequantizeLinear", axis=axis))
        converted.append(node.name)
    ordered = dequantize + list(graph.node)  # DQ of initializers first keeps the graph topologically sorted
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(out))
    return converted


def dynamic_linear(quantized, prepared, op_types, out, reduce_range=True, keep_float=(), grams=None):
    """A copy of a QDQ graph whose Gemm layers quantize their input per call instead.

    Every Gemm (quantized or kept float by the static search) not in `keep_float` becomes a
    DynamicQuantizeMatMul (ORT's contrib op: uint8 input quantized from its own min/max at run
    time, int8 weights symmetric per output column, float bias and output). The Q/DQ pairs only
    Gemms read are dropped; the other `op_types` nodes keep their static Q/DQ. Weights are 7-bit
    with `reduce_range`: per column, 8-bit weights saturate the AVX2 kernel's 16-bit pair sums
    (embedding cosine 0.9990 -> 0.9885 measured on the AVX2 code path; benchmarks/RESULTS.md).
    Gemms in `keep_float` (`search_dynamic_gemms`) stay float Gemms with float16 weights + Cast.

    Args:
        quantized: Path of a graph from `quantize_graph`, or the prepared graph itself (then
            every Gemm goes per call and nothing else is quantized). prepared: Path of the
            prepared float graph it was made from.
        op_types: the op types quantized statically in `quantized`. out: Path to write.
        keep_float: names of Gemms to leave in float.
        grams: {Gemm name: (K, K) Gram matrix of its calibration inputs} (`gptq.GemmInputGrams`):
            those Gemms' weights are rounded by GPTQ; the others (or all, with None) to nearest.

    Returns:
        (out, number of Gemms converted).
    """
    float_model = onnx.load(str(prepared))
    qdq = onnx.load(str(quantized))
    # Every non-Gemm node of the static op types is "kept": quantized ones keep their Q/DQ, kept-
    # float ones their compact weights. Op types not quantized at all are not touched either.
    keep = {n.name for n in qdq.graph.node if n.op_type in op_types and n.op_type != "Gemm"}
    quantized_only(qdq, float_model, keep, tuple(set(op_types) | {"Gemm"}), out)
    model = onnx.load(str(out))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    # Weights and bias from the float graph where it has them: a QDQ bias is int32 at the static
    # input scale, and a kept-float node's weights are int8 per output row already.
    float_inits = {i.name: i for i in float_model.graph.initializer}
    float_inputs = {n.name: list(n.input) for n in float_model.graph.node}

    def constant(node, k):
        source = float_inputs.get(node.name, [])
        if len(source) > k and source[k] in float_inits:
            return onnx.numpy_helper.to_array(float_inits[source[k]])
        return _constant_weight(node.input[k], inits, producers)

    qmax = 63 if reduce_range else 127  # 7-bit: 2 x 255 x 63 < 32767, no AVX2 pair saturation
    nodes, converted = [], 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = constant(node, 1) if node.op_type == "Gemm" else None
        has_bias = len(node.input) > 2 and bool(node.input[2])
        bias = constant(node, 2) if weight is not None and has_bias else None
        if node.name in keep_float and weight is not None:
            # Float weights (and bias) of its own: a weight the static search stored as int8 + DQ
            # would run as weight-only int8 (MatMulNBits: 3x slower per MAC than a float Gemm here).
            for k, value in ((1, weight), (2, bias)):
                if value is not None:
                    node.input[k] = f"{node.name}_float_{k}"
                    graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float32), node.input[k]))
            nodes.append(node)
            continue
        if (node.name in keep_float or weight is None or weight.ndim != 2 or (has_bias and (bias is None or bias.ndim != 1))
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        nodes.append(dynamic_quantize_matmul(graph, node.name, node.input[0],
                                             weight.T if attrs.get("transB", 0) else weight,  # (K, N)
                                             node.output, qmax, bias,  # bias (N,) float or None
                                             gram=(grams or {}).get(node.name)))
        converted += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)  # the replaced weights and their DequantizeLinear nodes
    use_contrib_opset(model)
    onnx.save(model, str(out))
    if keep_float:
        store_weights_compact(out, set(keep_float), out, float16_op_types=("Conv", "Gemm"))
    return out, converted


def gemm_macs(prepared):
    """Multiply-accumulates of each constant-weight Gemm per run: M x K x N, M from the inferred
    shape of its input (`prepare_graph` runs shape inference), or 1 where it is unknown.

    Returns:
        dict node name -> int.
    """
    model = onnx.load(str(prepared))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input)}
    macs = {}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(inits.get(node.input[1], ())) != 2:
            continue
        shape = shapes.get(node.input[0], [])
        rows = shape[0] if len(shape) == 2 and shape[0] > 0 else 1
        macs[node.name] = rows * int(np.prod(inits[node.input[1]]))
    return macs


def quantized_only(quantized, prepared, keep, op_types, out):
    """A copy of a QDQ graph in which only the `keep` nodes still read quantized inputs.

    Every other node of `op_types` reads the float tensors (and float weights) of the prepared
    graph again, and the Q/DQ nodes nobody reads any more are dropped: the one-node-at-a-time
    graphs of the sensitivity search in well under a second each, instead of a quantize_static
    run per node.

    Args:
        quantized, prepared: onnx.ModelProto (the QDQ graph, the graph it was made from).
        keep: names of nodes that stay quantized. out: Path to write.
    """
    model = copy.deepcopy(quantized)
    graph = model.graph
    float_nodes = {n.name: n for n in prepared.graph.node}
    float_inits = {i.name: i for i in prepared.graph.initializer}
    # Names already defined in the QDQ graph stay as they are: ORT's quantizer keeps a Gemm
    # bias's own name on its DequantizeLinear output (int32, scale = input x weight scale).
    present = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in op_types and node.name not in keep and node.name in float_nodes:
            node.ClearField("input")
            node.input.extend(float_nodes[node.name].input)
            for name in node.input:
                if name in float_inits and name not in present:
                    graph.initializer.append(float_inits[name])
                    present.add(name)
    # A Q->DQ'd activation belongs to the nodes that quantize it: its producer (a Conv's output)
    # or an op_types consumer. When none of them is kept, every reader (e.g. the Conv's GELU, a
    # residual Add) gets the float tensor back. Without this, every candidate carried the same
    # ~1/3 of the full graph's error (the Conv outputs) and the ranking was noise.
    producers = {o: n for n in graph.node for o in n.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight or bias: restored above where its node is not kept
        source = producers.get(q.input[0])
        users = readers.get(dq.output[0], [])
        if (source is not None and source.name in keep) or any(u.op_type in op_types and u.name in keep for u in users):
            continue
        for user in users:
            for k, name in enumerate(user.input):
                if name == dq.output[0]:
                    user.input[k] = q.input[0]
        if dq.output[0] in {o.name for o in graph.output}:  # a graph output keeps its name
            dq.op_type = "Identity"
            dq.ClearField("input")
            dq.ClearField("attribute")
            dq.input.append(q.input[0])
    _drop_unused(graph)
    onnx.save(model, str(out))
    return out


def _drop_unused(graph):
    """Remove nodes whose outputs nobody reads (repeatedly), then unread initializers."""
    needed = {o.name for o in graph.output}
    nodes = list(graph.node)
    while True:
        used = needed | {name for n in nodes for name in n.input}
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    used = {name for n in nodes for name in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _constant_weight(name, inits, producers):
    """A weight as float: an initializer, or an int8 initializer through DequantizeLinear
    (`store_weights_compact`'s storage); None for anything else."""
    if name in inits:
        return onnx.numpy_helper.to_array(inits[name])
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input):
        return None
    q, scale, *zero = (onnx.numpy_helper.to_array(inits[i]).astype(np.float32) for i in dq.input)
    zero = zero[0] if zero else np.zeros_like(scale)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if scale.ndim:
        shape[axis] = -1
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def graph_nodes(path, op_types):
    """Names of the nodes of `op_types` in an ONNX file, in graph order."""
    model = onnx.load(str(path), load_external_data=False)
    return [node.name for node in model.graph.node if node.op_type in op_types]


# -- search on the calibration set ---------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationSet:
    """Calibration feeds and the FP32 references every candidate graph is compared with."""

    encoder_feeds: list  # of {"image": (1, 3, 1024, 1024) float32}
    embeddings: list  # FP32 (1, 256, 64, 64) per image
    decoder_feeds: list  # of (image index, decoder feed dict on FP32 embeddings)
    reference_masks: list  # FP32 selected low-res masks (B, 256, 256) bool per decoder feed

    @property
    def prompts(self):
        return sum(feed["point_coords"].shape[0] for _, feed in self.decoder_feeds)


def build_calibration_set(manifest, images, config):
    """Encoder feeds through the runtime preprocessing, FP32 embeddings, prompt feeds, references."""
    pre = manifest.preprocess
    encoder = EncoderSession(manifest.encoder, config.threads)
    decoder = DecoderSession(manifest.decoder, config.threads)
    encoder_feeds = [{"image": calibration.encoder_input(io.load_image(img.path), pre)[0]} for img in images]
    embeddings = [encoder.run(feed["image"]) for feed in encoder_feeds]
    decoder_feeds, reference = [], []
    for index, (img, emb) in enumerate(zip(images, embeddings)):
        input_size = preprocess.preprocess_shape(*img.original_size, pre.image_size)
        for kind, coords, labels in calibration.sample_prompts(input_size, np.random.default_rng(config.seed + index),
                                                               config.sampling):
            mask_input = fidelity.refine_input(decoder, emb, coords, labels) if kind == "refine" else None
            feed = calibration.decoder_feeds(emb, coords, labels, mask_input)
            decoder_feeds.append((index, feed))
            reference.append(fidelity.select_best(*decoder.run(**feed))[0] > 0)
    return CalibrationSet(encoder_feeds, embeddings, decoder_feeds, reference)


class _Scorer:
    """Candidate graphs of one role, measured against FP32 on the calibration set.

    `budget(path)` is the largest fraction of an error budget the candidate uses (<= 1: on
    target): the encoder answers for the worst embedding cosine and for the selected-mask IoU
    of the FP32 decoder on its embeddings, the decoder for the selected-mask IoU on FP32
    embeddings. `error(path)` is the continuous error used to rank nodes.
    """

    def __init__(self, role, manifest, calib, budgets, threads):
        self.role, self.manifest, self.calib, self.budgets, self.threads = role, manifest, calib, budgets, threads
        self._fp32_decoder = DecoderSession(manifest.decoder, threads)

    def _session(self, path):
        spec = dataclasses.replace(getattr(self.manifest, self.role), path=Path(path))
        return (EncoderSession if self.role == "encoder" else DecoderSession)(spec, self.threads)

    def _mask_iou(self, decoder, embeddings):
        ious = []
        for (index, feed), reference in zip(self.calib.decoder_feeds, self.calib.reference_masks):
            low_res, iou = decoder.run(**dict(feed, image_embeddings=embeddings[index]))
            ious.extend(fidelity.mask_iou(fidelity.select_best(low_res, iou)[0] > 0, reference))
        return float(np.mean(ious))

    def budget(self, path):
        session = self._session(path)
        if self.role == "decoder":
            return fidelity.budget_used({"mask_iou": 1 - self._mask_iou(session, self.calib.embeddings)}, self.budgets)
        embeddings = [session.run(feed["image"]) for feed in self.calib.encoder_feeds]
        losses = {
            "cosine": 1 - min(fidelity.cosine(e, r) for e, r in zip(embeddings, self.calib.embeddings)),
            "mask_iou": 1 - self._mask_iou(self._fp32_decoder, embeddings),
        }
        return fidelity.budget_used(losses, self.budgets)

    def error(self, path):
        session = self._session(path)
        if self.role == "encoder":
            feed = self.calib.encoder_feeds[0]
            return 1 - fidelity.cosine(session.run(feed["image"]), self.calib.embeddings[0])
        feeds = [feed for _, feed in self.calib.decoder_feeds[:4]]
        return float(np.mean([1 - fidelity.cosine(session.run(**f)[0], self._fp32_decoder.run(**f)[0]) for f in feeds]))


def exclusion_count(errors, start, used):
    """How many of the most sensitive nodes to keep in float next.

    The measured budget use is attributed to the still-quantized nodes in proportion to their
    one-at-a-time errors; keeping a share s of that error in float leaves about used * (1 - s).

    Args:
        errors: one-at-a-time errors, sorted high to low. start: nodes already kept in float.
        used: budget use measured with `start` nodes kept in float (> 1).

    Returns:
        the smallest count > start estimated to bring the use to <= 1 (at most len(errors)).
    """
    remaining = sum(errors[start:])
    needed = 1.0 - 1.0 / used  # share of the remaining error to remove
    count, removed = start, 0.0
    while count < len(errors):
        removed += errors[count]
        count += 1
        if remaining <= 0 or removed / remaining >= needed:
            break
    return count


def quantized_format(recipes):
    """How the quantized graphs carry INT8: static QDQ, per-call DynamicQuantizeMatMul, or both."""
    kinds = set()
    for recipe in recipes.values():
        if recipe["static_op_types"]:
            kinds.add("QDQ")
        if recipe["dynamic_op_types"]:
            kinds.add("DynamicQuantizeMatMul")
    return " + ".join(sorted(kinds, key=["QDQ", "DynamicQuantizeMatMul"].index)) or "none"


def precision_name(linear, op_types):
    """The manifest's precision of a graph: static QDQ, dynamic only, or both (hybrid)."""
    if linear == "static":
        return PRECISION
    return "int8-hybrid" if set(op_types) - {"Gemm"} else "int8-dynamic"


def search_graph(role, prepared, reader, scorer, config, work, progress, grams=None):
    """Pick the calibration method by measurement, then keep the most sensitive nodes in float
    (weights still int8) until the calibration-set budget use is <= 1, and if that is not enough,
    quantize fewer op types (OP_TYPE_LADDER); then try the Gemms quantized per call
    (`dynamic_linear`, weights rounded by GPTQ against `grams` where given) as `config.linear` says.

    Returns:
        (path of the chosen INT8 graph, recipe dict for the manifest).
    """
    methods = list(METHODS) if config.method == "auto" else [config.method]
    used, paths = {}, {}
    for method in methods:
        progress(f"{role}: calibrating ({method}) and quantizing")
        paths[method] = quantize_graph(prepared, work / f"{role}.{method}.onnx", reader, method, role, (),
                                       config, work / f"{role}.{method}.ranges.json")
        used[method] = scorer.budget(paths[method])
        progress(f"{role}: {method}: {used[method]:.0%} of the calibration error budget")
    method = min(used, key=used.get)
    path, budget, excluded, errors = paths[method], used[method], [], {}
    cache = work / f"{role}.{method}.ranges.json"
    op_types = OP_TYPES[role]
    if budget > 1 and config.max_excluded > 0:
        candidates = graph_nodes(prepared, op_types)
        progress(f"{role}: over budget; measuring the sensitivity of {len(candidates)} nodes, one at a time")
        quantized, float_model = onnx.load(str(paths[method])), onnx.load(str(prepared))
        for name in candidates:
            one = quantized_only(quantized, float_model, {name}, OP_TYPES[role], work / f"{role}.one.onnx")
            errors[name] = scorer.error(one)
        ranked = sorted(candidates, key=errors.get, reverse=True)
        limit = min(config.max_excluded, len(ranked))
        while budget > 1 and len(excluded) < limit:
            count = min(exclusion_count([errors[n] for n in ranked], len(excluded), budget), limit)
            excluded = ranked[:count]
            path = work / f"{role}.{method}.x{count}.onnx"
            quantize_graph(prepared, path, reader, method, role, excluded, config, cache)
            budget = scorer.budget(path)
            progress(f"{role}: {count} node(s) kept in float -> {budget:.0%} of the budget")
    # Still over: the error is spread over many nodes; quantize fewer op types (OP_TYPE_LADDER).
    by_op_types = {"+".join(op_types): round(budget, 4)}
    for smaller in OP_TYPE_LADDER[role] if budget > 1 else ():
        trial = quantize_graph(prepared, work / f"{role}.{method}.{'-'.join(smaller)}.onnx", reader, method, role,
                               excluded, config, cache, smaller)
        used_here = scorer.budget(trial)
        by_op_types["+".join(smaller)] = round(used_here, 4)
        progress(f"{role}: only {'+'.join(smaller)} quantized -> {used_here:.0%} of the budget")
        if used_here < budget:
            path, budget, op_types = trial, used_here, smaller
        if budget <= 1:
            break
    linear, by_linear, search_excluded = "static", {"static": round(budget, 4)}, excluded
    static_path, float_gemms, gemm_errors = path, [], {}
    trial, converted = (None, 0) if config.linear == "static" else dynamic_linear(
        path, prepared, op_types, work / f"{role}.dynamic-linear.onnx", config.reduce_range, grams=grams)
    if converted:  # a graph without Gemms has nothing to quantize per call
        used_here = scorer.budget(trial)
        by_linear["dynamic"] = round(used_here, 4)
        progress(f"{role}: {converted} Gemm(s) quantized per call (DynamicQuantizeMatMul) -> {used_here:.0%} of the budget")
        if config.linear == "dynamic" or used_here <= max(1.0, budget):
            path, budget, linear = trial, used_here, "dynamic"
            # Kept-float Gemms are dynamic now; only static op types' nodes are still kept float.
            static_nodes = set(graph_nodes(prepared, set(op_types) - {"Gemm"}))
            search_excluded, excluded = excluded, [n for n in excluded if n in static_nodes]
            if budget > 1 and config.max_excluded > len(excluded):
                path, budget, float_gemms, gemm_errors = search_dynamic_gemms(
                    role, static_path, prepared, op_types, scorer, config, work, progress, (path, budget),
                    config.max_excluded - len(excluded), grams)
                by_linear["dynamic_with_float_gemms"] = round(budget, 4)
                excluded = excluded + float_gemms
    static_op_types = [t for t in op_types if linear == "static" or t != "Gemm"]
    recipe = {
        "method": method,
        # False for int8-dynamic: the method chose what the search kept float, but no calibrated
        # activation range is left in the graph (every input is quantized per call).
        "calibrated_ranges_used": bool(static_op_types),
        "linear": linear,
        "budget_used_by_linear": by_linear,
        "budget_used_by_method": {m: round(u, 4) for m, u in used.items()},
        "budget_used": round(budget, 4),
        "budgets": {k: round(v, 6) for k, v in scorer.budgets.items()},
        "precision": precision_name(linear, op_types),
        "op_types": list(op_types),
        "static_op_types": static_op_types,
        "dynamic_op_types": ["Gemm"] if linear == "dynamic" else [],
        "budget_used_by_op_types": by_op_types,
        "float_compute_op_types": sorted(set(OP_TYPES[role]) - set(op_types)),
        "float_output_op_types": list(FLOAT_OUTPUT_OPS),
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "per_channel": True,
        "reduce_range": config.reduce_range,
        # How the per-call Gemms' weights were rounded (static Q/DQ weights: ORT's nearest).
        "dynamic_weight_rounding": (None if linear != "dynamic" else
                                    f"gptq (damp {GPTQ_DAMP})" if grams else "nearest"),
        "excluded_nodes": excluded,
        "search_excluded_nodes": search_excluded,  # before the linear layers went dynamic
        "excluded_nodes_storage": ("float compute; Gemm/MatMul weights int8 (per-channel, symmetric) + "
                                   "DequantizeLinear, Conv weights float16 + Cast"
                                   + ("; with dynamic linear layers, the static search's Gemms are "
                                      "DynamicQuantizeMatMul too, and the Gemms kept float by the "
                                      "per-call search have float16 weights + Cast" if linear == "dynamic" else "")),
        "sensitivity_top": {n: round(errors[n], 7) for n in sorted(errors, key=errors.get, reverse=True)[:16]},
        # The per-call search (search_dynamic_gemms): Gemms kept float, and the one-at-a-time
        # errors in the order it keeps them (error per multiply-accumulate).
        "float_gemms": float_gemms,
        "dynamic_sensitivity_top": {n: round(e, 7) for n, e in list(gemm_errors.items())[:16]},
        "preparation": "ORT extended-level fusions (lookup tables kept unfolded), quant_pre_process shape inference",
    }
    return path, recipe


def search_dynamic_gemms(role, static_path, prepared, op_types, scorer, config, work, progress, start, limit,
                         grams=None):
    """Keep Gemms in float, the ones whose per-call quantization costs most accuracy per
    multiply-accumulate first, until the calibration-set budget use is <= 1.

    Each Gemm's error is measured alone (it quantized per call, every other node float); ranking
    by error per MAC buys the accuracy with the least float work (the small attention output
    projections come first on vit_t). The search stops at the first step that does not lower the
    measured budget use and keeps the best graph: on random weights the selected-mask IoU has a
    floor of changed picks between near-tied scores that more float Gemms do not lower
    (measured at calibration share 0.5: none 134 %, 5 Gemms 131 %, 12 136 %, 18 170 %, 32 129 %;
    benchmarks/RESULTS.md, "INT8 quantization, session 8").

    Args:
        static_path: the graph `dynamic_linear` converts (static Q/DQ of the other op types).
        start: (path, budget use) of the every-Gemm-per-call graph (use > 1).
        limit: most Gemms to keep float.
        grams: as `dynamic_linear`'s.

    Returns:
        (path of the chosen graph, its budget use, the Gemms kept float,
        {Gemm: one-at-a-time error} in keeping order).
    """
    macs = gemm_macs(prepared)
    gemms = [n for n in graph_nodes(prepared, ("Gemm",)) if n in macs]
    progress(f"{role}: per-call Gemms over budget; measuring the error of {len(gemms)} Gemms, one at a time")
    errors = {}
    for name in gemms:
        one, _ = dynamic_linear(prepared, prepared, (), work / f"{role}.one-dynamic.onnx", config.reduce_range,
                                keep_float=set(gemms) - {name}, grams=grams)
        errors[name] = scorer.error(one)
    ranked = sorted(gemms, key=lambda n: errors[n] / macs[n], reverse=True)
    (path, used), kept, limit = start, [], min(limit, len(ranked))
    while used > 1 and len(kept) < limit:
        count = min(exclusion_count([errors[n] for n in ranked], len(kept), used), limit)
        trial, _ = dynamic_linear(static_path, prepared, op_types, work / f"{role}.dynamic-linear.f{count}.onnx",
                                  config.reduce_range, keep_float=ranked[:count], grams=grams)
        used_here = scorer.budget(trial)
        progress(f"{role}: {count} Gemm(s) kept in float, the rest per call -> {used_here:.0%} of the budget")
        if used_here >= used:
            progress(f"{role}: no better than {len(kept)} kept in float; stopping there")
            break
        path, used, kept = trial, used_here, ranked[:count]
    return path, used, kept, {n: errors[n] for n in ranked}


# -- the command ----------------------------------------------------------------------------------

def _split_images(source, config):
    """Calibration and held-out image lists (validated), by sorted file name."""
    paths = calibration.list_images(source)
    images = calibration.load_images(paths, config.min_images + config.holdout)
    cut = len(images) - config.holdout
    return images[:cut], images[cut:]


def _budgets(role, config, roles):
    """Error budgets of one graph on the calibration set: its share of the gate's budgets."""
    share = config.calibration_share / len(roles)  # both graphs move the masks; only the encoder the embedding
    budgets = {"mask_iou": share * (1.0 - config.min_mask_iou)}
    if role == "encoder":
        budgets["cosine"] = config.calibration_share * (1.0 - config.min_cosine)
    return budgets


def _write_manifest(staging, manifest, graphs, recipe):
    """manifest.json of the INT8 directory: the FP32 one with new graph entries and the recipe."""
    doc = copy.deepcopy(manifest.raw)
    def declared(specs):
        return [(spec.name, spec.shape) for spec in specs]

    contract = {"encoder": (manifest_mod.ENCODER_INPUTS, manifest_mod.ENCODER_OUTPUTS),
                "decoder": (manifest_mod.DECODER_INPUTS, manifest_mod.DECODER_OUTPUTS)}
    if manifest.points_decoder is not None:  # copied as it is: basic or current contract, as declared
        contract["points_decoder"] = (declared(manifest.points_decoder.inputs), declared(manifest.points_decoder.outputs))
    doc["graphs"].pop("points_decoder", None)  # kept only when `graphs` has it (decoder not quantized)
    for role, (path, precision) in graphs.items():
        doc["graphs"][role] = manifest_mod.graph_entry(role, path, precision, manifest.weights_id, *contract[role])
    doc["quantization"] = recipe
    atomic_write_text(staging / manifest_mod.MANIFEST_NAME, json.dumps(doc, indent=2) + "\n")


def _sessions(manifest, paths, threads, fallback=None):
    """(EncoderSession, PromptDecoder) of the manifest's graphs with some files swapped.

    Args:
        paths: dict role -> Path of the graph to use instead of the manifest's; "points_decoder"
            may map to None: no points decoder (an INT8 decoder serves every prompt).
        fallback: an (EncoderSession, PromptDecoder) whose sessions serve the roles not in
            `paths` (default: new ones).
    """
    reused = {} if fallback is None else {"encoder": fallback[0], "decoder": fallback[1].decoder,
                                          "points_decoder": fallback[1].points_decoder}

    def session(role, kind):
        if role not in paths and role in reused:
            return reused[role]
        spec = getattr(manifest, role)
        path = paths.get(role, None if spec is None else spec.path)
        return None if path is None else kind(dataclasses.replace(spec, path=Path(path)), threads)

    decoder = PromptDecoder(session("decoder", DecoderSession), session("points_decoder", PointsDecoderSession))
    return session("encoder", EncoderSession), decoder


def quantize_model(model_dir, calib, out_dir, config=QuantizeConfig(), progress=None):
    """Quantize a tinysam-rt model directory to INT8 and publish it atomically.

    Args:
        model_dir: FP32 tinysam-rt model directory (its manifest and sha256 are verified).
        calib: calibration images: a directory (every file in it must be an image) or a glob.
        out_dir: output model directory: new, empty or an earlier model directory (the rule of
            `tinysam_export.out_dir`); created or replaced whole, only if everything succeeds.
        config: QuantizeConfig.
        progress: optional callable(str) receiving progress lines (the CLI prints them).

    Returns:
        the report dict (also the manifest's "quantization" block).

    Raises:
        FileNotFoundError / ModelFileError: `model_dir` is not a (valid) tinysam-rt model.
        ValueError: bad config, an `out_dir` the rule refuses (checked before any slow step), too
            few calibration images, a file that is not an image (or is under 2 pixels on a
            side), or a `model_dir` that is already quantized.
        GateFailedError (a RuntimeError): the accuracy gate failed; nothing was written (unless
            config.gate is False); its `report` has the numbers.
    """
    progress = progress or (lambda line: logger.info("%s", line))
    check_config(config)
    manifest = manifest_mod.load_manifest(model_dir)
    check_out_dir(model_dir, out_dir)
    not_fp32 = [f"{g.role} is {g.precision}" for g in manifest.graphs if g.precision != "fp32"]
    if not_fp32 or manifest.quantization is not None:
        raise ValueError(f"{model_dir} is already quantized ({', '.join(not_fp32) or 'manifest has a quantization recipe'}); "
                         f"quantize the FP32 export it came from")
    calib_images, held_images = _split_images(calib, config)
    roles = ["encoder", "decoder"] if config.only == "both" else [config.only]
    points = manifest.points_decoder
    current = [name for name, _ in manifest_mod.POINTS_DECODER_INPUTS]
    if config.upscaler == "int8" and (points is None or [spec.name for spec in points.inputs] != current):
        raise ValueError(f"{model_dir}: upscaler='int8' needs a points decoder with the per-prompt upscaler "
                         f"(re-export with this tinysam-rt), and this model has {'none' if points is None else 'an older one'}")
    with tempfile.TemporaryDirectory(prefix="tinysam-quantize-") as tmp, atomic_directory(out_dir) as staging:
        work = Path(tmp)
        progress(f"calibration set: {len(calib_images)} images through the runtime preprocessing")
        calib_set = build_calibration_set(manifest, calib_images, config)
        graphs, recipes, dynamic = {}, {}, {}
        for role in roles:
            spec = getattr(manifest, role)
            prepared = prepare_graph(spec.path, work / f"{role}.prepared.onnx")
            feeds = calib_set.encoder_feeds if role == "encoder" else [feed for _, feed in calib_set.decoder_feeds]
            reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
            scorer = _Scorer(role, manifest, calib_set, _budgets(role, config, roles), config.threads)
            grams = None
            if config.linear != "static" and config.weight_rounding == "gptq":
                progress(f"{role}: Gram matrices of the Gemm inputs on the calibration set (GPTQ rounding)")
                grams = GemmInputGrams(prepared, work / f"{role}.gemm-inputs.onnx", config.threads).grams(feeds)
            path, recipes[role] = search_graph(role, prepared, reader, scorer, config, work, progress, grams)
            graphs[role] = (shutil.copyfile(path, staging / INT8_FILES[role]), recipes[role]["precision"])
            stamp_weights_id(graphs[role][0], manifest.weights_id)
            progress(f"{role}: building the quantize_dynamic baseline")
            dynamic[role] = quantize_dynamic_baseline(spec.path, work / f"{role}.dynamic.onnx", work)
        for role in ("encoder", "decoder"):
            if role not in graphs:  # --only: the other graph is copied unchanged
                spec = getattr(manifest, role)
                graphs[role] = (shutil.copyfile(spec.path, staging / spec.path.name), spec.precision)
        # The points decoder stays only beside the FP32 decoder: next to an INT8 decoder it would
        # take every prompt without a mask input and the INT8 decoder would never run.
        if points is not None and "decoder" not in roles and config.upscaler == "int8":
            upscaler_grams = None
            if config.weight_rounding == "gptq":
                progress("points_decoder: Gram matrices of the upscaler GEMM inputs on the calibration prompts (GPTQ rounding)")
                upscaler_grams = UpscalerInputGrams(points.path, work, config.threads).grams(
                    calibration.points_decoder_feed(feed) for _, feed in calib_set.decoder_feeds
                    if not feed["has_mask_input"].any())  # prompts with a mask input go to the plain decoder
            converted, biases = int8_upscaler(points.path, staging / points.path.name, config.reduce_range,
                                              upscaler_grams)
            graphs["points_decoder"] = (staging / points.path.name, UPSCALER_PRECISION)
            recipes["points_decoder"] = {
                "precision": UPSCALER_PRECISION, "linear": "dynamic", "upscaler": "int8",
                "static_op_types": [], "dynamic_op_types": ["MatMul"], "converted_matmuls": converted,
                "biases_in_matmul": biases, "reduce_range": config.reduce_range,
                "dynamic_weight_rounding": f"gptq (damp {GPTQ_DAMP})" if upscaler_grams else "nearest",
                "what": "the per-prompt mask upscaler's GEMMs as DynamicQuantizeMatMul (int8 weights per "
                        "output column); transformer, IoU head and upscaler gate float",
            }
            progress(f"points_decoder: {converted} upscaler GEMMs quantized per call (DynamicQuantizeMatMul), "
                     f"{biases} with their bias inside")
        elif points is not None and "decoder" not in roles:
            graphs["points_decoder"] = (shutil.copyfile(points.path, staging / points.path.name), points.precision)
        held = [(img.path.name, io.load_image(img.path)) for img in held_images]
        held += [(f"synthetic-{k}", calibration.synthetic_image(768 + 64 * k, 1024 - 96 * k, config.seed + k))
                 for k in range(config.synthetic)]
        progress(f"evaluating FP32 / static / dynamic on {len(held)} held-out images")
        fp32 = _sessions(manifest, {}, config.threads)
        # What the runtime would load from each directory: point prompts go to its points decoder.
        ours = {role: graphs[role][0] for role in recipes}  # the graphs quantized here
        kept_points = {} if "points_decoder" in graphs else {"points_decoder": None}
        pipelines = {"fp32": fp32,
                     "static": _sessions(manifest, {**ours, **kept_points}, config.threads, fp32),
                     "dynamic": _sessions(manifest, {**dynamic, **kept_points}, config.threads, fp32)}
        scores = fidelity.evaluate(pipelines, held, manifest.preprocess, config.sampling, config.seed + 1000)
        sizes = {}
        for role in ["encoder", "decoder"] + (["points_decoder"] if "points_decoder" in recipes else []):
            fp32_bytes = getattr(manifest, role).path.stat().st_size
            size = Path(graphs[role][0]).stat().st_size
            sizes[role] = {"precision": graphs[role][1], "fp32_bytes": fp32_bytes, "bytes": size,
                           "ratio": round(size / fp32_bytes, 4),
                           "dynamic_bytes": dynamic[role].stat().st_size if role in dynamic else None}
        failures = fidelity.gate_failures(scores, sizes["encoder"]["ratio"] if "encoder" in roles else None,
                                          config.min_cosine, config.min_mask_iou, config.max_size_ratio)
        report = {
            "tool": "tinysam quantize",
            "model": manifest.model,
            "weights_id": manifest.weights_id,
            "source": {"encoder_sha256": manifest.encoder.sha256, "decoder_sha256": manifest.decoder.sha256},
            "points_decoder": ("upscaler GEMMs int8 (DynamicQuantizeMatMul), the rest copied" if "points_decoder" in recipes else
                               "copied (decoder not quantized)" if "points_decoder" in graphs else
                               "dropped: the INT8 decoder serves every prompt" if points is not None else None),
            "format": quantized_format(recipes),
            "graphs": recipes,
            "calibration": {
                "images": [{"file": img.path.name, "sha256": img.sha256} for img in calib_images],
                "prompts": calib_set.prompts,
                "prompt_sampling": dataclasses.asdict(config.sampling),
                "seed": config.seed,
                "share_of_gate_budget": config.calibration_share,
            },
            "held_out": [name for name, _ in held],
            "held_out_images": [{"file": img.path.name, "sha256": img.sha256} for img in held_images],
            "fidelity": scores,
            "sizes": sizes,
            "gate": {"enforced": config.gate, "passed": not failures, "failures": failures,
                     "min_cosine": config.min_cosine, "min_mask_iou": config.min_mask_iou,
                     "max_size_ratio": config.max_size_ratio},
            "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__},
        }
        if failures and config.gate:
            raise GateFailedError("accuracy gate failed, nothing written: " + "; ".join(failures)
                                  + " (--no-gate writes it anyway)", report)
        _write_manifest(staging, manifest, graphs, report)
        atomic_write_text(staging / REPORT_FILES[0], json.dumps(report, indent=2) + "\n")
        atomic_write_text(staging / REPORT_FILES[1], fidelity.report_markdown(report))
        # Publish only what the runtime itself loads (sha256, I/O contract) and runs.
        image = held[0][1]
        TinySAMPredictor(image, model_dir=staging, threads=config.threads).predict(
            point_coords=[[image.shape[1] / 2, image.shape[0] / 2]])
    return report
