"""Join two traced ONNX graphs with a Scan: the second runs once per item of the first's batch.

The tracer cannot emit a loop, so a per-item stage is traced on its own (one item, no batch axis)
and spliced in here as the body of an ONNX `Scan` over axis 0 of the outer graph's outputs. Every
name inside the body gets a prefix, so nothing in it shadows a name of the outer graph.
"""

import onnx
from onnx import helper


def _prefixed_body(body, prefix):
    """A copy of `body`'s graph with `prefix` on every value, node and initializer name."""
    graph = onnx.GraphProto()
    graph.CopyFrom(body.graph)
    defined = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    defined |= {name for node in graph.node for name in node.output if name}
    rename = {name: prefix + name for name in defined}
    for init in graph.initializer:
        init.name = rename[init.name]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = rename.get(value.name, value.name)
    for node in graph.node:
        node.name = prefix + node.name
        node.input[:] = [rename.get(name, name) for name in node.input]
        node.output[:] = [rename.get(name, name) for name in node.output]
    graph.name = prefix.rstrip("/") or "body"
    return graph


def scan_over_batch(outer, body, scan_inputs, scan_outputs, graph_outputs, prefix):
    """Append to `outer` a Scan that runs `body` on each item along axis 0 of `scan_inputs`.

    Args:
        outer: onnx.ModelProto whose graph produces every name in `scan_inputs` (B, ...).
        body: onnx.ModelProto for one item: one input per `scan_inputs` entry (in order, without
            the B axis), one output per `scan_outputs` entry. Same opsets as `outer`.
        scan_inputs: names of outer values scanned along axis 0.
        scan_outputs: names for the Scan's outputs, the body's outputs stacked on a new axis 0.
        graph_outputs: the final graph outputs in order: names of outer outputs and/or of
            `scan_outputs` (typed as the body's output behind the first scan input's axis 0).
        prefix: prepended to every name in the body, e.g. "upscale/".
    Returns:
        `outer`, modified in place and checked with onnx.checker.
    Raises:
        ValueError: the input/output counts do not match the body, or an opset differs.
    """
    if len(body.graph.input) != len(scan_inputs) or len(body.graph.output) != len(scan_outputs):
        raise ValueError(f"body has {len(body.graph.input)} inputs / {len(body.graph.output)} outputs, "
                         f"scan_inputs {len(scan_inputs)} / scan_outputs {len(scan_outputs)}")
    opsets = {(o.domain, o.version) for o in outer.opset_import}
    if {(o.domain, o.version) for o in body.opset_import} - opsets:
        raise ValueError(f"body opsets {list(body.opset_import)} are not all in the outer model's {list(outer.opset_import)}")
    graph = outer.graph
    scan = helper.make_node("Scan", list(scan_inputs), list(scan_outputs), name=prefix + "scan",
                            num_scan_inputs=len(scan_inputs), body=_prefixed_body(body, prefix))
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
