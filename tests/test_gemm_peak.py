"""GEMM microbenchmark: the hand-serialised ONNX MatMul graphs compute the right products."""

import numpy as np
import onnxruntime as ort
import pytest

from tinysam_rt import gemm_peak


def test_float_matmul_graph_computes_a_at_b():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5), dtype=np.float32)
    b = rng.standard_normal((5, 3), dtype=np.float32)
    session = ort.InferenceSession(gemm_peak.matmul_model_bytes(b), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"A": a})
    np.testing.assert_allclose(y, a @ b, rtol=1e-5, atol=1e-5)


def test_u8s8_matmul_integer_graph_is_exact():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    # 7-bit weights: exact on every kernel, AVX2's saturating pair sums included (see below)
    b = rng.integers(-64, 64, (4, 6), dtype=np.int8)
    session = ort.InferenceSession(gemm_peak.matmul_model_bytes(b, "u8s8"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"A": a})
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, a.astype(np.int32) @ b.astype(np.int32))


def test_graph_is_valid_onnx():
    onnx = pytest.importorskip("onnx", reason="checking the model needs onnx (dev extra)")
    model = onnx.load_from_string(gemm_peak.matmul_model_bytes(np.ones((3, 3), np.float32)))
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


def test_peak_results_have_rates():
    for result in (gemm_peak.numpy_sgemm_peak(64, min_time_s=0, min_reps=2),
                   gemm_peak.ort_matmul_peak(1, "float32", 64, min_time_s=0, min_reps=2),
                   gemm_peak.ort_matmul_peak(1, "u8s8", 64, min_time_s=0, min_reps=2)):
        assert result["n"] == 64 and result["reps"] == 2
        assert result["best_gflops"] >= result["median_gflops"] > 0


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match=r"kind must be one of \['float32', 'u8s8'\], got 'fp16'"):
        gemm_peak.ort_matmul_peak(1, "fp16", 64)


def test_saturation_probe_matches_what_the_kernel_computes():
    # Which answer is right depends on the CPU (AVX2-only: saturates; VNNI/AMX/ARM: exact); the
    # probe must agree with a full-range product computed through the same graph.
    a = np.full((64, 64), 255, np.uint8)
    b = np.full((64, 16), -128, np.int8)
    session = ort.InferenceSession(gemm_peak.matmul_model_bytes(b, "u8s8"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"A": a})
    exact = a.astype(np.int32) @ b.astype(np.int32)
    saturates = gemm_peak.u8s8_kernel_saturates()
    assert saturates is (not np.array_equal(y, exact))
    if saturates:
        np.testing.assert_array_equal(y, np.full_like(y, 32 * -32768))  # every pair clipped to int16 min
