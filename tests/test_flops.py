"""FLOP counter: exact on a hand-built graph, and on each counted op's closed form."""

import numpy as np
import pytest

from tinysam_rt import flops
from tinysam_rt.flops import NodeShapes, count_macs, node_macs


def _conv_matmul_model(path):
    """x (1,4,16,16) -> Conv(W (6,2,3,3), group 2, stride 2, pad 1) -> (1,6,8,8)
    -> Reshape (1,6,64) -> MatMul(B (64,5)) -> y (1,6,5)."""
    onnx = pytest.importorskip("onnx", reason="building the test graph needs onnx (dev extra)")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1, 6, 64], dtype=np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((64, 5)).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], group=2, strides=[2, 2], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "b"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "conv_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_hand_built_conv_matmul_graph_is_exact(tmp_path):
    import onnxruntime as ort

    path = _conv_matmul_model(tmp_path / "conv_matmul.onnx")
    x = np.zeros((1, 4, 16, 16), np.float32)
    nodes = flops.profile_node_shapes(lambda options: ort.InferenceSession(str(path), options),
                                      lambda session: session.run(None, {"x": x}))
    result = count_macs(nodes)
    # Conv: each of the 1*6*8*8 outputs sums (C/group)*kh*kw = 2*3*3 products.
    conv = 1 * 6 * 8 * 8 * (2 * 3 * 3)
    # MatMul: each of the 1*6*5 outputs sums K = 64 products.
    matmul = 1 * 6 * 5 * 64
    assert result["macs"] == conv + matmul == 8832
    assert result["flops"] == 2 * (conv + matmul)
    assert result["by_op"] == {"Conv": conv, "MatMul": matmul}
    assert result["by_kind"] == {"conv": conv, "matmul_weight": matmul}
    assert result["counted_nodes"] == 2
    assert result["uncounted_ops"] == {"Reshape": 1}
    assert result["uncountable_heavy_ops"] == {}


def test_profile_lists_nodes_in_order_with_weight_shapes(tmp_path):
    import onnxruntime as ort

    path = _conv_matmul_model(tmp_path / "conv_matmul.onnx")
    x = np.zeros((1, 4, 16, 16), np.float32)
    nodes = flops.profile_node_shapes(lambda options: ort.InferenceSession(str(path), options),
                                      lambda session: session.run(None, {"x": x}))
    assert [n.op_type for n in nodes] == ["Conv", "Reshape", "MatMul"]
    # Prepacking is off, so constant weights keep their shapes in the profile.
    assert nodes[0].input_shapes == ((1, 4, 16, 16), (6, 2, 3, 3))
    assert nodes[2].input_shapes == ((1, 6, 64), (64, 5))
    assert nodes[2].output_shapes == ((1, 6, 5),)


@pytest.mark.parametrize("node, expected", [
    # Gemm with transA: A is (K, M) = (7, 3), Y (3, 4): 3*4 outputs of 7 products.
    (NodeShapes("g", "Gemm", ((7, 3), (7, 4), (4,)), ((3, 4),)), (3 * 4 * 7, "gemm")),
    # ConvTranspose k2 s2: every input element meets M/group*kh*kw = 8*2*2 weights.
    (NodeShapes("t", "ConvTranspose", ((2, 16, 5, 5), (16, 8, 2, 2)), ((2, 8, 10, 10),)), (2 * 16 * 25 * 32, "conv_transpose")),
    # attention scores q @ k^T: (B, heads, T, d) @ (B, heads, d, T)
    (NodeShapes("a", "MatMul", ((2, 4, 49, 32), (2, 4, 32, 49)), ((2, 4, 49, 49),)), (2 * 4 * 49 * 49 * 32, "matmul_batched")),
    # depthwise conv: group = C, so W is (C, 1, 3, 3)
    (NodeShapes("d", "Conv", ((1, 64, 32, 32), (64, 1, 3, 3)), ((1, 64, 32, 32),)), (64 * 32 * 32 * 9, "conv")),
    # QLinearConv: weight is input 3 (x, x_scale, x_zp, w, ...)
    (NodeShapes("q", "QLinearConv", ((1, 3, 8, 8), (), (), (4, 3, 1, 1), (), (), (), ()), ((1, 4, 8, 8),)), (4 * 64 * 3, "conv")),
    (NodeShapes("i", "MatMulInteger", ((10, 20), (20, 30)), ((10, 30),)), (10 * 30 * 20, "matmul_weight")),
    # ORT's fused/quantized forms that saved (optimised or quantized) graphs may contain
    (NodeShapes("f", "FusedMatMul", ((2, 8, 32, 49), (2, 8, 32, 49)), ((2, 8, 49, 49),)), (2 * 8 * 49 * 49 * 32, "matmul_batched")),
    (NodeShapes("f2", "FusedMatMul", ((2, 49, 32), (2, 49, 32)), ((2, 49, 49),)), (2 * 49 * 49 * 32, "matmul_batched")),
    (NodeShapes("qg", "QGemm", ((16, 64), (), (), (32, 64), (), ()), ((16, 32),)), (16 * 32 * 64, "gemm")),
    (NodeShapes("mf", "MatMulIntegerToFloat", ((1, 49, 64), (64, 128), (), ()), ((1, 49, 128),)), (49 * 128 * 64, "matmul_weight")),
    (NodeShapes("s", "Softmax", ((2, 49, 49),), ((2, 49, 49),)), (0, None)),
])
def test_node_macs_closed_forms(node, expected):
    assert node_macs(node) == expected


def test_missing_weight_shape_is_an_error_naming_the_node():
    node = NodeShapes("enc/conv1", "Conv", ((1, 3, 8, 8), None), ((1, 4, 8, 8),))
    with pytest.raises(ValueError, match=r"node 'enc/conv1' \(Conv\): the shape of its weight is unknown"):
        node_macs(node)


def test_count_macs_reports_ops_it_cannot_count():
    nodes = [NodeShapes("e", "Einsum", ((2, 3), (3, 4)), ((2, 4),)),
             NodeShapes("m", "MatMul", ((2, 3), (3, 4)), ((2, 4),))]
    result = count_macs(nodes)
    assert result["macs"] == 2 * 4 * 3
    assert result["uncounted_ops"] == {"Einsum": 1}
    assert result["uncountable_heavy_ops"] == {"Einsum": 1}


def test_nodes_from_profile_keeps_kernel_events_only():
    events = [
        {"cat": "Session", "name": "model_run", "args": {}},
        {"cat": "Node", "name": "mm_fence_before", "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "mm_kernel_time", "args": {
            "op_name": "MatMul", "input_type_shape": [{"float": [2, 3]}, {"float": [3, 4]}],
            "output_type_shape": [{"float": [2, 4]}]}},
    ]
    assert flops.nodes_from_profile(events) == [NodeShapes("mm", "MatMul", ((2, 3), (3, 4)), ((2, 4),))]
