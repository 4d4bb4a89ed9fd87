"""Property tests (hypothesis) of the runtime's pure functions.

Covers what the per-module tests check only on hand-picked examples: the preprocessing shape
math for any H, W >= 1, the resize output shape, the coordinate transforms (into the 1024 frame
and back out through `upscale_logits`), mask -> box, RLE on larger and run-structured masks, and
NMS idempotence / batched NMS. (`tests/test_amg.py` already has hypothesis tests of the basic
NMS invariants and the RLE round trip on small random masks; they are not repeated here.)
"""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinysam_rt import amg, postprocess, preprocess

SIDES = st.integers(1, 100_000)
LONG_SIDES = st.sampled_from([1, 2, 3, 7, 64, 255, 1024, 1025, 4096])


# --- preprocess_shape ------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(SIDES, SIDES, LONG_SIDES)
def test_preprocess_shape_for_any_size(height, width, long_side):
    scale = long_side / max(height, width)
    try:
        new_h, new_w = preprocess.preprocess_shape(height, width, long_side)
    except ValueError as exc:
        # Only refused when the short side really rounds to 0 px, and the message says so.
        assert "too elongated" in str(exc) and f"{height}x{width}" in str(exc)
        assert min(height, width) * scale < 0.5 + 1e-9
        return
    assert isinstance(new_h, int) and isinstance(new_w, int)
    assert max(new_h, new_w) == long_side  # the long side lands exactly on long_side
    assert 1 <= min(new_h, new_w) <= long_side
    assert abs(new_h - height * scale) <= 0.5 + 1e-9 and abs(new_w - width * scale) <= 0.5 + 1e-9
    assert (new_h >= new_w) == (height >= width) or abs(new_h - new_w) <= 1  # orientation kept
    # Transposing the image transposes the result.
    assert preprocess.preprocess_shape(width, height, long_side) == (new_w, new_h)


def test_preprocess_shape_refusal_boundary():
    # 1 x 2048 -> 0.5 px, which rounds half up to 1: accepted; 1 x 2049 -> 0.4998 px: refused.
    assert preprocess.preprocess_shape(1, 2048, 1024) == (1, 1024)
    with pytest.raises(ValueError, match="1x2049 is too elongated"):
        preprocess.preprocess_shape(1, 2049, 1024)


# --- resize_longest_side -----------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 90), st.integers(1, 90), st.integers(1, 70), st.integers(0, 255), st.integers(0, 2**32 - 1))
def test_resize_output_shape_and_range(height, width, long_side, fill, seed):
    try:
        expected = preprocess.preprocess_shape(height, width, long_side)
    except ValueError:
        return  # covered above
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = preprocess.resize_longest_side(image, long_side)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    # An interpolating filter with non-negative weights stays inside the input's range per channel.
    assert (out.min(axis=(0, 1)) >= image.min(axis=(0, 1))).all()
    assert (out.max(axis=(0, 1)) <= image.max(axis=(0, 1))).all()
    # A constant image stays exactly constant (the fixed-point weights sum to 1 within rounding).
    flat = preprocess.resize_longest_side(np.full((height, width, 3), fill, np.uint8), long_side)
    assert (flat == fill).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 60), st.integers(2, 60), st.integers(0, 2**32 - 1))
def test_resize_ignores_memory_layout(height, width, seed):
    """A strided, read-only view resizes exactly like its contiguous copy."""
    base = np.random.default_rng(seed).integers(0, 256, (2 * height, 2 * width, 3), dtype=np.uint8)
    view = base[::2, ::2]
    view.flags.writeable = False
    np.testing.assert_array_equal(preprocess.resize_longest_side(view, 50),
                                  preprocess.resize_longest_side(np.ascontiguousarray(view), 50))


# --- coordinate transforms ---------------------------------------------------------------------

SIZES = st.tuples(st.integers(2, 5000), st.integers(2, 5000)).filter(
    lambda hw: min(hw) * 1024 / max(hw) >= 0.5
)


@st.composite
def image_and_points(draw, max_points=8):
    height, width = draw(SIZES)
    n = draw(st.integers(1, max_points))
    unit = draw(arrays(np.float64, (n, 2), elements=st.floats(0, 1)))
    return (height, width), unit * np.array([width, height])  # (N, 2) (x, y) inside the image


@settings(max_examples=300, deadline=None)
@given(image_and_points())
def test_coords_round_trip_through_the_1024_frame(data):
    size, coords = data
    height, width = size
    new_h, new_w = preprocess.preprocess_shape(height, width, 1024)
    coords_1024 = preprocess.coords_to_input_frame(coords, size, 1024)
    assert coords_1024.shape == coords.shape and coords_1024.dtype == np.float32
    # Points inside the image land inside the resized (unpadded) region, x with w and y with h.
    tol = 1e-3
    assert (coords_1024[:, 0] >= -tol).all() and (coords_1024[:, 0] <= new_w + tol).all()
    assert (coords_1024[:, 1] >= -tol).all() and (coords_1024[:, 1] <= new_h + tol).all()
    # Going back by the per-axis scale of the resize recovers the points (float32 precision).
    back = coords_1024.astype(np.float64) * np.array([width / new_w, height / new_h])
    np.testing.assert_allclose(back, coords, rtol=0, atol=max(height, width) * 2e-7 + 1e-6)
    # The image's far corner maps onto the resized image's far corner.
    corner = preprocess.coords_to_input_frame([[width, height]], size, 1024)
    np.testing.assert_allclose(corner, [[new_w, new_h]], atol=1e-3)


@settings(max_examples=200, deadline=None)
@given(image_and_points(max_points=6))
def test_boxes_transform_like_their_corners(data):
    size, coords = data
    assume(len(coords) % 2 == 0)
    corners = coords.reshape(-1, 2, 2)
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)  # (K, 4) XYXY
    boxes_1024 = preprocess.boxes_to_input_frame(boxes, size, 1024)
    corners_1024 = preprocess.coords_to_input_frame(boxes.reshape(-1, 2, 2), size, 1024)
    np.testing.assert_array_equal(boxes_1024, corners_1024.reshape(-1, 4))
    assert (boxes_1024[:, 2] >= boxes_1024[:, 0]).all() and (boxes_1024[:, 3] >= boxes_1024[:, 1]).all()


@settings(max_examples=40, deadline=None)
@given(image_and_points(max_points=1).filter(lambda d: max(d[0]) <= 1500))
def test_prompt_frame_and_mask_frame_agree(data):
    """A logit peak placed where a prompt lands in the 1024 frame comes back at the prompt.

    `coords_to_input_frame` (prompts in) and `upscale_logits` (masks out) must use the same
    geometry; an x/y swap, a wrong crop or a per-axis scale mix-up moves the peak away.
    """
    size, coords = data
    height, width = size
    x_1024, y_1024 = preprocess.coords_to_input_frame(coords, size, 1024)[0]
    # Low-res pixel i covers 1024-frame [4i, 4i + 4): a cone centred on the prompt in that frame.
    centres = (np.arange(256) + 0.5) * 4.0
    logits = -np.hypot(centres[None, :] - x_1024, centres[:, None] - y_1024).astype(np.float32)
    full = postprocess.upscale_logits(logits[None, None], preprocess.preprocess_shape(height, width, 1024), size)
    assert full.shape == (1, 1, height, width)
    peak_y, peak_x = np.unravel_index(np.argmax(full[0, 0]), (height, width))
    # One low-res pixel is 4 / scale original pixels; allow that plus a pixel of rounding.
    tol = 1.0 + 4.0 * max(height, width) / 1024
    assert abs(peak_x + 0.5 - coords[0, 0]) <= tol and abs(peak_y + 0.5 - coords[0, 1]) <= tol


# --- mask -> box -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40))))
def test_mask_to_box_is_the_tight_extent(masks):
    boxes = amg.batched_mask_to_box(masks)
    assert boxes.shape == (len(masks), 4) and boxes.dtype == np.int64
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        if not mask.any():
            assert (x0, y0, x1, y1) == (0, 0, 0, 0)
            continue
        assert 0 <= x0 <= x1 < mask.shape[1] and 0 <= y0 <= y1 < mask.shape[0]
        inside = np.zeros_like(mask)
        inside[y0:y1 + 1, x0:x1 + 1] = True
        assert not (mask & ~inside).any(), "every mask pixel lies in its box"
        # Tight: each edge row/column of the box holds a mask pixel.
        assert mask[y0].any() and mask[y1].any() and mask[:, x0].any() and mask[:, x1].any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.data())
def test_mask_to_box_of_a_rectangle_is_the_rectangle(height, width, data):
    x0 = data.draw(st.integers(0, width - 1))
    x1 = data.draw(st.integers(x0, width - 1))
    y0 = data.draw(st.integers(0, height - 1))
    y1 = data.draw(st.integers(y0, height - 1))
    mask = np.zeros((height, width), bool)
    mask[y0:y1 + 1, x0:x1 + 1] = True
    assert amg.batched_mask_to_box(mask[None])[0].tolist() == [x0, y0, x1, y1]
    assert amg.box_xyxy_to_xywh(np.array([x0, y0, x1, y1])).tolist() == [x0, y0, x1 - x0, y1 - y0]


# --- RLE on larger, run-structured masks --------------------------------------------------------


def _reference_rle_counts(mask):
    """Column-major run lengths, starting with a (maybe empty) run of zeros, by a plain loop."""
    counts, current, run = [], False, 0
    for value in mask.flatten(order="F"):
        if bool(value) != current:
            counts.append(run)
            current, run = bool(value), 0
        run += 1
    counts.append(run)
    return counts


@st.composite
def run_masks(draw):
    """(H, W) bool masks made of long runs, so counts exceed the 5-bit digits of COCO strings."""
    height, width = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    runs = draw(st.lists(st.integers(1, 4000), min_size=1, max_size=12))
    start = draw(st.booleans())
    flat = np.concatenate([np.full(r, (i % 2 == 1) ^ start) for i, r in enumerate(runs)])
    flat = np.resize(flat, height * width)  # repeat / cut to fill the image
    return flat.reshape(width, height).T  # column-major order, as COCO counts it


@settings(max_examples=150, deadline=None)
@given(run_masks())
def test_rle_round_trip_on_long_runs(mask):
    (rle,) = amg.mask_to_rle(mask[None])
    assert rle["size"] == list(mask.shape)
    assert rle["counts"] == _reference_rle_counts(mask)
    assert all(isinstance(c, int) for c in rle["counts"])  # JSON-serialisable plain ints
    np.testing.assert_array_equal(amg.rle_to_mask(rle), mask)
    assert amg.area_from_rle(rle) == int(mask.sum())
    compressed = amg.rle_to_coco_string(rle)
    assert set(compressed["counts"]) <= {chr(c) for c in range(48, 48 + 64)}
    assert amg.coco_string_to_rle(compressed) == rle


@pytest.mark.parametrize("value", [False, True])
def test_rle_of_uniform_masks(value):
    mask = np.full((7, 5), value)
    (rle,) = amg.mask_to_rle(mask[None])
    assert rle["counts"] == ([0, 35] if value else [35])
    np.testing.assert_array_equal(amg.rle_to_mask(rle), mask)


# --- NMS: idempotence and batched NMS ------------------------------------------------------------


@st.composite
def scored_boxes(draw, max_n=25):
    """(N, 4) XYXY boxes on a quarter-pixel lattice, with scores (ties likely).

    Real boxes are pixel boxes. Sub-1e-16 boxes are left out on purpose: `batched_nms` separates
    categories by adding category * (max + 1), as torchvision does, which rounds such boxes to
    zero area (a documented limitation of that trick, not of the NMS).
    """
    n = draw(st.integers(0, max_n))
    xy = draw(arrays(np.float64, (n, 2), elements=st.integers(0, 400).map(lambda v: v / 4)))
    wh = draw(arrays(np.float64, (n, 2), elements=st.integers(0, 240).map(lambda v: v / 4)))
    scores = draw(arrays(np.float64, (n,), elements=st.sampled_from([0.1, 0.5, 0.9]) | st.floats(0, 1)))
    return np.concatenate([xy, xy + wh], axis=1), scores


def _pairwise_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = amg.box_area(a)[:, None] + amg.box_area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@settings(max_examples=150, deadline=None)
@given(scored_boxes(), st.floats(0, 1))
def test_nms_is_idempotent(data, threshold):
    boxes, scores = data
    keep = amg.nms(boxes, scores, threshold)
    assert keep.dtype == np.int64 and len(np.unique(keep)) == len(keep)
    kept = boxes[keep]
    iou = _pairwise_iou(kept, kept)
    np.fill_diagonal(iou, 0)
    assert (iou <= threshold + 1e-12).all()
    # Running NMS again on its own output keeps everything, in the same order.
    again = amg.nms(kept, scores[keep], threshold)
    assert again.tolist() == list(range(len(keep)))
    # Permuting the input does not change which boxes survive when scores are distinct.
    if len(np.unique(scores)) == len(scores):
        perm = np.random.default_rng(0).permutation(len(boxes))
        assert sorted(perm[amg.nms(boxes[perm], scores[perm], threshold)].tolist()) == sorted(keep.tolist())


@settings(max_examples=100, deadline=None)
@given(scored_boxes(), st.floats(0, 1), st.data())
def test_batched_nms_is_nms_per_category(data, threshold, draw):
    boxes, scores = data
    categories = np.asarray(draw.draw(st.lists(st.integers(0, 3), min_size=len(boxes), max_size=len(boxes))), np.int64)
    keep = amg.batched_nms(boxes, scores, categories, threshold)
    assert np.all(np.diff(scores[keep]) <= 0)
    for category in np.unique(categories):
        members = np.flatnonzero(categories == category)
        expected = members[amg.nms(boxes[members], scores[members], threshold)]
        assert sorted(keep[categories[keep] == category].tolist()) == sorted(expected.tolist())
