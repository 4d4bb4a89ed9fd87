"""INT8 mask upscaler for the points decoder: its GEMMs quantized per call.

In everything mode the points decoder's per-prompt mask upscaler (GEMMs standing for SAM's
ConvTranspose2d pair, split by kernel row: see `onnx_wrappers.UpscalerGemms`; a LayerNorm and
GELUs; run once per prompt in a Scan) is about half of the decoder's time when every mask is
computed. Its weights are constants, so each GEMM can be a
DynamicQuantizeMatMul (uint8 input quantized from its own min/max on every call, int8 weights
symmetric per output column): measured 7.96 -> 5.15 ms per prompt for the Scan (ORT profiler,
2 threads; benchmarks/RESULTS.md, "Everything mode"). Only mask logits move: the IoU head runs
before the upscaler, so predicted IoUs, the selected token and the upscaler gate are unchanged.
The transformer stays float: its per-prompt products have activations on both sides.

No torch: onnx and numpy only.
"""

import numpy as np
import onnx

from tinysam_export.gptq import gptq_int8

UPSCALER_PRECISION = "int8-upscaler"  # the points decoder's manifest precision after `int8_upscaler`


def per_column_int8(weight, qmax):
    """Symmetric int8 quantization of a (K, N) float weight, one scale per output column.

    Returns:
        q (K, N) int8 in [-qmax, qmax]; scale (N,) float32 (1.0 for an all-zero column).
    """
    scale = (np.abs(weight).max(axis=0) / qmax).astype(np.float32)  # (N,)
    scale[scale == 0] = 1.0
    return np.clip(np.round(weight / scale), -qmax, qmax).astype(np.int8), scale


def dynamic_quantize_matmul(graph, name, x, weight, outputs, qmax, bias=None, weight_key=None, gram=None):
    """A DynamicQuantizeMatMul node computing `x @ weight (+ bias)`, its int8 weights added to `graph`.

    Args:
        graph: onnx GraphProto that receives the weight, scale, zero point (and bias) initializers.
        name: node name, also the bias initializer's prefix. x: name of the float input.
        weight: (K, N) float array. outputs: list of output names. qmax: 63 (7-bit) or 127.
        bias: (N,) float array or None.
        weight_key: prefix of the int8 weight, scale and zero point (default `name`); nodes given
            the same key (the same float weight) share one int8 copy.
        gram: (K, K) Gram matrix of the input over calibration rows: the weights are rounded by
            GPTQ against it (`gptq.gptq_int8`); None rounds each weight to nearest.
    Returns:
        the NodeProto (not added to `graph`: the caller places it).
    """
    key = name if weight_key is None else weight_key
    inputs = [x, f"{key}_dq_weight", f"{key}_dq_scale", f"{key}_dq_zero"]
    if not any(init.name == inputs[1] for init in graph.initializer):
        weight = np.asarray(weight, np.float32)
        q, scale = per_column_int8(weight, qmax) if gram is None else gptq_int8(weight, gram, qmax)  # (K, N) int8, (N,)
        graph.initializer.extend([onnx.numpy_helper.from_array(q, inputs[1]),
                                  onnx.numpy_helper.from_array(scale, inputs[2]),
                                  onnx.numpy_helper.from_array(np.zeros(scale.shape, np.int8), inputs[3])])
    if bias is not None:
        inputs.append(f"{name}_dq_bias")
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(bias, np.float32), inputs[-1]))
    return onnx.helper.make_node("DynamicQuantizeMatMul", inputs, list(outputs), name=name, domain="com.microsoft")


def use_contrib_opset(model):
    """Declare ORT's com.microsoft domain (DynamicQuantizeMatMul's) in `model` if it is not yet."""
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def _subgraphs(node):
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]


def _graphs_under(graph):
    """`graph` and every graph nested in its nodes (If branches, Scan bodies), depth first."""
    found = [graph]
    for node in graph.node:
        for sub in _subgraphs(node):
            found += _graphs_under(sub)
    return found


def _names_read(graph):
    """Every tensor name read by a node of `graph` or of any graph nested in it, or returned by one
    of those graphs (a branch may return an initializer as it is)."""
    graphs = _graphs_under(graph)
    return ({name for g in graphs for n in g.node for name in n.input if name}
            | {value.name for g in graphs for value in g.output})


def _bias_add(graph, matmul, inits, readers):
    """The Add that only adds a constant (N,) bias to `matmul`'s output, or None.

    Args:
        graph: the GraphProto holding `matmul`. inits: initializers in scope, by name.
        readers: name -> how many times any node of the model reads it or a graph returns it.
    Returns:
        (add node, bias array) or None.
    """
    out = matmul.output[0]
    if readers.get(out, 0) != 1:
        return None
    add = next((n for n in graph.node if n.op_type == "Add" and out in n.input), None)
    if add is None:
        return None
    other = add.input[1] if add.input[0] == out else add.input[0]
    if other not in inits:
        return None
    bias = onnx.numpy_helper.to_array(inits[other])
    n = onnx.numpy_helper.to_array(inits[matmul.input[1]]).shape[1]
    return (add, bias) if bias.shape == (n,) else None


def _read_counts(graph):
    """name -> how many times a node of `graph` or of a graph nested in it reads it, or one of
    those graphs returns it."""
    counts = {}
    for g in _graphs_under(graph):
        for name in [name for n in g.node for name in n.input if name] + [v.name for v in g.output]:
            counts[name] = counts.get(name, 0) + 1
    return counts


def int8_upscaler(src, out, reduce_range=True):
    """Write a copy of a points decoder whose upscaler GEMMs are DynamicQuantizeMatMul.

    The upscaler is the body of the graph's one Scan (see `export_onnx.export_points_decoder`);
    every MatMul in it (nested graphs included) with a constant 2-D weight is converted. A bias
    Add right after it (a constant of the GEMM's width, nothing else reading the product) goes
    into the DynamicQuantizeMatMul's bias input: ORT would otherwise fuse that Add with the GELU
    after it into BiasGelu, measured 1.33 vs 0.68 ms for Gelu alone on a (16384, 128) tensor. GEMMs
    of the same float weight share its int8 copy. The float weights are dropped when nothing else
    reads them.

    Args:
        src: Path of a points_decoder.onnx (the current contract: gate and image-side cache).
        out: Path to write.
        reduce_range: 7-bit weights (qmax 63): 2 x 255 x 63 < 32767, so the u8 x s8 pair sums of
            x86 CPUs without VNNI cannot saturate; 8-bit otherwise.

    Returns:
        (converted, biases): how many MatMuls were converted (6 for vit_t) and how many bias Adds
        went into them.

    Raises:
        ValueError: the graph has no Scan, or no constant-weight MatMul inside it.
    """
    model = onnx.load(str(src))
    scans = [n for n in model.graph.node if n.op_type == "Scan"]
    if len(scans) != 1:
        raise ValueError(f"{src}: expected the points decoder's one per-prompt upscaler Scan, found {len(scans)} Scan nodes")
    qmax = 63 if reduce_range else 127
    outer = {i.name: i for i in model.graph.initializer}
    readers = _read_counts(model.graph)
    converted, folded = 0, []
    for graph in _graphs_under(_subgraphs(scans[0])[0]):
        inits = {**outer, **{i.name: i for i in graph.initializer}}  # inner names shadow outer ones
        for node in graph.node:
            weight = onnx.numpy_helper.to_array(inits[node.input[1]]) if node.op_type == "MatMul" and node.input[1] in inits else None
            if weight is None or weight.ndim != 2:
                continue
            add = _bias_add(graph, node, inits, readers)
            outputs, bias = (add[0].output, add[1]) if add else (node.output, None)
            # In place: re-adding nodes would copy them and detach the nested graphs still to visit.
            node.CopyFrom(dynamic_quantize_matmul(graph, node.name or node.output[0], node.input[0], weight,
                                                  outputs, qmax, bias, weight_key=node.input[1]))
            converted += 1
            if add:
                folded.append((graph, add[0]))
    for graph, add in reversed(folded):  # after the walk, innermost graphs first: no graph still to visit moves
        graph.node.remove(add)
    if not converted:
        raise ValueError(f"{src}: no MatMul with a constant weight in the upscaler Scan; is it a tinysam-rt points decoder?")
    read = _names_read(model.graph)
    for graph in _graphs_under(model.graph):  # the replaced float weights, wherever they were
        kept = [i for i in graph.initializer if i.name in read]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    use_contrib_opset(model)
    onnx.save(model, str(out))
    return converted, len(folded)
