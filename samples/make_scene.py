"""Draws samples/scene.png, the bundled demo image (primitives only, no third-party photo)."""

from pathlib import Path

import cv2
import numpy as np


def draw_scene(height=480, width=640):
    """(H, W, 3) uint8 RGB: sky, ground, sun, house with roof and door, tree."""
    yy = np.arange(height, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(np.array([120, 180, 235], np.float32) + 0.05 * yy, (height, width, 3)).copy()
    image[300:] = (90, 160, 80)
    image = image.astype(np.uint8)
    cv2.circle(image, (540, 90), 45, (250, 220, 90), -1)
    cv2.rectangle(image, (120, 200), (320, 360), (200, 90, 70), -1)
    cv2.fillPoly(image, [np.array([[100, 200], [220, 120], [340, 200]], np.int32)], (120, 60, 50))
    cv2.rectangle(image, (200, 280), (245, 360), (90, 60, 40), -1)
    cv2.rectangle(image, (400, 240), (420, 380), (110, 80, 50), -1)
    cv2.circle(image, (410, 220), 55, (40, 120, 50), -1)
    return image


if __name__ == "__main__":
    out = Path(__file__).with_name("scene.png")
    cv2.imwrite(str(out), cv2.cvtColor(draw_scene(), cv2.COLOR_RGB2BGR))
