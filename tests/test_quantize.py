"""tinysam quantize: pure helpers on tiny arrays/graphs, then the real command end to end.

The end-to-end cases quantize the session's random-weight vit_t export on two small synthetic
images (minutes on 2 cores would be too slow for CI, so prompts are few and the sensitivity
search is off); the error cases must fail before any slow step and leave no output directory.
"""

import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import synthetic_image
from tinysam_export import calibration, fidelity, quantize
from tinysam_export.upscaler_int8 import _graphs_under, per_column_int8
from tinysam_rt import cli, gemm_peak, prompts
from tinysam_rt.io import load_image, write_png
from tinysam_rt.manifest import Preprocess, load_manifest
from tinysam_rt.predictor import TinySAMPredictor, warn_if_weights_saturate

SMALL = calibration.PromptSampling(points=2, multi_points=1, boxes=1, point_boxes=1, grid_per_side=2, refinements=1, batch=4)
FAST = quantize.QuantizeConfig(method="minmax", only="both", min_images=1, holdout=1, synthetic=0, gate=False,
                               max_excluded=0, linear="static", sampling=SMALL)


# -- pure helpers -----------------------------------------------------------------------------------

def test_mask_iou_and_cosine():
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True  # 4 shared of 12 -> 1/3
    a[1] = b[1] = True
    np.testing.assert_allclose(fidelity.mask_iou(a, b), [1 / 3, 1.0, 1.0])  # two empty masks agree
    assert fidelity.cosine(np.ones(5), 2 * np.ones(5)) == pytest.approx(1.0)
    assert fidelity.cosine(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(0.0)
    assert fidelity.cosine(np.zeros(3), np.zeros(3)) == 1.0


def test_select_best_takes_highest_predicted_iou():
    low_res = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    iou = np.array([[0.1, 0.9, 0.2], [0.7, 0.1, 0.3]], np.float32)
    best, scores, tokens = fidelity.select_best(low_res, iou)
    np.testing.assert_array_equal(best, low_res[[0, 1], [1, 0]])
    np.testing.assert_array_equal(scores, iou[[0, 1], [1, 0]])
    np.testing.assert_array_equal(tokens, [1, 0])
    # Another model's choices: its masks at those tokens, whatever its own scores say.
    at, at_scores, at_tokens = fidelity.select_best(low_res, iou, tokens=[2, 2])
    np.testing.assert_array_equal(at, low_res[[0, 1], [2, 2]])
    np.testing.assert_array_equal(at_tokens, [2, 2])


SAM_PREPROCESS = Preprocess(image_size=1024, pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375),
                            pad_value=0.0)


class _FixedDecoder:
    """A decoder session stand-in: token k's mask is the left (k + 1) / 4 of the frame; fixed IoU scores."""

    def __init__(self, scores):
        self.scores = np.asarray(scores, np.float32)

    def run(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        b = len(point_coords)
        cols = np.arange(256)[None, :]
        low_res = np.stack([np.where(cols < 64 * (k + 1), 5.0, -5.0) * np.ones((256, 1)) for k in range(3)])
        return np.broadcast_to(low_res, (b, 3, 256, 256)).astype(np.float32), np.tile(self.scores, (b, 1))


class _ZeroEncoder:
    def run(self, tensor):
        return np.zeros((1, 256, 64, 64), np.float32)


def test_fidelity_separates_a_changed_selection_from_changed_masks():
    """Same masks, reversed IoU ranking: every selection differs from FP32's, yet the masks at
    FP32's choices are identical. The gated metric counts the changed choice as a miss."""
    encoder = _ZeroEncoder()
    pipelines = {"fp32": (encoder, _FixedDecoder([0.9, 0.5, 0.1])), "static": (encoder, _FixedDecoder([0.1, 0.5, 0.9])),
                 "dynamic": (encoder, _FixedDecoder([0.9, 0.5, 0.1]))}
    image = synthetic_image(64, 80, seed=3)
    result = fidelity.evaluate(pipelines, [("a", image)], SAM_PREPROCESS, SMALL, seed=0)
    static, dynamic = result["static"], result["dynamic"]
    assert static["selection_agreement"] == 0.0 and static["same_token_mask_iou_mean"] == 1.0
    assert static["mask_iou_mean"] == pytest.approx(1 / 3, abs=1e-4)  # left quarter vs left three quarters
    assert dynamic["selection_agreement"] == 1.0 and dynamic["mask_iou_mean"] == dynamic["same_token_mask_iou_mean"] == 1.0


def test_budget_used_is_the_worst_metric():
    assert fidelity.budget_used({"cosine": 0.004, "mask_iou": 0.01}, {"cosine": 0.008, "mask_iou": 0.02}) == 0.5
    assert fidelity.budget_used({"mask_iou": 0.03}, {"mask_iou": 0.02}) == pytest.approx(1.5)
    assert fidelity.budget_used({"cosine": 0.0}, {"cosine": 0.0}) == 0.0
    assert fidelity.budget_used({"cosine": 1e-6}, {"cosine": 0.0}) == float("inf")


def test_exclusion_count_attributes_the_overshoot_proportionally():
    errors = [0.5, 0.2, 0.2, 0.1]
    # 2x over budget: half of the error must go; the top node alone carries half.
    assert quantize.exclusion_count(errors, 0, 2.0) == 1
    # 4x over: 75 % must go -> 0.5 + 0.2 = 70 % is not enough, 90 % is.
    assert quantize.exclusion_count(errors, 0, 4.0) == 3
    # From 1 excluded, 1.5x over among the remaining 0.5: one third must go -> one more node.
    assert quantize.exclusion_count(errors, 1, 1.5) == 2
    assert quantize.exclusion_count(errors, 3, 100.0) == 4  # never beyond the list


def test_sample_prompts_follow_the_runtime_packing():
    input_size = (600, 1024)  # (h, w) of a landscape image in the 1024 frame
    batches = calibration.sample_prompts(input_size, np.random.default_rng(0), calibration.PromptSampling())
    kinds = {kind for kind, _, _ in batches}
    assert kinds == {"point", "multi_point", "box", "point_box", "grid", "refine"}
    total = 0
    for kind, coords, labels in batches:
        assert coords.dtype == np.float32 and labels.dtype == np.float32
        assert coords.shape[:2] == labels.shape and coords.shape[2] == 2 and len(coords) <= 8
        total += len(coords)
        xs, ys = coords[..., 0], coords[..., 1]
        assert (xs >= 0).all() and (xs <= 1024).all() and (ys >= 0).all() and (ys <= 600).all()
        if kind in ("box", "point_box"):  # a box: corners labelled 2, 3 and no padding point
            np.testing.assert_array_equal(labels[:, -2:], np.tile([2.0, 3.0], (len(labels), 1)))
            assert not (labels == prompts.PAD_LABEL).any()
        else:  # SAM pads point-only prompts with (0, 0) labelled -1
            np.testing.assert_array_equal(labels[:, -1], prompts.PAD_LABEL)
            np.testing.assert_array_equal(coords[:, -1], 0.0)
    sampling = calibration.PromptSampling()
    assert total == (sampling.points + sampling.multi_points + sampling.boxes + sampling.point_boxes
                     + sampling.grid_per_side ** 2 + sampling.refinements)
    # Single points are packed exactly as the predictor packs them.
    kind, coords, labels = batches[0]
    packed = prompts.pack_prompt(coords[0, :1], labels[0, :1], None)
    np.testing.assert_array_equal(packed[0][0], coords[0])
    np.testing.assert_array_equal(packed[1][0], labels[0])


def test_list_images_dir_and_glob(tmp_path):
    for name in ("b.png", "a.png", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in calibration.list_images(tmp_path)] == ["a.png", "b.png"]
    assert [p.name for p in calibration.list_images(tmp_path / "b*.png")] == ["b.png"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        calibration.list_images(tmp_path / "*.jpg")
    with pytest.raises(FileNotFoundError, match="neither a directory nor a glob"):
        calibration.list_images(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files"):
        calibration.list_images(empty)


def test_encoder_input_matches_the_predictor(fp32_model_dir):
    image = synthetic_image(300, 200, seed=3)
    manifest = load_manifest(fp32_model_dir)
    tensor, input_size = calibration.encoder_input(image, manifest.preprocess)
    predictor = TinySAMPredictor(image, model_dir=fp32_model_dir, cache_size=0)
    assert input_size == predictor.input_size == (1024, 683)
    from tinysam_rt.sessions import EncoderSession

    np.testing.assert_array_equal(EncoderSession(manifest.encoder).run(tensor), predictor.embedding.features)


def _one_node_model(path, op, name, x_shape, y_shape, w):
    """Save a model y = op(x, w) with w an initializer; returns path."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op, ["x", "w"], ["y"], name=name)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)],
        [onnx.numpy_helper.from_array(w, "w")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


def test_store_weights_compact_keeps_float_compute(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    src = _one_node_model(tmp_path / "mm.onnx", "MatMul", "mm", [4, 16], [4, 8], w)
    assert quantize.store_weights_compact(src, ["mm"], tmp_path / "w8.onnx") == ["mm"]
    model = onnx.load(tmp_path / "w8.onnx")
    onnx.checker.check_model(model)
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert stored["w_w8"].dtype == np.int8 and stored["w_w8_scale"].shape == (8,)  # per output column
    x = rng.normal(size=(4, 16)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "w8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w, atol=0.05 * np.abs(x @ w).max())
    assert not np.array_equal(y, x @ w)  # really int8 weights, not the float ones


def test_store_weights_keeps_float_conv_weights_as_float16(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    src = _one_node_model(tmp_path / "conv.onnx", "Conv", "conv", [1, 4, 6, 6], [1, 8, 4, 4], w)
    assert quantize.store_weights_compact(src, ["conv"], tmp_path / "f16.onnx") == ["conv"]
    model = onnx.load(tmp_path / "f16.onnx")
    onnx.checker.check_model(model)
    assert [i.data_type for i in model.graph.initializer] == [onnx.TensorProto.FLOAT16]
    assert [n.op_type for n in model.graph.node] == ["Cast", "Conv"]
    x = rng.normal(size=(1, 4, 6, 6)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "f16.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (want,) = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, want, atol=2e-3 * np.abs(want).max())


def _row_error(out, ref):
    """Mean over rows of 1 - cosine: every sample counts, however small its values."""
    return float(np.mean([1 - fidelity.cosine(o, r) for o, r in zip(out, ref)]))


class _RelativeError:
    """A real scorer for a tiny graph: ORT output vs the float graph on fixed inputs."""

    def __init__(self, src, feeds, budget):
        self.feeds, self.budgets = feeds, {"cosine": budget}
        session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        self.reference = [session.run(None, f)[0] for f in feeds]

    def error(self, path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return float(np.mean([_row_error(session.run(None, f)[0], r) for f, r in zip(self.feeds, self.reference)]))

    def budget(self, path):
        return fidelity.budget_used({"cosine": self.error(path)}, self.budgets)


def _chain(tmp_path):
    """x -> mm0 -> mm1 -> mm2 -> y (MatMul, MatMul, Gemm with bias; 32 wide) and 4 feeds whose x
    has one spike of 1000.

    The spike makes a per-tensor u8 scale for x leave ~1 level for every other value, so
    quantizing mm0's input destroys every other row's output; mm0's weight row 0 is zero so the
    spike does not reach h0 and only mm0 is sensitive.
    """
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(32, 32)).astype(np.float32) / 6 for _ in range(3)]
    weights[0][0] = 0.0
    nodes = [onnx.helper.make_node("MatMul", [i, f"w{k}"], [o], name=f"mm{k}")
             for k, (i, o) in enumerate((("x", "h0"), ("h0", "h1")))]
    nodes.append(onnx.helper.make_node("Gemm", ["h1", "w2", "b2"], ["y"], name="mm2"))  # a bias, as linear layers
    graph = onnx.helper.make_graph(
        nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 32])],
        [onnx.numpy_helper.from_array(w, f"w{k}") for k, w in enumerate(weights)]
        + [onnx.numpy_helper.from_array(rng.normal(size=32).astype(np.float32), "b2")])
    return _save_with_spiked_feeds(graph, tmp_path / "chain.onnx", rng)


def _save_with_spiked_feeds(graph, src, rng):
    """Save a (64, 32) -> (64, 32) graph; 4 feeds of x with one spike of 1000 at x[0, 0]."""
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), src)
    feeds = []
    for _ in range(4):
        x = rng.normal(size=(64, 32)).astype(np.float32)
        x[0, 0] = 1000.0
        feeds.append({"x": x})
    return src, feeds


def _run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _chain_qdq(tmp_path, ops=("MatMul", "Gemm")):
    """The chain, its prepared graph, and that graph's static QDQ (MinMax) with `ops` quantized."""
    src, feeds = _chain(tmp_path)
    prepared = quantize.prepare_graph(src, tmp_path / "chain.prepared.onnx")
    reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
    qdq = quantize.quantize_qdq(prepared, tmp_path / "q.onnx", reader, "minmax", ops, (), tmp_path / "r.json")
    return src, feeds, prepared, qdq


def test_quantized_only_restores_float_inputs(tmp_path):
    ops = ("MatMul", "Gemm")
    src, feeds, prepared, qdq = _chain_qdq(tmp_path, ops)
    q_model, f_model = onnx.load(str(qdq)), onnx.load(str(prepared))
    every = quantize.quantized_only(q_model, f_model, {"mm0", "mm1", "mm2"}, ops, tmp_path / "all.onnx")
    np.testing.assert_array_equal(_run(every, feeds[0]), _run(qdq, feeds[0]))
    none = quantize.quantized_only(q_model, f_model, set(), ops, tmp_path / "none.onnx")
    # Only the Gemm bias stays int32 + DequantizeLinear (ORT keeps its name): ~1e-4 off float.
    np.testing.assert_allclose(_run(none, feeds[0]), _run(src, feeds[0]), rtol=0, atol=1e-3)
    assert {n.op_type for n in onnx.load(str(none)).graph.node} <= {"MatMul", "Gemm", "DequantizeLinear"}
    only1 = quantize.quantized_only(q_model, f_model, {"mm1"}, ops, tmp_path / "one.onnx")
    inputs = {n.name: list(n.input) for n in onnx.load(str(only1)).graph.node}
    assert inputs["mm0"] == ["x", "w0"] and inputs["mm2"][:2] == ["h1", "w2"]
    assert all(name.endswith("DequantizeLinear_Output") for name in inputs["mm1"])


def test_quantized_only_also_restores_quantized_outputs(tmp_path):
    """A Conv's output is Q->DQ'd on its way to a float op (here Exp) and to the graph output:
    with no node kept, that must go too (it used to stay, giving every candidate the same error
    floor)."""
    rng = np.random.default_rng(1)
    nodes = [onnx.helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Exp", ["c0"], ["t0"], name="exp0"),
             onnx.helper.make_node("Conv", ["t0", "w1"], ["y"], name="conv1", pads=[1, 1, 1, 1])]
    graph = onnx.helper.make_graph(
        nodes, "convs", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32) / 4, f"w{k}") for k in range(2)])
    src = tmp_path / "convs.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), src)
    feeds = [{"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)} for _ in range(3)]
    prepared = quantize.prepare_graph(src, tmp_path / "convs.prepared.onnx")
    reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
    qdq = quantize.quantize_qdq(prepared, tmp_path / "q.onnx", reader, "minmax", ("Conv",), (), tmp_path / "r.json")
    q_model, f_model = onnx.load(str(qdq)), onnx.load(str(prepared))
    none = quantize.quantized_only(q_model, f_model, set(), ("Conv",), tmp_path / "none.onnx")
    np.testing.assert_allclose(_run(none, feeds[0]), _run(src, feeds[0]), rtol=0, atol=1e-5)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in onnx.load(str(none)).graph.node}
    every = quantize.quantized_only(q_model, f_model, {"conv0", "conv1"}, ("Conv",), tmp_path / "all.onnx")
    np.testing.assert_array_equal(_run(every, feeds[0]), _run(qdq, feeds[0]))
    assert np.abs(_run(every, feeds[0]) - _run(src, feeds[0])).max() > 1e-4  # quantization is really on


def test_search_keeps_the_sensitive_node_in_float(tmp_path):
    src, feeds = _chain(tmp_path)
    prepared = quantize.prepare_graph(src, tmp_path / "chain.prepared.onnx")
    reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
    scorer = _RelativeError(src, feeds, budget=0.01)
    config = quantize.QuantizeConfig(method="minmax", linear="static")
    messages = []
    path, recipe = quantize.search_graph("decoder", prepared, reader, scorer, config, tmp_path, messages.append)
    assert recipe["budget_used_by_method"]["minmax"] > 1  # all-INT8 misses the budget
    assert recipe["excluded_nodes"] == ["mm0"] and recipe["budget_used"] <= 1
    assert next(iter(recipe["sensitivity_top"])) == "mm0"
    model = onnx.load(str(path))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["mm0"] == "MatMul" and "w0_w8_DequantizeLinear" in ops  # float compute, int8 weights
    assert any("sensitivity of 3 nodes" in m for m in messages)
    assert recipe["op_types"] == ["Gemm", "MatMul"] and recipe["budget_used_by_op_types"] == {"Gemm+MatMul": recipe["budget_used"]}


def test_search_quantizes_fewer_op_types_when_single_nodes_are_not_enough(tmp_path):
    """With no node allowed in float, the decoder ladder drops MatMul (mm0, mm1) and keeps the
    Gemm (mm2) quantized: the sensitive mm0 then computes in float, with int8 weights."""
    src, feeds = _chain(tmp_path)
    prepared = quantize.prepare_graph(src, tmp_path / "chain.prepared.onnx")
    reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
    scorer = _RelativeError(src, feeds, budget=0.01)
    config = quantize.QuantizeConfig(method="minmax", max_excluded=0, linear="static")
    messages = []
    path, recipe = quantize.search_graph("decoder", prepared, reader, scorer, config, tmp_path, messages.append)
    assert recipe["op_types"] == ["Gemm"] and recipe["float_compute_op_types"] == ["MatMul"]
    assert recipe["excluded_nodes"] == [] and recipe["budget_used"] <= 1
    assert recipe["budget_used_by_op_types"]["Gemm+MatMul"] > 1 >= recipe["budget_used_by_op_types"]["Gemm"]
    ops = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops["mm0"] == ops["mm1"] == "MatMul" and {"w0_w8_DequantizeLinear", "w1_w8_DequantizeLinear"} <= set(ops)
    assert any("only Gemm quantized" in m for m in messages)


def _ops(path):
    return {n.name: n for n in onnx.load(str(path)).graph.node}


def test_dynamic_linear_quantizes_gemms_per_call_and_keeps_static_matmuls(tmp_path):
    ops = ("MatMul", "Gemm")
    src, feeds, prepared, qdq = _chain_qdq(tmp_path, ops)
    out, converted = quantize.dynamic_linear(qdq, prepared, ops, tmp_path / "dyn.onnx")
    nodes = _ops(out)
    assert converted == 1 and nodes["mm2"].op_type == "DynamicQuantizeMatMul" and nodes["mm2"].domain == "com.microsoft"
    assert nodes["mm2"].input[0] == "h1"  # reads the float activation: the per-call quantization is its own
    assert all(name.endswith("DequantizeLinear_Output") for name in nodes["mm1"].input)  # still static
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    weight = inits["mm2_dq_weight"]
    assert weight.dtype == np.int8 and weight.shape == (32, 32) and np.abs(weight).max() == 63  # 7-bit, (K, N)
    np.testing.assert_array_equal(inits["mm2_dq_bias"], onnx.numpy_helper.to_array(
        next(i for i in onnx.load(str(src)).graph.initializer if i.name == "b2")))  # the float bias again
    # mm0's spike still ruins the static rows: compare only mm2's own step, from the same h1.
    only_mm2 = quantize.dynamic_linear(prepared, prepared, (), tmp_path / "dyn-only.onnx")[0]
    y, want = _run(only_mm2, feeds[1]), _run(src, feeds[1])
    assert 0 < np.abs(y - want).max() < 0.02 * np.abs(want).max()


def test_dynamic_linear_converts_gemms_kept_float_with_compact_weights(tmp_path):
    src, feeds = _chain(tmp_path)
    prepared = quantize.prepare_graph(src, tmp_path / "chain.prepared.onnx")
    compact = tmp_path / "compact.onnx"
    quantize.store_weights_compact(prepared, ["mm2"], compact)
    assert _ops(compact)["w2_w8_DequantizeLinear"].op_type == "DequantizeLinear"
    out, converted = quantize.dynamic_linear(compact, prepared, (), tmp_path / "dyn.onnx", reduce_range=False)
    nodes = _ops(out)
    assert converted == 1 and nodes["mm2"].op_type == "DynamicQuantizeMatMul"
    assert "w2_w8_DequantizeLinear" not in nodes  # weights quantized again from the float graph's
    weight = next(onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer
                  if i.name == "mm2_dq_weight")
    assert np.abs(weight).max() == 127  # 8-bit when asked
    np.testing.assert_allclose(_run(out, feeds[0]), _run(src, feeds[0]), rtol=0, atol=0.05)


def _two_gemms(tmp_path):
    """x -> g0 -> g1 -> y, two Gemms with bias (32 wide, 64 rows), and 4 feeds whose x has one
    spike of 1000: quantizing g0's input per call ruins every other row (its weight row 0 is
    zero, so the spike does not reach g1, whose per-call input is fine)."""
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(32, 32)).astype(np.float32) / 6
    w0[0] = 0.0
    w1 = rng.normal(size=(32, 32)).astype(np.float32) / 6
    nodes = [onnx.helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], name="g0"),
             onnx.helper.make_node("Gemm", ["h", "w1", "b1"], ["y"], name="g1")]
    graph = onnx.helper.make_graph(
        nodes, "two_gemms", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 32])],
        [onnx.numpy_helper.from_array(w0, "w0"), onnx.numpy_helper.from_array(w1, "w1"),
         onnx.numpy_helper.from_array(rng.normal(size=32).astype(np.float32), "b0"),
         onnx.numpy_helper.from_array(rng.normal(size=32).astype(np.float32), "b1")])
    return _save_with_spiked_feeds(graph, tmp_path / "two_gemms.onnx", rng)


@pytest.mark.parametrize("compact_source", [False, True])
def test_dynamic_linear_keeps_named_gemms_float_with_float16_weights(tmp_path, compact_source):
    """A Gemm kept float gets float16 weights + Cast (ORT folds the Cast at load: a float Gemm),
    also when the source graph stored its weights as int8 + DequantizeLinear (weight-only int8)."""
    src, feeds = _two_gemms(tmp_path)
    prepared = quantize.prepare_graph(src, tmp_path / "two.prepared.onnx")
    source = prepared
    if compact_source:
        source = tmp_path / "compact.onnx"
        quantize.store_weights_compact(prepared, ["g0"], source)
        assert _ops(source)["w0_w8_DequantizeLinear"].op_type == "DequantizeLinear"
    out, converted = quantize.dynamic_linear(source, prepared, (), tmp_path / "dyn.onnx", keep_float={"g0"})
    nodes = _ops(out)
    assert converted == 1 and nodes["g0"].op_type == "Gemm" and nodes["g1"].op_type == "DynamicQuantizeMatMul"
    assert nodes["g0"].input[1] == "g0_float_1" and nodes["g0_float_1_f16_Cast"].op_type == "Cast"
    assert not any(n.op_type == "DequantizeLinear" for n in nodes.values())
    stored = {i.name: i.data_type for i in onnx.load(str(out)).graph.initializer}
    assert stored["g0_float_1_f16"] == onnx.TensorProto.FLOAT16 and stored["g0_float_2"] == onnx.TensorProto.FLOAT
    # g0 in float (float16 weights) keeps the spiked rows right; all per call ruins them
    every = quantize.dynamic_linear(prepared, prepared, (), tmp_path / "all.onnx")[0]
    want = _run(src, feeds[0])
    assert _row_error(_run(out, feeds[0]), want) < 0.1 * _row_error(_run(every, feeds[0]), want)


def test_gemm_macs_reads_rows_from_inferred_shapes(tmp_path):
    src, _ = _two_gemms(tmp_path)
    prepared = quantize.prepare_graph(src, tmp_path / "two.prepared.onnx")
    assert quantize.gemm_macs(prepared) == {"g0": 64 * 32 * 32, "g1": 64 * 32 * 32}


def test_search_keeps_the_gemm_that_per_call_quantization_ruins_in_float(tmp_path):
    src, feeds = _two_gemms(tmp_path)
    prepared = quantize.prepare_graph(src, tmp_path / "two.prepared.onnx")
    reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
    scorer = _RelativeError(src, feeds, budget=0.01)
    messages = []
    config = quantize.QuantizeConfig(method="minmax", linear="dynamic")
    path, recipe = quantize.search_graph("decoder", prepared, reader, scorer, config, tmp_path, messages.append)
    assert recipe["budget_used_by_linear"]["dynamic"] > 1  # every Gemm per call misses the budget
    assert recipe["float_gemms"] == ["g0"] and "g0" in recipe["excluded_nodes"]
    assert list(recipe["dynamic_sensitivity_top"]) == ["g0", "g1"]  # kept in order of error per MAC
    assert recipe["budget_used"] == recipe["budget_used_by_linear"]["dynamic_with_float_gemms"] <= 1
    ops = _ops(path)
    assert ops["g0"].op_type == "Gemm" and ops["g1"].op_type == "DynamicQuantizeMatMul"
    assert any("error of 2 Gemms, one at a time" in m for m in messages)
    # with no node allowed in float the per-call graph stays as it is, over budget
    capped = quantize.QuantizeConfig(method="minmax", linear="dynamic", max_excluded=0)
    (tmp_path / "capped").mkdir()
    _, recipe = quantize.search_graph("decoder", prepared, reader, scorer, capped, tmp_path / "capped", lambda m: None)
    assert recipe["float_gemms"] == [] and recipe["budget_used"] > 1


class _ScriptedBudget:
    """A scorer whose one-at-a-time error is given per Gemm and whose budget use follows a script
    (what a noisy calibration metric may do)."""

    def __init__(self, errors, budgets):
        self.errors, self.budgets, self.calls = errors, list(budgets), 0

    def error(self, path):
        (name,) = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "DynamicQuantizeMatMul"]
        return self.errors[name]

    def budget(self, path):
        self.calls += 1
        return self.budgets.pop(0)


def test_dynamic_gemm_search_stops_when_a_step_does_not_help(tmp_path):
    src, _ = _two_gemms(tmp_path)
    prepared = quantize.prepare_graph(src, tmp_path / "two.prepared.onnx")
    config = quantize.QuantizeConfig(linear="dynamic")
    start = (tmp_path / "start.onnx", 2.0)
    # equal MACs: ranked by error alone, g1 first
    scorer = _ScriptedBudget({"g0": 1e-4, "g1": 3e-4}, [2.1])  # keeping g1 float made it worse
    path, used, kept, errors = quantize.search_dynamic_gemms("decoder", prepared, prepared, (), scorer, config,
                                                             tmp_path, lambda m: None, start, 2)
    assert (path, used, kept) == (start[0], 2.0, []) and scorer.calls == 1
    assert list(errors) == ["g1", "g0"]
    scorer = _ScriptedBudget({"g0": 1e-4, "g1": 3e-4}, [1.5, 1.6])  # better, then worse: keep the better
    path, used, kept, _ = quantize.search_dynamic_gemms("decoder", prepared, prepared, (), scorer, config,
                                                        tmp_path, lambda m: None, start, 2)
    assert used == 1.5 and kept == ["g1"] and _ops(path)["g1"].op_type == "Gemm"
    assert _ops(path)["g0"].op_type == "DynamicQuantizeMatMul"


@pytest.mark.parametrize("linear, want", [("static", "static"), ("dynamic", "dynamic"), ("auto", "dynamic")])
def test_search_tries_gemms_quantized_per_call(tmp_path, linear, want):
    """The chain's Gemm reads no spike, so per-call quantization stays within budget and "auto"
    takes it; MatMuls stay static QDQ: the graph is a hybrid, and says so."""
    src, feeds = _chain(tmp_path)
    prepared = quantize.prepare_graph(src, tmp_path / "chain.prepared.onnx")
    reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
    scorer = _RelativeError(src, feeds, budget=0.01)
    config = quantize.QuantizeConfig(method="minmax", linear=linear)
    path, recipe = quantize.search_graph("decoder", prepared, reader, scorer, config, tmp_path, lambda m: None)
    assert recipe["linear"] == want
    assert set(recipe["budget_used_by_linear"]) == ({"static"} if linear == "static" else {"static", "dynamic"})
    ops = _ops(path)
    if want == "dynamic":
        assert recipe["precision"] == "int8-hybrid" and recipe["dynamic_op_types"] == ["Gemm"]
        assert recipe["static_op_types"] == ["MatMul"] and ops["mm2"].op_type == "DynamicQuantizeMatMul"
        assert recipe["budget_used"] == recipe["budget_used_by_linear"]["dynamic"] <= 1
        # what stays float is named only where it still computes in float (MatMuls)
        assert recipe["search_excluded_nodes"] == recipe["excluded_nodes"] == ["mm0"]  # a MatMul: still float
    else:
        assert recipe["precision"] == "int8-static-qdq" and recipe["dynamic_op_types"] == []
        assert ops["mm2"].op_type == "Gemm"


def test_check_config_names_the_field():
    with pytest.raises(ValueError, match=r"linear must be one of \['auto', 'static', 'dynamic'\], got 'mixed'"):
        quantize.check_config(quantize.QuantizeConfig(linear="mixed"))
    with pytest.raises(ValueError, match="method must be"):
        quantize.check_config(quantize.QuantizeConfig(method="kl"))
    with pytest.raises(ValueError, match="min_images must be an int >= 1"):
        quantize.check_config(quantize.QuantizeConfig(min_images=0))
    with pytest.raises(ValueError, match="holdout \\+ synthetic"):
        quantize.check_config(quantize.QuantizeConfig(holdout=0, synthetic=0))
    with pytest.raises(ValueError, match=r"upscaler must be one of \['fp32', 'int8'\], got 'int4'"):
        quantize.check_config(quantize.QuantizeConfig(upscaler="int4"))
    with pytest.raises(ValueError, match=r"kept only with only='encoder' .*got only='both'"):
        quantize.check_config(quantize.QuantizeConfig(upscaler="int8", only="both"))
    for share in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="calibration_share must be in"):
            quantize.check_config(quantize.QuantizeConfig(calibration_share=share))


def test_cli_bad_calibration_share_is_a_usage_error(fp32_model_dir, calib_dir, tmp_path, capsys):
    code = cli.main(["quantize", "--model", str(fp32_model_dir), "--calib", str(calib_dir), "--out",
                     str(tmp_path / "out"), "--calibration-share", "1.2"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "calibration_share must be in (0, 1], got 1.2" in err
    assert not (tmp_path / "out").exists()


# -- end to end -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """Two synthetic images: one for calibration, one held out."""
    folder = tmp_path_factory.mktemp("calib")
    write_png(folder / "scene0.png", synthetic_image(480, 640, seed=10))
    write_png(folder / "scene1.png", synthetic_image(640, 480, seed=11))
    return folder


def _quantize_cli(fp32_model_dir, calib_dir, out, *flags):
    """`tinysam quantize` on the two test images, fast settings (minmax, no search), plus `flags`."""
    return cli.main(["quantize", "--model", str(fp32_model_dir), "--calib", str(calib_dir / "*.png"), "--out", str(out),
                     "--method", "minmax", "--min-images", "1", "--holdout", "1", "--synthetic", "0",
                     "--max-excluded", "0", *flags])


@pytest.fixture(scope="module")
def int8_dir(fp32_model_dir, calib_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "vit_t-int8"
    report = quantize.quantize_model(fp32_model_dir, calib_dir, out, FAST)
    return out, report


def test_quantized_model_loads_and_predicts(int8_dir, fp32_model_dir, calib_dir):
    out, report = int8_dir
    manifest = load_manifest(out)  # sha256-verified
    fp32 = load_manifest(fp32_model_dir)
    assert manifest.encoder.precision == manifest.decoder.precision == "int8-static-qdq"
    assert manifest.weights_id == fp32.weights_id
    assert manifest.encoder.path.stat().st_size <= 0.35 * fp32.encoder.path.stat().st_size
    recipe = manifest.quantization
    assert recipe["calibration"]["images"] == [
        {"file": "scene0.png", "sha256": hashlib.sha256((calib_dir / "scene0.png").read_bytes()).hexdigest()}]
    assert recipe["held_out"] == ["scene1.png"] and recipe["calibration"]["prompts"] == 10  # SMALL: 2+1+1+1+4+1
    assert recipe["graphs"]["encoder"]["method"] == "minmax"
    assert recipe["graphs"]["encoder"]["excluded_nodes"] == []
    assert recipe["versions"]["onnxruntime"] == ort.__version__
    assert set(recipe["fidelity"]) == {"static", "dynamic"} and recipe["format"] == "QDQ"
    assert (out / "quantization_report.md").read_text().startswith("# tinysam quantize")
    # The FP32 points decoder would take every point prompt from the INT8 decoder: it is dropped.
    assert manifest.points_decoder is None and not (out / "points_decoder.onnx").exists()
    for graph in manifest.graphs:  # each INT8 file carries the weights it was made from
        props = {p.key: p.value for p in onnx.load(str(graph.path)).metadata_props}
        assert props["tinysam_rt.weights_id"] == fp32.weights_id
    assert recipe["points_decoder"] == "dropped: the INT8 decoder serves every prompt"
    image = load_image(calib_dir / "scene1.png")
    int8 = TinySAMPredictor(image, model_dir=out)
    masks, scores, low_res = int8.predict(point_coords=[[240, 320]])
    assert masks.shape == (3, 640, 480) and masks.dtype == bool and scores.shape == (3,) and low_res.shape == (3, 256, 256)
    reference = TinySAMPredictor(image, model_dir=fp32_model_dir)
    # Same weights, quantized: embeddings close (the held-out gate numbers are in the report).
    assert fidelity.cosine(int8.embedding.features, reference.embedding.features) > 0.95
    assert report["fidelity"]["static"]["embedding_cosine_min"] > 0.95
    for metrics in report["fidelity"].values():
        # Fractions of the held-out prompts; with every selection equal to FP32's the two IoUs
        # measure the same masks.
        assert 0.0 <= metrics["selection_agreement"] <= 1.0
        assert 0.0 <= metrics["same_token_mask_iou_mean"] <= 1.0
        if metrics["selection_agreement"] == 1.0:
            assert metrics["same_token_mask_iou_mean"] == metrics["mask_iou_mean"]
    assert "| same mask chosen |" in (out / "quantization_report.md").read_text()


def test_failed_gate_writes_nothing_and_keeps_previous_output(fp32_model_dir, calib_dir, tmp_path):
    import dataclasses

    out = tmp_path / "int8"
    out.mkdir()  # an earlier output: only a model directory may be replaced (tinysam_export.out_dir)
    shutil.copyfile(fp32_model_dir / "manifest.json", out / "manifest.json")
    (out / "encoder.int8.onnx").write_text("kept")
    impossible = dataclasses.replace(FAST, gate=True, min_mask_iou=1.0, only="decoder")
    with pytest.raises(RuntimeError, match="accuracy gate failed, nothing written: mean selected-mask IoU"):
        quantize.quantize_model(fp32_model_dir, calib_dir, out, impossible)
    assert sorted(p.name for p in out.iterdir()) == ["encoder.int8.onnx", "manifest.json"]
    assert (out / "encoder.int8.onnx").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]  # no staging directory left behind


def test_cli_failed_gate_prints_the_numbers_then_one_error_line(fp32_model_dir, calib_dir, tmp_path, monkeypatch, capsys):
    # The gate's verdict is forced (random weights pass or fail it by chance); the numbers are real.
    monkeypatch.setattr(fidelity, "gate_failures", lambda *a, **k: ["mean selected-mask IoU 0.5000 < 0.95"])
    out = tmp_path / "int8"
    code = _quantize_cli(fp32_model_dir, calib_dir, out, "--only", "decoder", "--report")
    captured = capsys.readouterr()
    assert code == 1 and not out.exists()
    assert "| vs FP32 |" in captured.out and "scene1.png" in captured.out  # the fidelity table of the refused model
    assert captured.err.strip().splitlines()[-1].startswith("tinysam quantize: error: accuracy gate failed, nothing written")


# -- bad input: one clear error, nothing written ----------------------------------------------------

def _no_output(tmp_path):
    return not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_non_image_file_is_named(fp32_model_dir, calib_dir, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for p in calib_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"calibration file .*notes\.txt is not an image"):
        quantize.quantize_model(fp32_model_dir, folder, tmp_path / "out", FAST)
    assert _no_output(tmp_path)


def test_truncated_image_is_named(fp32_model_dir, calib_dir, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "a.png").write_bytes((calib_dir / "scene0.png").read_bytes())
    (folder / "b.png").write_bytes((calib_dir / "scene1.png").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"b\.png is not an image"):
        quantize.quantize_model(fp32_model_dir, folder, tmp_path / "out", FAST)
    assert _no_output(tmp_path)


@pytest.mark.parametrize("height, width", [(1, 40), (2000, 1)], ids=["one_row", "one_column"])
def test_image_below_two_pixels_is_named_before_any_slow_step(fp32_model_dir, calib_dir, tmp_path, height, width):
    import cv2

    folder = tmp_path / "calib"
    folder.mkdir()
    for p in calib_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    cv2.imwrite(str(folder / "sliver.png"), np.full((height, width, 3), 128, np.uint8))
    with pytest.raises(ValueError, match=rf"calibration file .*sliver\.png must be at least 2x2 pixels, got {height}x{width}"):
        quantize.quantize_model(fp32_model_dir, folder, tmp_path / "out", FAST)
    assert _no_output(tmp_path)


def test_predictor_warns_when_8bit_weights_meet_a_saturating_kernel(int8_dir, tmp_path, caplog):
    """Whether this CPU's kernel saturates decides the answer (AVX2-only: yes; VNNI/AMX/ARM: no);
    the test holds on both, and 7-bit weights never warn."""
    out, _ = int8_dir
    eight_bit = tmp_path / "eight-bit"
    shutil.copytree(out, eight_bit)
    doc = json.loads((eight_bit / "manifest.json").read_text())
    doc["quantization"]["graphs"]["encoder"]["reduce_range"] = False  # as --no-reduce-range writes it
    (eight_bit / "manifest.json").write_text(json.dumps(doc))
    saturates = gemm_peak.u8s8_kernel_saturates()
    with caplog.at_level(logging.WARNING, logger="tinysam_rt.predictor"):
        TinySAMPredictor(model_dir=eight_bit)
        TinySAMPredictor(model_dir=out)
    warned = [r.getMessage() for r in caplog.records if "8-bit weights" in r.getMessage()]
    assert warned == ([f"{eight_bit}: the encoder graph(s) have 8-bit weights, and this CPU's integer kernel "
                       "saturates them (no VNNI): expect outputs further from FP32; re-quantize without "
                       "--no-reduce-range"] if saturates else [])
    assert warn_if_weights_saturate(load_manifest(out)) == []


def test_already_quantized_model_is_refused(int8_dir, calib_dir, tmp_path):
    with pytest.raises(ValueError, match=r"is already quantized \(encoder is int8-static-qdq, decoder is "
                                         r"int8-static-qdq\); quantize the FP32 export it came from"):
        quantize.quantize_model(int8_dir[0], calib_dir, tmp_path / "out", FAST)
    assert _no_output(tmp_path)


def test_cli_out_equal_to_model_is_a_usage_error(fp32_model_dir, calib_dir, capsys):
    code = cli.main(["quantize", "--model", str(fp32_model_dir), "--calib", str(calib_dir), "--out", str(fp32_model_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out must differ from --model" in err


def _manifest_only_model(fp32_model_dir, directory):
    """A model directory as far as --model parsing goes (verify=False reads only manifest.json)."""
    directory.mkdir(parents=True)
    shutil.copyfile(fp32_model_dir / "manifest.json", directory / "manifest.json")
    return directory


@pytest.mark.parametrize("where, message", [
    ("parent", "--out {out} contains --model {model} and would be replaced whole, deleting it; give a directory outside it"),
    ("inside", "--out {out} is inside --model {model}; give a directory outside it"),
])
def test_cli_out_holding_or_inside_model_is_a_usage_error(fp32_model_dir, calib_dir, tmp_path, capsys, where, message):
    model = _manifest_only_model(fp32_model_dir, tmp_path / "models" / "vit_t")
    out = tmp_path / "models" if where == "parent" else model / "int8"
    code = cli.main(["quantize", "--model", str(model), "--calib", str(calib_dir), "--out", str(out)])
    assert code == 2
    assert capsys.readouterr().err == f"tinysam quantize: error: {message.format(out=out, model=model)}\n"
    assert sorted(p.name for p in (tmp_path / "models").rglob("*")) == ["manifest.json", "vit_t"]


def test_out_holding_other_files_is_refused_before_any_slow_step(fp32_model_dir, calib_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    monkeypatch.setattr(quantize, "_split_images", lambda *a: pytest.fail("calibration images read before --out was checked"))
    message = (f"--out {out} is a non-empty directory that is not a tinysam-rt model directory (unexpected entries: "
               f"notes.txt, photos/); it would be replaced whole, so give a new or empty directory")
    with pytest.raises(ValueError) as info:
        quantize.quantize_model(fp32_model_dir, calib_dir, out, FAST)
    assert str(info.value) == message
    assert cli.main(["quantize", "--model", str(fp32_model_dir), "--calib", str(calib_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"tinysam quantize: error: {message}\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "photos"] and (out / "notes.txt").read_text() == "precious"
    not_dir = tmp_path / "out.txt"
    not_dir.write_text("x")
    with pytest.raises(ValueError, match=f"^--out {not_dir} exists and is not a directory"):
        quantize.check_out_dir(fp32_model_dir, not_dir)


def test_too_large_calibration_image_is_named(fp32_model_dir, calib_dir, tmp_path):
    from test_io import png_declaring

    folder = tmp_path / "calib"
    folder.mkdir()
    for p in calib_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "huge.png").write_bytes(png_declaring(40000, 30000))
    with pytest.raises(ValueError, match=r"calibration file .*huge\.png is not an image cv2 can decode: image too large "
                                         r"to decode: 40000x30000 \(HxW\)"):
        quantize.quantize_model(fp32_model_dir, folder, tmp_path / "out", FAST)
    assert _no_output(tmp_path)


def test_too_few_images_is_an_error_not_a_fallback(fp32_model_dir, calib_dir, tmp_path):
    import dataclasses

    with pytest.raises(ValueError, match="calibration needs at least 5 images, got 2"):
        quantize.quantize_model(fp32_model_dir, calib_dir, tmp_path / "out", dataclasses.replace(FAST, min_images=4))
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="neither a directory nor a glob"):
        quantize.quantize_model(fp32_model_dir, missing, tmp_path / "out", FAST)
    assert _no_output(tmp_path)


def test_model_dir_that_is_not_a_tinysam_model(calib_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "encoder.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(FileNotFoundError, match="is .*model a tinysam-rt model dir"):
        quantize.quantize_model(folder, calib_dir, tmp_path / "out", FAST)
    (folder / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a tinysam-rt manifest"):
        quantize.quantize_model(folder, calib_dir, tmp_path / "out", FAST)
    assert _no_output(tmp_path)


def test_corrupt_fp32_graph_is_refused_by_sha256(fp32_model_dir, calib_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for p in fp32_model_dir.iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    with open(model / "decoder.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xff")
    with pytest.raises(ValueError, match="decoder.onnx: sha256"):
        quantize.quantize_model(model, calib_dir, tmp_path / "out", FAST)
    assert _no_output(tmp_path)


def test_cli_errors_are_one_line(calib_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tinysam_rt.cli", "quantize", "--model", str(tmp_path),
                             "--calib", str(calib_dir), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "tinysam quantize: error:" in result.stderr
    assert "tinysam-rt model dir" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_without_onnx_says_what_to_install(calib_dir, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    code = cli.main(["quantize", "--model", str(tmp_path), "--calib", str(calib_dir), "--out", str(tmp_path / "o")])
    assert code == 1
    assert "pip install 'tinysam-rt[quantize]'" in capsys.readouterr().err


def test_cli_only_decoder_keeps_the_fp32_encoder(fp32_model_dir, calib_dir, tmp_path, capsys):
    out = tmp_path / "mixed"
    code = _quantize_cli(fp32_model_dir, calib_dir, out, "--no-gate", "--only", "decoder", "--linear", "static", "--report")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| vs FP32 |" in captured.out and f"wrote {out}/" in captured.out
    manifest, fp32 = load_manifest(out), load_manifest(fp32_model_dir)
    assert manifest.encoder.precision == "fp32" and manifest.encoder.sha256 == fp32.encoder.sha256
    assert manifest.decoder.precision == "int8-static-qdq"
    assert list(manifest.quantization["graphs"]) == ["decoder"]
    assert manifest.quantization["fidelity"]["static"]["embedding_cosine_min"] == 1.0
    TinySAMPredictor(synthetic_image(64, 64), model_dir=out).predict(box=[4, 4, 40, 50])


def test_cli_only_encoder_keeps_the_fp32_decoders(fp32_model_dir, calib_dir, tmp_path, capsys):
    out = tmp_path / "mixed"
    code = _quantize_cli(fp32_model_dir, calib_dir, out, "--no-gate", "--only", "encoder", "--linear", "dynamic")
    assert code == 0, capsys.readouterr().err
    manifest, fp32 = load_manifest(out), load_manifest(fp32_model_dir)
    recipe = manifest.quantization["graphs"]["encoder"]
    assert recipe["linear"] == "dynamic" and recipe["dynamic_op_types"] == ["Gemm"]
    assert recipe["dynamic_weight_rounding"].startswith("gptq")  # the default, end to end
    assert "| dynamic, weights rounded by gptq (damp " in (out / "quantization_report.md").read_text()
    # Named for what it runs: static Q/DQ left for Conv/MatMul -> hybrid, none -> dynamic.
    assert manifest.encoder.precision == ("int8-hybrid" if recipe["static_op_types"] else "int8-dynamic")
    assert manifest.quantization["format"] == ("QDQ + " if recipe["static_op_types"] else "") + "DynamicQuantizeMatMul"
    kernels = {n.op_type for n in onnx.load(str(manifest.encoder.path)).graph.node}
    assert "DynamicQuantizeMatMul" in kernels and "Gemm" not in kernels
    # A calibrated activation range lives in a QuantizeLinear; the recipe says whether any is left.
    assert recipe["calibrated_ranges_used"] == ("QuantizeLinear" in kernels) == bool(recipe["static_op_types"])
    assert fidelity._method(recipe) == ("minmax" if recipe["static_op_types"] else "minmax (search only)")
    assert [(g.precision, g.sha256) for g in manifest.graphs[1:]] == [(g.precision, g.sha256) for g in fp32.graphs[1:]]
    assert manifest.points_decoder is not None
    assert manifest.quantization["points_decoder"] == "copied (decoder not quantized)"
    TinySAMPredictor(synthetic_image(64, 64), model_dir=out).predict(point_coords=[[10, 20]])


def test_cli_weight_rounding_nearest_rounds_each_weight_alone(fp32_model_dir, calib_dir, tmp_path, capsys):
    out = tmp_path / "nearest"
    code = _quantize_cli(fp32_model_dir, calib_dir, out, "--no-gate", "--linear", "dynamic", "--weight-rounding", "nearest")
    assert code == 0, capsys.readouterr().err
    manifest = load_manifest(out)
    assert manifest.quantization["graphs"]["encoder"]["dynamic_weight_rounding"] == "nearest"
    # Every per-call weight is exactly the nearest 7-bit level of its float weight.
    prepared = quantize.prepare_graph(load_manifest(fp32_model_dir).encoder.path, tmp_path / "prepared.onnx")
    float_model = onnx.load(str(prepared))
    floats = {i.name: onnx.numpy_helper.to_array(i) for i in float_model.graph.initializer}
    gemm_weights = {n.name: floats[n.input[1]] for n in float_model.graph.node if n.op_type == "Gemm"}
    ints = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(manifest.encoder.path)).graph.initializer}
    checked = 0
    for name, weight in gemm_weights.items():
        if f"{name}_dq_weight" in ints:
            np.testing.assert_array_equal(ints[f"{name}_dq_weight"], per_column_int8(weight, 63)[0])
            checked += 1
    assert checked == len(gemm_weights) > 0


def test_cli_bad_weight_rounding_is_a_usage_error(fp32_model_dir, calib_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _quantize_cli(fp32_model_dir, calib_dir, tmp_path / "out", "--weight-rounding", "adaround")
    assert exit_info.value.code == 2
    assert "argument --weight-rounding: invalid choice: 'adaround'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_int8_upscaler_quantizes_the_points_decoder(fp32_model_dir, calib_dir, tmp_path, capsys):
    out = tmp_path / "int8-upscaler"
    code = _quantize_cli(fp32_model_dir, calib_dir, out, "--no-gate", "--linear", "dynamic", "--upscaler", "int8", "--report")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest, fp32 = load_manifest(out), load_manifest(fp32_model_dir)
    assert manifest.points_decoder.precision == "int8-upscaler"
    assert manifest.decoder.sha256 == fp32.decoder.sha256  # mask-input prompts: the FP32 decoder
    recipe = manifest.quantization["graphs"]["points_decoder"]
    assert recipe["converted_matmuls"] == 6 and recipe["biases_in_matmul"] == 6 and recipe["reduce_range"] is True
    assert recipe["dynamic_weight_rounding"].startswith("gptq")  # the default, on the calibration prompts
    assert manifest.quantization["points_decoder"].startswith("upscaler GEMMs int8")
    size = manifest.quantization["sizes"]["points_decoder"]
    assert size["precision"] == "int8-upscaler" and size["bytes"] < size["fp32_bytes"]
    assert "| points_decoder | int8-upscaler |" in captured.out
    kernels = {n.op_type for g in _graphs_under(onnx.load(str(manifest.points_decoder.path)).graph) for n in g.node}
    assert "DynamicQuantizeMatMul" in kernels
    # The fidelity report ran point prompts through it (the gate sees the upscaler's effect).
    assert manifest.quantization["fidelity"]["static"]["prompts"] > 0
    masks, scores, _ = TinySAMPredictor(synthetic_image(64, 64), model_dir=out).predict(point_coords=[[10, 20]])
    assert masks.shape == (3, 64, 64) and scores.shape == (3,)


def test_int8_upscaler_needs_a_current_points_decoder(fp32_model_dir, calib_dir, tmp_path):
    import dataclasses

    model = tmp_path / "no-points"
    shutil.copytree(fp32_model_dir, model)
    (model / "points_decoder.onnx").unlink()
    doc = json.loads((model / "manifest.json").read_text())
    del doc["graphs"]["points_decoder"]
    (model / "manifest.json").write_text(json.dumps(doc))
    config = dataclasses.replace(FAST, only="encoder", upscaler="int8")
    with pytest.raises(ValueError, match="upscaler='int8' needs a points decoder .* this model has none"):
        quantize.quantize_model(model, calib_dir, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_cli_int8_upscaler_with_an_int8_decoder_is_a_usage_error(fp32_model_dir, calib_dir, tmp_path, capsys):
    code = cli.main(["quantize", "--model", str(fp32_model_dir), "--calib", str(calib_dir), "--out", str(tmp_path / "o"),
                     "--only", "both", "--upscaler", "int8"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kept only with only='encoder'" in err
    assert not (tmp_path / "o").exists()
