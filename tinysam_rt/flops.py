"""Count the multiply-accumulates (MACs) of an ONNX graph from its nodes' tensor shapes.

What is counted, per node (bias adds, activations, norms, softmax, resizes are not):

    Conv, ConvInteger, QLinearConv,
    FusedConv                        MACs = prod(Y) * prod(W.shape[1:])   (W: M, C/group, k...)
    ConvTranspose                    MACs = prod(X) * prod(W.shape[1:])   (W: C, M/group, k...)
    MatMul, MatMulInteger, QLinearMatMul, MatMulIntegerToFloat,
    DynamicQuantizeMatMul, FusedMatMul,
    Gemm, FusedGemm, QGemm           MACs = prod(Y) * K                   (K: A's reduced axis)

FLOPs = 2 * MACs. Papers on SAM-family models (TinySAM's "42.0 GFLOPs", fvcore's counter) report
MACs under the name FLOPs; we report both and name each. MatMuls whose second operand has rank 2
are `matmul_weight` (linear layers); the rest are `matmul_batched` (activation x activation:
attention scores and values, the decoder's hypernetwork product).

Shapes come from `profile_node_shapes`: the graph runs once in ONNX Runtime with profiling on and
graph optimisations and weight prepacking off, so every node of the file executes as written and
is reported with the concrete shapes it saw. This needs nothing beyond the runtime's own
onnxruntime (a Pi user need not install `onnx` and its protobuf), and unlike
`onnx.shape_inference`, even with data propagation, it also resolves the shapes behind TinyViT's
data-dependent window reshapes (shape inference leaves the encoder's attention MatMuls unknown).
"""

import glob
import json
import math
import os
import tempfile
from dataclasses import dataclass

# Conv family: op -> index of the weight input (M, C/group, k...).
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1}
# Gemm family (2-D): op -> index of A, which is (M, K) or, with transA, (K, M).
_GEMM_A = {"Gemm": 0, "FusedGemm": 0, "QGemm": 0}
# MatMul family: op -> (index of A (..., M, K), index of B (..., K, N)). The com.microsoft ops
# are what ORT's fusions and quantizers leave in saved graphs.
_MATMUL = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "MatMulIntegerToFloat": (0, 1),
           "DynamicQuantizeMatMul": (0, 1), "FusedMatMul": (0, 1)}
COUNTED_OPS = tuple(sorted({*_CONV_WEIGHT, *_GEMM_A, *_MATMUL, "ConvTranspose"}))
# Ops that do multiply-adds at scale but whose count needs attributes we do not read.
_UNCOUNTABLE_HEAVY = ("Einsum", "Attention", "MultiHeadAttention", "QAttention", "ConvTransposeWithDynamicPads")


@dataclass(frozen=True)
class NodeShapes:
    """One executed node: its op type and the shapes of its inputs and outputs.

    `input_shapes` / `output_shapes` are tuples of int tuples, None where a shape is unknown.
    """

    name: str
    op_type: str
    input_shapes: tuple
    output_shapes: tuple


def _shape(shapes, index, node, what):
    if index >= len(shapes) or shapes[index] is None:
        raise ValueError(f"node {node.name!r} ({node.op_type}): the shape of its {what} is unknown")
    return shapes[index]


def node_macs(node):
    """Multiply-accumulates of one node, and its kind.

    Returns:
        (macs int, kind str) with kind in "conv", "conv_transpose", "gemm", "matmul_weight",
        "matmul_batched"; (0, None) for an op that is not counted.

    Raises:
        ValueError: a counted node lacks a shape it needs.
    """
    op = node.op_type
    if op not in COUNTED_OPS:
        return 0, None
    out = _shape(node.output_shapes, 0, node, "output")
    if op in _CONV_WEIGHT:
        weight = _shape(node.input_shapes, _CONV_WEIGHT[op], node, "weight")  # (M, C/group, k...)
        return math.prod(out) * math.prod(weight[1:]), "conv"
    if op == "ConvTranspose":
        x = _shape(node.input_shapes, 0, node, "input")  # (N, C, spatial...)
        weight = _shape(node.input_shapes, 1, node, "weight")  # (C, M/group, k...)
        return math.prod(x) * math.prod(weight[1:]), "conv_transpose"
    if op in _GEMM_A:
        a = _shape(node.input_shapes, _GEMM_A[op], node, "A")
        # Y is (M, N); A is (M, K) or (K, M) with transA, so K = size(A) / M either way.
        return math.prod(out) * (math.prod(a) // out[0]), "gemm"
    a_index, b_index = _MATMUL[op]
    a = _shape(node.input_shapes, a_index, node, "A")
    k = a[-1]
    if op == "FusedMatMul" and len(a) >= 2 and a[-2] != out[-2]:
        k = a[-2]  # transA: A is (..., K, M); when K == M either axis is right
    b = node.input_shapes[b_index] if len(node.input_shapes) > b_index else None
    kind = "matmul_weight" if b is not None and len(b) == 2 else "matmul_batched"
    return math.prod(out) * k, kind


def count_macs(nodes):
    """Total MACs of executed nodes, broken down by kind and op type.

    Args:
        nodes: iterable of NodeShapes.

    Returns:
        dict with "macs", "flops" (= 2 * macs), "by_kind" {kind: macs}, "by_op" {op: macs},
        "counted_nodes" int, "uncounted_ops" {op: node count}, "uncountable_heavy_ops"
        {op: node count} (ops doing matmul work we cannot count; empty for plain exports).
    """
    total, by_kind, by_op, counted, uncounted = 0, {}, {}, 0, {}
    for node in nodes:
        macs, kind = node_macs(node)
        if kind is None:
            uncounted[node.op_type] = uncounted.get(node.op_type, 0) + 1
            continue
        total += macs
        counted += 1
        by_kind[kind] = by_kind.get(kind, 0) + macs
        by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
    return {
        "macs": total,
        "flops": 2 * total,
        "by_kind": by_kind,
        "by_op": by_op,
        "counted_nodes": counted,
        "uncounted_ops": dict(sorted(uncounted.items())),
        "uncountable_heavy_ops": {op: n for op, n in sorted(uncounted.items()) if op in _UNCOUNTABLE_HEAVY},
    }


def nodes_from_profile(events):
    """NodeShapes of every kernel run recorded in an ORT profile.

    Args:
        events: the parsed profile JSON (a list of trace events).
    """
    nodes = []
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue

        def shapes(key):
            # each entry is {dtype: [dims]}; one entry per tensor
            return tuple(tuple(int(d) for d in next(iter(t.values()))) for t in args.get(key, []))

        nodes.append(NodeShapes(event["name"][: -len("_kernel_time")], args["op_name"],
                                shapes("input_type_shape"), shapes("output_type_shape")))
    return nodes


def profile_node_shapes(make_session, feeds_run):
    """Run a graph once with ORT profiling and return the shapes every node saw.

    Args:
        make_session: callable(session_options) -> an object owning one InferenceSession
            (e.g. `lambda o: EncoderSession(graph, session_options=o)`). It must drop its ORT
            session when garbage-collected; the profile file is complete once it has.
        feeds_run: callable(session) that runs it once on representative inputs.

    Returns:
        list of NodeShapes, in execution order.
    """
    import onnxruntime as ort  # deferred: `tinysam-bench --help` must not import ORT

    with tempfile.TemporaryDirectory(prefix="tinysam-flops-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        # No fusions or layout rewrites: the profile then lists the file's own ONNX ops.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # Prepacked weights vanish from the recorded input shapes; keep them visible.
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.intra_op_num_threads = 1
        session = make_session(options)
        feeds_run(session)
        del session  # ORT finishes writing the profile when the session is destroyed
        (path,) = glob.glob(os.path.join(tmp, "profile*.json"))
        with open(path, encoding="utf-8") as f:
            return nodes_from_profile(json.load(f))
