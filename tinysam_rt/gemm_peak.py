"""This machine's measured matrix-multiply limit: the denominator of "% of machine limit".

nanoGPT's `estimate_mfu` divides achieved FLOP/s by a datasheet peak; a Pi or a shared VM has no
trustworthy datasheet, so we measure the best a large square GEMM reaches here instead:
- numpy float32 (its BLAS, with the BLAS's own thread count), and
- ONNX Runtime's own MatMul (float32) and MatMulInteger (uint8 x int8, the kernel INT8 models
  use), with the same session options and thread count as the model sessions.
It also tells which kind of uint8 x int8 kernel ORT picked here (`u8s8_kernel_saturates`): that
decides whether 8-bit weights are safe on this CPU.

ORT needs a model file to run a MatMul and `onnx` is not a runtime dependency, so the one-node
graph is serialised here by hand (a few protobuf fields of onnx.proto).
"""

import time

import numpy as np

# onnx.proto TensorProto.DataType values
_ELEM = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6}
_KINDS = {  # kind -> (op, A dtype, B dtype, Y dtype)
    "float32": ("MatMul", "float32", "float32", "float32"),
    "u8s8": ("MatMulInteger", "uint8", "int8", "int32"),
}


def _varint(value):
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int_field(number, value):
    return _varint(number << 3) + _varint(value)  # wire type 0


def _bytes_field(number, payload):
    payload = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload  # wire type 2


def _value_info(name, dtype, shape):
    """ValueInfoProto {name, type: TypeProto {tensor_type {elem_type, shape {dim*}}}}."""
    dims = b"".join(_bytes_field(1, _int_field(1, d)) for d in shape)
    tensor_type = _int_field(1, _ELEM[dtype]) + _bytes_field(2, dims)
    return _bytes_field(1, name) + _bytes_field(2, _bytes_field(1, tensor_type))


def _initializer(name, array):
    """TensorProto {dims*, data_type, name, raw_data} (raw data is little-endian)."""
    dims = b"".join(_int_field(1, d) for d in array.shape)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return dims + _int_field(2, _ELEM[str(array.dtype)]) + _bytes_field(8, name) + _bytes_field(9, data)


def matmul_model_bytes(b_matrix, kind="float32"):
    """Serialized ONNX model `Y = A @ B` with B a constant (so ORT prepacks it, as for weights).

    Args:
        b_matrix: (K, N) array, float32 for kind "float32", int8 for "u8s8".
        kind: "float32" (MatMul) or "u8s8" (MatMulInteger, A uint8).

    Returns:
        bytes of a ModelProto (IR 8, opset 17) with one input "A" of shape (M=K, K).
    """
    op, a_dtype, _, y_dtype = _KINDS[kind]
    k, n = b_matrix.shape
    node = _bytes_field(1, "A") + _bytes_field(1, "B") + _bytes_field(2, "Y") + _bytes_field(4, op)
    graph = (_bytes_field(1, node) + _bytes_field(2, "gemm_peak")
             + _bytes_field(5, _initializer("B", b_matrix))
             + _bytes_field(11, _value_info("A", a_dtype, (k, k)))
             + _bytes_field(12, _value_info("Y", y_dtype, (k, n))))
    opset = _bytes_field(1, "") + _int_field(2, 17)
    return _int_field(1, 8) + _bytes_field(7, graph) + _bytes_field(8, opset)


def _time_reps(call, min_time_s, min_reps, max_reps):
    """Seconds per call: call once to warm up, then until min_time_s and min_reps are reached."""
    call()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def _result(n, times, **extra):
    work = 2 * n**3 / 1e9  # GFLOP (or GOP for integer kernels): one multiply + one add per MAC
    return {"n": n, "reps": len(times), "best_gflops": work / min(times),
            "median_gflops": work / float(np.median(times)), **extra}


def numpy_sgemm_peak(n=1024, min_time_s=0.3, min_reps=3, max_reps=50):
    """Best float32 GFLOP/s of an (n, n) @ (n, n) numpy matmul (BLAS picks its thread count)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    return _result(n, _time_reps(lambda: np.matmul(a, b, out=out), min_time_s, min_reps, max_reps),
                   threads="BLAS default")


def ort_matmul_peak(threads, kind="float32", n=1024, min_time_s=0.3, min_reps=3, max_reps=50):
    """Best GFLOP/s (GOP/s for u8s8) of ORT's MatMul / MatMulInteger on (n, n) matrices.

    Args:
        threads: intra-op threads, passed to the runtime's one SessionOptions factory.
        kind: "float32" or "u8s8".
    """
    import onnxruntime as ort  # deferred: `tinysam-bench --help` must not import ORT

    from tinysam_rt.sessions import make_session_options

    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    rng = np.random.default_rng(0)
    if kind == "float32":
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
    else:
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        b = rng.integers(-128, 128, (n, n), dtype=np.int8)
    # A microbenchmark graph, not a model graph: it owns its own session on purpose.
    session = ort.InferenceSession(matmul_model_bytes(b, kind), make_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    times = _time_reps(lambda: session.run(None, {"A": a}), min_time_s, min_reps, max_reps)
    return _result(n, times, threads=threads, kind=kind)


def u8s8_kernel_saturates(threads=1, k=64):
    """Whether ORT's uint8 x int8 GEMM kernel on this CPU saturates 16-bit pair sums.

    MLAS picks the kernel from CPUID. With VNNI or AMX (x86) and on ARM it accumulates the
    products in 32 bits; on AVX2-only CPUs (and AVX-512 without VNNI) it adds each pair of
    products into an int16 with saturation first (VPMADDUBSW), so 2 x 255 x |w| > 32767 is
    clipped. Models with 7-bit weights (`reduce_range`, what `tinysam quantize` writes) never
    reach that; 8-bit weights do. A row of 255s times a column of 127s tells the two apart:
    exact (k x 32385) or clipped (k/2 x 32767).

    Args:
        threads: intra-op threads, passed to the runtime's one SessionOptions factory.
        k: inner dimension (even); (k, k) uint8 A times (k, 16) int8 B.

    Returns:
        True if the product came out pair-clipped, False if exact, None if neither (a kernel
        this probe does not know: reported as unknown, never guessed).
    """
    import onnxruntime as ort  # deferred: `tinysam-bench --help` must not import ORT

    from tinysam_rt.sessions import make_session_options

    a = np.full((k, k), 255, np.uint8)
    b = np.full((k, 16), 127, np.int8)
    session = ort.InferenceSession(matmul_model_bytes(b, "u8s8"), make_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"A": a})  # (k, 16) int32
    exact = k * 255 * 127
    if np.all(y == exact):
        return False
    if np.all(y == k // 2 * 32767):
        return True
    return None
