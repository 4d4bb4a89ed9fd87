"""Reading images and writing results (masks, overlays, JSON), every write atomic."""

import contextlib
import json
import struct
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
        ValueError: naming the file: not an image cv2 can decode, or larger than OpenCV's
            pixel limit (with the size its header declares, for PNG and JPEG).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)  # imdecode also handles non-ASCII paths
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error as exc:  # OpenCV raises for some failures (size limit, allocation) instead of returning None
        raise ValueError(f"{path}: {_decode_failure(exc, data)}") from None
    if bgr is None:
        raise ValueError(f"{path}: not a readable image (unsupported format or corrupt file)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode_failure(exc, data):
    """Why cv2.imdecode raised, for a one-line error."""
    text = str(exc).strip()  # not exc.err: it can be left over from an earlier error
    if "CV_IO_MAX_IMAGE" not in text:
        return f"not a readable image (OpenCV: {text.split(' error: ', 1)[-1]})"  # drop the source path
    size = _declared_size(data[:65536].tobytes())
    shown = f": {size[0]}x{size[1]} (HxW) = {size[0] * size[1]} pixels" if size else ""
    return f"image too large to decode{shown}; OpenCV's limit is 2^30 pixels (2^20 per side) by default"


def _declared_size(header):
    """(H, W) that a PNG or JPEG header declares, or None (other formats, truncated headers).

    Read without decoding, so the size of a file too large to decode can still be named.
    """
    if header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR" and len(header) >= 24:
        width, height = struct.unpack(">II", header[16:24])
        return height, width
    if header[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 9 <= len(header) and header[pos] == 0xFF:
        marker, length = header[pos + 1], struct.unpack(">H", header[pos + 2:pos + 4])[0]
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", header[pos + 5:pos + 9])
            return height, width
        pos += 2 + length
    return None


@contextlib.contextmanager
def opencv_log_silenced():
    """Silence OpenCV's own log lines (e.g. `[ERROR:0@..] grfmt_png.cpp ...` for a corrupt file)
    inside the block; the previous level is restored after.

    For the command-line tools, whose one-line error already says what failed. The level is
    process-wide, so library code never calls this.
    """
    api = getattr(getattr(cv2, "utils", None), "logging", None)
    if api is None:  # OpenCV builds without the logging module
        yield
        return
    previous = api.getLogLevel()
    api.setLogLevel(api.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        api.setLogLevel(previous)


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
