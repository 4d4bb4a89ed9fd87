"""Calibration data for `tinysam quantize`: real images and the prompts the runtime sends.

Encoder calibration feeds are made by the runtime's own preprocessing (`tinysam_rt.preprocess`,
the functions `TinySAMPredictor` uses), so the INT8 ranges are measured on exactly the numbers
the encoder sees in production. Decoder calibration feeds cover every prompt shape the runtime
builds with `tinysam_rt.prompts.pack_prompt` — single points, several points, boxes, a point
plus a box, everything-mode grid points, and mask refinement — in the 1024 frame, with SAM's
padding point wherever there is no box.

No torch here: numpy, cv2 (through tinysam_rt.io) and onnxruntime's reader interface only.
"""

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from tinysam_rt import amg, io, manifest, preprocess, prompts


@dataclass(frozen=True)
class CalibrationImage:
    """One calibration image file, validated (it decodes) and fingerprinted."""

    path: Path
    sha256: str  # of the file's bytes, recorded in the INT8 manifest
    original_size: tuple  # (H, W)


@dataclass(frozen=True)
class PromptSampling:
    """How many prompts of each kind are drawn per image (decoder calibration and evaluation)."""

    points: int = 8  # single foreground points (+ SAM's padding point)
    multi_points: int = 4  # 2 foreground + 1 background point (+ padding point)
    boxes: int = 4  # boxes alone (corner labels 2, 3; no padding point)
    point_boxes: int = 2  # one foreground point inside a box
    grid_per_side: int = 4  # everything mode: grid_per_side**2 grid points (+ padding point)
    refinements: int = 2  # single points re-run with the previous best low-res mask as mask_input
    batch: int = 8  # prompts per decoder run (calibration memory grows with B)


def list_images(source):
    """The calibration files named by a directory or a glob pattern, sorted.

    A directory contributes every non-hidden regular file in it (not recursive): a stray
    non-image file is an error later, not silently skipped.

    Args:
        source: str or Path, a directory or a glob such as "photos/*.jpg".

    Raises:
        FileNotFoundError: the directory does not exist / the pattern matches no file.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"calibration directory {path} holds no files")
        return files
    if any(ch in str(source) for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(source)) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"calibration pattern {source!r} matches no file")
        return files
    raise FileNotFoundError(f"calibration source {source} is neither a directory nor a glob pattern")


def load_images(paths, min_images):
    """Check that every file is a readable image and that there are enough of them.

    Each image is decoded once here (then dropped) so a bad file fails before any slow step.

    Args:
        paths: sequence of Paths (from `list_images`).
        min_images: int, how many images the caller needs in total.

    Returns:
        list of CalibrationImage, in the order of `paths`.

    Raises:
        ValueError: naming a file cv2 cannot decode, or saying how many images were found.
    """
    if len(paths) < min_images:
        raise ValueError(
            f"calibration needs at least {min_images} images, got {len(paths)} "
            f"({', '.join(p.name for p in paths) or 'none'})"
        )
    images = []
    for path in paths:
        try:
            image = io.load_image(path)
        except ValueError as exc:  # its message: "<path>: <reason>", e.g. corrupt or too large
            reason = str(exc).removeprefix(f"{path}: ")
            raise ValueError(
                f"calibration file {path} is not an image cv2 can decode: {reason}; "
                f"the calibration folder must hold only images"
            ) from None
        # The runtime's own check (e.g. a side below 2 pixels), named here before any slow step.
        preprocess.check_image(image, name=f"calibration file {path}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        images.append(CalibrationImage(path, digest, tuple(image.shape[:2])))
    return images


def encoder_input(image, pre):
    """The encoder feed for one image, made exactly as `TinySAMPredictor` makes it.

    Args:
        image: (H, W, 3) uint8 RGB.
        pre: tinysam_rt.manifest.Preprocess of the model.

    Returns:
        tensor (1, 3, S, S) float32 normalised and padded (S = pre.image_size);
        input_size (h, w) of the resized image inside the S x S frame.
    """
    resized = preprocess.resize_longest_side(image, pre.image_size)  # (h, w, 3)
    tensor = preprocess.normalize_pad(resized, pre.pixel_mean, pre.pixel_std, pre.image_size, pre.pad_value)
    return tensor, tuple(resized.shape[:2])


def synthetic_image(height, width, seed):
    """A structured (H, W, 3) uint8 RGB image: gradients, solid discs and noise.

    Held-out evaluation uses these beside real photos: they stress flat regions and hard edges.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    image = np.stack([xx / (width - 1), yy / (height - 1), 0.5 + 0.0 * xx], axis=-1) * 200  # (H, W, 3)
    for _ in range(5):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.08, 0.3) * min(height, width)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < radius * radius] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _points(rng, count, input_size):
    """(count, 2) float32 (x, y) uniform inside the resized image, 1024 frame."""
    h, w = input_size
    return (rng.uniform(0, 1, (count, 2)) * np.array([w, h])).astype(np.float32)


def _box(rng, input_size):
    """(4,) float32 XYXY box inside the resized image, 1024 frame, at least 2% of each side."""
    h, w = input_size
    x = np.sort(rng.uniform(0, w, 2))
    y = np.sort(rng.uniform(0, h, 2))
    x[1], y[1] = max(x[1], min(x[0] + 0.02 * w, w)), max(y[1], min(y[0] + 0.02 * h, h))
    return np.array([x[0], y[0], x[1], y[1]], dtype=np.float32)


def _stack(packed):
    """Stack `pack_prompt` outputs of equal N into (B, N, 2) coords and (B, N) labels."""
    coords = np.concatenate([c for c, _ in packed])  # (B, N, 2)
    labels = np.concatenate([l for _, l in packed])  # (B, N)
    return coords, labels


def sample_prompts(input_size, rng, sampling):
    """Prompts of every kind the runtime sends, packed as decoder feeds.

    Args:
        input_size: (h, w) of the resized image in the 1024 frame.
        rng: numpy Generator.
        sampling: PromptSampling.

    Returns:
        list of (kind str, coords (B, N, 2) float32 XY 1024 frame, labels (B, N) float32);
        prompts of one kind share N, each list item holds at most `sampling.batch` prompts.
        Kind "refine" items must be fed with the previous best mask as mask_input.
    """
    h, w = input_size
    groups = {
        "point": [prompts.pack_prompt(p[None], np.ones(1, np.float32), None) for p in _points(rng, sampling.points, input_size)],
        "multi_point": [
            prompts.pack_prompt(_points(rng, 3, input_size), np.array([1, 1, 0], np.float32), None)
            for _ in range(sampling.multi_points)
        ],
        "box": [prompts.pack_prompt(None, None, _box(rng, input_size)) for _ in range(sampling.boxes)],
        "point_box": [],
        "grid": [],
        "refine": [prompts.pack_prompt(p[None], np.ones(1, np.float32), None) for p in _points(rng, sampling.refinements, input_size)],
    }
    for _ in range(sampling.point_boxes):
        box = _box(rng, input_size)
        inside = np.array([[rng.uniform(box[0], box[2]), rng.uniform(box[1], box[3])]], np.float32)  # (1, 2)
        groups["point_box"].append(prompts.pack_prompt(inside, np.ones(1, np.float32), box))
    # Everything mode scales the unit grid to the image and moves it into the 1024 frame,
    # which for the full image is the same as scaling by the resized (w, h).
    grid = (amg.build_point_grid(sampling.grid_per_side) * np.array([w, h])).astype(np.float32)  # (G, 2)
    groups["grid"] = [prompts.pack_prompt(p[None], np.ones(1, np.float32), None) for p in grid]
    batches = []
    for kind, packed in groups.items():
        for start in range(0, len(packed), sampling.batch):
            batches.append((kind, *_stack(packed[start:start + sampling.batch])))
    return batches


def decoder_feeds(embeddings, coords, labels, mask_input=None):
    """One decoder feed dict (the contract's input names).

    Args:
        embeddings: (1, 256, 64, 64) float32.
        coords: (B, N, 2) float32, 1024 frame; labels: (B, N) float32.
        mask_input: (B, 1, 256, 256) float32 low-res logits, or None.
    """
    mask, has_mask = prompts.mask_feeds(mask_input, coords.shape[0])
    return {
        "image_embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": mask,
        "has_mask_input": has_mask,
    }


def points_decoder_feed(feed):
    """The points decoder's feed for a decoder feed without a mask input (the prompts the runtime
    sends it): every mask computed, the image side computed in the call.

    Args:
        feed: a `decoder_feeds` dict whose has_mask_input is all 0.
    Returns:
        dict of the points decoder contract's inputs (manifest.POINTS_DECODER_INPUTS).
    """
    gate, (cache, (_, *cache_shape)) = manifest.POINTS_DECODER_GATE[0], manifest.POINTS_DECODER_CACHE
    return {
        **{name: feed[name] for name, _ in manifest.POINTS_DECODER_BASIC_INPUTS},
        gate: np.array(-np.inf, np.float32),  # no prompt skips the upscaler
        cache: np.zeros((0, *cache_shape), np.float32),  # empty: compute the image side
    }


class FeedReader(CalibrationDataReader):
    """ORT calibration reader over feeds made on demand, one at a time.

    `set_range` lets quantize_static collect statistics in strides of one feed, so the
    calibrator never holds more than one feed's intermediate tensors in memory (the histogram
    calibrators otherwise keep all of them: several GB for the 1024x1024 encoder).
    """

    def __init__(self, count, make_feed):
        """
        Args:
            count: number of feeds.
            make_feed: callable index -> feed dict.
        """
        self._count = count
        self._make_feed = make_feed
        self._next, self._end = 0, count

    def __len__(self):
        return self._count

    def set_range(self, start_index, end_index):
        self._next, self._end = start_index, min(end_index, self._count)

    def rewind(self):
        self.set_range(0, self._count)

    def get_next(self):
        if self._next >= self._end:
            return None
        self._next += 1
        return self._make_feed(self._next - 1)
