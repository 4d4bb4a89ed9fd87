"""GPTQ rounding for the per-call (DynamicQuantizeMatMul) Gemm weights.

Nearest rounding treats each weight alone, but the rounding errors of one output column add up
along the directions its inputs actually take: on vit_t's encoder the calibration inputs of
every Gemm share a large mean component, so nearest-rounded weights shift every token's output
the same way. GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv:2210.17323) rounds the weight one input row at a
time and moves each row's rounding error onto the rows not yet rounded, weighted by the inverse
Gram matrix X^T X of the layer's calibration inputs: a greedy minimum of ||X W - X W_q||^2. The
grid stays the same (symmetric per output column, max|w| / qmax, 7-bit with reduce_range), so the
graph, its size and its speed do not change; only which integer each weight rounds to does.

Measured on vit_t's 40 encoder Gemms, all per call (benchmarks/RESULTS.md, "INT8 quantization,
session 10"): calibration-input error ||X (W - W_q)||^2 down to 5 % of nearest rounding's; on
the held-out gate set embedding cosine 0.99872 -> 0.99939 and selected-mask IoU 0.944 -> 0.975.

No torch: numpy, onnx and onnxruntime only.
"""

import numpy as np
import onnx
import onnxruntime as ort

from tinysam_rt.sessions import make_session_options

# Ridge added to the Gram matrix's diagonal, as a fraction of its mean diagonal, so the inverse
# exists for inputs that are (nearly) collinear. GPTQ's default; 0.1 measured worse here (held-out
# mask IoU 0.969 vs 0.975).
GPTQ_DAMP = 0.01


def gptq_int8(weight, gram, qmax, damp=GPTQ_DAMP):
    """Symmetric per-column int8 weights rounded by GPTQ against the inputs' Gram matrix.

    Args:
        weight: (K, N) float, the Gemm's weight as x @ weight (K inputs, N output columns).
        gram: (K, K) float, X^T X summed over calibration rows x (K,) of the Gemm's input.
        qmax: 63 (7-bit, reduce_range) or 127.
        damp: ridge on the diagonal, times the mean of the diagonal.
    Returns:
        q (K, N) int8 in [-qmax, qmax]; scale (N,) float32, max|weight| / qmax per column (1.0 for
        an all-zero column), the same grid as `upscaler_int8.per_column_int8`.
    """
    w = np.array(weight, dtype=np.float64)  # (K, N), updated in place as rows are rounded
    k_in = w.shape[0]
    scale = np.abs(w).max(axis=0) / qmax  # (N,)
    scale[scale == 0] = 1.0
    h = np.array(gram, dtype=np.float64)  # (K, K)
    dead = np.diag(h) == 0  # inputs that were always 0: no error to spread from them
    h[dead, dead] = 1.0
    h[np.diag_indices(k_in)] += damp * np.mean(np.diag(h))
    # Upper Cholesky factor of H^-1: row k holds how row k's error moves onto rows k+1.. .
    h_inv = np.linalg.cholesky(np.linalg.inv(h)).T  # (K, K)
    q = np.empty(w.shape, dtype=np.int8)
    for k in range(k_in):
        q_row = np.clip(np.round(w[k] / scale), -qmax, qmax)  # (N,)
        q[k] = q_row
        err = (w[k] - q_row * scale) / h_inv[k, k]  # (N,)
        w[k + 1:] -= np.outer(h_inv[k, k + 1:], err)
    return q, scale.astype(np.float32)


def gram(x):
    """(..., K) float activations -> (K, K) float64 X^T X over all leading positions (rows)."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)  # (rows, K)
    return rows.T @ rows


def add_float_outputs(model, names):
    """Make the tensors `names` of `model`'s main graph extra float outputs (ones already
    outputs are left as they are), so a session can hand them out."""
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in sorted(set(names) - existing))


class GemmInputGrams:
    """The Gram matrix X^T X of every Gemm's input over calibration feeds.

    Owns one ORT session on a copy of the prepared float graph that also outputs each Gemm's
    input tensor. Gemms whose input is a constant (no calibration rows) get none.
    """

    def __init__(self, prepared, out, threads=None):
        """prepared: Path of the prepared float graph; out: Path for the tapped copy."""
        model = onnx.load(str(prepared))
        graph = model.graph
        constants = {i.name for i in graph.initializer}
        self.inputs = {n.name: n.input[0] for n in graph.node if n.op_type == "Gemm" and n.input[0] not in constants}
        add_float_outputs(model, self.inputs.values())
        onnx.save(model, str(out))
        self._session = ort.InferenceSession(str(out), make_session_options(threads),
                                             providers=["CPUExecutionProvider"])
        self._wanted = sorted(set(self.inputs.values()))

    def grams(self, feeds):
        """Args: feeds: iterable of input dicts of the graph. Returns: {Gemm name: (K, K) float64}."""
        sums = {}
        for feed in feeds:
            for tensor, x in zip(self._wanted, self._session.run(self._wanted, feed)):
                sums[tensor] = sums.get(tensor, 0.0) + gram(x)
        return {name: sums[tensor] for name, tensor in self.inputs.items() if tensor in sums}
