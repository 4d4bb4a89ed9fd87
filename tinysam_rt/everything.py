"""Everything mode: masks for a whole image from grids of point prompts.

Two strategies over the same batched decoder:

- standard (SAM's `SamAutomaticMaskGenerator`): an N x N grid, optional crop layers, IoU and
  stability filters, box NMS, optional small-region clean-up;
- hierarchical (TinySAM's `SamHierarchicalMaskGenerator.hierarchical_generate`): a sparse
  (N // 4)^2 grid first; pixels where a surviving sparse mask has logits > `high_score_thresh`
  are "covered"; dense points on covered pixels are skipped; sparse and dense masks are merged
  and NMS'd once.

Memory stays bounded: each batch is filtered at the decoder's 256 x 256 logit resolution and only
the candidates are upsampled to the image size, a few at a time, then run-length encoded at once.

Filtering at low resolution, and why it still gives SAM's answer: SAM computes the stability
score on logits upsampled to the image size. Here it is first computed on the 256 x 256 logits
(inside the unpadded area) as a prefilter: masks below `stability_score_thresh -
stability_prefilter_margin` are dropped there; the rest are upsampled and filtered again on the
exact full-resolution score, which is also the score recorded. The two scores differ by the
bilinear blur along the mask boundary: measured |difference| <= 0.003 on 300 smooth random logit
fields (benchmarks/RESULTS.md); on the checkerboard-noise logits of random weights the low-res
score is the higher one (by up to 0.18), so the prefilter only lets extra candidates through.
With the default margin of 0.05 the result is SAM's; a margin of 1.0 upsamples every IoU survivor
(exact by construction, slower).
"""

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from tinysam_rt import amg, postprocess, preprocess, sysinfo
from tinysam_rt.prompts import PAD_LABEL, as_float_array, check_int, is_real

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
DENSE_POINT_MODES = ("tinysam", "grid")
SPARSE_DIVISOR = 4  # TinySAM: the sparse grid has points_per_side // 4 points per side
# Float32 bytes of upsampled logits held at once (intermediate 1024 x 1024 + image-size planes).
UPSCALE_BUDGET_BYTES = 96 << 20
# Bounds that catch typos before they take the machine: 1024 per side is a million prompts per
# crop (hours at ~60 prompts/s; SAM's default is 32); a batch's outputs take 768 KiB per prompt.
MAX_POINTS_PER_SIDE = 1024
MAX_POINTS_PER_BATCH = 1024


def _float(value):
    """A real number (numpy scalars and Fractions included) as a Python float (inf beyond float64),
    or None for anything else; configs keep floats so every comparison with arrays stays numeric."""
    if not is_real(value):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _check_fraction(config, name):
    value = _float(getattr(config, name))
    if value is None or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {getattr(config, name)!r}")
    object.__setattr__(config, name, value)


@dataclass(frozen=True)
class AmgConfig:
    """Parameters of everything mode; names and defaults are SAM's `SamAutomaticMaskGenerator`'s."""

    points_per_side: Optional[int] = 32  # int: grid points per image side (N x N prompts); None: use point_grids
    points_per_batch: int = 16  # prompts per decoder run; not SAM's 64: measured, the FP32 decoder's time
    # per prompt is flat from 1 to 128 while ORT's peak memory grows with it (32x32 run: 0.9 GiB at 16, 2.3 at 64)
    pred_iou_thresh: float = 0.88  # keep masks whose predicted IoU is > this (0 disables), in [0, 1]
    stability_score_thresh: float = 0.95  # keep masks whose stability score is >= this (0 disables)
    stability_score_offset: float = 1.0  # logit shift of the two cut-offs the stability score compares
    box_nms_thresh: float = 0.7  # box IoU above which the lower-IoU-score mask of a crop is dropped
    crop_n_layers: int = 0  # extra crop layers; layer i runs on (2**i)**2 overlapping crops
    crop_nms_thresh: float = 0.7  # box IoU for removing duplicates between crops (smaller crops win)
    crop_overlap_ratio: float = 512 / 1500  # crop overlap in layer 1, as a fraction of the short side
    crop_n_points_downscale_factor: int = 1  # layer i uses points_per_side / factor**i points per side
    point_grids: Optional[tuple] = None  # tuple of (P, 2) (x, y) grids in [0, 1], one per layer; instead of points_per_side
    min_mask_region_area: int = 0  # > 0: fill holes and drop islands smaller than this many pixels
    output_mode: str = "binary_mask"  # "binary_mask" (H, W) bool | "uncompressed_rle" | "coco_rle" (string counts)
    stability_prefilter_margin: float = 0.05  # not SAM's: low-res stability below thresh - margin is dropped
    # without upsampling (see the module docstring); 1.0 upsamples every IoU survivor
    decoder_workers: int = 1  # not SAM's: > 1 runs that many batches of points_per_batch side by side on
    # single-thread decoder sessions (`predict_batch(workers=)`): faster on 2+ cores, each batch in
    # flight takes its own decoder memory; same results as 1 (float noise where a last, short batch splits otherwise)

    def __post_init__(self):
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError(
                f"exactly one of points_per_side and point_grids must be given, got "
                f"points_per_side={self.points_per_side!r} and point_grids={'None' if self.point_grids is None else '...'}"
            )
        check_int(self.crop_n_layers, "crop_n_layers", 0)
        check_int(self.crop_n_points_downscale_factor, "crop_n_points_downscale_factor", 1)
        if self.points_per_side is not None:
            check_int(self.points_per_side, "points_per_side", 1, MAX_POINTS_PER_SIDE)
            last = int(self.points_per_side / self.crop_n_points_downscale_factor**self.crop_n_layers)
            if last < 1:  # SAM's own grid code divides by zero here
                raise ValueError(
                    f"crop layer {self.crop_n_layers} would get 0 points per side: points_per_side="
                    f"{self.points_per_side} / crop_n_points_downscale_factor={self.crop_n_points_downscale_factor}"
                    f"**{self.crop_n_layers} < 1; use fewer crop layers or a smaller factor"
                )
        else:
            if isinstance(self.point_grids, (str, bytes)) or not isinstance(self.point_grids, (tuple, list, np.ndarray)):
                raise TypeError(f"point_grids must be a tuple of (P, 2) arrays, one per crop layer, "
                                f"got {type(self.point_grids).__name__}")
            grids = tuple(as_float_array(g, f"point_grids[{i}]") for i, g in enumerate(self.point_grids))
            if len(grids) != self.crop_n_layers + 1 or any(g.ndim != 2 or g.shape[1] != 2 or len(g) == 0 for g in grids):
                raise ValueError(
                    f"point_grids must be {self.crop_n_layers + 1} non-empty (P, 2) arrays (one per crop layer), "
                    f"got shapes {[g.shape for g in grids]}"
                )
            if any(((g < 0) | (g > 1)).any() for g in grids):
                raise ValueError("point_grids must hold normalised (x, y) in [0, 1]")
            object.__setattr__(self, "point_grids", grids)
        check_int(self.points_per_batch, "points_per_batch", 1, MAX_POINTS_PER_BATCH)
        check_int(self.decoder_workers, "decoder_workers", 1, sysinfo.max_threads())  # a thread each
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh",
                     "stability_prefilter_margin"):
            _check_fraction(self, name)
        offset = _float(self.stability_score_offset)
        if offset is None or not 0.0 <= offset < math.inf:
            raise ValueError(f"stability_score_offset must be a finite number >= 0, got {self.stability_score_offset!r}")
        object.__setattr__(self, "stability_score_offset", offset)
        check_int(self.min_mask_region_area, "min_mask_region_area", 0)
        overlap = _float(self.crop_overlap_ratio)
        if overlap is None or not 0.0 <= overlap < 1.0:
            raise ValueError(f"crop_overlap_ratio must be a number in [0, 1), got {self.crop_overlap_ratio!r}")
        object.__setattr__(self, "crop_overlap_ratio", overlap)
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}")

    def layer_grids(self):
        """Normalised point grids per crop layer: list of (P_i, 2) float64 (x, y) in [0, 1]."""
        if self.point_grids is not None:
            return list(self.point_grids)
        return amg.build_all_layer_point_grids(self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor)


@dataclass(frozen=True)
class HierarchicalConfig:
    """TinySAM's hierarchical strategy; used together with an AmgConfig (its points_per_side)."""

    high_score_thresh: float = 8.5  # logit above which a surviving sparse mask marks a pixel covered (TinySAM's name)
    dense_points: str = "tinysam"  # "tinysam": the published neighbours at {-1,0,1,2} strides of
    # each sparse point; "grid": the exact points_per_side grid (SAM's points), minus covered ones

    def __post_init__(self):
        value = _float(self.high_score_thresh)
        if value is None or not math.isfinite(value):
            raise ValueError(f"high_score_thresh must be a finite number (a logit), got {self.high_score_thresh!r}")
        object.__setattr__(self, "high_score_thresh", value)
        if self.dense_points not in DENSE_POINT_MODES:
            raise ValueError(f"dense_points must be one of {DENSE_POINT_MODES}, got {self.dense_points!r}")


@dataclass(frozen=True)
class EverythingStats:
    """What a run did (for users comparing strategies, and for benchmarks)."""

    mode: str  # "standard", "hierarchical-tinysam" or "hierarchical-grid"
    points_run: int  # prompts that went through the decoder, all passes and crops
    points_upscaled: int  # of those, prompts whose masks the decoder computed: the points decoder
    #                       skips the mask upscaler when all 3 IoUs are <= pred_iou_thresh
    decoder_calls: int  # predict_batch calls
    decoder_seconds: float  # wall time inside predict_batch
    sparse_points: int  # hierarchical: prompts of the sparse pass (0 in standard mode)
    dense_candidates: int  # hierarchical: dense points considered
    dense_skipped: int  # hierarchical: dense points skipped because they were covered
    covered_fraction: float  # hierarchical: fraction of image pixels covered after the sparse pass
    masks_before_nms: int  # masks that passed the IoU, stability and crop-edge filters
    masks: int  # records returned


@dataclass(frozen=True)
class EverythingResult:
    records: list  # SAM's records (see TinySAMAutomaticMaskGenerator.generate)
    stats: EverythingStats


def check_configs(config, hierarchical):
    """Check an AmgConfig / HierarchicalConfig pair (each is valid alone; some pairs are not).

    Raises:
        TypeError: wrong config types.
        ValueError: hierarchical mode with points_per_side < 4, point_grids or crop layers.
    """
    if not isinstance(config, AmgConfig):
        raise TypeError(f"config must be an AmgConfig, got {type(config).__name__}")
    if hierarchical is None:
        return
    if not isinstance(hierarchical, HierarchicalConfig):
        raise TypeError(f"hierarchical must be a HierarchicalConfig or None, got {type(hierarchical).__name__}")
    if config.points_per_side is None or config.points_per_side < SPARSE_DIVISOR:
        raise ValueError(
            f"hierarchical mode needs points_per_side >= {SPARSE_DIVISOR} (the sparse grid has "
            f"points_per_side // {SPARSE_DIVISOR} per side), got {config.points_per_side!r}"
        )
    if config.crop_n_layers != 0:
        raise ValueError(f"hierarchical mode runs on the whole image only: crop_n_layers must be 0, got {config.crop_n_layers}")


def _check_crop_sizes(crop_boxes, orig_size, crop_n_layers):
    """Refuse crop layers that cut the image into crops the encoder cannot take, before any decoding.

    Raises:
        ValueError: a crop side below preprocess.MIN_IMAGE_SIDE, naming crop_n_layers and the image size.
    """
    sides = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in crop_boxes]
    smallest = min(sides, key=min)
    if min(smallest) < preprocess.MIN_IMAGE_SIDE:
        raise ValueError(
            f"crop_n_layers={crop_n_layers} cuts this {orig_size[0]}x{orig_size[1]} image into crops as small as "
            f"{smallest[0]}x{smallest[1]} pixels; crops must be at least {preprocess.MIN_IMAGE_SIDE}x"
            f"{preprocess.MIN_IMAGE_SIDE}: use fewer crop layers for an image this small"
        )


def _low_res_valid(input_size, low_res_side, long_side):
    """(rows, cols) of the low-res logits that cover the unpadded image (ceil, so edges count)."""
    scale = low_res_side / long_side
    return math.ceil(input_size[0] * scale), math.ceil(input_size[1] * scale)


class _Counter:
    """Prompt and decoder-call tallies of one run, plus the caller's progress callback."""

    def __init__(self, progress, total):
        self.progress, self.total = progress, total
        self.points = self.upscaled = self.calls = 0
        self.seconds = 0.0

    def add(self, points, seconds, upscaled):
        self.points += points
        self.upscaled += upscaled
        self.calls += 1
        self.seconds += seconds
        if self.progress is not None:
            self.progress(self.points, self.total)


class TinySAMAutomaticMaskGenerator:
    """Segment everything in an image with a TinySAMPredictor (SAM's AMG API).

    Example::

        generator = TinySAMAutomaticMaskGenerator(TinySAMPredictor(), AmgConfig(points_per_side=32))
        records = generator.generate(image)                      # SAM's standard grid
        hier = TinySAMAutomaticMaskGenerator(predictor, hierarchical=HierarchicalConfig())
        result = hier.run(image)                                 # records + stats.points_run

    The predictor's current image is left alone: embeddings come from `predictor.embed` (cached)
    and are passed to `predict_batch` explicitly.
    """

    def __init__(self, predictor, config=None, hierarchical=None):
        """
        Args:
            predictor: a TinySAMPredictor (anything with `embed`, `predict_batch` and a `manifest`;
                its `predict_batch` is passed `workers=` only when config.decoder_workers > 1).
            config: AmgConfig; default AmgConfig().
            hierarchical: HierarchicalConfig to use TinySAM's hierarchical strategy, or None.
        """
        config = AmgConfig() if config is None else config
        check_configs(config, hierarchical)
        self.predictor = predictor
        self.config = config
        self.hierarchical = hierarchical

    def generate(self, image, progress=None):
        """Masks for everything in `image`, as `SamAutomaticMaskGenerator.generate` returns them.

        Args:
            image: (H, W, 3) uint8 RGB.
            progress: optional callable(points_done, points_total), called after each decoder
                batch (in hierarchical mode the total grows once the dense points are known).

        Returns:
            list of dicts, best first, with SAM's fields: `segmentation` ((H, W) bool, or an RLE
            dict per `output_mode`), `area` (int), `bbox` ([x, y, w, h] ints), `predicted_iou`,
            `point_coords` ([[x, y]] original pixels), `stability_score`, `crop_box` (XYWH).
        """
        return self.run(image, progress).records

    def run(self, image, progress=None):
        """Like `generate`, but returns an EverythingResult (records + EverythingStats)."""
        image = preprocess.check_image(image)
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be None or a callable(points_done, points_total), got {type(progress).__name__}")
        if self.hierarchical is None:
            data, stats = self._generate_standard(image, progress)
        else:
            data, stats = self._generate_hierarchical(image, progress)
        if self.config.min_mask_region_area > 0:
            data = self._remove_small_regions(data)
        records = self._records(data)
        return EverythingResult(records, EverythingStats(**stats, masks=len(records)))

    # -- strategies ------------------------------------------------------------------------------

    def _generate_standard(self, image, progress):
        cfg = self.config
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = amg.generate_crop_boxes(orig_size, cfg.crop_n_layers, cfg.crop_overlap_ratio)
        _check_crop_sizes(crop_boxes, orig_size, cfg.crop_n_layers)
        grids = cfg.layer_grids()
        counter = _Counter(progress, sum(len(grids[layer]) for layer in layer_idxs))
        data, masks_before_nms = amg.MaskData(), 0
        for crop_box, layer in zip(crop_boxes, layer_idxs):
            x0, y0, x1, y1 = crop_box
            points = grids[layer] * np.array([x1 - x0, y1 - y0])  # (P, 2) crop pixels
            crop_data = self._run_points(image[y0:y1, x0:x1], points, crop_box, orig_size, counter)
            masks_before_nms += len(crop_data)
            crop_data.filter(amg.nms(crop_data["boxes"], crop_data["iou_preds"], cfg.box_nms_thresh))
            data.cat(self._uncrop(crop_data, crop_box))
        if len(crop_boxes) > 1:  # duplicates between crops: prefer masks from smaller crops
            data.filter(amg.nms(data["boxes"], 1.0 / amg.box_area(data["crop_boxes"]), cfg.crop_nms_thresh))
        return data, self._stats("standard", counter, masks_before_nms=masks_before_nms)

    def _generate_hierarchical(self, image, progress):
        cfg, hier = self.config, self.hierarchical
        height, width = orig_size = image.shape[:2]
        full_box = [0, 0, width, height]
        scale = np.array([width, height], dtype=np.float64)
        sparse = amg.build_point_grid(cfg.points_per_side // SPARSE_DIVISOR) * scale  # (S, 2) pixels
        counter = _Counter(progress, len(sparse))
        coverage = np.zeros(orig_size, dtype=bool)  # (H, W), filled by the sparse pass
        sparse_data = self._run_points(image, sparse, full_box, orig_size, counter, coverage)

        if hier.dense_points == "tinysam":
            candidates, _ = amg.tinysam_dense_candidates(sparse, orig_size, cfg.points_per_side)
        else:
            candidates = amg.build_point_grid(cfg.points_per_side) * scale
        skipped = amg.points_covered(candidates, coverage)  # (P,) bool
        counter.total += int((~skipped).sum())
        data = self._run_points(image, candidates[~skipped], full_box, orig_size, counter)
        data.cat(sparse_data)  # TinySAM keeps the sparse masks; dense first, as it concatenates
        masks_before_nms = len(data)
        data.filter(amg.nms(data["boxes"], data["iou_preds"], cfg.box_nms_thresh))
        data["crop_boxes"] = np.tile(np.array(full_box, dtype=np.int64), (len(data), 1))
        return data, self._stats(
            f"hierarchical-{hier.dense_points}", counter, sparse_points=len(sparse),
            dense_candidates=len(candidates), dense_skipped=int(skipped.sum()),
            covered_fraction=float(coverage.mean()), masks_before_nms=masks_before_nms,
        )

    @staticmethod
    def _stats(mode, counter, sparse_points=0, dense_candidates=0, dense_skipped=0, covered_fraction=0.0,
               masks_before_nms=0):
        return dict(mode=mode, points_run=counter.points, points_upscaled=counter.upscaled, decoder_calls=counter.calls,
                    decoder_seconds=counter.seconds, sparse_points=sparse_points,
                    dense_candidates=dense_candidates, dense_skipped=dense_skipped,
                    covered_fraction=covered_fraction, masks_before_nms=masks_before_nms)

    # -- one set of points on one crop -------------------------------------------------------------

    def _run_points(self, crop, points, crop_box, orig_size, counter, coverage=None):
        """Decode `points` on one crop in batches and keep the masks that pass the filters.

        Args:
            crop: (h, w, 3) uint8 view of the image inside `crop_box`.
            points: (P, 2) float64 (x, y) pixels in the crop frame.
            crop_box: [x0, y0, x1, y1] in the original image.
            coverage: (h, w) bool or None; if given, pixels where a surviving mask's logits are
                > high_score_thresh are OR-ed into it (hierarchical sparse pass).

        Returns:
            MaskData with rles (original frame), boxes (crop frame, XYXY), iou_preds,
            stability_score, points (crop frame), in prompt order.
        """
        data = amg.MaskData(
            rles=[], boxes=np.zeros((0, 4), np.int64), iou_preds=np.zeros(0, np.float32),
            stability_score=np.zeros(0, np.float32), points=np.zeros((0, 2), np.float64),
        )
        if len(points) == 0:
            return data
        embedding = self.predictor.embed(crop)
        long_side = self.predictor.manifest.preprocess.image_size
        step = self.config.points_per_batch * self.config.decoder_workers  # one batch per worker per call
        for start in range(0, len(points), step):
            batch = points[start:start + step]  # (b, 2)
            data.cat(self._run_batch(embedding, batch, crop_box, orig_size, long_side, counter, coverage))
        return data

    def _run_batch(self, embedding, points, crop_box, orig_size, long_side, counter, coverage):
        cfg = self.config
        crop_size = embedding.original_size
        b = len(points)
        coords_1024 = preprocess.coords_to_input_frame(points, crop_size, long_side)  # (b, 2)
        # SAM's prompt encoder pads point-only prompts with (0, 0) label -1; the graph expects it.
        feed_coords = np.stack([coords_1024, np.zeros_like(coords_1024)], axis=1)  # (b, 2, 2)
        feed_labels = np.tile(np.array([[1.0, PAD_LABEL]], dtype=np.float32), (b, 1))  # (b, 2)
        started = time.perf_counter()
        # Masks with predicted IoU <= pred_iou_thresh are dropped below, so the decoder may skip
        # the upscaler of prompts whose 3 IoUs all are (zeros come back for those).
        gate = cfg.pred_iou_thresh if cfg.pred_iou_thresh > 0.0 else None
        # Only asked for when used, so predictor wrappers without `workers` keep working.
        workers = {} if cfg.decoder_workers == 1 else {"workers": cfg.decoder_workers}
        low_res, iou = self.predictor.predict_batch(feed_coords, feed_labels, embedding=embedding,
                                                    upscale_iou_threshold=gate, **workers)
        skipped = 0
        if gate is not None and self.predictor.skips_low_iou_upscaling:
            skipped = int((iou.max(axis=1) <= gate).sum())
        counter.add(b, time.perf_counter() - started, b - skipped)
        n_masks = low_res.shape[1]
        low_res = low_res.reshape(b * n_masks, *low_res.shape[2:])  # (b*3, 256, 256)
        iou = iou.reshape(-1)  # (b*3,)
        points = np.repeat(points, n_masks, axis=0)  # (b*3, 2)

        keep = iou > cfg.pred_iou_thresh if cfg.pred_iou_thresh > 0.0 else np.ones(len(iou), bool)
        threshold = self.predictor.manifest.mask_threshold
        if cfg.stability_score_thresh > 0.0:
            rows, cols = _low_res_valid(embedding.input_size, low_res.shape[-1], long_side)
            index = np.flatnonzero(keep)
            coarse = amg.calculate_stability_score(
                low_res[index, :rows, :cols], threshold, cfg.stability_score_offset
            )
            keep[index[coarse < cfg.stability_score_thresh - cfg.stability_prefilter_margin]] = False
        return self._upsample_and_encode(
            low_res, iou, points, np.flatnonzero(keep), embedding, crop_box, orig_size, threshold, coverage
        )

    def _upsample_and_encode(self, low_res, iou, points, index, embedding, crop_box, orig_size, threshold, coverage):
        """Upsample the candidate masks a few at a time; exact stability filter; boxes; RLE."""
        cfg = self.config
        crop_h, crop_w = embedding.original_size
        long_side = self.predictor.manifest.preprocess.image_size
        chunk = max(1, UPSCALE_BUDGET_BYTES // (4 * (long_side * long_side + 2 * crop_h * crop_w)))
        out = amg.MaskData(rles=[], boxes=np.zeros((0, 4), np.int64), iou_preds=np.zeros(0, np.float32),
                           stability_score=np.zeros(0, np.float32), points=np.zeros((0, 2), np.float64))
        for start in range(0, len(index), chunk):
            part = index[start:start + chunk]
            logits = postprocess.upscale_logits(
                low_res[part][:, None], embedding.input_size, embedding.original_size, long_side
            )[:, 0]  # (k, h, w) float32
            stability = amg.calculate_stability_score(logits, threshold, cfg.stability_score_offset)
            ok = stability >= cfg.stability_score_thresh if cfg.stability_score_thresh > 0.0 else np.ones(len(part), bool)
            logits, part, stability = logits[ok], part[ok], stability[ok]
            if coverage is not None and len(part):
                coverage |= (logits > self.hierarchical.high_score_thresh).any(axis=0)
            masks = logits > threshold  # (k, h, w) bool
            del logits
            boxes = amg.batched_mask_to_box(masks)  # (k, 4) crop frame
            inside = ~amg.is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
            masks = amg.uncrop_masks(masks[inside], crop_box, *orig_size)
            out.cat(amg.MaskData(
                rles=amg.mask_to_rle(masks), boxes=boxes[inside], iou_preds=iou[part[inside]],
                stability_score=stability[inside], points=points[part[inside]],
            ))
        return out

    @staticmethod
    def _uncrop(data, crop_box):
        data["boxes"] = amg.uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = amg.uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = np.tile(np.array(crop_box, dtype=np.int64), (len(data), 1))
        return data

    # -- output ----------------------------------------------------------------------------------

    def _remove_small_regions(self, data):
        """SAM's `postprocess_small_regions`: clean each mask, then NMS preferring untouched ones."""
        if len(data) == 0:
            return data
        min_area = self.config.min_mask_region_area
        boxes, scores, rles = [], [], []
        for rle in data["rles"]:
            mask = amg.rle_to_mask(rle)
            mask, holes_changed = amg.remove_small_regions(mask, min_area, "holes")
            mask, islands_changed = amg.remove_small_regions(mask, min_area, "islands")
            changed = holes_changed or islands_changed
            boxes.append(amg.batched_mask_to_box(mask))
            scores.append(0.0 if changed else 1.0)  # NMS prefers masks that needed no repair
            rles.append(amg.mask_to_rle(mask[None])[0] if changed else rle)
        data["rles"], data["boxes"] = rles, np.stack(boxes)
        data.filter(amg.nms(data["boxes"], np.array(scores), max(self.config.box_nms_thresh, self.config.crop_nms_thresh)))
        return data

    def _records(self, data):
        mode = self.config.output_mode
        records = []
        for i, rle in enumerate(data["rles"]):
            if mode == "binary_mask":
                segmentation = amg.rle_to_mask(rle)
            elif mode == "coco_rle":
                segmentation = amg.rle_to_coco_string(rle)
            else:
                segmentation = rle
            records.append({
                "segmentation": segmentation,
                "area": amg.area_from_rle(rle),
                "bbox": amg.box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                "predicted_iou": float(data["iou_preds"][i]),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": float(data["stability_score"][i]),
                "crop_box": amg.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
            })
        return records
