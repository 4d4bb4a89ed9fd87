"""Tests of tinysam_rt.amg: pure functions on tiny synthetic arrays.

The `torch`-marked tests at the end cross-check each function against segment_anything's own
torch implementation on random inputs.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinysam_rt import amg


# --- grids and crops -------------------------------------------------------------------------


def test_build_point_grid_is_cell_centres_row_major():
    grid = amg.build_point_grid(2)
    # Cell centres of a 2x2 grid over the unit square; x varies fastest.
    np.testing.assert_allclose(grid, [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    grid = amg.build_point_grid(32)
    assert grid.shape == (1024, 2)
    np.testing.assert_allclose(grid.min(axis=0), 1 / 64)
    np.testing.assert_allclose(np.diff(grid[:32, 0]), 1 / 32)


def test_build_all_layer_point_grids_downscales_per_layer():
    grids = amg.build_all_layer_point_grids(16, 2, 2)
    assert [len(g) for g in grids] == [256, 64, 16]


def test_generate_crop_boxes_layers_cover_the_image():
    boxes, layers = amg.generate_crop_boxes((300, 400), 1, 512 / 1500)
    assert boxes[0] == [0, 0, 400, 300] and layers == [0, 1, 1, 1, 1]
    covered = np.zeros((300, 400), dtype=bool)
    for x0, y0, x1, y1 in boxes[1:]:
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert amg.generate_crop_boxes((300, 400), 0, 0.3) == ([[0, 0, 400, 300]], [0])


# --- stability, boxes, NMS -------------------------------------------------------------------


def test_stability_score_is_ratio_of_high_to_low_counts():
    logits = np.full((2, 4, 4), -5.0, dtype=np.float32)
    logits[0, :2, :2] = 3.0  # 4 px above +1
    logits[0, 2:, :2] = 0.5  # 4 px only above -1
    # mask 1 stays empty at every threshold -> 0, not NaN
    score = amg.calculate_stability_score(logits, 0.0, 1.0)
    assert score.dtype == np.float32 and score.shape == (2,)
    np.testing.assert_allclose(score, [0.5, 0.0])


def _boxes_by_nonzero(masks):
    out = []
    for mask in masks.reshape(-1, *masks.shape[-2:]):
        ys, xs = np.nonzero(mask)
        out.append([xs.min(), ys.min(), xs.max(), ys.max()] if len(xs) else [0, 0, 0, 0])
    return np.array(out).reshape(*masks.shape[:-2], 4)


def test_batched_mask_to_box_matches_nonzero_extent():
    rng = np.random.default_rng(0)
    masks = rng.random((2, 3, 9, 7)) > 0.9
    masks[1, 2] = False  # an empty mask -> [0, 0, 0, 0]
    boxes = amg.batched_mask_to_box(masks)
    assert boxes.shape == (2, 3, 4) and boxes.dtype == np.int64
    np.testing.assert_array_equal(boxes, _boxes_by_nonzero(masks))
    np.testing.assert_array_equal(boxes[1, 2], 0)


def test_box_xyxy_to_xywh():
    np.testing.assert_array_equal(amg.box_xyxy_to_xywh(np.array([[2, 3, 10, 7]])), [[2, 3, 8, 4]])


def _iou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


_boxes = st.integers(1, 30).flatmap(
    lambda n: st.tuples(
        arrays(np.float64, (n, 4), elements=st.integers(0, 40).map(float)),
        arrays(np.float64, (n,), elements=st.floats(0, 1)),
    )
)


@settings(max_examples=60, deadline=None)
@given(_boxes, st.sampled_from([0.0, 0.3, 0.7, 1.0]))
def test_nms_invariants(data, threshold):
    corners, scores = data
    boxes = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])], 1)
    keep = amg.nms(boxes, scores, threshold)
    assert len(set(keep.tolist())) == len(keep)
    assert np.all(np.diff(scores[keep]) <= 0), "kept boxes come by descending score"
    for i, a in enumerate(keep):  # no two kept boxes overlap more than the threshold
        for b in keep[i + 1 :]:
            assert _iou(boxes[a], boxes[b]) <= threshold
    for r in set(range(len(boxes))) - set(keep.tolist()):  # each dropped box has a better keeper
        assert any(_iou(boxes[k], boxes[r]) > threshold and scores[k] >= scores[r] for k in keep)


def test_nms_keeps_the_best_of_duplicates_and_disjoint_boxes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=float)
    keep = amg.nms(boxes, np.array([0.5, 0.9, 0.8, 0.1]), 0.7)
    assert keep.tolist() == [1, 3]


def test_batched_nms_never_suppresses_across_categories():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    keep = amg.batched_nms(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 1, 0]), 0.5)
    assert sorted(keep.tolist()) == [0, 1]
    assert amg.batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).tolist() == []


def test_is_box_near_crop_edge_ignores_edges_shared_with_the_image():
    crop = [0, 0, 100, 100]  # top-left crop of a 200 x 200 image
    boxes = np.array([[5, 5, 50, 50], [30, 30, 95, 60], [30, 30, 60, 60]])
    near = amg.is_box_near_crop_edge(boxes, crop, [0, 0, 200, 200])
    assert near.tolist() == [False, True, False]
    # The same crop box as the image: no crop edge to be near.
    assert not amg.is_box_near_crop_edge(boxes, [0, 0, 200, 200], [0, 0, 200, 200]).any()


def test_uncrop_helpers_shift_into_the_original_frame():
    crop = [10, 20, 40, 60]
    np.testing.assert_array_equal(amg.uncrop_boxes_xyxy(np.array([[1, 2, 3, 4]]), crop), [[11, 22, 13, 24]])
    np.testing.assert_array_equal(amg.uncrop_points(np.array([[1.5, 2.0]]), crop), [[11.5, 22.0]])
    masks = np.ones((2, 40, 30), dtype=bool)
    full = amg.uncrop_masks(masks, crop, 100, 50)
    assert full.shape == (2, 100, 50) and full.sum() == masks.sum()
    assert full[:, 20:60, 10:40].all()
    assert amg.uncrop_masks(masks, [0, 0, 30, 40], 40, 30) is masks


# --- RLE ---------------------------------------------------------------------------------------


def test_rle_is_column_major_and_starts_with_a_zero_run():
    mask = np.zeros((2, 3), dtype=bool)
    mask[0, 1] = True  # (y=0, x=1) -> column-major index x * H + y = 2
    assert amg.mask_to_rle(mask[None])[0] == {"size": [2, 3], "counts": [2, 1, 3]}
    mask[0, 0] = True  # first pixel set -> leading empty run
    assert amg.mask_to_rle(mask[None])[0]["counts"] == [0, 1, 1, 1, 3]
    assert amg.mask_to_rle(np.zeros((0, 2, 3), dtype=bool)) == []


@settings(max_examples=80, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9))))
def test_rle_round_trip_and_area(masks):
    rles = amg.mask_to_rle(masks)
    for mask, rle in zip(masks, rles):
        assert sum(rle["counts"]) == mask.size
        assert amg.area_from_rle(rle) == mask.sum()
        decoded = amg.rle_to_mask(rle)
        assert decoded.flags.c_contiguous
        np.testing.assert_array_equal(decoded, mask)
        compressed = amg.rle_to_coco_string(rle)
        assert isinstance(compressed["counts"], str)
        assert amg.coco_string_to_rle(compressed) == rle


def test_coco_string_encoding_by_hand():
    # Digits are 5 bits + a continuation bit (32), written as chr(48 + digit); from the 4th count
    # on, the delta to the count two places back is stored instead of the count.
    #   1 -> '1';  40 = 8 + 1*32 -> (8 | 32) 'X', then 1 '1';  3 -> '3'
    #   1 - 40 = -39 -> low digit 25 (+ continuation) 'i', then -2 -> digit 30 (sign bit 16) 'N'
    #   2 - 3 = -1 -> digit 31 'O'
    rle = {"size": [1, 47], "counts": [1, 40, 3, 1, 2]}
    assert amg.rle_to_coco_string(rle) == {"size": [1, 47], "counts": "1X13iNO"}
    assert amg.coco_string_to_rle({"size": [1, 47], "counts": "1X13iNO"}) == rle


def test_rle_to_mask_rejects_counts_that_do_not_fill_the_image():
    with pytest.raises(ValueError, match="sum to H\\*W = 6"):
        amg.rle_to_mask({"size": [2, 3], "counts": [2, 1]})


# --- small regions -----------------------------------------------------------------------------


def test_remove_small_regions_islands_and_holes():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True  # 100 px square ...
    mask[5, 5] = False  # ... with a 1 px hole
    mask[16:18, 16:18] = True  # and a 4 px island
    cleaned, changed = amg.remove_small_regions(mask, 10, "islands")
    assert changed and not cleaned[16:18, 16:18].any() and cleaned[2:12, 2:12].sum() == 99
    filled, changed = amg.remove_small_regions(mask, 10, "holes")
    assert changed and filled[5, 5] and filled[16:18, 16:18].all() and filled.sum() == mask.sum() + 1
    same, changed = amg.remove_small_regions(mask, 1, "islands")
    assert not changed and same is mask
    largest, changed = amg.remove_small_regions(mask, 1000, "islands")  # all small: keep the largest
    assert changed and largest.sum() == 99 and not largest[16:18, 16:18].any()
    with pytest.raises(ValueError, match="mode must be 'holes' or 'islands', got 'edges'"):
        amg.remove_small_regions(mask, 10, "edges")


# --- MaskData ----------------------------------------------------------------------------------


def test_mask_data_filter_and_cat():
    data = amg.MaskData(iou=np.array([0.1, 0.9, 0.5]), rles=["a", "b", "c"])
    data.filter(np.array([False, True, True]))
    assert data["iou"].tolist() == [0.9, 0.5] and data["rles"] == ["b", "c"] and len(data) == 2
    data.filter(np.array([1, 0]))  # index arrays reorder
    assert data["rles"] == ["c", "b"]
    data.cat(amg.MaskData(iou=np.array([0.3]), rles=["d"]))
    assert data["iou"].tolist() == [0.5, 0.9, 0.3] and data["rles"] == ["c", "b", "d"]
    empty = amg.MaskData()
    empty.cat(data)
    assert len(empty) == 3
    with pytest.raises(TypeError, match="column 'x' must be a numpy array or list, got int"):
        amg.MaskData(x=3)


# --- hierarchical point selection --------------------------------------------------------------


def _sparse_points(image_size, points_per_side):
    height, width = image_size
    return amg.build_point_grid(points_per_side // 4) * np.array([width, height])


def test_tinysam_candidates_complete_the_half_stride_lattice():
    # 1024 px, 32 per side: sparse centres at 64 + 128 k, stride 32. Sparse points and their
    # candidates together tile the lattice {32, 64, ..., 992}^2 exactly once.
    sparse = _sparse_points((1024, 1024), 32)
    points, parent = amg.tinysam_dense_candidates(sparse, (1024, 1024), 32)
    lattice = {(32.0 * i, 32.0 * j) for i in range(1, 32) for j in range(1, 32)}
    as_set = set(map(tuple, points.tolist()))
    assert len(as_set) == len(points) == 31 * 31 - 64
    assert as_set | set(map(tuple, sparse.tolist())) == lattice
    assert np.all(np.abs(points - sparse[parent]) <= 64)


def test_tinysam_candidates_follow_the_published_neighbourhood_rule():
    # The rule as the issue states it, written as loops: offsets {-1, 0, 1, 2} x stride, minus
    # the point itself, minus those outside the image; 3x3 block first, then x+2, y+2, corner.
    image_size = (600, 800)
    height, width = image_size
    sparse = _sparse_points(image_size, 32)
    hs, ws = height // 32, width // 32
    expected = []
    for x, y in sparse:
        block = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
        for dx, dy in block + [(2, -1), (2, 0), (2, 1), (-1, 2), (0, 2), (1, 2), (2, 2)]:
            if x + dx * ws < width and y + dy * hs < height:
                expected.append((x + dx * ws, y + dy * hs))
    points, _ = amg.tinysam_dense_candidates(sparse, image_size, 32)
    np.testing.assert_allclose(points, np.array(expected))


def test_points_covered_truncates_like_int():
    coverage = np.zeros((4, 5), dtype=bool)
    coverage[1, 3] = True
    covered = amg.points_covered(np.array([[3.9, 1.99], [3.0, 2.0], [2.99, 1.0]]), coverage)
    assert covered.tolist() == [True, False, False]


# --- cross-checks against segment_anything (torch) ---------------------------------------------


@pytest.mark.torch
def test_matches_segment_anything_amg_functions():
    torch = pytest.importorskip("torch")
    sam_amg = pytest.importorskip("segment_anything.utils.amg")
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (6, 33, 47)).astype(np.float32)
    masks = logits > 0.5
    masks[2] = False

    np.testing.assert_allclose(
        amg.calculate_stability_score(logits[:5], 0.0, 1.0),
        sam_amg.calculate_stability_score(torch.from_numpy(logits[:5]), 0.0, 1.0).numpy(),
    )
    np.testing.assert_array_equal(
        amg.batched_mask_to_box(masks), sam_amg.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    )
    assert amg.mask_to_rle(masks) == sam_amg.mask_to_rle_pytorch(torch.from_numpy(masks))
    for rle in amg.mask_to_rle(masks):
        np.testing.assert_array_equal(amg.rle_to_mask(rle), sam_amg.rle_to_mask(rle))
    for n_layers in (0, 1, 2):
        assert amg.generate_crop_boxes((333, 517), n_layers, 512 / 1500) == sam_amg.generate_crop_boxes(
            (333, 517), n_layers, 512 / 1500
        )
    for grid, ref in zip(amg.build_all_layer_point_grids(12, 2, 2), sam_amg.build_all_layer_point_grids(12, 2, 2)):
        np.testing.assert_allclose(grid, ref)
    boxes = amg.batched_mask_to_box(masks)
    crop = [10, 5, 40, 30]
    np.testing.assert_array_equal(
        amg.is_box_near_crop_edge(boxes, crop, [0, 0, 60, 40]),
        sam_amg.is_box_near_crop_edge(torch.from_numpy(boxes), crop, [0, 0, 60, 40]).numpy(),
    )
    for mode in ("holes", "islands"):
        ours, changed = amg.remove_small_regions(masks[0], 4, mode)
        ref, ref_changed = sam_amg.remove_small_regions(masks[0], 4, mode)
        assert changed == ref_changed
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.torch
def test_nms_matches_torchvision():
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 100, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (300, 2))], axis=1).astype(np.float32)
    scores = rng.random(300).astype(np.float32)  # distinct scores: no tie-breaking ambiguity
    categories = rng.integers(0, 3, 300)
    for threshold in (0.3, 0.7):
        ref = ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(categories), threshold)
        assert amg.batched_nms(boxes, scores, categories, threshold).tolist() == ref.tolist()
