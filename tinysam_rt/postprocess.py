"""Low-res logits -> masks in the user's frame (pure numpy + cv2).

Follows SAM's `postprocess_masks`: bilinear upsample 256 -> 1024, crop the padding away, bilinear
resize to the original (H, W). cv2's INTER_LINEAR on float32 uses the same half-pixel sampling as
torch's `interpolate(mode="bilinear", align_corners=False)`.
"""

import cv2
import numpy as np

_CV_MAX_CHANNELS = 512  # cv2.resize handles at most this many channels per call


def _resize_channels_last(planes, size_hw):
    """Bilinear-resize (h, w, K) float32 to (H, W, K) in chunks cv2 accepts."""
    height, width = size_hw
    chunks = []
    for start in range(0, planes.shape[2], _CV_MAX_CHANNELS):
        chunk = np.ascontiguousarray(planes[:, :, start:start + _CV_MAX_CHANNELS])
        out = cv2.resize(chunk, (width, height), interpolation=cv2.INTER_LINEAR)
        chunks.append(out.reshape(height, width, -1))  # cv2 drops a single channel axis
    return np.concatenate(chunks, axis=2)


def upscale_logits(low_res, input_size, original_size, image_size=1024):
    """Low-res mask logits to logits at the original image size.

    Args:
        low_res: (B, C, 256, 256) float32 logits, 1024 frame (padded).
        input_size: (h, w) of the resized image inside the 1024 frame.
        original_size: (H, W) of the user's image.

    Returns:
        (B, C, H, W) float32 logits.
    """
    batch, channels = low_res.shape[:2]
    planes = low_res.reshape(batch * channels, *low_res.shape[2:]).transpose(1, 2, 0)  # (256, 256, K)
    padded = _resize_channels_last(planes.astype(np.float32), (image_size, image_size))  # (1024, 1024, K)
    cropped = padded[: input_size[0], : input_size[1]]
    full = _resize_channels_last(cropped, original_size)  # (H, W, K)
    return np.ascontiguousarray(full.transpose(2, 0, 1)).reshape(batch, channels, *original_size)


def select_best(iou_predictions):
    """Index of the highest predicted IoU per prompt.

    Args:
        iou_predictions: (B, C).

    Returns:
        (B,) int64.
    """
    return np.argmax(iou_predictions, axis=1)
