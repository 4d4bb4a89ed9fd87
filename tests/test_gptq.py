"""GPTQ weight rounding: the pure rounding on synthetic arrays, the Gram taps on a tiny real graph,
and per-call Gemms built with it."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tinysam_export import calibration, quantize
from tinysam_export.gptq import GPTQ_DAMP, GemmInputGrams, gptq_int8
from tinysam_export.upscaler_int8 import per_column_int8


def _inputs(rng, rows, k, source=None):
    """(rows, K) inputs like a transformer's: a large shared mean plus correlated noise. `source`
    (another seed) draws new rows of the same distribution as `rng`'s."""
    mean = rng.normal(size=k) * 3.0
    mixing = rng.normal(size=(k, k)) / np.sqrt(k)
    noise = (source or rng).normal(size=(rows, k))
    return (mean + noise @ mixing).astype(np.float32)


def _output_error(x, weight, q, scale):
    return float(np.sum((x.astype(np.float64) @ (weight - q * scale)) ** 2))


def test_gptq_keeps_the_nearest_rounding_grid():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(24, 10)).astype(np.float32)
    weight[:, 3] = 0.0  # an all-zero column keeps scale 1, as per_column_int8
    x = _inputs(rng, 200, 24)
    q, scale = gptq_int8(weight, x.T.astype(np.float64) @ x, qmax=63)
    want_q, want_scale = per_column_int8(weight, 63)
    assert q.dtype == np.int8 and q.shape == (24, 10) and np.abs(q).max() <= 63
    assert scale.dtype == np.float32
    np.testing.assert_array_equal(scale, want_scale)
    assert scale[3] == 1.0 and not q[:, 3].any()
    assert (q != want_q).any()  # it does move weights off their nearest level


def test_gptq_with_a_diagonal_gram_is_nearest_rounding():
    """Uncorrelated inputs give a diagonal H^-1: no error moves to other rows."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(16, 8)).astype(np.float32)
    q, scale = gptq_int8(weight, np.diag(rng.uniform(0.5, 2.0, size=16)), qmax=127)
    want_q, want_scale = per_column_int8(weight, 127)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(scale, want_scale)


def test_gptq_lowers_the_output_error_on_unseen_rows_too():
    weight = (np.random.default_rng(2).normal(size=(64, 32)) / 8).astype(np.float32)
    calib = _inputs(np.random.default_rng(3), 2000, 64)
    unseen = _inputs(np.random.default_rng(3), 500, 64, source=np.random.default_rng(4))
    q, scale = gptq_int8(weight, calib.T.astype(np.float64) @ calib, qmax=63)
    nearest_q, _ = per_column_int8(weight, 63)
    for x in (calib, unseen):
        assert _output_error(x, weight, q, scale) < 0.5 * _output_error(x, weight, nearest_q, scale)


def test_gptq_tolerates_inputs_that_are_always_zero():
    rng = np.random.default_rng(4)
    x = _inputs(rng, 300, 12)
    x[:, [2, 7]] = 0.0  # dead inputs: zero rows and columns in the Gram matrix
    weight = rng.normal(size=(12, 6)).astype(np.float32)
    q, scale = gptq_int8(weight, x.T.astype(np.float64) @ x, qmax=63)
    nearest_q, _ = per_column_int8(weight, 63)
    np.testing.assert_array_equal(q[[2, 7]], nearest_q[[2, 7]])  # nothing to spread from them
    assert _output_error(x, weight, q, scale) < _output_error(x, weight, nearest_q, scale)


def _two_gemms(path, k=32):
    """x (R, K) -> g0 (K -> 24) -> Relu -> g1 (24 -> 16, weight stored transposed, transB=1) -> y."""
    rng = np.random.default_rng(5)
    w0, w1 = rng.normal(size=(k, 24)).astype(np.float32), rng.normal(size=(16, 24)).astype(np.float32)
    nodes = [onnx.helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], name="g0"),
             onnx.helper.make_node("Relu", ["h"], ["r"]),
             onnx.helper.make_node("Gemm", ["r", "w1"], ["y"], name="g1", transB=1)]
    graph = onnx.helper.make_graph(
        nodes, "two", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["R", k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["R", 16])],
        [onnx.numpy_helper.from_array(w0, "w0"), onnx.numpy_helper.from_array(w1, "w1"),
         onnx.numpy_helper.from_array(rng.normal(size=24).astype(np.float32), "b0")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return w0, w1


def test_gemm_input_grams_sum_every_feed(tmp_path):
    w0, _ = _two_gemms(tmp_path / "two.onnx")
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.normal(size=(rows, 32)).astype(np.float32)} for rows in (5, 9)]
    grams = GemmInputGrams(tmp_path / "two.onnx", tmp_path / "taps.onnx", threads=1).grams(feeds)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    b0 = onnx.numpy_helper.to_array(next(i for i in onnx.load(str(tmp_path / "two.onnx")).graph.initializer
                                         if i.name == "b0"))
    r = np.maximum(x @ w0 + b0, 0.0)
    assert set(grams) == {"g0", "g1"}
    np.testing.assert_allclose(grams["g0"], x.T @ x, rtol=1e-5)
    np.testing.assert_allclose(grams["g1"], r.T @ r, rtol=1e-4, atol=1e-4)
    # The tapped copy only adds outputs: the graph's own output is still first and unchanged.
    session = ort.InferenceSession(str(tmp_path / "taps.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()][0] == "y"


def test_dynamic_linear_with_grams_is_closer_to_float(tmp_path):
    """The same per-call graph, weights rounded by GPTQ: less output error on the inputs it saw
    and on new ones."""
    _two_gemms(tmp_path / "two.onnx")
    calib = {"x": _inputs(np.random.default_rng(7), 1000, 32)}
    unseen = {"x": _inputs(np.random.default_rng(7), 300, 32, source=np.random.default_rng(8))}
    grams = GemmInputGrams(tmp_path / "two.onnx", tmp_path / "taps.onnx").grams([calib])
    nearest, _ = quantize.dynamic_linear(tmp_path / "two.onnx", tmp_path / "two.onnx", (), tmp_path / "nearest.onnx")
    rounded, converted = quantize.dynamic_linear(tmp_path / "two.onnx", tmp_path / "two.onnx", (),
                                                 tmp_path / "gptq.onnx", grams=grams)
    assert converted == 2
    ops = [n.op_type for n in onnx.load(str(rounded)).graph.node]
    assert ops == [n.op_type for n in onnx.load(str(nearest)).graph.node]  # the same graph
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in
           (tmp_path / "two.onnx", nearest, rounded)}
    for feed in (calib, unseen):
        want = run[tmp_path / "two.onnx"].run(None, feed)[0]
        err = {p: float(np.sum((run[p].run(None, feed)[0] - want) ** 2)) for p in (nearest, rounded)}
        assert err[rounded] < 0.5 * err[nearest]  # measured 0.18-0.19


def test_search_records_the_weight_rounding(tmp_path):
    _two_gemms(tmp_path / "two.onnx")
    prepared = quantize.prepare_graph(tmp_path / "two.onnx", tmp_path / "two.prepared.onnx")
    feeds = [{"x": _inputs(np.random.default_rng(8), 64, 32)}]
    reader = calibration.FeedReader(len(feeds), feeds.__getitem__)
    grams = GemmInputGrams(prepared, tmp_path / "taps.onnx").grams(feeds)

    class Budget:  # every candidate within budget: the search takes the per-call graph
        budgets = {"cosine": 1.0}

        def budget(self, path):
            return 0.5

    config = quantize.QuantizeConfig(method="minmax", linear="dynamic")
    _, recipe = quantize.search_graph("decoder", prepared, reader, Budget(), config, tmp_path, lambda m: None, grams)
    assert recipe["dynamic_weight_rounding"] == f"gptq (damp {GPTQ_DAMP})"
    _, recipe = quantize.search_graph("decoder", prepared, reader, Budget(), config, tmp_path, lambda m: None)
    assert recipe["dynamic_weight_rounding"] == "nearest"


def test_check_config_names_a_bad_weight_rounding():
    with pytest.raises(ValueError, match=r"weight_rounding must be one of \['gptq', 'nearest'\], got 'ada'"):
        quantize.check_config(quantize.QuantizeConfig(weight_rounding="ada"))
