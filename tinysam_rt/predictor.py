"""TinySAMPredictor: set an image once, then prompt it many times. Wiring only, no math."""

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tinysam_rt import postprocess, preprocess, prompts
from tinysam_rt.embedding import EmbeddingCache, ImageEmbedding, image_digest
from tinysam_rt.manifest import ENCODER_OUTPUTS, load_manifest, resolve_model_dir
from tinysam_rt.sessions import load_sessions, make_session_options

logger = logging.getLogger(__name__)

# Largest decoder run inside `predict_batch`. The decoder's activations take ~30 MiB per prompt
# (64 prompts: +2.1 GiB peak; benchmarks/RESULTS.md, "Soak") and ORT's memory arena keeps its peak
# for the life of the session, so one huge batch would pin gigabytes for good. 64 is SAM's
# points_per_batch.
MAX_DECODER_BATCH = 64
# Prompt points in one decoder run: everything mode's 64 prompts of a point and its padding point.
# Each point adds attention to the 4096 image positions (~0.5 MiB per prompt), so prompts with many
# points run in smaller parts and a run's memory stays near that of 64 clicks.
MAX_DECODER_POINTS = 2 * MAX_DECODER_BATCH


def warn_if_weights_saturate(manifest):
    """Log a warning when a graph with 8-bit integer weights meets a CPU whose uint8 x int8 kernel
    saturates (x86 without VNNI): its outputs then drift from FP32 (embedding cosine 0.980 ->
    0.941 measured; benchmarks/RESULTS.md, "AVX2 code path"). 7-bit weights, what `tinysam
    quantize` writes unless told `--no-reduce-range`, are safe everywhere.

    Returns:
        list of the roles with 8-bit weights if the kernel saturates, else [].
    """
    recipes = (manifest.quantization or {}).get("graphs", {})
    eight_bit = sorted(role for role, recipe in recipes.items() if recipe.get("reduce_range") is False)
    if not eight_bit:
        return []
    from tinysam_rt.gemm_peak import u8s8_kernel_saturates  # one tiny ORT session, only for such models

    if u8s8_kernel_saturates() is not True:  # exact, or a kernel the probe does not know
        return []
    logger.warning("%s: the %s graph(s) have 8-bit weights, and this CPU's integer kernel saturates them "
                   "(no VNNI): expect outputs further from FP32; re-quantize without --no-reduce-range",
                   manifest.model_dir, ", ".join(eight_bit))
    return eight_bit


class TinySAMPredictor:
    """SAM's predictor API on ONNX Runtime.

    `predict` follows `segment_anything.SamPredictor.predict`, with TinySAM's one difference:
    the decoder always yields its 3 multimask outputs (tokens 1..3), so `multimask_output=False`
    returns the one of those 3 with the highest predicted IoU (SAM would return token 0).

    Thread safety: the sessions and the embedding cache are safe to share; the *current image*
    is per predictor, so give each thread its own predictor: `predictor.clone()` shares the
    sessions and the cache but not the current image.
    """

    def __init__(self, image=None, model_dir=None, threads=None, cache_size=4, _shared=None):
        """
        Args:
            image: optional (H, W, 3) uint8 RGB image to set right away.
            model_dir: directory with manifest.json; default: $TINYSAM_MODEL_DIR, then
                ~/.cache/tinysam-rt/vit_t.
            threads: ORT intra-op threads (None: one per core).
            cache_size: how many image embeddings to keep (LRU); 0 disables caching. Each
                takes 4 MiB, plus 14 MiB once a point prompt ran on it (the points decoder's
                per-image part, see ImageEmbedding.decoder_cache).
        """
        if _shared is None:
            # Cheap argument checks first: a bad argument should not cost a model load.
            cache = EmbeddingCache(cache_size)
            make_session_options(threads)
            if image is not None:
                preprocess.check_image(image)
            manifest = load_manifest(resolve_model_dir(model_dir))
            encoder, decoder = load_sessions(manifest, threads)
            warn_if_weights_saturate(manifest)
            _shared = (manifest, encoder, decoder, cache)
        self.manifest, self._encoder, self._decoder, self._cache = _shared
        self._embedding = None
        if image is not None:
            self.set_image(image)

    def clone(self):
        """A predictor with its own current image, sharing sessions and cache with this one."""
        return TinySAMPredictor(_shared=(self.manifest, self._encoder, self._decoder, self._cache))

    # -- image ---------------------------------------------------------------------------------

    def set_image(self, image, image_format="RGB"):
        """Compute (or fetch from the cache) the embedding of `image` and make it current.

        Args:
            image: (H, W, 3) uint8. Strided and read-only arrays are fine.
            image_format: "RGB" (default) or "BGR" (e.g. straight from cv2.imread). Channel
                order cannot be detected from the pixels; passing BGR as RGB silently degrades
                masks.
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = preprocess.check_image(image)
        if image_format == "BGR":
            image = image[..., ::-1]
        self._embedding = self.embed(image)
        return self._embedding

    def embed(self, image):
        """The ImageEmbedding of an RGB image, from the cache when the same content was seen.

        Does not change the current image.
        """
        image = preprocess.check_image(image)
        key = (image_digest(image), self.manifest.model_id)
        embedding = self._cache.get(key)
        if embedding is None:
            embedding = self._encode(image)
            self._cache.put(key, embedding)
        return embedding

    def _encode(self, image):
        pre = self.manifest.preprocess
        resized = preprocess.resize_longest_side(image, pre.image_size)  # (h, w, 3)
        tensor = preprocess.normalize_pad(resized, pre.pixel_mean, pre.pixel_std, pre.image_size, pre.pad_value)
        features = self._encoder.run(tensor)  # (1, 256, 64, 64)
        features.setflags(write=False)
        return ImageEmbedding(features, tuple(image.shape[:2]), tuple(resized.shape[:2]), self.manifest.model_id)

    def set_embedding(self, embedding):
        """Make a previously computed ImageEmbedding current (must come from this model)."""
        self._embedding = self._check_embedding(embedding)

    def _check_embedding(self, embedding):
        """`embedding` if it is one this predictor's encoder and preprocessing could have made.

        Raises:
            TypeError / ValueError naming the field that is off (checked here, at the boundary, so
            a hand-made embedding fails before the decoder or the postprocessing).
        """
        if not isinstance(embedding, ImageEmbedding):
            raise TypeError(f"embedding must be an ImageEmbedding, got {type(embedding).__name__}")
        if embedding.model_id != self.manifest.model_id:
            raise ValueError("embedding was made by a different encoder than this predictor's")
        features = embedding.features
        (_, shape), = ENCODER_OUTPUTS
        if not isinstance(features, np.ndarray) or features.dtype != np.float32 or features.shape != shape:
            got = f"{features.dtype} {features.shape}" if isinstance(features, np.ndarray) else type(features).__name__
            raise ValueError(f"embedding.features must be a float32 array of shape {shape}, got {got}")
        size = embedding.original_size
        if not (isinstance(size, tuple) and len(size) == 2 and all(prompts.is_int(v) and v >= preprocess.MIN_IMAGE_SIDE
                                                                   for v in size)):
            raise ValueError(f"embedding.original_size must be (H, W) ints >= {preprocess.MIN_IMAGE_SIDE}, got {size!r}")
        expected = preprocess.preprocess_shape(*size, self.manifest.preprocess.image_size)
        if embedding.input_size != expected:  # a tuple, as _encode makes it
            raise ValueError(
                f"embedding.input_size must be {expected} (an image of {size[0]}x{size[1]} resized to "
                f"{self.manifest.preprocess.image_size}), got {embedding.input_size!r}"
            )
        return embedding

    def reset_image(self):
        """Forget the current image (cached embeddings stay in the cache)."""
        self._embedding = None

    @property
    def is_image_set(self):
        return self._embedding is not None

    @property
    def embedding(self):
        return self._require_embedding()

    @property
    def original_size(self):
        return self._require_embedding().original_size

    @property
    def input_size(self):
        return self._require_embedding().input_size

    @property
    def skips_low_iou_upscaling(self):
        """True when `predict_batch(..., upscale_iou_threshold=t)` really skips work for point
        prompts whose IoUs are all <= t (a points decoder exported with the gate)."""
        points = self._decoder.points_decoder
        return points is not None and points.gated

    @property
    def cache_len(self):
        return len(self._cache)

    def _require_embedding(self):
        if self._embedding is None:
            raise RuntimeError("no image is set: call set_image(image) (or pass image= to the constructor) before predict")
        return self._embedding

    # -- prompts -------------------------------------------------------------------------------

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output=True, return_logits=False):
        """Masks for one prompt (points and/or a box, optionally a previous low-res mask).

        Args:
            point_coords: (N, 2) array or list of (x, y) pixels in the original image, or None.
            point_labels: (N,) 1 = foreground, 0 = background; None means all foreground.
            box: (4,) XYXY pixels in the original image, or None.
            mask_input: (1, 256, 256) low-res logits from a previous call, or None.
            multimask_output: True: all 3 masks; False: the one with the highest score.
            return_logits: return float logits instead of boolean masks.

        Returns:
            masks (C, H, W) bool (float32 logits with return_logits), scores (C,) float32,
            low_res_logits (C, 256, 256) float32; C = 3 or 1.
        """
        embedding = self._require_embedding()
        size = embedding.original_size
        coords, labels = prompts.validate_points(point_coords, point_labels, size)
        box = prompts.validate_box(box, size)
        mask = prompts.validate_mask_input(mask_input)
        if coords is None and box is None:
            raise ValueError("predict needs point_coords or box (mask_input alone is not a prompt)")
        long_side = self.manifest.preprocess.image_size
        coords_1024 = None if coords is None else preprocess.coords_to_input_frame(coords, size, long_side)
        box_1024 = None if box is None else preprocess.boxes_to_input_frame(box, size, long_side)
        feed_coords, feed_labels = prompts.pack_prompt(coords_1024, labels, box_1024)
        feed_mask, has_mask = prompts.mask_feeds(mask, 1)
        low_res, scores = self._decoder.run(embedding.features, feed_coords, feed_labels, feed_mask, has_mask,
                                            cache=embedding.decoder_cache)
        low_res, scores = low_res[0], scores[0]  # (3, 256, 256), (3,)
        if not multimask_output:
            best = int(np.argmax(scores))
            low_res, scores = low_res[best:best + 1], scores[best:best + 1]
        masks = postprocess.upscale_logits(low_res[None], embedding.input_size, size)[0]  # (C, H, W)
        if not return_logits:
            masks = masks > self.manifest.mask_threshold
        return masks, scores, low_res

    def predict_batch(self, point_coords, point_labels, mask_input=None, embedding=None, upscale_iou_threshold=None,
                      workers=1):
        """B prompts, in the 1024 frame, without upsampling.

        Any B works: the decoder runs on at most `MAX_DECODER_BATCH` prompts at a time (fewer for
        prompts of more than 2 points, see MAX_DECODER_POINTS), so its working memory stays
        bounded; the outputs themselves take 3 * 256 * 256 * 4 bytes (768 KiB) per prompt, and a
        B whose outputs cannot be allocated is a MemoryError.

        Args:
            point_coords: (B, N, 2) XY in the 1024 frame; include SAM's padding point (0, 0)
                with label -1 for prompts without a box.
            point_labels: (B, N) in {-1, 0, 1, 2, 3}.
            mask_input: (B, 1, 256, 256) low-res logits or None.
            embedding: an ImageEmbedding to use instead of the current image.
            upscale_iou_threshold: None (every mask), or a float t for callers that keep only
                masks with predicted IoU > t (everything mode): prompts whose 3 IoUs are all <= t
                may then get zero logits, as the points decoder skips their mask upscaler.
            workers: int >= 1. With more than 1, the B prompts run in parts of ceil(B / workers)
                (at most MAX_DECODER_BATCH), `workers` at a time side by side, each on a
                single-thread session of the decoder (loaded on first use: a second copy of the
                decoder weights). Faster on 2+ cores
                for large batches; each part in flight takes its own working memory. Outputs
                equal those of running each part alone.

        Returns:
            low_res_logits (B, 3, 256, 256) float32, iou_predictions (B, 3) float32.
        """
        embedding = self._require_embedding() if embedding is None else self._check_embedding(embedding)
        long_side = self.manifest.preprocess.image_size
        gate = prompts.validate_iou_threshold(upscale_iou_threshold)
        prompts.check_int(workers, "workers", 1)
        try:
            coords, labels, mask, has_mask = prompts.validate_batch(point_coords, point_labels, mask_input, long_side)
            batch = len(coords)
            part_size = min(MAX_DECODER_BATCH, max(1, MAX_DECODER_POINTS // coords.shape[1]), -(-batch // int(workers)))
            if batch <= part_size:
                return self._decoder.run(embedding.features, coords, labels, mask, has_mask, gate,
                                         embedding.decoder_cache)
            low_res = np.empty((batch, 3, prompts.LOW_RES, prompts.LOW_RES), np.float32)  # (B, 3, 256, 256)
        except MemoryError:
            batch = np.shape(point_coords)[0]
            raise MemoryError(
                f"point_coords has B={batch} prompts; their outputs alone need "
                f"{batch * 3 * prompts.LOW_RES**2 * 4 / 2**30:.1f} GiB: pass them in smaller batches"
            ) from None
        iou = np.empty((batch, 3), np.float32)
        parts = [slice(start, start + part_size) for start in range(0, batch, part_size)]
        decoder = self._decoder if workers == 1 else self._decoder.single_threaded()

        def run(part):
            low_res[part], iou[part] = decoder.run(embedding.features, coords[part], labels[part], mask[part],
                                                   has_mask[part], gate, embedding.decoder_cache)

        if workers == 1:
            for part in parts:
                run(part)
        else:
            with ThreadPoolExecutor(min(int(workers), len(parts))) as pool:
                list(pool.map(run, parts))  # list(): a part's exception is raised here
        return low_res, iou
