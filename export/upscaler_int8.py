"""INT8 mask upscaler for the points decoder: its GEMMs quantized per call.

In everything mode the points decoder's per-prompt mask upscaler (GEMMs standing for SAM's
ConvTranspose2d pair, split by kernel row: see `onnx_wrappers.UpscalerGemms`; a LayerNorm and
GELUs; run once per prompt in a Scan) is about half of the decoder's time when every mask is
computed. Its weights are constants, so each GEMM can be a
DynamicQuantizeMatMul (uint8 input quantized from its own min/max on every call, int8 weights
symmetric per output column): measured 7.96 -> 5.15 ms per prompt for the Scan (ORT profiler,
2 threads; benchmarks/RESULTS.md, "Everything mode"). Only mask logits move: the IoU head runs
before the upscaler, so predicted IoUs, the selected token and the upscaler gate are unchanged.
The transformer stays float: its per-prompt products have activations on both sides. The
weights are rounded by GPTQ against the calibration prompts' upscaler inputs when the caller
gives their Gram matrices (`UpscalerInputGrams`): held-out mask IoU vs the FP32 upscaler 0.982 ->
0.987 on vit_t's random weights (benchmarks/RESULTS.md, "INT8 quantization, session 10").

No torch: onnx, onnxruntime and numpy only.
"""

import numpy as np
import onnx
import onnxruntime as ort

from tinysam_export.gptq import add_float_outputs, gptq_int8, gram
from tinysam_rt.sessions import make_session_options

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


def _the_scan(model, src):
    """The points decoder's one per-prompt upscaler Scan node (ValueError if there is not one)."""
    scans = [n for n in model.graph.node if n.op_type == "Scan"]
    if len(scans) != 1:
        raise ValueError(f"{src}: expected the points decoder's one per-prompt upscaler Scan, found {len(scans)} Scan nodes")
    return scans[0]


def _constant_matmuls(graph, inits):
    """MatMul nodes of `graph` whose weight (input 1) is a 2-D constant in `inits` (name -> TensorProto)."""
    return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def _upscaler_alone(model, src):
    """The graph under the points decoder's Scan that holds the upscaler GEMMs, as a model of its
    own whose outputs are those GEMMs' inputs. Only the first such graph (the exporter puts all
    of them in the gate's If branch); GEMMs in any other would get no Gram matrix, so nearest
    rounding.

    Returns:
        (ModelProto, {its input name: the Scan input it is a per-prompt slice of},
        [its inputs read whole from the outer graph (per-image values)], the GEMM MatMul nodes).
    """
    scan = _the_scan(model, src)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in scan.attribute}
    body = attrs["body"]
    if attrs.get("num_scan_inputs") != len(scan.input) or any(attrs.get("scan_input_axes", [])):
        raise ValueError(f"{src}: the upscaler Scan must scan every input along axis 0")
    outer = {i.name: i for g in (model.graph, body) for i in g.initializer}
    graph = next((g for g in _graphs_under(body) if _constant_matmuls(g, {**outer, **{i.name: i for i in g.initializer}})), None)
    if graph is None:
        raise ValueError(f"{src}: no MatMul with a constant weight in the upscaler Scan; is it a tinysam-rt points decoder?")
    own = {i.name: i for i in graph.initializer}
    matmuls = _constant_matmuls(graph, {**outer, **own})
    read = {name for n in graph.node for name in n.input if name} - {name for n in graph.node for name in n.output} - set(own)
    slices = {v.name: (k, v) for k, v in enumerate(body.input)}  # body input k <- Scan input k, per prompt
    computed_outside = {name for n in model.graph.node for name in n.output}  # e.g. per-image values
    whole = sorted((read - set(slices) - set(outer)) & computed_outside)
    if read - set(slices) - set(outer) - computed_outside:
        raise ValueError(f"{src}: the upscaler reads {sorted(read - set(slices) - set(outer) - computed_outside)} "
                         f"from outside the Scan")
    inputs = sorted(read & set(slices))
    alone = onnx.helper.make_graph(
        list(graph.node), "upscaler",
        [slices[name][1] for name in inputs] + [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in whole],
        [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in sorted({n.input[0] for n in matmuls})],
        list(own.values()) + [outer[name] for name in sorted(read & set(outer))])
    alone_model = onnx.helper.make_model(alone, opset_imports=model.opset_import, ir_version=model.ir_version)
    return alone_model, {name: scan.input[slices[name][0]] for name in inputs}, whole, matmuls


FACTORED_ROWS = ("rows0", "rows1")  # the factored points decoder's per-prompt first-GEMM weights (Scan inputs)
FACTORED_RSTD = "rstd1"  # its InvStdDev of the last image LayerNorm, beside the final image tokens
FIRST_WEIGHT_SUFFIX = "upscaler.w1_{}"  # the first ConvTranspose's GEMM weight of kernel row i1


def _drop_unread(graph):
    """Remove nodes of `graph` none of whose outputs is read (in it or a nested graph) or
    returned, until none is left, then its initializers nothing reads."""
    while True:
        read = _names_read(graph)
        dead = [n for n in graph.node if not any(name in read for name in n.output if name)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = _names_read(graph)
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def on_image_tokens(model, src):
    """Undo the points decoder's factored first upscaler GEMM (`onnx_wrappers.factored_first_weights`).

    Exports since the factoring compute the first upscaler GEMM per prompt from small factors,
    whose weights change with every prompt, so they cannot be quantized ahead of time. This
    rewrites the graph to multiply the final (4096, 256) image tokens by the GEMM's constant
    weight W_i instead, as exports before the factoring did (same function: X2 W_i + b), so that
    `int8_upscaler` can quantize it: measured at B=16, 2 cores, the INT8 upscaler on the image
    tokens is 13.4 ms per prompt against 14.3 ms with the factored GEMM kept float (FP32 factored: 15.2).

    X2 is the head's LayerNormalization that returns the Scan input `rstd1`; W_i is the initializer
    named `...upscaler.w1_<i>` (the image-side branch multiplies by it); b = f_i - beta1 W_i,
    from the factored GEMM's constant f_i = beta1 W_i + b. Scan inputs, nodes and initializers
    the rewritten graph no longer reads are removed. A graph without the factoring is returned as it is.

    Args:
        model: onnx.ModelProto of a points decoder (changed in place). src: its path, for errors.
    Returns:
        `model`.
    Raises:
        ValueError: a factored graph in which a piece named above is missing.
    """
    scan = _the_scan(model, src)
    if not set(FACTORED_ROWS) <= set(scan.input):
        return model
    body = next(a.g for a in scan.attribute if a.name == "body")
    norm = next((n for n in model.graph.node if n.op_type == "LayerNormalization" and FACTORED_RSTD in n.output[1:]), None)
    inits = {i.name: i for g in _graphs_under(model.graph) for i in g.initializer}
    weights = [next((i for name, i in inits.items() if name.endswith(FIRST_WEIGHT_SUFFIX.format(k))), None) for k in range(2)]
    if norm is None or norm.input[2] not in inits or None in weights:
        raise ValueError(f"{src}: a factored points decoder without the final image tokens' LayerNormalization "
                         f"or the first upscaler weights; is it a tinysam-rt export?")
    beta = onnx.numpy_helper.to_array(inits[norm.input[2]]).astype(np.float64)  # (256,)
    rows = {body.input[list(scan.input).index(name)].name: k for k, name in enumerate(FACTORED_ROWS)}
    # scan_over_batch names body input k prefix + Scan input k: the new input gets the same prefix.
    tokens = body.input[0].name[: -len(scan.input[0])] + "image_tokens"
    found = 0
    for graph in _graphs_under(body):
        for node in [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in rows]:
            k = rows[node.input[1]]
            bias_add = next((n for n in graph.node if n.op_type == "Add" and node.output[0] in n.input), None)
            bias_name = next((name for name in bias_add.input if name != node.output[0]), None) if bias_add else None
            shared_add = next((n for n in graph.node if n.op_type == "Add" and bias_add.output[0] in n.input), None) \
                if bias_add else None
            if shared_add is None or bias_name not in inits:
                raise ValueError(f"{src}: the factored first upscaler GEMM {node.name!r} is not followed by its "
                                 f"constant bias and shared-product Adds; is it a tinysam-rt export?")
            found += 1
            weight = onnx.numpy_helper.to_array(weights[k]).astype(np.float64)  # (256, (j1, c1))
            bias = onnx.numpy_helper.to_array(inits[bias_name]).astype(np.float64) - beta @ weight
            weight_name, bias_name = f"{tokens}/w1_{k}", f"{tokens}/b1_{k}"
            graph.initializer.extend([onnx.numpy_helper.from_array(weight.astype(np.float32), weight_name),
                                      onnx.numpy_helper.from_array(bias.astype(np.float32), bias_name)])
            node.input[:] = [tokens, weight_name]
            bias_add.input[:] = [node.output[0], bias_name]
            bias_add.output[:] = shared_add.output
            graph.node.remove(shared_add)
        _drop_unread(graph)
    if found != len(FACTORED_ROWS):
        raise ValueError(f"{src}: expected {len(FACTORED_ROWS)} factored first upscaler GEMMs, found {found}")
    # The final image tokens become a Scan input, after the others (the body's inputs follow them).
    scan.input.append(norm.output[0])
    body.input.append(onnx.helper.make_tensor_value_info(tokens, onnx.TensorProto.FLOAT, None))
    read = _names_read(body)
    unread = [k for k, value in enumerate(body.input) if value.name not in read]
    for k in reversed(unread):
        del scan.input[k]
        del body.input[k]
    for attr in scan.attribute:
        if attr.name == "num_scan_inputs":
            attr.i = len(scan.input)
    _drop_unread(model.graph)
    onnx.checker.check_model(model)
    return model


class UpscalerInputGrams:
    """Gram matrices X^T X of the upscaler GEMMs' inputs over calibration prompts, by weight name
    (for GPTQ rounding in `int8_upscaler`; GEMMs sharing a weight add up).

    ORT hands out no tensor from inside a Scan, so this owns two sessions: the points decoder with
    the Scan's inputs as extra outputs, and the graph under the Scan that holds the GEMMs, made a
    model of its own (`_upscaler_alone`) and run once per prompt on that prompt's slice of them.
    """

    def __init__(self, src, work, threads=None):
        """src: Path of a current points decoder; work: directory for the two tapped graphs."""
        model = on_image_tokens(onnx.load(str(src)), src)
        alone, self._feeds, self._whole, self._matmuls = _upscaler_alone(model, src)
        self._taps = [o.name for o in alone.graph.output]
        onnx.save(alone, str(work / "upscaler.gemm-inputs.onnx"))
        add_float_outputs(model, [*self._feeds.values(), *self._whole])
        onnx.save(model, str(work / "points_decoder.scan-inputs.onnx"))
        options = make_session_options(threads)
        self._outer = ort.InferenceSession(str(work / "points_decoder.scan-inputs.onnx"), options,
                                           providers=["CPUExecutionProvider"])
        self._inner = ort.InferenceSession(str(work / "upscaler.gemm-inputs.onnx"), options,
                                           providers=["CPUExecutionProvider"])

    def grams(self, feeds):
        """Args: feeds: points decoder input dicts (`calibration.points_decoder_feed`).
        Returns: {weight initializer name: (K, K) float64}."""
        inner_names = sorted(self._feeds)
        sums = {}
        for feed in feeds:
            outer = self._outer.run([self._feeds[name] for name in inner_names] + self._whole, feed)
            per_batch, whole = outer[:len(inner_names)], dict(zip(self._whole, outer[len(inner_names):]))  # (B, ...)
            for b in range(per_batch[0].shape[0]):
                taps = self._inner.run(self._taps, {**whole, **{name: x[b] for name, x in zip(inner_names, per_batch)}})
                for tensor, x in zip(self._taps, taps):
                    sums[tensor] = sums.get(tensor, 0.0) + gram(x)
        grams = {}
        for node in self._matmuls:
            if node.input[0] in sums:
                grams[node.input[1]] = grams.get(node.input[1], 0.0) + sums[node.input[0]]
        return grams


def int8_upscaler(src, out, reduce_range=True, grams=None):
    """Write a copy of a points decoder whose upscaler GEMMs are DynamicQuantizeMatMul.

    The upscaler is the body of the graph's one Scan (see `export_onnx.export_points_decoder`),
    its first GEMM on the image tokens (`on_image_tokens` undoes the FP32 export's factoring);
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
        grams: {weight name: (K, K)} from `UpscalerInputGrams`: those weights are rounded by GPTQ
            (`gptq.gptq_int8`); None rounds every weight to nearest.

    Returns:
        (converted, biases): how many MatMuls were converted (6 for vit_t) and how many bias Adds
        went into them.

    Raises:
        ValueError: the graph has no Scan, or no constant-weight MatMul inside it.
    """
    model = on_image_tokens(onnx.load(str(src)), src)
    scan = _the_scan(model, src)
    qmax = 63 if reduce_range else 127
    outer = {i.name: i for i in model.graph.initializer}
    readers = _read_counts(model.graph)
    converted, folded = 0, []
    for graph in _graphs_under(_subgraphs(scan)[0]):
        inits = {**outer, **{i.name: i for i in graph.initializer}}  # inner names shadow outer ones
        for node in _constant_matmuls(graph, inits):
            weight = onnx.numpy_helper.to_array(inits[node.input[1]])
            add = _bias_add(graph, node, inits, readers)
            outputs, bias = (add[0].output, add[1]) if add else (node.output, None)
            # In place: re-adding nodes would copy them and detach the nested graphs still to visit.
            node.CopyFrom(dynamic_quantize_matmul(graph, node.name or node.output[0], node.input[0], weight,
                                                  outputs, qmax, bias, weight_key=node.input[1],
                                                  gram=(grams or {}).get(node.input[1])))
            converted += 1
            if add:
                folded.append((graph, add[0]))
    for graph, add in reversed(folded):  # after the walk, innermost graphs first: no graph still to visit moves
        graph.node.remove(add)
    if not converted:
        raise ValueError(f"{src}: no MatMul with a constant weight in the upscaler Scan; is it a tinysam-rt points decoder?")
    for graph in _graphs_under(model.graph):  # the replaced float weights, wherever they were
        _drop_unread(graph)
    use_contrib_opset(model)
    onnx.save(model, str(out))
    return converted, len(folded)
