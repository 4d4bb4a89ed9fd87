"""Prompt validation and packing into decoder feeds (pure numpy).

User prompts are in the original image's pixel frame; the decoder wants (B, N, 2) points in the
1024 frame with labels, SAM-style: box corners carry labels 2 and 3, and when there is no box one
padding point (0, 0) with label -1 is appended — exactly what SAM's prompt encoder does, so the
ONNX decoder sees the same tokens as `SamPredictor`.
"""

import math
import numbers

import numpy as np

LOW_RES = 256  # side of the decoder's mask_input / low_res_masks
PAD_LABEL = -1.0
BOX_LABELS = (2.0, 3.0)
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Points in one prompt. The decoder attends from every token to the 4096 image positions, about
# 0.5 MiB per point per prompt, so a runaway N would take the machine's memory; SAM prompts have a
# handful of points (its training sampled up to ~10 plus a box).
MAX_PROMPT_POINTS = 1024


def as_float_array(value, name):
    """`value` as a float64 array of finite reals that float32 can hold, or a TypeError /
    ValueError naming `name` (everything reaching the decoder is cast to float32)."""
    not_numeric = f"{name} must be numeric array-like, got {type(value).__name__}"
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):  # e.g. ragged nesting
        raise TypeError(not_numeric) from None
    if array.dtype.kind in "USV" or (array.dtype == object and any(isinstance(v, (str, bytes)) for v in array.flat)):
        raise TypeError(f"{name} must be numeric array-like, got text")  # float64 would parse "10" silently
    if array.dtype == object and any(v is None for v in array.flat):  # float64 would make it NaN
        raise TypeError(f"{name} must be numeric, got None among its values")
    if np.iscomplexobj(array):  # float64 would silently drop the imaginary part
        raise TypeError(f"{name} must be real numbers, got complex values")
    try:
        array = array.astype(np.float64, copy=False)
    except OverflowError:  # Python ints beyond float64
        raise ValueError(f"{name} has a value too large for a float") from None
    except (TypeError, ValueError):
        raise TypeError(not_numeric) from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    if array.size and np.abs(array).max() > FLOAT32_MAX:
        raise ValueError(f"{name} has values beyond float32's range (|x| > {FLOAT32_MAX:.3g})")
    return array


def _check_inside(coords, original_size, name):
    """Raise unless every (x, y) lies in [0, W] x [0, H]."""
    height, width = original_size
    x, y = coords[..., 0], coords[..., 1]
    bad = (x < 0) | (x > width) | (y < 0) | (y > height)
    if bad.any():
        first = coords[bad][0] if coords.ndim > 1 else coords
        raise ValueError(
            f"{name} has {int(bad.sum())} point(s) outside the image (W={width}, H={height}), "
            f"e.g. (x, y) = ({first[0]:g}, {first[1]:g}); coordinates are (x, y) pixels"
        )


def validate_points(point_coords, point_labels, original_size):
    """Check user points and labels.

    Args:
        point_coords: (N, 2) array-like or list of (x, y), original pixel frame; or None.
        point_labels: (N,) array-like of 1 (foreground) / 0 (background); None means all 1.
        original_size: (H, W).

    Returns:
        (coords (N, 2) float64, labels (N,) float32), or (None, None) when point_coords is None.
    """
    if point_coords is None:
        if point_labels is not None:
            raise ValueError("point_labels given without point_coords")
        return None, None
    coords = as_float_array(point_coords, "point_coords")
    if coords.ndim == 1 and coords.shape == (2,):
        coords = coords[None, :]  # a single (x, y)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"point_coords must have shape (N, 2) as (x, y), got {coords.shape}")
    if coords.shape[0] == 0:
        raise ValueError("point_coords has 0 points; pass None when there are no points")
    if coords.shape[0] > MAX_PROMPT_POINTS:
        raise ValueError(f"point_coords has {coords.shape[0]} points; at most {MAX_PROMPT_POINTS} per prompt")
    _check_inside(coords, original_size, "point_coords")
    if point_labels is None:
        labels = np.ones(len(coords), dtype=np.float32)
    else:
        labels = as_float_array(point_labels, "point_labels").reshape(-1)
        if labels.shape[0] != coords.shape[0]:
            raise ValueError(
                f"point_labels must have one label per point: {coords.shape[0]} points, "
                f"got {labels.shape[0]} labels"
            )
        if not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError(f"point_labels must be 1 (foreground) or 0 (background), got {np.unique(labels).tolist()}")
        labels = labels.astype(np.float32)
    return coords, labels


def validate_box(box, original_size):
    """Check a user box.

    Args:
        box: (4,) or (1, 4) array-like XYXY in the original pixel frame, or None.

    Returns:
        (4,) float64 or None.
    """
    if box is None:
        return None
    array = as_float_array(box, "box")
    if array.size != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got shape {array.shape}")
    array = array.reshape(4)
    if array[2] < array[0] or array[3] < array[1]:
        raise ValueError(f"box must have x0 <= x1 and y0 <= y1, got {array.tolist()}")
    _check_inside(array.reshape(2, 2), original_size, "box")
    return array


def validate_mask_input(mask_input):
    """Check a low-res mask prompt (the `low_res_logits` of an earlier predict).

    Args:
        mask_input: (256, 256) or (1, 256, 256) logits, or None.

    Returns:
        (1, 256, 256) float32 or None.
    """
    if mask_input is None:
        return None
    array = as_float_array(mask_input, "mask_input")
    if array.shape not in ((LOW_RES, LOW_RES), (1, LOW_RES, LOW_RES)):
        raise ValueError(f"mask_input must have shape (1, 256, 256) (low-res logits), got {array.shape}")
    return array.reshape(1, LOW_RES, LOW_RES).astype(np.float32)


def pack_prompt(coords_1024, labels, box_1024):
    """One prompt as decoder feeds, with SAM's token order and padding rule.

    Args:
        coords_1024: (N, 2) float32 or None, 1024 frame.
        labels: (N,) float32 or None.
        box_1024: (4,) float32 or None, 1024 frame.

    Returns:
        point_coords (1, M, 2) float32, point_labels (1, M) float32.
    """
    coord_parts, label_parts = [], []
    if coords_1024 is not None:
        coord_parts.append(np.asarray(coords_1024, dtype=np.float32).reshape(-1, 2))
        label_parts.append(np.asarray(labels, dtype=np.float32).reshape(-1))
    if box_1024 is not None:
        coord_parts.append(np.asarray(box_1024, dtype=np.float32).reshape(2, 2))
        label_parts.append(np.array(BOX_LABELS, dtype=np.float32))
    else:
        coord_parts.append(np.zeros((1, 2), dtype=np.float32))
        label_parts.append(np.array([PAD_LABEL], dtype=np.float32))
    return np.concatenate(coord_parts)[None], np.concatenate(label_parts)[None]


def mask_feeds(mask_input, batch):
    """mask_input / has_mask_input feeds for `batch` prompts.

    Args:
        mask_input: (B, 1, 256, 256) or (1, 256, 256) float32, or None.

    Returns:
        mask (B, 1, 256, 256) float32, has_mask (B,) float32.
    """
    if mask_input is None:
        return np.zeros((batch, 1, LOW_RES, LOW_RES), np.float32), np.zeros(batch, np.float32)
    mask = np.broadcast_to(np.asarray(mask_input, np.float32).reshape(-1, 1, LOW_RES, LOW_RES), (batch, 1, LOW_RES, LOW_RES))
    return np.ascontiguousarray(mask), np.ones(batch, np.float32)


def validate_batch(point_coords, point_labels, mask_input=None, long_side=None):
    """Check decoder-ready batched prompts (1024 frame) for `predict_batch`.

    Args:
        point_coords: (B, N, 2) XY, 1024 frame, padding points included by the caller.
        point_labels: (B, N) in {-1, 0, 1, 2, 3}.
        mask_input: (B, 1, 256, 256) or None.
        long_side: side of the frame (1024); when given, every point that is not padding
            (label -1, whose coordinates the decoder ignores) must lie in [0, long_side].

    Returns:
        coords (B, N, 2) float32, labels (B, N) float32, mask (B,1,256,256), has_mask (B,).
    """
    coords = as_float_array(point_coords, "point_coords")
    labels = as_float_array(point_labels, "point_labels")
    if coords.ndim != 3 or coords.shape[2] != 2 or coords.shape[0] == 0 or coords.shape[1] == 0:
        raise ValueError(f"point_coords must have shape (B, N, 2) with B, N >= 1, got {coords.shape}")
    if coords.shape[1] > MAX_PROMPT_POINTS + len(BOX_LABELS):  # a box's 2 corners or the padding point on top
        raise ValueError(
            f"point_coords has N={coords.shape[1]} points per prompt; at most {MAX_PROMPT_POINTS} plus a box's 2 corners"
        )
    if labels.shape != coords.shape[:2]:
        raise ValueError(f"point_labels must have shape {coords.shape[:2]} (B, N), got {labels.shape}")
    if not np.isin(labels, (-1.0, 0.0, 1.0, 2.0, 3.0)).all():
        raise ValueError(f"point_labels must be in {{-1, 0, 1, 2, 3}}, got {np.unique(labels).tolist()}")
    if long_side is not None:
        used = coords[labels != PAD_LABEL]  # (M, 2)
        if ((used < 0) | (used > long_side)).any():
            raise ValueError(
                f"point_coords must be XY in the {long_side} frame, within [0, {long_side}], got values "
                f"from {used.min():g} to {used.max():g}; original-image pixels go through "
                f"preprocess.coords_to_input_frame first"
            )
    if mask_input is not None:
        mask_input = as_float_array(mask_input, "mask_input")
        if mask_input.shape != (coords.shape[0], 1, LOW_RES, LOW_RES):
            raise ValueError(f"mask_input must have shape ({coords.shape[0]}, 1, 256, 256), got {mask_input.shape}")
    mask, has_mask = mask_feeds(mask_input, coords.shape[0])
    return coords.astype(np.float32), labels.astype(np.float32), mask, has_mask


def is_int(value):
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value):
    """True for Python and numpy reals (np.float32(0.8) included), False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_int(value, name, minimum, maximum=None):
    """Raise ValueError naming `name` unless `value` is an int (not a bool) >= `minimum` (and
    <= `maximum` when given)."""
    if maximum is not None and is_int(value) and value > maximum:
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {value!r}")
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def validate_iou_threshold(value):
    """`predict_batch`'s upscale_iou_threshold: None, or a finite real number (returned as float)."""
    if value is None:
        return None
    if not is_real(value):
        raise TypeError(f"upscale_iou_threshold must be None or a number, got {type(value).__name__}")
    try:
        number = float(value)  # any Real (Fraction too); np.isfinite only takes numpy's types
    except OverflowError:  # a Python int beyond float64
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"upscale_iou_threshold must be finite, got {value}")
    if abs(number) > FLOAT32_MAX:  # the graph takes it as float32: it would become inf
        raise ValueError(f"upscale_iou_threshold must be within float32's range (|t| <= {FLOAT32_MAX:.3g}), got {value}")
    return number
