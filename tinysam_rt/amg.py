"""Pure-numpy building blocks of automatic mask generation ("everything" mode).

The functions mirror `segment_anything/utils/amg.py` one by one (same names, same semantics and
SAM's record fields) without torch: point grids, crop boxes, stability score, mask -> box, box NMS,
COCO run-length encoding, small-region clean-up, plus TinySAM's hierarchical point selection.
Everything here takes arrays and returns arrays: no sessions, no I/O, no globals.

Conventions: masks are (..., H, W) indexed [y, x]; points are (x, y); boxes are XYXY with
inclusive pixel indices (SAM's `batched_mask_to_box` convention) unless a name says XYWH.
"""

import math
from itertools import product

import cv2
import numpy as np

# TinySAM's neighbourhood of a sparse point, in dense strides (dx, dy), in the order its
# `hierarchical_generate` visits them: the 3x3 block (x offset outer), then x + 2, then y + 2,
# then the (2, 2) corner. Order matters only for batch composition and NMS tie-breaking.
TINYSAM_DENSE_OFFSETS = (
    *((dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)),
    *((2, dy) for dy in (-1, 0, 1)),
    *((dx, 2) for dx in (-1, 0, 1)),
    (2, 2),
)


class MaskData:
    """Columns of per-mask data that are filtered and concatenated together (SAM's MaskData).

    Every value is a numpy array whose first axis is the mask axis, or a list of the same length.
    `filter` and `cat` edit the container in place, as SAM's does.
    """

    def __init__(self, **columns):
        self._columns = {}
        for key, value in columns.items():
            self[key] = value

    def __setitem__(self, key, value):
        if not isinstance(value, (np.ndarray, list)):
            raise TypeError(f"MaskData column {key!r} must be a numpy array or list, got {type(value).__name__}")
        self._columns[key] = value

    def __getitem__(self, key):
        return self._columns[key]

    def __delitem__(self, key):
        del self._columns[key]

    def __contains__(self, key):
        return key in self._columns

    def __len__(self):
        """Number of masks (length of the first column; 0 when empty)."""
        return len(next(iter(self._columns.values()))) if self._columns else 0

    def items(self):
        return self._columns.items()

    def filter(self, keep):
        """Keep rows selected by `keep`: (N,) bool or an int index array (which also reorders)."""
        keep = np.asarray(keep)
        index = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        for key, value in self._columns.items():
            self._columns[key] = value[index] if isinstance(value, np.ndarray) else [value[i] for i in index]

    def cat(self, other):
        """Append the rows of `other` (a MaskData with the same columns, or any new ones)."""
        for key, value in other.items():
            if key not in self._columns:
                self._columns[key] = value.copy() if isinstance(value, np.ndarray) else list(value)
            elif isinstance(value, np.ndarray):
                self._columns[key] = np.concatenate([self._columns[key], value], axis=0)
            else:
                self._columns[key] = self._columns[key] + list(value)


def build_point_grid(n_per_side):
    """Cell centres of an n x n grid over the unit square (SAM's `build_point_grid`).

    Returns:
        (n * n, 2) float64, (x, y) in (0, 1), row-major: y is the outer index.
    """
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1.0 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side)  # (n, n) each, indexed [y, x]
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side, n_layers, scale_per_layer):
    """One normalised grid per crop layer; layer i has int(n / scale**i) points per side.

    Returns:
        list of n_layers + 1 arrays (n_i * n_i, 2) float64, (x, y) in (0, 1).
    """
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size, n_layers, overlap_ratio):
    """Crop boxes of every layer: the whole image, then (2**i)**2 overlapping crops in layer i.

    Args:
        im_size: (H, W) of the image.

    Returns:
        (boxes, layer_idxs): list of [x0, y0, x1, y1] int boxes (exclusive x1, y1) and the layer
        index of each, the full image first (SAM's order).
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]
    for i_layer in range(n_layers):
        n_crops = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops))
        crop_w = int(math.ceil((overlap * (n_crops - 1) + im_w) / n_crops))
        crop_h = int(math.ceil((overlap * (n_crops - 1) + im_h) / n_crops))
        x0s = [int((crop_w - overlap) * i) for i in range(n_crops)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_crops)]
        for x0, y0 in product(x0s, y0s):  # x outer, as SAM
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return boxes, layer_idxs


def calculate_stability_score(logits, mask_threshold, threshold_offset):
    """IoU of the masks thresholded at `mask_threshold +- threshold_offset` (SAM's definition).

    The high-threshold mask is contained in the low one, so IoU = count(high) / count(low).

    Args:
        logits: (..., H, W) float mask logits, any resolution.

    Returns:
        (...,) float32; 0 where even the low-threshold mask is empty (SAM gives NaN there, which
        fails every threshold in the same way).
    """
    high = np.count_nonzero(logits > mask_threshold + threshold_offset, axis=(-2, -1))
    low = np.count_nonzero(logits > mask_threshold - threshold_offset, axis=(-2, -1))
    score = np.divide(high, low, out=np.zeros(low.shape, dtype=np.float64), where=low > 0)
    return score.astype(np.float32)


def batched_mask_to_box(masks):
    """Tight boxes around binary masks, [0, 0, 0, 0] for empty ones.

    Args:
        masks: (..., H, W) bool.

    Returns:
        (..., 4) int64, XYXY with inclusive pixel indices (x1, y1 are the last mask pixels).
    """
    height, width = masks.shape[-2:]
    rows = masks.any(axis=-1)  # (..., H): row holds a mask pixel
    cols = masks.any(axis=-2)  # (..., W)
    top = rows.argmax(axis=-1)
    bottom = height - 1 - rows[..., ::-1].argmax(axis=-1)
    left = cols.argmax(axis=-1)
    right = width - 1 - cols[..., ::-1].argmax(axis=-1)
    boxes = np.stack([left, top, right, bottom], axis=-1).astype(np.int64)
    boxes[~rows.any(axis=-1)] = 0
    return boxes


def box_xyxy_to_xywh(boxes):
    """(..., 4) XYXY -> (..., 4) XYWH (same dtype; w = x1 - x0, as SAM records `bbox`)."""
    boxes = np.asarray(boxes)
    return np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def box_area(boxes):
    """(N, 4) XYXY -> (N,) float64 areas (x1 - x0) * (y1 - y0), torchvision's convention."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes, scores, iou_threshold):
    """Greedy non-maximum suppression with torchvision's semantics.

    Boxes are visited by descending score (ties keep input order); a box is dropped when its IoU
    with an already kept box is > `iou_threshold`. IoU of two zero-area boxes counts as 0.

    Args:
        boxes: (N, 4) XYXY, any real dtype.
        scores: (N,) float.

    Returns:
        (K,) int64 indices into `boxes` of the kept boxes, by descending score.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    boxes = np.asarray(boxes, dtype=np.float64)[order]
    areas = box_area(boxes)
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = boxes[i + 1 :]  # (R, 4) lower-scored boxes
        inter_w = np.clip(np.minimum(boxes[i, 2], rest[:, 2]) - np.maximum(boxes[i, 0], rest[:, 0]), 0, None)
        inter_h = np.clip(np.minimum(boxes[i, 3], rest[:, 3]) - np.maximum(boxes[i, 1], rest[:, 1]), 0, None)
        inter = inter_w * inter_h
        union = areas[i] + areas[i + 1 :] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        suppressed[i + 1 :] |= iou > iou_threshold
    return order[np.asarray(keep, dtype=np.int64)]


def batched_nms(boxes, scores, categories, iou_threshold):
    """NMS run independently per category (torchvision's `batched_nms`).

    Boxes of different categories are shifted apart so that they never overlap, then one `nms`.

    Args:
        boxes: (N, 4) XYXY. scores: (N,) float. categories: (N,) int.

    Returns:
        (K,) int64 kept indices, by descending score.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.asarray(categories, dtype=np.float64) * (boxes.max() + 1.0)  # (N,)
    return nms(boxes + shift[:, None], scores, iou_threshold)


def is_box_near_crop_edge(boxes, crop_box, orig_box, atol=20.0):
    """Which boxes touch a crop edge that is not also an edge of the original image.

    Args:
        boxes: (N, 4) XYXY in the crop's frame.
        crop_box, orig_box: [x0, y0, x1, y1] in the original image frame.

    Returns:
        (N,) bool.
    """
    crop = np.asarray(crop_box, dtype=np.float64)
    orig = np.asarray(orig_box, dtype=np.float64)
    boxes = uncrop_boxes_xyxy(np.asarray(boxes, dtype=np.float64), crop_box)
    near_crop = np.abs(boxes - crop[None, :]) <= atol
    near_image = np.abs(boxes - orig[None, :]) <= atol
    return np.any(near_crop & ~near_image, axis=1)


def uncrop_boxes_xyxy(boxes, crop_box):
    """(..., 4) XYXY in the crop frame -> original frame (adds the crop's x0, y0)."""
    x0, y0 = crop_box[:2]
    return np.asarray(boxes) + np.array([x0, y0, x0, y0])


def uncrop_points(points, crop_box):
    """(..., 2) (x, y) in the crop frame -> original frame."""
    x0, y0 = crop_box[:2]
    return np.asarray(points) + np.array([x0, y0])


def uncrop_masks(masks, crop_box, orig_h, orig_w):
    """(N, h, w) masks of a crop -> (N, orig_h, orig_w), zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    pad = ((0, 0), (y0, orig_h - y1), (x0, orig_w - x1))
    return np.pad(masks, pad, mode="constant", constant_values=False)


def mask_to_rle(masks):
    """Uncompressed COCO run-length encoding of binary masks (SAM's `mask_to_rle_pytorch`).

    Runs are over the column-major (Fortran) flattening, as pycocotools expects, starting with a
    run of zeros (of length 0 when the first pixel is set).

    Args:
        masks: (B, H, W) bool.

    Returns:
        list of B dicts {"size": [H, W], "counts": list of int}.
    """
    b, h, w = masks.shape
    if b == 0:
        return []
    flat = np.ascontiguousarray(masks.transpose(0, 2, 1)).reshape(b, h * w)  # column-major per mask
    mask_idx, pixel_idx = np.nonzero(flat[:, 1:] != flat[:, :-1])  # sorted by mask, then pixel
    bounds = np.searchsorted(mask_idx, np.arange(1, b))
    out = []
    for i, cuts in enumerate(np.split(pixel_idx + 1, bounds)):
        counts = np.diff(np.concatenate([[0], cuts, [h * w]])).tolist()
        out.append({"size": [h, w], "counts": ([0] if flat[i, 0] else []) + counts})
    return out


def rle_to_mask(rle):
    """Decode an uncompressed COCO RLE dict back to a (H, W) bool mask (C-contiguous).

    Raises:
        ValueError: the counts do not add up to H * W.
    """
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"rle counts must be >= 0 and sum to H*W = {h * w}, got sum {counts.sum()}")
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.ascontiguousarray(np.repeat(values, counts).reshape(w, h).T)


def area_from_rle(rle):
    """Number of set pixels of an uncompressed RLE (sum of the odd runs)."""
    return int(sum(rle["counts"][1::2]))


def rle_to_coco_string(rle):
    """Compress an uncompressed RLE into pycocotools' string form (`rleToString`).

    Each count (from the 4th on, minus the count two places before) is written as a
    variable-length signed integer, 5 bits per character, characters '0'..'o'.

    Returns:
        {"size": [H, W], "counts": str}, JSON-serialisable and readable by pycocotools.
    """
    counts = rle["counts"]
    chars = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            char = value & 0x1F
            value >>= 5  # arithmetic shift: negative values stay negative
            more = value != -1 if char & 0x10 else value != 0
            chars.append(chr((char | 0x20 if more else char) + 48))
    return {"size": list(rle["size"]), "counts": "".join(chars)}


def coco_string_to_rle(coco_rle):
    """Inverse of `rle_to_coco_string` (pycocotools' `rleFrString`).

    Returns:
        {"size": [H, W], "counts": list of int}.
    """
    text, counts, pos = coco_rle["counts"], [], 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            char = ord(text[pos]) - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and char & 0x10:
                value |= -1 << shift  # sign-extend
        counts.append(value + (counts[-2] if len(counts) > 2 else 0))
    return {"size": list(coco_rle["size"]), "counts": counts}


def remove_small_regions(mask, area_thresh, mode):
    """Remove small islands (`mode="islands"`) or fill small holes (`mode="holes"`).

    Args:
        mask: (H, W) bool.
        area_thresh: components with fewer pixels than this are removed / filled.

    Returns:
        ((H, W) bool mask, changed: bool). If every island is small, the largest one is kept.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    fill_holes = mode == "holes"
    working = (mask ^ fill_holes).astype(np.uint8)  # holes become foreground components
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the background
    small = np.flatnonzero(sizes < area_thresh) + 1
    if len(small) == 0:
        return mask, False
    if fill_holes:
        return mask | np.isin(regions, small), True
    keep = np.setdiff1d(np.arange(1, n_labels), small)
    if len(keep) == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(regions, keep), True


def tinysam_dense_candidates(sparse_points, image_size, points_per_side):
    """TinySAM's dense candidates: each sparse point's neighbours at {-1, 0, 1, 2} strides.

    The stride is `W // points_per_side` in x and `H // points_per_side` in y; the sparse point
    itself and neighbours outside the image are left out (TinySAM's `hierarchical_generate`).

    Args:
        sparse_points: (S, 2) float, (x, y) pixels in the original image.
        image_size: (H, W).

    Returns:
        (points (P, 2) float64 (x, y) pixels, parent (P,) int64 index of the sparse point),
        ordered by sparse point, then by `TINYSAM_DENSE_OFFSETS`.
    """
    height, width = image_size
    stride = np.array([width // points_per_side, height // points_per_side], dtype=np.float64)
    offsets = np.asarray(TINYSAM_DENSE_OFFSETS, dtype=np.float64) * stride  # (15, 2)
    sparse = np.asarray(sparse_points, dtype=np.float64).reshape(-1, 2)
    points = (sparse[:, None, :] + offsets[None, :, :]).reshape(-1, 2)  # (S * 15, 2)
    parent = np.repeat(np.arange(len(sparse)), len(offsets))
    inside = (points >= 0).all(axis=1) & (points[:, 0] < width) & (points[:, 1] < height)
    return points[inside], parent[inside]


def points_covered(points, coverage):
    """Whether each point falls on a covered pixel, pixel = (int(y), int(x)) as TinySAM indexes.

    Args:
        points: (P, 2) float, (x, y) pixels, inside the image.
        coverage: (H, W) bool.

    Returns:
        (P,) bool.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    cols = points[:, 0].astype(np.int64)  # truncation, like int() in TinySAM
    rows = points[:, 1].astype(np.int64)
    return coverage[rows, cols]
