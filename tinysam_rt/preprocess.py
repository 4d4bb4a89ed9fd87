"""Image preprocessing and coordinate transforms (pure numpy).

SAM's recipe, which TinySAM keeps: resize the longest side to 1024 with PIL's antialiased bilinear
filter, normalise with the pixel mean/std, pad bottom-right with zeros to 1024x1024. Point and box
coordinates move into that "1024 frame" by scaling x and y separately.
"""

import os

import numpy as np

# PIL's fixed-point precision for 8-bit resampling (32 bits - 8 bits of pixel - 2 guard bits).
_PRECISION_BITS = 22
MIN_IMAGE_SIDE = 2  # pixels; also the smallest crop everything mode's crop layers may cut


def check_image(image, name="image"):
    """Validate a user image and return it as a (H, W, 3) uint8 array (no copy when possible).

    Args:
        image: (H, W, 3) uint8, RGB. Strided views and read-only arrays are fine.

    Raises:
        TypeError: not a numpy array, or not uint8.
        ValueError: wrong rank or channel count, or a side below 2 pixels.
    """
    if not isinstance(image, np.ndarray):
        hint = ""
        if isinstance(image, (str, os.PathLike)):
            hint = f" {os.fspath(image)!r}; read an image file with tinysam_rt.io.load_image(path)"
            if os.path.isdir(image):
                hint = f" {os.fspath(image)!r}, a directory (a model directory? pass it as model_dir=)"
        raise TypeError(f"{name} must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}{hint}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ValueError(
            f"{name} must have 3 channels (H, W, 3) RGB, got shape {image.shape} (grayscale?); "
            f"use np.repeat(gray[..., None], 3, axis=2)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (RGBA? drop alpha with image[..., :3])" if image.ndim == 3 and image.shape[2] == 4 else ""
        raise ValueError(f"{name} must have shape (H, W, 3) RGB, got {image.shape}{hint}")
    if image.dtype != np.uint8:
        raise TypeError(
            f"{name} must be uint8 in [0, 255], got dtype {image.dtype}; "
            f"convert e.g. with np.clip(img * 255, 0, 255).astype(np.uint8) for floats in [0, 1]"
        )
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"{name} must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels, got {image.shape[0]}x{image.shape[1]}"
        )
    return image


def preprocess_shape(height, width, long_side):
    """Size after resizing the longest side to `long_side`, keeping aspect ratio (SAM's rule).

    Returns:
        (new_h, new_w) ints, each rounded half up.

    Raises:
        ValueError: a side would become 0 pixels (aspect ratio beyond long_side:1).
    """
    scale = long_side / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    if min(new_h, new_w) < 1:
        raise ValueError(
            f"image of {height}x{width} is too elongated: its short side would be 0 px after "
            f"resizing the long side to {long_side}"
        )
    return new_h, new_w


def _resample_taps(in_size, out_size):
    """Per-output-pixel source indices and fixed-point weights of PIL's bilinear filter.

    Returns:
        index (out_size, T) int64 into [0, in_size); weight (out_size, T) int32 fixed point
        (unused taps have weight 0). Downscaling widens the triangle (antialiasing).
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale  # bilinear's support is 1, stretched when downscaling
    centers = (np.arange(out_size) + 0.5) * scale
    lo = np.clip((centers - support + 0.5).astype(np.int64), 0, in_size)
    hi = np.clip((centers + support + 0.5).astype(np.int64), 0, in_size)
    taps = int((hi - lo).max())
    index = lo[:, None] + np.arange(taps)[None, :]  # (out, T)
    valid = index < hi[:, None]
    distance = (index - centers[:, None] + 0.5) / filter_scale
    weight = np.where(valid, np.clip(1.0 - np.abs(distance), 0.0, None), 0.0)
    weight /= weight.sum(axis=1, keepdims=True)
    fixed = np.round(weight * (1 << _PRECISION_BITS)).astype(np.int32)  # PIL rounds half away; weights >= 0
    return np.minimum(index, in_size - 1), fixed


def _resample_axis(image, out_size, axis):
    """Resample (H, W, C) uint8 along `axis` (0 or 1) with PIL's 8-bit bilinear arithmetic."""
    index, weight = _resample_taps(image.shape[axis], out_size)
    out_shape = list(image.shape)
    out_shape[axis] = out_size
    acc = np.full(out_shape, 1 << (_PRECISION_BITS - 1), dtype=np.int32)  # rounding offset
    shape = [1, 1, 1]
    shape[axis] = out_size
    for tap in range(index.shape[1]):
        acc += np.take(image, index[:, tap], axis=axis).astype(np.int32) * weight[:, tap].reshape(shape)
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_longest_side(image, long_side):
    """Resize so the longest side is `long_side`, as SAM's ResizeLongestSide.apply_image does.

    Matches PIL's antialiased bilinear resize (horizontal pass, then vertical, 8-bit between).

    Args:
        image: (H, W, 3) uint8.

    Returns:
        (h, w, 3) uint8 with (h, w) = preprocess_shape(H, W, long_side).
    """
    new_h, new_w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    out = image
    if new_w != image.shape[1]:
        out = _resample_axis(out, new_w, axis=1)
    if new_h != image.shape[0]:
        out = _resample_axis(out, new_h, axis=0)
    return np.ascontiguousarray(out)


def normalize_pad(resized, pixel_mean, pixel_std, long_side, pad_value=0.0):
    """Normalise and pad bottom-right into the encoder's input tensor.

    Args:
        resized: (h, w, 3) uint8 with h, w <= long_side.
        pixel_mean, pixel_std: 3 floats each, RGB order, 0..255 scale.

    Returns:
        (1, 3, long_side, long_side) float32, NCHW.
    """
    h, w = resized.shape[:2]
    mean = np.asarray(pixel_mean, dtype=np.float32)
    std = np.asarray(pixel_std, dtype=np.float32)
    out = np.full((1, 3, long_side, long_side), pad_value, dtype=np.float32)
    out[0, :, :h, :w] = ((resized.astype(np.float32) - mean) / std).transpose(2, 0, 1)  # (3, h, w)
    return out


def coords_to_input_frame(coords, original_size, long_side):
    """Move (x, y) pixel coordinates from the original image into the resized (1024) frame.

    Args:
        coords: (..., 2) float, (x, y) in the original image.
        original_size: (H, W) of the original image.

    Returns:
        (..., 2) float32 coords_1024.
    """
    height, width = original_size
    new_h, new_w = preprocess_shape(height, width, long_side)
    scale = np.array([new_w / width, new_h / height], dtype=np.float64)
    return (np.asarray(coords, dtype=np.float64) * scale).astype(np.float32)


def boxes_to_input_frame(boxes, original_size, long_side):
    """Move (x0, y0, x1, y1) boxes into the 1024 frame.

    Args:
        boxes: (..., 4) float, XYXY in the original image.

    Returns:
        (..., 4) float32 boxes_1024.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    corners = coords_to_input_frame(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side)
    return corners.reshape(boxes.shape).astype(np.float32)
