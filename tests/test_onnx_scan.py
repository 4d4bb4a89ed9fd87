"""export/onnx_scan.py: a traced per-item graph spliced in as a Scan over the batch axis."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import onnxruntime as ort  # noqa: E402

from tinysam_export.onnx_scan import cached_or_computed, gate_body, scan_over_batch  # noqa: E402

OPSET = [helper.make_opsetid("", 17)]


def _outer():
    """x (B, 3) -> y = x * w_outer (B, 3), z = x + 1 (B, 3); `w` names an initializer here too."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"], name="mul"), helper.make_node("Add", ["x", "one"], ["z"], name="add")],
        "outer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 3])],
        [numpy_helper.from_array(np.array([1, 2, 3], np.float32), "w"),
         numpy_helper.from_array(np.array(1, np.float32), "one")])
    return helper.make_model(graph, opset_imports=OPSET)


def _body():
    """One item: y (3,), z (3,) -> s = sum(y * w_body) (scalar) and m = z @ M (2,).

    Its names `w`, `mul` and `y` are also outer names: the splice must keep them apart."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["y", "w"], ["prod"], name="mul"),
         helper.make_node("ReduceSum", ["prod"], ["s"], name="sum", keepdims=0),
         helper.make_node("MatMul", ["z", "M"], ["m"], name="matmul")],
        "body", [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
                 helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([10, 20, 30], np.float32), "w"),
         numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "M")])
    return helper.make_model(graph, opset_imports=OPSET)


def test_scan_runs_the_body_once_per_item_with_its_own_names():
    model = scan_over_batch(_outer(), _body(), ["y", "z"], ["sums", "mats"], ["mats", "z", "sums"], prefix="item/")
    assert [o.name for o in model.graph.output] == ["mats", "z", "sums"]
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output]
    assert dims == [["B", 2], ["B", 3], ["B"]]
    x = np.arange(12, dtype=np.float32).reshape(4, 3) - 5
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mats, z, sums = session.run(None, {"x": x})
    y = x * np.array([1, 2, 3], np.float32)  # the outer `w`, not the body's
    np.testing.assert_allclose(sums, (y * np.array([10, 20, 30], np.float32)).sum(1))
    np.testing.assert_allclose(mats, (x + 1) @ np.arange(6, dtype=np.float32).reshape(3, 2))
    np.testing.assert_allclose(z, x + 1)


def test_outer_values_are_read_whole_by_every_item():
    """The body's `z` input names an outer (B, 3) value: every item reads all of it, not its row."""
    body = _body()
    for value in (body.graph.input[1], body.graph.output[1]):  # z (B, 3) -> m (B, 2)
        value.type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_param="B"))
    model = scan_over_batch(_outer(), body, ["y"], ["sums", "mats"], ["sums", "mats"], prefix="item/", outer_values=["z"])
    scan = next(n for n in model.graph.node if n.op_type == "Scan")
    assert list(scan.input) == ["y"]
    x = np.arange(12, dtype=np.float32).reshape(4, 3) - 5
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sums, mats = session.run(None, {"x": x})
    whole = (x + 1) @ np.arange(6, dtype=np.float32).reshape(3, 2)  # (B, 2), the same for every item
    np.testing.assert_allclose(mats, np.broadcast_to(whole, (4, 4, 2)))
    np.testing.assert_allclose(sums, (x * np.array([1, 2, 3], np.float32) * np.array([10, 20, 30], np.float32)).sum(1))
    with pytest.raises(ValueError, match=r"outer values \['q'\] are not inputs"):
        scan_over_batch(_outer(), _body(), ["y"], ["sums", "mats"], ["sums"], prefix="item/", outer_values=["q"])


def test_mismatched_counts_and_unknown_outputs_are_named():
    with pytest.raises(ValueError, match="body has 2 inputs"):
        scan_over_batch(_outer(), _body(), ["y"], ["sums", "mats"], ["sums"], prefix="item/")
    with pytest.raises(ValueError, match="'nope'"):
        scan_over_batch(_outer(), _body(), ["y", "z"], ["sums", "mats"], ["nope"], prefix="item/")


def test_a_body_with_another_opset_is_refused():
    body = _body()
    body.opset_import[0].version = 18
    with pytest.raises(ValueError, match="opsets"):
        scan_over_batch(_outer(), body, ["y", "z"], ["sums", "mats"], ["sums"], prefix="item/")


def test_a_gated_body_runs_only_for_items_above_the_outer_threshold():
    # The gate's If nests the body one graph deeper: the splice must prefix names in there too
    # (the body's `w`, `mul` and `y` would otherwise collide with the outer graph's).
    body = gate_body(_body(), ("score", (3,)), "threshold")
    outer = _outer()
    outer.graph.input.append(helper.make_tensor_value_info("threshold", TensorProto.FLOAT, []))
    model = scan_over_batch(outer, body, ["y", "z", "x"], ["sums", "mats"], ["mats", "sums"], prefix="item/")
    inner = model.graph.node[-1].attribute[0].g
    nested = [n for n in inner.node if n.op_type == "If"][0].attribute
    then_graph = next(a.g for a in nested if a.name == "then_branch")
    assert {i.name for i in then_graph.initializer} == {"item/w", "item/M"}
    x = np.array([[1, 2, 3], [-5, -4, -3], [0, 0, 0.5], [2, -9, 0]], np.float32)  # max: 3, -3, 0.5, 2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mats, sums = session.run(None, {"x": x, "threshold": np.array(0.5, np.float32)})
    run = np.array([True, False, False, True])  # max(x) > 0.5, strictly
    y = x * np.array([1, 2, 3], np.float32)
    np.testing.assert_allclose(sums[run], (y[run] * np.array([10, 20, 30], np.float32)).sum(1))
    np.testing.assert_allclose(mats[run], (x[run] + 1) @ np.arange(6, dtype=np.float32).reshape(3, 2))
    assert not sums[~run].any() and not mats[~run].any() and mats.shape == (4, 2) and sums.shape == (4,)


def test_gating_needs_static_output_shapes():
    body = _body()
    body.graph.output[1].type.tensor_type.shape.dim[0].dim_param = "K"
    with pytest.raises(ValueError, match="'m' needs a static shape"):
        gate_body(body, ("score", (3,)), "threshold")


def _side_model():
    """x (B, 3), side (1, 3) -> y = x + side."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "side"], ["y"], name="add")],
        "outer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3]),
                  helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])])
    return helper.make_model(graph, opset_imports=OPSET)


def _side_compute(input_name="x"):
    """x (B, 3) -> side_out = 10 * max over the batch (1, 3), then the cache holding it (1, 3). Its
    `y` is also the outer output's name: the splice must keep them apart."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", [input_name], ["y"], name="max", axes=[0], keepdims=1),
         helper.make_node("Mul", ["y", "w"], ["side_out"], name="mul"),
         helper.make_node("Identity", ["side_out"], ["packed"], name="pack")],
        "compute", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor_value_info("side_out", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("packed", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.array(10, np.float32), "w")])
    return helper.make_model(graph, opset_imports=OPSET)


def _side_from_cache():
    """side_cache (S, 3) -> its first row (1, 3), then an empty (0, 3) tensor."""
    graph = helper.make_graph(
        [helper.make_node("Slice", ["side_cache", "zero", "one"], ["row"], name="row"),
         helper.make_node("Slice", ["side_cache", "zero", "zero"], ["empty"], name="empty")],
        "from_cache", [helper.make_tensor_value_info("side_cache", TensorProto.FLOAT, ["S", 3])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("empty", TensorProto.FLOAT, [0, 3])],
        [numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([1], np.int64), "one")])
    return helper.make_model(graph, opset_imports=OPSET)


def test_cached_values_are_used_when_given_and_computed_when_empty():
    model = cached_or_computed(_side_model(), ["side"], "side_packed", _side_from_cache(), _side_compute(),
                               prefix="side/")
    assert [v.name for v in model.graph.input] == ["x", "side_cache"]
    assert [v.name for v in model.graph.output] == ["y", "side_packed"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[1, -2, 3], [4, 0, -6]], np.float32)
    y, packed = session.run(None, {"x": x, "side_cache": np.zeros((0, 3), np.float32)})
    np.testing.assert_array_equal(packed, [[40, 0, 30]])  # computed, and returned for the caller to keep
    np.testing.assert_array_equal(y, x + packed)
    given = np.array([[0.5, 0.25, -1]], np.float32)
    y, packed = session.run(None, {"x": x, "side_cache": given})
    assert packed.shape == (0, 3)  # the caller holds the cache: nothing copied back
    np.testing.assert_array_equal(y, x + given)


def test_compute_inputs_become_graph_inputs_and_values_need_not_be_inputs():
    outer = _side_model()
    model = cached_or_computed(outer, ["side", "unread"], "side_packed", _two(_side_from_cache()),
                               _two(_side_compute("z")), prefix="side/")
    assert [v.name for v in model.graph.input] == ["x", "z", "side_cache"]
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    assert list(if_node.output) == ["side", "unread", "side_packed"]


def _two(branch):
    """`branch` returning its first output twice (as two values), then its last one."""
    graph = branch.graph
    first, last = graph.output[0], graph.output[-1]
    graph.node.append(helper.make_node("Identity", [first.name], [first.name + "_again"], name="again"))
    again = onnx.ValueInfoProto()
    again.CopyFrom(first)
    again.name = first.name + "_again"
    del graph.output[:]
    graph.output.extend([first, again, last])
    return branch


def test_cached_input_misuse_is_named():
    with pytest.raises(ValueError, match=r"from_cache must return the 2 values and then 'side_packed', returns \['row', 'empty'\]"):
        cached_or_computed(_side_model(), ["side", "more"], "side_packed", _side_from_cache(), _side_compute(), prefix="s/")
    cache = _side_from_cache()
    cache.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    with pytest.raises(ValueError, match="from_cache must have one input \\(the cache\\), has 2"):
        cached_or_computed(_side_model(), ["side"], "side_packed", cache, _side_compute(), prefix="s/")
