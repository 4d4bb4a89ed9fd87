"""Tests of tinysam_rt.everything (standard and hierarchical everything mode).

Most tests run the real TinySAMPredictor (manifest, sessions, prompt checks) on a tiny model
directory whose decoder graph, built here with onnx.helper, has known outputs: for a prompt whose
first point is p (1024 frame), every mask is a square plateau around p,

    logit(q) = clip(SLOPE * (HALF_WIDTH - max(|q.x - p.x|, |q.y - p.y|)), -20, 20)

so the mask is the Chebyshev ball of radius HALF_WIDTH and logits exceed TinySAM's 8.5 on the
ball of radius CORE. Token 1 has predicted IoU 0.95 when p.x < LEFT_OF else 0.5; tokens 2 and 3
have 0.1. With the default 0.88 IoU filter, exactly the token-1 masks of left-side prompts
survive, which makes the covered region — and so the set of skipped dense points — known.
"""

import json
import re
from fractions import Fraction

import numpy as np
import pytest

from tinysam_rt import amg, preprocess
from tinysam_rt.everything import AmgConfig, HierarchicalConfig, TinySAMAutomaticMaskGenerator
from tinysam_rt.predictor import TinySAMPredictor
from conftest import synthetic_image

CORE = 40.0  # logits > 8.5 within this Chebyshev radius, 1024 frame
SLOPE = 8.0  # logits per pixel at the edge: steep, so stability is ~1 at any resolution
HALF_WIDTH = CORE + 8.5 / SLOPE  # mask (logit > 0) radius
LEFT_OF = 512.0  # prompts with x < this (1024 frame) get a confident token 1


def _region_model_dir(out_dir, points_decoder=None):
    """Write encoder.onnx, decoder.onnx and manifest.json of the known-output model.

    points_decoder: None, or "basic" / "gated" to add a points_decoder.onnx with the same
    function (the basic contract of exports before the upscaler gate / the current one: zero
    masks for prompts whose IoUs are all <= upscale_iou_threshold, like the exported graph's gate).
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from tinysam_rt import manifest as manifest_mod

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)

    def io(specs):
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in specs]

    # Encoder: 16x16 average pool, then a fixed 1x1 conv to 256 channels.
    weight = np.random.default_rng(0).normal(0, 0.1, (256, 3, 1, 1))
    encoder = helper.make_graph(
        [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
         helper.make_node("Conv", ["pooled", "w"], ["image_embeddings"])],
        "region_encoder", io(manifest_mod.ENCODER_INPUTS), io(manifest_mod.ENCODER_OUTPUTS), [const("w", weight)],
    )
    centres = np.arange(256) * 4 + 1.5  # low-res pixel centres in the 1024 frame
    initializers = [
        const("gx", centres.reshape(1, 1, 256)), const("gy", centres.reshape(1, 256, 1)),
        const("half_width", HALF_WIDTH), const("slope", SLOPE), const("lo", -20.0), const("hi", 20.0),
        const("left_of", LEFT_OF), const("iou_gain", 0.45), const("iou_base", 0.5), const("zero", 0.0),
        const("iou_other", 0.1),
        numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "ax12"), numpy_helper.from_array(np.array([1], np.int64), "ax1"),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["point_coords", "i0"], ["first"], axis=1),  # (B, 2) first point
        node("Gather", ["first", "i0"], ["px"], axis=1),  # (B,)
        node("Gather", ["first", "i1"], ["py"], axis=1),
        node("Unsqueeze", ["px", "ax12"], ["px3"]),  # (B, 1, 1)
        node("Unsqueeze", ["py", "ax12"], ["py3"]),
        node("Sub", ["gx", "px3"], ["sx"]), node("Abs", ["sx"], ["dx"]),  # (B, 1, 256)
        node("Sub", ["gy", "py3"], ["sy"]), node("Abs", ["sy"], ["dy"]),  # (B, 256, 1)
        node("Max", ["dx", "dy"], ["dist"]),  # (B, 256, 256) Chebyshev distance
        node("Sub", ["half_width", "dist"], ["margin"]), node("Mul", ["margin", "slope"], ["raw"]),
        node("Clip", ["raw", "lo", "hi"], ["plateau"]),
        node("Unsqueeze", ["plateau", "ax1"], ["mask1"]),  # (B, 1, 256, 256)
        node("Concat", ["mask1", "mask1", "mask1"], ["low_res_masks"], axis=1),
        node("Less", ["px", "left_of"], ["is_left"]), node("Cast", ["is_left"], ["left"], to=TensorProto.FLOAT),
        node("Mul", ["left", "iou_gain"], ["gain"]), node("Add", ["gain", "iou_base"], ["iou1"]),
        node("Unsqueeze", ["iou1", "ax1"], ["iou1c"]),  # (B, 1)
        node("Mul", ["iou1c", "zero"], ["zeros"]), node("Add", ["zeros", "iou_other"], ["iou_rest"]),
        node("Concat", ["iou1c", "iou_rest", "iou_rest"], ["iou_predictions"], axis=1),
    ]
    decoder = helper.make_graph(
        nodes, "region_decoder", io(manifest_mod.DECODER_INPUTS), io(manifest_mod.DECODER_OUTPUTS), initializers
    )
    graphs = [("encoder", encoder, manifest_mod.ENCODER_INPUTS, manifest_mod.ENCODER_OUTPUTS),
              ("decoder", decoder, manifest_mod.DECODER_INPUTS, manifest_mod.DECODER_OUTPUTS)]
    if points_decoder == "basic":
        inputs, outputs = manifest_mod.POINTS_DECODER_BASIC_INPUTS, manifest_mod.POINTS_DECODER_BASIC_OUTPUTS
        graphs.append(("points_decoder", helper.make_graph(nodes, "region_points", io(inputs), io(outputs), initializers),
                       inputs, outputs))
    elif points_decoder == "gated":
        inputs = manifest_mod.POINTS_DECODER_INPUTS
        gate = [node(n.op_type, n.input, ["all_masks" if o == "low_res_masks" else o for o in n.output],
                     **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in nodes]
        gate += [
            node("ReduceMax", ["iou_predictions"], ["best"], axes=[1], keepdims=1),  # (B, 1)
            node("Greater", ["best", "upscale_iou_threshold"], ["run"]), node("Cast", ["run"], ["runf"], to=TensorProto.FLOAT),
            node("Unsqueeze", ["runf", "ax23"], ["run4"]),  # (B, 1, 1, 1)
            node("Mul", ["all_masks", "run4"], ["low_res_masks"]),
            node("ConstantOfShape", ["side_shape"], ["image_side"]),  # nothing per image here
        ]
        extra = [numpy_helper.from_array(np.array([2, 3], np.int64), "ax23"),
                 numpy_helper.from_array(np.array((1, *manifest_mod.POINTS_DECODER_IMAGE_SIDE[1][1:]), np.int64), "side_shape")]
        outputs = manifest_mod.POINTS_DECODER_OUTPUTS
        graphs.append(("points_decoder", helper.make_graph(gate, "region_points_gated", io(inputs), io(outputs),
                                                           initializers + extra), inputs, outputs))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, graph in ((f"{role}.onnx", graph) for role, graph, _, _ in graphs):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, out_dir / name)
    weights_id = "test-region-model"
    doc = {
        "format": manifest_mod.MANIFEST_FORMAT, "format_version": manifest_mod.FORMAT_VERSION,
        "model": "region_test", "tinysam_rt_version": "test",
        "weights": {"source": "random", "checkpoint_sha256": None, "seed": 0, "weights_id": weights_id},
        "opset": 17,
        "preprocess": {"image_size": 1024, "pixel_mean": [123.675, 116.28, 103.53],
                       "pixel_std": [58.395, 57.12, 57.375], "pad_value": 0.0},
        "postprocess": {"mask_threshold": 0.0, "low_res_size": 256, "mask_tokens": [1, 2, 3]},
        "graphs": {
            role: manifest_mod.graph_entry(role, out_dir / f"{role}.onnx", "fp32", weights_id, inputs, outputs)
            for role, _, inputs, outputs in graphs
        },
        "quantization": None,
    }
    (out_dir / "manifest.json").write_text(json.dumps(doc))
    return out_dir


@pytest.fixture(scope="module")
def region_predictor(tmp_path_factory):
    return TinySAMPredictor(model_dir=_region_model_dir(tmp_path_factory.mktemp("region") / "model"), threads=1)


class RecordingPredictor:
    """Passes every call to a real predictor and keeps the prompts given to predict_batch."""

    def __init__(self, inner):
        self.inner, self.manifest, self.batches = inner, inner.manifest, []

    def embed(self, image):
        return self.inner.embed(image)

    @property
    def skips_low_iou_upscaling(self):
        return self.inner.skips_low_iou_upscaling

    def predict_batch(self, point_coords, point_labels, mask_input=None, embedding=None, upscale_iou_threshold=None):
        self.batches.append((np.array(point_coords), np.array(point_labels)))
        return self.inner.predict_batch(point_coords, point_labels, mask_input, embedding, upscale_iou_threshold)

    def prompts_1024(self):
        """(P, 2) first points of all prompts so far, in call order."""
        return np.concatenate([coords[:, 0] for coords, _ in self.batches])


def _to_1024(points, image_size):
    return preprocess.coords_to_input_frame(points, image_size, 1024).astype(np.float64)


def _chebyshev_to_nearest(points_1024, centres_1024):
    """(P,) distance (1024 frame) from each point to the nearest centre (inf if none)."""
    if len(centres_1024) == 0:
        return np.full(len(points_1024), np.inf)
    diff = np.abs(points_1024[:, None, :] - centres_1024[None, :, :]).max(axis=2)  # (P, C)
    return diff.min(axis=1)


# --- hierarchical skip logic -------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [(1024, 1024), (768, 1024), (512, 640)])
def test_hierarchical_skips_exactly_the_dense_points_covered_by_surviving_sparse_masks(region_predictor, image_size):
    recorder = RecordingPredictor(region_predictor)
    generator = TinySAMAutomaticMaskGenerator(recorder, AmgConfig(points_per_side=32), HierarchicalConfig())
    result = generator.run(np.zeros((*image_size, 3), np.uint8))

    height, width = image_size
    sparse = amg.build_point_grid(8) * np.array([width, height])
    sparse_1024 = _to_1024(sparse, image_size)
    survivors_1024 = sparse_1024[sparse_1024[:, 0] < LEFT_OF]  # sparse masks passing the IoU filter
    candidates, _ = amg.tinysam_dense_candidates(sparse, image_size, 32)
    candidates_1024 = _to_1024(candidates, image_size)
    distance = _chebyshev_to_nearest(candidates_1024, survivors_1024)
    # Every candidate lies well inside or well outside the high-logit cores, so "covered" is exact.
    assert np.all(np.abs(distance - CORE) >= 6)
    expected_run = candidates_1024[distance > CORE]

    fed = recorder.prompts_1024()
    np.testing.assert_allclose(fed[:64], sparse_1024, atol=1e-3)  # sparse pass first, grid order
    np.testing.assert_allclose(fed[64:], expected_run, atol=1e-3)  # then the uncovered candidates
    for coords, labels in recorder.batches:  # every prompt: the point, then SAM's padding point
        np.testing.assert_array_equal(coords[:, 1], 0.0)
        np.testing.assert_array_equal(labels, np.tile([1.0, -1.0], (len(labels), 1)))
    stats = result.stats
    assert stats.mode == "hierarchical-tinysam"
    assert stats.sparse_points == 64 and stats.dense_candidates == len(candidates)
    assert stats.dense_skipped == len(candidates) - len(expected_run)
    assert stats.points_run == len(fed) == 64 + len(expected_run)
    if image_size == (1024, 1024):
        # 32 surviving sparse points x their 8 neighbours at one stride; 31 x 31 - 64 candidates.
        assert (stats.dense_skipped, stats.dense_candidates, stats.points_run) == (256, 897, 705)
    # The sparse masks stay in the result (no mask of the right half survives the IoU filter).
    kept = {tuple(np.round(r["point_coords"][0], 6)) for r in result.records}
    assert {tuple(np.round(p, 6)) for p in sparse[sparse_1024[:, 0] < LEFT_OF]} <= kept


def test_hierarchical_grid_variant_skips_covered_grid_points(region_predictor):
    recorder = RecordingPredictor(region_predictor)
    generator = TinySAMAutomaticMaskGenerator(
        recorder, AmgConfig(points_per_side=32), HierarchicalConfig(dense_points="grid")
    )
    result = generator.run(np.zeros((1024, 1024, 3), np.uint8))
    sparse = amg.build_point_grid(8) * 1024.0
    grid = amg.build_point_grid(32) * 1024.0
    distance = _chebyshev_to_nearest(grid, sparse[sparse[:, 0] < LEFT_OF])
    np.testing.assert_allclose(recorder.prompts_1024()[64:], grid[distance > CORE], atol=1e-3)
    # Grid points sit 16 px from the sparse points (covered) or >= 48 px away: 2x2 per survivor.
    assert result.stats.dense_skipped == 32 * 4 and result.stats.points_run == 64 + 1024 - 128
    assert result.stats.mode == "hierarchical-grid"


def test_nothing_is_skipped_when_no_sparse_mask_is_confident(region_predictor):
    generator = TinySAMAutomaticMaskGenerator(
        region_predictor, AmgConfig(points_per_side=16), HierarchicalConfig(high_score_thresh=20.5)
    )
    stats = generator.run(np.zeros((256, 256, 3), np.uint8)).stats
    assert stats.covered_fraction == 0.0 and stats.dense_skipped == 0
    assert stats.points_run == 16 + stats.dense_candidates


# --- standard mode on the known-output model ----------------------------------------------------


def _square_mask(point, image_size, radius_1024):
    """(H, W) bool: pixels whose 1024-frame centre is within radius of `point` (Chebyshev)."""
    height, width = image_size
    scale = 1024 / max(height, width)
    ys, xs = np.mgrid[0:height, 0:width]
    return np.maximum(np.abs((xs + 0.5) - point[0]), np.abs((ys + 0.5) - point[1])) * scale < radius_1024


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_standard_masks_are_the_decoders_squares_in_the_original_frame(region_predictor):
    image_size = (300, 500)
    result = TinySAMAutomaticMaskGenerator(region_predictor, AmgConfig(points_per_side=8)).run(
        np.zeros((*image_size, 3), np.uint8)
    )
    records = result.records
    assert result.stats.points_run == 64 and result.stats.decoder_calls == -(-64 // AmgConfig().points_per_batch)
    assert len(records) > 0 and len(records) == result.stats.masks
    for record in records:
        x, y = record["point_coords"][0]
        assert x * 1024 / 500 < LEFT_OF  # only confident token-1 masks pass 0.88
        assert record["predicted_iou"] == pytest.approx(0.95)
        mask = record["segmentation"]
        assert mask.shape == image_size and mask.sum() == record["area"]
        assert _iou(mask, _square_mask((x, y), image_size, HALF_WIDTH)) > 0.9
        ys, xs = np.nonzero(mask)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert record["crop_box"] == [0, 0, 500, 300]
        assert 0.95 <= record["stability_score"] <= 1.0
    ious = [r["predicted_iou"] for r in records]
    assert ious == sorted(ious, reverse=True)


def test_batch_size_does_not_change_the_result(region_predictor):
    image = np.zeros((200, 260, 3), np.uint8)
    runs = [
        TinySAMAutomaticMaskGenerator(region_predictor, AmgConfig(points_per_side=12, points_per_batch=b)).run(image)
        for b in (1, 7, 64, 500)
    ]
    assert [r.stats.decoder_calls for r in runs] == [144, 21, 3, 1]
    reference = runs[0].records
    for run in runs[1:]:
        assert len(run.records) == len(reference)
        for a, b in zip(reference, run.records):
            np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
            assert {k: v for k, v in a.items() if k != "segmentation"} == {
                k: v for k, v in b.items() if k != "segmentation"
            }


@pytest.mark.parametrize("hierarchical", [None, HierarchicalConfig()])
def test_decoder_workers_change_time_not_results(fp32_model_dir, hierarchical):
    # Two batches of 16 side by side per call; a 10 x 10 grid ends in a short call of 4 (2 + 2),
    # which moves logits only by float noise (see the batch-size test below).
    predictor = TinySAMPredictor(model_dir=fp32_model_dir, threads=2)
    image = synthetic_image(180, 240, seed=5)
    config = {**EQUIVALENCE, "points_per_side": 10, "points_per_batch": 16}
    one, two = (TinySAMAutomaticMaskGenerator(predictor, AmgConfig(**config, decoder_workers=w), hierarchical).run(image)
                for w in (1, 2))
    passes = [one.stats.points_run] if hierarchical is None else [one.stats.sparse_points, one.stats.points_run - one.stats.sparse_points]
    assert one.stats.decoder_calls == sum(-(-n // 16) for n in passes)
    assert two.stats.decoder_calls == sum(-(-n // 32) for n in passes)
    assert one.stats.points_run == two.stats.points_run and len(one.records) == len(two.records) > 0
    for a, b in zip(one.records, two.records):
        assert a["point_coords"] == b["point_coords"] and a["bbox"] == b["bbox"]
        assert _iou(a["segmentation"], b["segmentation"]) > 0.999
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)


@pytest.mark.parametrize("hierarchical", [None, HierarchicalConfig()])
def test_the_upscaler_gate_changes_work_not_results(tmp_path, region_predictor, hierarchical):
    # Same function behind three decoders: plain, a points decoder with the basic contract (an
    # older export), one that returns zero masks for prompts whose IoUs are all <= the threshold.
    image = synthetic_image(200, 260, seed=3)
    config = AmgConfig(points_per_side=16)
    predictors = {"plain": region_predictor}
    for kind in ("basic", "gated"):
        predictors[kind] = TinySAMPredictor(model_dir=_region_model_dir(tmp_path / kind, kind), threads=1)
    runs = {k: TinySAMAutomaticMaskGenerator(p, config, hierarchical).run(image) for k, p in predictors.items()}
    assert [p.skips_low_iou_upscaling for p in predictors.values()] == [False, False, True]
    reference = runs["plain"]
    assert len(reference.records) > 0
    for run in runs.values():
        assert run.stats.points_run == reference.stats.points_run
        assert [r["point_coords"] for r in run.records] == [r["point_coords"] for r in reference.records]
        for a, b in zip(reference.records, run.records):
            np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
    # Only left-side prompts have an IoU above 0.88; the gated decoder upscales just those.
    fed = RecordingPredictor(predictors["gated"])
    TinySAMAutomaticMaskGenerator(fed, config, hierarchical).run(image)
    left = int((fed.prompts_1024()[:, 0] < LEFT_OF).sum())
    assert 0 < runs["gated"].stats.points_upscaled == left < runs["gated"].stats.points_run
    assert runs["basic"].stats.points_upscaled == runs["plain"].stats.points_upscaled == reference.stats.points_run


def test_no_iou_filter_means_no_gate(tmp_path):
    predictor = TinySAMPredictor(model_dir=_region_model_dir(tmp_path / "gated", "gated"), threads=1)
    config = AmgConfig(points_per_side=8, pred_iou_thresh=0.0)
    result = TinySAMAutomaticMaskGenerator(predictor, config).run(synthetic_image(100, 120, seed=4))
    assert result.stats.points_upscaled == result.stats.points_run == 64
    assert len(result.records) > 0


def test_batch_size_changes_real_decoder_results_only_by_float_noise(fp32_model_dir):
    # ORT's kernels sum in a different order for another B, so logits move in the last bits; the
    # masks, their order and points must not change beyond that.
    predictor = TinySAMPredictor(model_dir=fp32_model_dir, threads=2)
    image = synthetic_image(180, 240, seed=5)
    config = {k: v for k, v in EQUIVALENCE.items() if k != "points_per_batch"}
    one, many = (TinySAMAutomaticMaskGenerator(predictor, AmgConfig(**config, points_per_batch=b)).generate(image)
                 for b in (1, 64))
    assert len(one) == len(many) > 0
    for a, b in zip(one, many):
        assert a["point_coords"] == b["point_coords"] and a["bbox"] == b["bbox"]
        assert _iou(a["segmentation"], b["segmentation"]) > 0.999
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-3)
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)


def test_crop_layers_return_masks_in_the_original_frame(region_predictor):
    image_size = (400, 400)
    config = AmgConfig(points_per_side=8, crop_n_layers=1, crop_nms_thresh=0.7)
    records = TinySAMAutomaticMaskGenerator(region_predictor, config).generate(np.zeros((*image_size, 3), np.uint8))
    crops, _ = amg.generate_crop_boxes(image_size, 1, config.crop_overlap_ratio)
    crops_xywh = [amg.box_xyxy_to_xywh(np.array(c)).tolist() for c in crops]
    assert {tuple(r["crop_box"]) for r in records} - {tuple(c) for c in crops_xywh} == set()
    assert any(r["crop_box"] != [0, 0, 400, 400] for r in records), "some masks come from the crops"
    for record in records:
        x0, y0, w, h = record["crop_box"]
        x, y = record["point_coords"][0]
        assert x0 <= x <= x0 + w and y0 <= y <= y0 + h
        # The crop is resized to 1024 on its own, so the square's radius is in crop-1024 pixels.
        radius = HALF_WIDTH * max(w, h) / 1024
        square = np.zeros(image_size, bool)
        square[max(0, int(y - radius)):int(y + radius) + 1, max(0, int(x - radius)):int(x + radius) + 1] = True
        square[:y0] = square[y0 + h:] = False
        square[:, :x0] = square[:, x0 + w:] = False
        assert _iou(record["segmentation"], square) > 0.85


def test_output_modes_encode_the_same_masks(region_predictor):
    image = np.zeros((120, 160, 3), np.uint8)
    by_mode = {
        mode: TinySAMAutomaticMaskGenerator(region_predictor, AmgConfig(points_per_side=6, output_mode=mode)).generate(image)
        for mode in ("binary_mask", "uncompressed_rle", "coco_rle")
    }
    assert len({len(v) for v in by_mode.values()}) == 1 and len(by_mode["binary_mask"]) > 0
    for binary, rle, coco in zip(*by_mode.values()):
        np.testing.assert_array_equal(amg.rle_to_mask(rle["segmentation"]), binary["segmentation"])
        assert isinstance(coco["segmentation"]["counts"], str)
        assert amg.coco_string_to_rle(coco["segmentation"]) == rle["segmentation"]
        json.dumps(coco)  # records in RLE modes are JSON-serialisable as they are


def test_progress_reports_every_batch_and_leaves_the_current_image_alone(region_predictor):
    predictor = region_predictor.clone()
    current = synthetic_image(50, 60)
    predictor.set_image(current)
    calls = []
    generator = TinySAMAutomaticMaskGenerator(predictor, AmgConfig(points_per_side=8, points_per_batch=20),
                                              HierarchicalConfig())
    result = generator.run(np.zeros((256, 256, 3), np.uint8), progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (4, 4)  # the 2 x 2 sparse pass, one batch
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] == calls[-1][1] == result.stats.points_run
    assert predictor.original_size == (50, 60)


def test_small_region_removal_keeps_clean_masks(region_predictor):
    image = np.zeros((160, 200, 3), np.uint8)
    plain = TinySAMAutomaticMaskGenerator(region_predictor, AmgConfig(points_per_side=6)).generate(image)
    cleaned = TinySAMAutomaticMaskGenerator(region_predictor, AmgConfig(points_per_side=6, min_mask_region_area=50)).generate(image)
    # Squares have no holes or islands: nothing changes, NMS at max(0.7, 0.7) keeps them all.
    assert len(cleaned) == len(plain) > 0
    for a, b in zip(plain, cleaned):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])


# --- configuration errors -----------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("points_per_side", 0, "points_per_side must be an int >= 1, got 0"),
    ("points_per_side", -4, "points_per_side must be an int >= 1, got -4"),
    ("points_per_side", 2.5, "points_per_side must be an int >= 1, got 2.5"),
    ("points_per_batch", 0, "points_per_batch must be an int >= 1, got 0"),
    ("points_per_side", 100_000, r"points_per_side must be an int in \[1, 1024\], got 100000"),  # a typo, not hours of work
    ("points_per_batch", 10**6, r"points_per_batch must be an int in \[1, 1024\], got 1000000"),
    ("decoder_workers", 10**6, r"decoder_workers must be an int in \[1, \d+\], got 1000000"),
    ("decoder_workers", 0, "decoder_workers must be an int >= 1, got 0"),
    ("decoder_workers", 1.5, "decoder_workers must be an int >= 1, got 1.5"),
    ("pred_iou_thresh", 1.5, r"pred_iou_thresh must be a number in \[0, 1\], got 1.5"),
    ("pred_iou_thresh", -0.1, r"pred_iou_thresh must be a number in \[0, 1\], got -0.1"),
    ("stability_score_thresh", 2, r"stability_score_thresh must be a number in \[0, 1\], got 2"),
    ("box_nms_thresh", -1.0, r"box_nms_thresh must be a number in \[0, 1\], got -1.0"),
    ("crop_nms_thresh", float("nan"), r"crop_nms_thresh must be a number in \[0, 1\], got nan"),
    ("stability_score_offset", -1.0, "stability_score_offset must be a finite number >= 0, got -1.0"),
    ("crop_n_layers", -1, "crop_n_layers must be an int >= 0, got -1"),
    ("crop_overlap_ratio", 1.0, r"crop_overlap_ratio must be a number in \[0, 1\), got 1.0"),
    ("min_mask_region_area", -5, "min_mask_region_area must be an int >= 0, got -5"),
    ("output_mode", "png", "output_mode must be one of .*, got 'png'"),
])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        AmgConfig(**{field: value})


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(points_per_side=2, crop_n_layers=1, crop_n_points_downscale_factor=4), ValueError,
     r"crop layer 1 would get 0 points per side: points_per_side=2 / crop_n_points_downscale_factor=4\*\*1 < 1"),
    (dict(points_per_side=8, crop_n_layers=3, crop_n_points_downscale_factor=4), ValueError,
     "crop layer 3 would get 0 points per side"),
    (dict(points_per_side=None, point_grids=5), TypeError, "point_grids must be a tuple of \\(P, 2\\) arrays, .*got int"),
    (dict(points_per_side=None, point_grids="grid.npy"), TypeError, "point_grids must be a tuple .*got str"),
    (dict(points_per_side=None, point_grids=(np.array([[np.nan, 0.5]]),)), ValueError, r"point_grids\[0\] contains NaN or inf"),
    (dict(points_per_side=None, point_grids=([[0.1, 0.2], [0.3]],)), TypeError, r"point_grids\[0\] must be numeric array-like"),
    (dict(points_per_side=None, point_grids=([["0.1", "0.2"]],)), TypeError, r"point_grids\[0\] must be numeric array-like, got text"),
    (dict(points_per_side=None, point_grids=([[0.1 + 1j, 0.2]],)), TypeError, r"point_grids\[0\] must be real numbers"),
])
def test_bad_crop_and_grid_config_names_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        AmgConfig(**kwargs)


def test_numpy_scalars_are_numbers_in_configs():
    config = AmgConfig(points_per_side=np.int64(8), pred_iou_thresh=np.float32(0.8), stability_score_thresh=np.float64(0.9),
                       stability_score_offset=np.float32(1.0), crop_overlap_ratio=np.float32(0.3),
                       min_mask_region_area=np.int32(0))
    assert config.pred_iou_thresh == np.float32(0.8) and type(config.pred_iou_thresh) is float
    assert HierarchicalConfig(high_score_thresh=np.float32(8.5)).high_score_thresh == 8.5
    assert AmgConfig(pred_iou_thresh=Fraction(1, 2), stability_score_offset=Fraction(1)).pred_iou_thresh == 0.5
    with pytest.raises(ValueError, match="stability_score_offset must be a finite number >= 0, got 1000"):
        AmgConfig(stability_score_offset=10**400)  # beyond float64
    with pytest.raises(ValueError, match=r"pred_iou_thresh must be a number in \[0, 1\], got np.True_"):
        AmgConfig(pred_iou_thresh=np.bool_(True))


def test_progress_that_cannot_be_called_is_refused_before_decoding(region_predictor):
    recorder = RecordingPredictor(region_predictor)
    with pytest.raises(TypeError, match=r"progress must be None or a callable\(points_done, points_total\), got int"):
        TinySAMAutomaticMaskGenerator(recorder, AmgConfig(points_per_side=4)).run(np.zeros((40, 40, 3), np.uint8), progress=5)
    assert recorder.batches == []


def test_bad_hierarchical_config_and_combinations(region_predictor):
    with pytest.raises(ValueError, match="high_score_thresh must be a finite number"):
        HierarchicalConfig(high_score_thresh=float("inf"))
    with pytest.raises(ValueError, match="dense_points must be one of .*, got 'all'"):
        HierarchicalConfig(dense_points="all")
    with pytest.raises(ValueError, match="exactly one of points_per_side and point_grids"):
        AmgConfig(points_per_side=None)
    with pytest.raises(ValueError, match="point_grids must be 1 non-empty"):
        AmgConfig(points_per_side=None, point_grids=(np.zeros((3, 3)),))
    with pytest.raises(ValueError, match="hierarchical mode needs points_per_side >= 4.*got 3"):
        TinySAMAutomaticMaskGenerator(region_predictor, AmgConfig(points_per_side=3), HierarchicalConfig())
    with pytest.raises(ValueError, match="crop_n_layers must be 0, got 1"):
        TinySAMAutomaticMaskGenerator(region_predictor, AmgConfig(crop_n_layers=1), HierarchicalConfig())
    with pytest.raises(TypeError, match="config must be an AmgConfig, got dict"):
        TinySAMAutomaticMaskGenerator(region_predictor, {"points_per_side": 8})
    with pytest.raises(TypeError, match="image must be a numpy array"):
        TinySAMAutomaticMaskGenerator(region_predictor).generate("photo.jpg")


@pytest.mark.parametrize("shape, layers, smallest", [((2, 700), 1, "1x350"), ((3, 40), 2, "0x10"), ((40, 3), 2, "10x0")])
def test_crop_layers_too_fine_for_the_image_are_refused_before_decoding(region_predictor, shape, layers, smallest):
    recorder = RecordingPredictor(region_predictor)
    generator = TinySAMAutomaticMaskGenerator(recorder, AmgConfig(points_per_side=4, crop_n_layers=layers))
    message = (f"crop_n_layers={layers} cuts this {shape[0]}x{shape[1]} image into crops as small as {smallest} "
               "pixels; crops must be at least 2x2")
    with pytest.raises(ValueError, match=message):
        generator.generate(np.zeros((*shape, 3), np.uint8))
    assert recorder.batches == []
    TinySAMAutomaticMaskGenerator(recorder, AmgConfig(points_per_side=4)).generate(np.zeros((*shape, 3), np.uint8))
    assert len(recorder.batches) == 1  # the same image without crop layers runs


def test_explicit_point_grids(region_predictor):
    grid = np.array([[0.1, 0.5], [0.3, 0.5]])
    recorder = RecordingPredictor(region_predictor)
    config = AmgConfig(points_per_side=None, point_grids=(grid,))
    TinySAMAutomaticMaskGenerator(recorder, config).generate(np.zeros((100, 200, 3), np.uint8))
    np.testing.assert_allclose(recorder.prompts_1024(), _to_1024(grid * [200, 100], (100, 200)), atol=1e-3)


# --- equivalence with segment_anything (torch) ---------------------------------------------------

# Random weights give checkerboard-noise logits (std ~1) whose boxes all span the whole image and
# whose predicted IoUs are ~0 (tokens 1, 3) or ~0.2 (token 2). Thresholds at which a meaningful
# number of masks survive (34 of 192 here): pred_iou_thresh 0.1, stability_score_thresh 0.003
# (full-resolution scores are 0..0.03); box_nms_thresh 1.0 because identical boxes would leave a
# single mask. 8 x 8 points on a 180 x 240 image keep the eager PyTorch side affordable.
EQUIVALENCE = dict(points_per_side=8, points_per_batch=32, pred_iou_thresh=0.1,
                   stability_score_thresh=0.003, box_nms_thresh=1.0)


def _match_ious(ours, reference):
    """Mean IoU of each reference mask with our mask from the same prompt point (same token order)."""
    by_point = {}
    for record in ours:
        by_point.setdefault(tuple(np.round(record["point_coords"][0], 3)), []).append(record)
    ious = []
    for record in reference:
        candidates = by_point.get(tuple(np.round(record["point_coords"][0], 3)), [])
        ious.append(max((_iou(record["segmentation"], c["segmentation"]) for c in candidates), default=0.0))
    return np.array(ious)


@pytest.mark.torch
def test_standard_mode_matches_segment_anything(fp32_model_dir, torch_model):
    from segment_anything import SamAutomaticMaskGenerator

    image = synthetic_image(180, 240, seed=5)
    reference = SamAutomaticMaskGenerator(torch_model, **EQUIVALENCE).generate(image)
    predictor = TinySAMPredictor(model_dir=fp32_model_dir, threads=2)
    ours = TinySAMAutomaticMaskGenerator(predictor, AmgConfig(**EQUIVALENCE)).generate(image)
    assert len(reference) >= 25, "thresholds must leave a meaningful number of masks"
    assert abs(len(ours) - len(reference)) <= 0.02 * len(reference)
    ious = _match_ious(ours, reference)
    assert ious.mean() >= 0.98, f"mean matched IoU {ious.mean():.4f}"
    ref_scores = sorted(r["stability_score"] for r in reference)
    our_scores = sorted(r["stability_score"] for r in ours)
    if len(ref_scores) == len(our_scores):
        np.testing.assert_allclose(our_scores, ref_scores, atol=2e-3)


# --- `tinysam everything` (the subcommand lives in cli.py; its tests live with the feature) ------


def _run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tinysam_rt.cli", "everything", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_everything_writes_overlay_and_coco_rle_json(region_predictor, tmp_path):
    from tinysam_rt.io import load_image, write_png

    image = synthetic_image(120, 160)
    write_png(tmp_path / "scene.png", image)
    out = tmp_path / "out"
    model_dir = region_predictor.manifest.model_dir
    result = _run_cli(tmp_path / "scene.png", "--hierarchical", "--points-per-side", "8", "--decoder-workers", "2",
                      "--model", model_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    report = json.loads((out / "masks.json").read_text())
    assert report["stats"]["mode"] == "hierarchical-tinysam" and report["image_size"] == [120, 160]
    annotations = report["annotations"]
    assert len(annotations) == report["stats"]["masks"] > 0
    direct = TinySAMAutomaticMaskGenerator(region_predictor, AmgConfig(points_per_side=8), HierarchicalConfig()).generate(image)
    assert len(direct) == len(annotations)
    for ours, record in zip(direct, annotations):
        np.testing.assert_array_equal(amg.rle_to_mask(amg.coco_string_to_rle(record["segmentation"])), ours["segmentation"])
    overlay = load_image(out / "overlay.png")
    assert overlay.shape == image.shape and not np.array_equal(overlay, image)
    assert sorted(p.name for p in out.iterdir()) == ["masks.json", "overlay.png"]  # no temp files left


def test_cli_everything_defaults_are_the_configs():
    from tinysam_rt import cli

    args = cli.build_parser().parse_args(["everything", "x.png"])
    config, hierarchical = AmgConfig(), HierarchicalConfig()
    assert (args.points_per_side, args.points_per_batch) == (config.points_per_side, config.points_per_batch)
    assert (args.pred_iou_thresh, args.stability_score_thresh, args.box_nms_thresh) == (
        config.pred_iou_thresh, config.stability_score_thresh, config.box_nms_thresh)
    assert (args.high_score_thresh, args.dense_points) == (hierarchical.high_score_thresh, hierarchical.dense_points)
    assert (args.min_mask_region_area, args.decoder_workers) == (config.min_mask_region_area, config.decoder_workers)


@pytest.mark.parametrize("args, message", [
    (["--points-per-side", "0"], "positive integer"),
    (["--decoder-workers", "0"], "--decoder-workers.*positive integer"),
    (["--pred-iou-thresh", "1.5"], r"pred-iou-thresh must be a number in \[0, 1\], got 1.5"),
    (["--hierarchical", "--points-per-side", "3"], "hierarchical mode needs points-per-side >= 4"),
    (["--dense-points", "grid"], "--dense-points only applies with --hierarchical"),
])
def test_cli_everything_usage_errors_are_one_line(args, message, tmp_path):
    result = _run_cli("missing.jpg", *args, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()
