"""Reading images and writing results (masks, overlays, JSON), every write atomic."""

import json
from pathlib import Path

import cv2
import numpy as np

from tinysam_rt.atomic import atomic_write_bytes


def load_image(path):
    """Read an image file as (H, W, 3) uint8 RGB.

    EXIF orientation is applied; 16-bit files are scaled to 8 bits; grayscale is expanded to 3
    channels and alpha is dropped (all done by cv2's IMREAD_COLOR).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an image cv2 can decode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)  # imdecode also handles non-ASCII paths
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ValueError(f"{path}: not a readable image (unsupported format or corrupt file)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_png(image):
    """PNG bytes of (H, W) uint8/bool or (H, W, 3) uint8 RGB."""
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"cannot encode array of shape {array.shape} as PNG")
    return buffer.tobytes()


def write_png(path, image):
    """Write (H, W) mask or (H, W, 3) RGB image as PNG, atomically."""
    atomic_write_bytes(path, encode_png(image))


def encode_json(obj):
    """UTF-8 bytes of `obj` as indented JSON."""
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, encode_json(obj))


def overlay_masks(image, masks, colors=None, alpha=0.5):
    """Blend coloured masks over an image.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (K, H, W) bool; later masks are drawn over earlier ones.
        colors: (K, 3) uint8 RGB; default: a fixed, well-spread palette.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    masks = np.asarray(masks, dtype=bool)
    if colors is None:
        colors = palette(len(masks))
    out = image.astype(np.float32)
    for mask, color in zip(masks, colors):
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
        edges = mask ^ cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        out[edges] = color  # a crisp outline makes adjacent masks readable
    return np.clip(out, 0, 255).astype(np.uint8)


def palette(count):
    """(count, 3) uint8 RGB colours spread around the hue circle (golden-ratio steps)."""
    if count == 0:
        return np.zeros((0, 3), np.uint8)  # cv2.cvtColor refuses empty input (everything mode may find no mask)
    hues = (np.arange(count) * 0.618033988749895 % 1.0 * 180).astype(np.uint8)  # cv2 hue is 0..179
    hsv = np.stack([hues, np.full(count, 200, np.uint8), np.full(count, 255, np.uint8)], axis=1)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]
