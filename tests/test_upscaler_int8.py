"""upscaler_int8: the points decoder's upscaler GEMMs per call, on the session's random-weight export."""

import numpy as np
import onnx
import pytest

from conftest import synthetic_image
from tinysam_export import calibration
from tinysam_export.upscaler_int8 import UpscalerInputGrams, _graphs_under, int8_upscaler, on_image_tokens, per_column_int8
from tinysam_rt.manifest import load_manifest
from tinysam_rt.predictor import TinySAMPredictor
from tinysam_rt.sessions import PointsDecoderSession


@pytest.fixture(scope="module")
def int8_points(fp32_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("upscaler") / "points_decoder.onnx"
    converted, biases = int8_upscaler(fp32_model_dir / "points_decoder.onnx", out)
    return out, converted, biases


def test_per_column_int8_scales_each_output_column():
    weight = np.array([[0.9, -0.5, 0.0], [-2.0, 0.2, 0.0]], np.float32)  # (K=2, N=3)
    q, scale = per_column_int8(weight, 63)
    np.testing.assert_allclose(scale, [2.0 / 63, 0.5 / 63, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(q, [[28, -63, 0], [-63, 25, 0]])  # 0.9 / (2/63) = 28.35, 0.2 / (0.5/63) = 25.2
    assert q.dtype == np.int8


def _scan_body_ops(path):
    model = onnx.load(str(path))
    return model, _scan_body_ops_of(model)


def test_upscaler_gemms_become_dynamic_quantize_matmul(int8_points, fp32_model_dir):
    path, converted, biases = int8_points
    # The ConvTranspose2d pair as GEMMs split by kernel row: 2 x (256 -> 2 x 64), 2 x 2 x (64 -> 2 x 32).
    assert converted == 6 and biases == 6
    model, body = _scan_body_ops(path)
    ops = [n.op_type for n in body]
    assert ops.count("DynamicQuantizeMatMul") == 6
    # Each GEMM's bias is inside it: no float Add reads a quantized product.
    products = {n.output[0] for n in body if n.op_type == "DynamicQuantizeMatMul"}
    assert not [n for n in body if n.op_type == "Add" and products & set(n.input)]
    assert all(len(n.input) == 5 for n in body if n.op_type == "DynamicQuantizeMatMul")
    # 4 float weights (2 kernel rows of each conv), each quantized once: the second conv's halves
    # serve 2 GEMMs each.
    assert len({n.input[1] for n in body if n.op_type == "DynamicQuantizeMatMul"}) == 4
    weights = {i.name: i for g in _graphs_under(model.graph) for i in g.initializer}
    # The hypernetwork product (activations on both sides) stays a float MatMul.
    assert all(n.input[1] not in weights for n in body if n.op_type == "MatMul")
    for node in body:
        if node.op_type == "DynamicQuantizeMatMul":
            q = onnx.numpy_helper.to_array(weights[node.input[1]])
            assert q.dtype == np.int8 and np.abs(q).max() == 63  # 7-bit: no AVX2 pair saturation
    # The second conv's float copies (2 x (64, 64)) are gone, not kept beside the int8 ones.
    assert not [name for name in weights if name.endswith(("w2_0", "w2_1"))]
    # The main graph's transformer is untouched: it only lost the nodes that computed the factored
    # first GEMM's per-prompt inputs (now unread).
    fp32_main = {(n.name, n.op_type) for n in onnx.load(str(fp32_model_dir / "points_decoder.onnx")).graph.node}
    assert {(n.name, n.op_type) for n in model.graph.node if n.op_type != "Scan"} < fp32_main


def test_on_image_tokens_undoes_the_factoring_exactly(fp32_model_dir, tmp_path):
    """The FP32 export computes the first upscaler GEMM from per-prompt factors; `on_image_tokens`
    puts it back on the image tokens (what int8_upscaler quantizes): the same function."""
    import dataclasses

    source = fp32_model_dir / "points_decoder.onnx"
    model = on_image_tokens(onnx.load(str(source)), source)
    scan = next(n for n in model.graph.node if n.op_type == "Scan")
    assert "rows0" not in scan.input and len(scan.input) == 3  # hyper_in, iou_predictions, image tokens
    weights = {i.name: i for g in _graphs_under(model.graph) for i in g.initializer}
    first = [n for n in _scan_body_ops_of(model) if n.op_type == "MatMul" and n.input[1] in weights
             and onnx.numpy_helper.to_array(weights[n.input[1]]).shape == (256, 128)]
    assert len(first) == 2
    onnx.save(model, tmp_path / "tokens.onnx")
    manifest = load_manifest(fp32_model_dir)
    factored = PointsDecoderSession(manifest.points_decoder)
    tokens = PointsDecoderSession(dataclasses.replace(manifest.points_decoder, path=tmp_path / "tokens.onnx"))
    features = TinySAMPredictor(synthetic_image(500, 700, seed=5), model_dir=fp32_model_dir).embedding.features
    coords, labels = _grid_prompts(np.random.default_rng(7), 5)
    (masks_f, iou_f), (masks_t, iou_t) = factored.run(features, coords, labels), tokens.run(features, coords, labels)
    np.testing.assert_array_equal(iou_t, iou_f)
    assert np.abs(masks_t - masks_f).max() < 1e-4
    again = on_image_tokens(onnx.load(str(tmp_path / "tokens.onnx")), tmp_path / "tokens.onnx")  # nothing left to undo
    assert again.SerializeToString() == onnx.load(str(tmp_path / "tokens.onnx")).SerializeToString()


def test_on_image_tokens_names_what_a_factored_graph_lacks(fp32_model_dir):
    source = fp32_model_dir / "points_decoder.onnx"
    model = onnx.load(str(source))
    for graph in _graphs_under(model.graph):
        kept = [i for i in graph.initializer if not i.name.endswith("upscaler.w1_1")]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    with pytest.raises(ValueError, match="first upscaler weights"):
        on_image_tokens(model, source)


def _scan_body_ops_of(model):
    scan = next(n for n in model.graph.node if n.op_type == "Scan")
    return [n for g in _graphs_under(next(a.g for a in scan.attribute if a.name == "body")) for n in g.node]


def test_int8_upscaler_moves_masks_only(int8_points, fp32_model_dir, tmp_path):
    import dataclasses

    manifest = load_manifest(fp32_model_dir)
    fp32 = PointsDecoderSession(manifest.points_decoder)
    int8 = PointsDecoderSession(dataclasses.replace(manifest.points_decoder, path=int8_points[0]))
    predictor = TinySAMPredictor(synthetic_image(600, 800, seed=3), model_dir=fp32_model_dir)
    features = predictor.embedding.features
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.uniform(0, 1000, (6, 2, 2)), np.zeros((6, 1, 2))], axis=1).astype(np.float32)
    labels = np.tile(np.array([[1, 0, -1]], np.float32), (6, 1))
    masks_fp32, iou_fp32 = fp32.run(features, coords, labels)
    masks_int8, iou_int8 = int8.run(features, coords, labels)
    # The IoU head runs before the upscaler: the same scores, so the same selected token.
    np.testing.assert_allclose(iou_int8, iou_fp32, rtol=0, atol=1e-6)
    # Masks: per-call uint8 inputs and 7-bit weights move the logits a little, not the masks' shape.
    spread = masks_fp32.std()
    assert np.abs(masks_int8 - masks_fp32).max() < 0.25 * spread
    assert ((masks_int8 > 0) == (masks_fp32 > 0)).mean() > 0.98
    # The upscaler gate still skips prompts whose IoUs are all below the threshold.
    gated, _ = int8.run(features, coords, labels, upscale_iou_threshold=float(iou_fp32.max()) + 1.0)
    assert not gated.any()


def _grid_prompts(rng, count):
    """(count, 2, 2) coords (one point + SAM's padding point), (count, 2) labels."""
    coords = np.concatenate([rng.uniform(0, 1000, (count, 1, 2)), np.zeros((count, 1, 2))], axis=1).astype(np.float32)
    return coords, np.tile(np.array([[1, -1]], np.float32), (count, 1))


def test_upscaler_input_grams_add_up_over_feeds_and_shared_weights(fp32_model_dir, tmp_path):
    manifest = load_manifest(fp32_model_dir)
    features = TinySAMPredictor(synthetic_image(600, 800, seed=3), model_dir=fp32_model_dir).embedding.features
    feeds = [calibration.points_decoder_feed(calibration.decoder_feeds(features, *_grid_prompts(np.random.default_rng(k), 2)))
             for k in range(2)]
    taps = UpscalerInputGrams(manifest.points_decoder.path, tmp_path, threads=1)
    both, first, second = taps.grams(feeds), taps.grams(feeds[:1]), taps.grams(feeds[1:])
    # One Gram matrix per float weight; the second conv's two kernel-row halves read the same
    # two inputs (one per first-conv half), so theirs are equal.
    assert sorted(both) == ["upscale/image_tokens/w1_0", "upscale/image_tokens/w1_1", "upscale/upscaler.w2_0",
                            "upscale/upscaler.w2_1"]
    assert both["upscale/image_tokens/w1_0"].shape == (256, 256) and both["upscale/upscaler.w2_0"].shape == (64, 64)
    np.testing.assert_array_equal(both["upscale/image_tokens/w1_0"], both["upscale/image_tokens/w1_1"])
    np.testing.assert_array_equal(both["upscale/upscaler.w2_0"], both["upscale/upscaler.w2_1"])
    for name, gram in both.items():
        np.testing.assert_allclose(gram, first[name] + second[name], rtol=1e-9)  # a sum over prompts
        np.testing.assert_allclose(gram, gram.T, rtol=1e-12)
        assert np.linalg.eigvalsh(gram).min() > -1e-6 * np.trace(gram)


def test_gptq_upscaler_is_closer_to_fp32_on_other_prompts(fp32_model_dir, int8_points, tmp_path):
    import dataclasses

    manifest = load_manifest(fp32_model_dir)
    calib_features = TinySAMPredictor(synthetic_image(600, 800, seed=3), model_dir=fp32_model_dir).embedding.features
    feeds = [calibration.points_decoder_feed(calibration.decoder_feeds(calib_features, *_grid_prompts(np.random.default_rng(k), 4)))
             for k in range(3)]
    grams = UpscalerInputGrams(manifest.points_decoder.path, tmp_path, threads=1).grams(feeds)
    converted, _ = int8_upscaler(manifest.points_decoder.path, tmp_path / "gptq.onnx", grams=grams)
    assert converted == 6
    sessions = {name: PointsDecoderSession(dataclasses.replace(manifest.points_decoder, path=path))
                for name, path in (("fp32", manifest.points_decoder.path), ("nearest", int8_points[0]),
                                   ("gptq", tmp_path / "gptq.onnx"))}
    # Another image and other prompts than the calibration ones.
    features = TinySAMPredictor(synthetic_image(700, 500, seed=9), model_dir=fp32_model_dir).embedding.features
    coords, labels = _grid_prompts(np.random.default_rng(42), 8)
    masks = {name: s.run(features, coords, labels)[0] for name, s in sessions.items()}
    error = {name: float(np.mean((masks[name] - masks["fp32"]) ** 2)) for name in ("nearest", "gptq")}
    assert error["gptq"] < 0.8 * error["nearest"], error  # measured 0.43


def test_eight_bit_weights_on_request(fp32_model_dir, tmp_path):
    out = tmp_path / "points_decoder.onnx"
    int8_upscaler(fp32_model_dir / "points_decoder.onnx", out, reduce_range=False)
    model, body = _scan_body_ops(out)
    weights = {i.name: i for g in _graphs_under(model.graph) for i in g.initializer}
    peaks = [np.abs(onnx.numpy_helper.to_array(weights[n.input[1]])).max() for n in body if n.op_type == "DynamicQuantizeMatMul"]
    assert peaks == [127] * 6


def test_graph_without_the_upscaler_scan_is_refused(fp32_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"decoder.onnx: expected the points decoder's one per-prompt upscaler Scan, found 0"):
        int8_upscaler(fp32_model_dir / "decoder.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
