"""Splice traced ONNX graphs together: a Scan (per-item stage), an If gate, a cached input.

The tracer cannot emit a loop, so a per-item stage is traced on its own (one item, no batch axis)
and spliced in here as the body of an ONNX `Scan` over axis 0 of the outer graph's outputs. Every
name inside the body gets a prefix, so nothing in it shadows a name of the outer graph.
`gate_body` wraps such a body in an If on a per-item score; `cached_or_computed` lets a caller
pass in values the graph would otherwise compute on every run (e.g. per-image tensors).
"""

import numpy as np
import onnx
from onnx import helper


def _subgraphs(node):
    """The graphs held in `node`'s attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        yield from attr.graphs


def _defined_names(graph):
    """Every value name `graph` defines (initializers, inputs, node outputs), nested graphs included."""
    names = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    for node in graph.node:
        names |= {name for name in node.output if name}
        for sub in _subgraphs(node):
            names |= _defined_names(sub)
    return names


def _rename(graph, rename, prefix):
    """Apply `rename` to every value name in `graph` and its nested graphs; prefix node names."""
    for init in graph.initializer:
        init.name = rename.get(init.name, init.name)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = rename.get(value.name, value.name)
    for node in graph.node:
        node.name = prefix + node.name
        node.input[:] = [rename.get(name, name) for name in node.input]
        node.output[:] = [rename.get(name, name) for name in node.output]
        for sub in _subgraphs(node):
            _rename(sub, rename, prefix)


def _prefixed_body(body, prefix, outer_values=()):
    """A copy of `body`'s graph with `prefix` on every name it defines and every node name, nested
    graphs included; names it only refers to (outer-scope values) are left as they are, and so
    are its inputs named in `outer_values`, which are dropped from its inputs to become such
    references."""
    graph = onnx.GraphProto()
    graph.CopyFrom(body.graph)
    kept = [value for value in graph.input if value.name not in outer_values]
    del graph.input[:]
    graph.input.extend(kept)
    _rename(graph, {name: prefix + name for name in _defined_names(graph)}, prefix)
    graph.name = prefix.rstrip("/") or "body"
    return graph


def gate_body(body, score_input, threshold):
    """`body` run only for items whose scores pass: outputs zeros where max(score) <= threshold.

    The new body takes `body`'s inputs and then `score_input` (a float32 tensor of the item), and
    refers to `threshold`, a float32 scalar of the outer graph, by name. Its outputs keep `body`'s
    types; every output shape must be static (the zeros are made from it).

    Args:
        body: onnx.ModelProto for one item.
        score_input: (name, shape) of the per-item scores, e.g. ("iou_predictions", (3,)).
        threshold: name of the outer scalar.
    Returns:
        onnx.ModelProto: ReduceMax -> Greater -> If(then: `body`'s nodes, else: zeros).
    """
    source = body.graph
    then_graph = onnx.GraphProto()
    then_graph.CopyFrom(source)
    then_graph.name = "then"
    del then_graph.input[:]  # an If branch sees the body's inputs as outer-scope values
    else_nodes, else_outputs, gated_outputs = [], [], []
    for out in source.output:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in out.type.tensor_type.shape.dim]
        if None in dims:
            raise ValueError(f"gate_body: output {out.name!r} needs a static shape, has {dims}")
        shape = helper.make_tensor(f"else/{out.name}/shape", onnx.TensorProto.INT64, [len(dims)], dims)
        zero = helper.make_tensor("zero", out.type.tensor_type.elem_type, [1], [0])
        else_nodes.append(helper.make_node("ConstantOfShape", [f"else/{out.name}/shape"], [f"else/{out.name}"],
                                           name=f"else/{out.name}/zeros", value=zero))
        else_nodes.insert(0, helper.make_node("Constant", [], [f"else/{out.name}/shape"],
                                              name=f"else/{out.name}/shape", value=shape))
        value = onnx.ValueInfoProto()
        value.CopyFrom(out)
        value.name = f"else/{out.name}"
        else_outputs.append(value)
        gated = onnx.ValueInfoProto()
        gated.CopyFrom(out)
        gated.name = f"gated/{out.name}"
        gated_outputs.append(gated)
    else_graph = helper.make_graph(else_nodes, "else", [], else_outputs)
    name, shape = score_input
    nodes = [
        helper.make_node("ReduceMax", [name], ["gate/max"], name="gate/max", keepdims=0),
        helper.make_node("Greater", ["gate/max", threshold], ["gate/run"], name="gate/run"),
        helper.make_node("If", ["gate/run"], [v.name for v in gated_outputs], name="gate/if",
                         then_branch=then_graph, else_branch=else_graph),
    ]
    inputs = [*source.input, helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape))]
    graph = helper.make_graph(nodes, source.name, inputs, gated_outputs)
    model = helper.make_model(graph, opset_imports=body.opset_import, ir_version=body.ir_version)
    return model


def scan_over_batch(outer, body, scan_inputs, scan_outputs, graph_outputs, prefix, outer_values=()):
    """Append to `outer` a Scan that runs `body` on each item along axis 0 of `scan_inputs`.

    Args:
        outer: onnx.ModelProto whose graph produces every name in `scan_inputs` (B, ...) and in
            `outer_values`.
        body: onnx.ModelProto for one item: one input per `outer_values` entry (same name), and
            one per `scan_inputs` entry (the others, in order, without the B axis); one output
            per `scan_outputs` entry. Same opsets as `outer`.
        scan_inputs: names of outer values scanned along axis 0.
        scan_outputs: names for the Scan's outputs, the body's outputs stacked on a new axis 0.
        graph_outputs: the final graph outputs in order: names of outer outputs and/or of
            `scan_outputs` (typed as the body's output behind the first scan input's axis 0).
        prefix: prepended to every name in the body, e.g. "upscale/".
        outer_values: outer values every item reads whole (not scanned): the body refers to them
            by name instead of taking a per-item copy.
    Returns:
        `outer`, modified in place and checked with onnx.checker.
    Raises:
        ValueError: the input/output counts or the outer values' names do not match the body,
            or an opset differs.
    """
    body_inputs = [value.name for value in body.graph.input]
    if set(outer_values) - set(body_inputs):
        raise ValueError(f"outer values {sorted(set(outer_values) - set(body_inputs))} are not inputs of the body")
    scanned = len(body_inputs) - len(set(outer_values))
    if scanned != len(scan_inputs) or len(body.graph.output) != len(scan_outputs):
        raise ValueError(f"body has {scanned} inputs / {len(body.graph.output)} outputs besides the outer values, "
                         f"scan_inputs {len(scan_inputs)} / scan_outputs {len(scan_outputs)}")
    opsets = {(o.domain, o.version) for o in outer.opset_import}
    if {(o.domain, o.version) for o in body.opset_import} - opsets:
        raise ValueError(f"body opsets {list(body.opset_import)} are not all in the outer model's {list(outer.opset_import)}")
    graph = outer.graph
    scan = helper.make_node("Scan", list(scan_inputs), list(scan_outputs), name=prefix + "scan",
                            num_scan_inputs=len(scan_inputs), body=_prefixed_body(body, prefix, outer_values))
    graph.node.append(scan)
    declared = {value.name: value for value in graph.output}
    outputs = []
    for name in graph_outputs:
        value = onnx.ValueInfoProto()
        if name in declared:
            value.CopyFrom(declared[name])
        elif name in scan_outputs:
            # the body's output type with the scanned axis in front, named as the first input's
            value.CopyFrom(body.graph.output[list(scan_outputs).index(name)])
            value.name = name
            value.type.tensor_type.shape.dim.insert(0, declared[scan_inputs[0]].type.tensor_type.shape.dim[0])
        else:
            raise ValueError(f"graph output {name!r} is neither an outer output nor a scan output")
        outputs.append(value)
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(outer)
    return outer


def _as_branch(model, prefix):
    """`model`'s graph as an If branch: its inputs become outer-scope references (`_prefixed_body`)."""
    return _prefixed_body(model, prefix, outer_values={value.name for value in model.graph.input})


def cached_or_computed(outer, values, returned, from_cache, compute, prefix):
    """Let the caller pass in values the graph would otherwise compute on every run.

    The values named `values` (graph inputs of `outer`, or values a graph spliced in later will
    read) become the outputs of an If on whether the cache input
    (`from_cache`'s one input, added as a graph input) has any elements: if so, `from_cache`
    takes them out of it; else `compute` computes them from graph inputs. Both branches also
    return `returned`, which becomes the last graph output: `compute` the cache for the caller to
    keep and pass in on later runs, `from_cache` an empty tensor (the caller holds the cache
    already; an If returning an outer value copies it on every run).

    Args:
        outer: onnx.ModelProto.
        values: the names; those that are graph inputs of `outer` stop being inputs.
        returned: name of the new graph output.
        from_cache: onnx.ModelProto, one input (the cache input, first axis dynamic, an empty
            tensor meaning "compute them") -> `values` then `returned`, in that order.
        compute: onnx.ModelProto whose inputs become (or are already) graph inputs of `outer` ->
            `values` then `returned`. Its outputs' types are the If's.
        prefix: prepended to every name the branches define and to the new nodes' names.
    Returns:
        `outer`, modified in place and checked with onnx.checker.
    """
    graph = outer.graph
    declared = {v.name: v for v in graph.input}
    for branch, label in ((from_cache, "from_cache"), (compute, "compute")):
        outputs = [v.name for v in branch.graph.output]
        if len(outputs) != len(values) + 1:
            raise ValueError(f"{label} must return the {len(values)} values and then {returned!r}, returns {outputs}")
        opsets = {(o.domain, o.version) for o in outer.opset_import}
        if {(o.domain, o.version) for o in branch.opset_import} - opsets:
            raise ValueError(f"{label}'s opsets are not all in the outer model's")
    if len(from_cache.graph.input) != 1:
        raise ValueError(f"from_cache must have one input (the cache), has {len(from_cache.graph.input)}")
    cache = from_cache.graph.input[0]
    has_cache = prefix + "has_cache"
    nodes = [
        helper.make_node("Size", [cache.name], [prefix + "size"], name=prefix + "size"),
        helper.make_node("Greater", [prefix + "size", prefix + "zero"], [has_cache], name=prefix + "has_cache"),
        helper.make_node("If", [has_cache], [*values, returned], name=prefix + "if",
                         then_branch=_as_branch(from_cache, prefix + "cached/"),
                         else_branch=_as_branch(compute, prefix + "computed/")),
    ]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), prefix + "zero"))
    for name in values:
        if name in declared:  # values nothing reads yet (e.g. read by a Scan body spliced in later) are not inputs
            graph.input.remove(declared[name])
    for value in [*compute.graph.input, cache]:
        if value.name not in {v.name for v in graph.input}:
            graph.input.append(value)
    result = onnx.ValueInfoProto()
    result.CopyFrom(compute.graph.output[len(values)])
    result.name = returned
    ordered = nodes + list(graph.node)  # the If first keeps the graph topologically sorted
    del graph.node[:]
    graph.node.extend(ordered)
    graph.output.append(result)
    onnx.checker.check_model(outer)
    return outer
