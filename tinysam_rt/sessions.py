"""ONNX Runtime sessions: the only code that owns ORT state or calls `.run`.

One factory builds every `SessionOptions`; `EncoderSession`, `DecoderSession` and
`PointsDecoderSession` each wrap one `InferenceSession` and check, at init, that the graph's
inputs/outputs are the ones the manifest and the tinysam-rt contract promise; `PromptDecoder`
picks between the two decoders. ORT's `run` is thread-safe, so one session may serve many threads.
"""

import logging
import threading

import numpy as np
import onnxruntime as ort

from tinysam_rt import manifest as manifest_mod
from tinysam_rt.errors import ModelFileError
from tinysam_rt.sysinfo import THREADS_PER_CPU, max_threads

logger = logging.getLogger(__name__)


def make_session_options(threads=None):
    """The one place `SessionOptions` are made.

    Args:
        threads: intra-op threads; None lets ORT use one per physical core.
    """
    if threads is not None and (not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if threads is not None and threads > max_threads():
        raise ValueError(f"threads must be at most {max_threads()} ({THREADS_PER_CPU} per CPU), got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Encoder and decoder share the process: spinning workers of one session steal the cores the
    # other needs (measured: a decoder call after an encoder call went from 55 ms to 36 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _dims_match(declared, actual):
    """True when a declared shape (ints fixed, str dynamic) fits ORT's reported shape."""
    if len(declared) != len(actual):
        return False
    for want, got in zip(declared, actual):
        if isinstance(want, int) and isinstance(got, int) and want != got:
            return False
        if isinstance(want, int) and not isinstance(got, int):
            return False  # the contract fixes this axis; a dynamic graph axis is another model
    return True


def _check_io(kind, path, declared, expected, actual):
    """Check graph I/O against the manifest and the fixed contract.

    Args:
        kind: "inputs" | "outputs".
        declared: manifest TensorSpecs; expected: contract (name, shape) pairs;
        actual: ORT NodeArgs.
    """
    want_names = [name for name, _ in expected]
    if [spec.name for spec in declared] != want_names:
        raise ModelFileError(
            f"{path}: manifest declares {kind} {[s.name for s in declared]}, expected {want_names}"
        )
    got = {arg.name: tuple(d if isinstance(d, int) else str(d) for d in arg.shape) for arg in actual}
    if sorted(got) != sorted(want_names):
        raise ModelFileError(
            f"{path}: graph {kind} are {sorted(got)}, expected {sorted(want_names)} "
            f"(wrong graph for this role, e.g. encoder and decoder swapped?)"
        )
    types = {arg.name: arg.type for arg in actual}
    for name, shape in expected:
        if not _dims_match(shape, got[name]):
            raise ModelFileError(f"{path}: graph {kind[:-1]} {name!r} has shape {got[name]}, expected {shape}")
        # Every contract tensor is float32; another type would load but fail at the first run.
        if types[name] != "tensor(float)":
            raise ModelFileError(f"{path}: graph {kind[:-1]} {name!r} has type {types[name]}, expected tensor(float)")


class _GraphSession:
    """One ONNX graph with a checked I/O contract."""

    role = ""
    expected_inputs = ()
    expected_outputs = ()

    def __init__(self, graph, threads=None, session_options=None):
        """
        Args:
            graph: manifest.GraphSpec of this role (already sha256-verified by load_manifest).
            threads: intra-op threads (ignored when session_options is given).
            session_options: an ort.SessionOptions to use instead of the factory's.
        """
        if graph.role != self.role:
            raise ModelFileError(f"{graph.path}: expected a {self.role} graph, got role {graph.role!r}")
        options = session_options or make_session_options(threads)
        try:
            self._session = ort.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several pybind types for corrupt files
            raise ModelFileError(f"{graph.path}: ONNX Runtime cannot load the {self.role} graph: {exc}") from None
        self.expected_inputs, self.expected_outputs = self._contract(graph)
        _check_io("inputs", graph.path, graph.inputs, self.expected_inputs, self._session.get_inputs())
        _check_io("outputs", graph.path, graph.outputs, self.expected_outputs, self._session.get_outputs())
        stamped = self._session.get_modelmeta().custom_metadata_map.get(manifest_mod.WEIGHTS_ID_METADATA_KEY)
        if stamped is not None and stamped != graph.weights_id:
            raise ModelFileError(
                f"{graph.path}: this {self.role} graph was made from weights {stamped!r} but the manifest "
                f"says {graph.weights_id!r} (a graph from another export behind an edited manifest?)"
            )
        self.graph = graph
        self.output_names = [name for name, _ in self.expected_outputs]
        logger.debug("loaded %s %s (%s)", self.role, graph.path, graph.precision)

    @property
    def intra_op_threads(self):
        """The session's intra-op thread count (0: ORT's default, one per physical core)."""
        return self._session.get_session_options().intra_op_num_threads

    def _contract(self, graph):
        """The (inputs, outputs) contract `graph` is held to (one per role, but the points decoder's two)."""
        return self.expected_inputs, self.expected_outputs

    def _run(self, feeds):
        """Run with every feed as a C-contiguous float32 array (the contract's only dtype)."""
        # asarray, not ascontiguousarray: that one turns the 0-d gate threshold into shape (1,).
        feeds = {name: np.asarray(value, dtype=np.float32, order="C") for name, value in feeds.items()}
        return self._session.run(self.output_names, feeds)


class EncoderSession(_GraphSession):
    """The image encoder: normalised, padded image -> image embeddings."""

    role = "encoder"
    expected_inputs = manifest_mod.ENCODER_INPUTS
    expected_outputs = manifest_mod.ENCODER_OUTPUTS

    def run(self, image_1024):
        """
        Args:
            image_1024: (1, 3, 1024, 1024) float32, normalised and padded.

        Returns:
            (1, 256, 64, 64) float32 image embeddings.
        """
        (embeddings,) = self._run({"image": image_1024})
        return embeddings


class DecoderSession(_GraphSession):
    """Prompt encoder + mask decoder: embeddings and prompts -> 3 low-res masks per prompt."""

    role = "decoder"
    expected_inputs = manifest_mod.DECODER_INPUTS
    expected_outputs = manifest_mod.DECODER_OUTPUTS

    def run(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        """
        Args:
            image_embeddings: (1, 256, 64, 64) float32.
            point_coords: (B, N, 2) float32, XY in the 1024 frame.
            point_labels: (B, N) float32; 1 fg, 0 bg, 2/3 box corners, -1 padding.
            mask_input: (B, 1, 256, 256) float32 low-res logits (zeros when unused).
            has_mask_input: (B,) float32, 1 where mask_input is used.

        Returns:
            low_res_masks (B, 3, 256, 256) float32 logits, iou_predictions (B, 3) float32.
        """
        feeds = {
            "image_embeddings": image_embeddings,
            "point_coords": point_coords,
            "point_labels": point_labels,
            "mask_input": mask_input,
            "has_mask_input": has_mask_input,
        }
        low_res_masks, iou_predictions = self._run(feeds)
        return low_res_masks, iou_predictions


class PointsDecoderSession(_GraphSession):
    """The decoder's function for prompts without a mask input (see manifest.py), cheaper per prompt."""

    role = "points_decoder"
    expected_inputs = manifest_mod.POINTS_DECODER_INPUTS
    expected_outputs = manifest_mod.POINTS_DECODER_OUTPUTS
    IMAGE_SIDE_KEY = "points_decoder.image_side"  # in a caller's per-image cache dict

    def _contract(self, graph):
        basic = manifest_mod.POINTS_DECODER_BASIC_INPUTS
        if [spec.name for spec in graph.inputs] == [name for name, _ in basic]:
            # exported before the gate and the image-side cache: still a valid points decoder
            return basic, manifest_mod.POINTS_DECODER_BASIC_OUTPUTS
        return manifest_mod.POINTS_DECODER_INPUTS, manifest_mod.POINTS_DECODER_OUTPUTS

    @property
    def gated(self):
        """True when the graph can skip the mask upscaler below an IoU threshold (and cache its
        per-image part)."""
        return len(self.expected_inputs) == len(manifest_mod.POINTS_DECODER_INPUTS)

    def run(self, image_embeddings, point_coords, point_labels, upscale_iou_threshold=None, cache=None):
        """
        Args:
            image_embeddings: (1, 256, 64, 64) float32.
            point_coords: (B, N, 2) float32, XY in the 1024 frame.
            point_labels: (B, N) float32; 1 fg, 0 bg, 2/3 box corners, -1 padding.
            upscale_iou_threshold: None computes every mask. A float t: masks are only computed for
                prompts with some predicted IoU > t; the others' masks may come back as zeros
                (always computed by a graph without the gate).
            cache: None, or a dict kept with this image embedding (and only with it): the
                per-image part of the first layer is stored there by the first call and read by
                later ones instead of being recomputed (measured, one prompt: 21.4 ms per call
                reading it, 35.2 ms computing it; benchmarks/RESULTS.md, session 12).

        Returns:
            low_res_masks (B, 3, 256, 256) float32 logits, iou_predictions (B, 3) float32.
        """
        feeds = {"image_embeddings": image_embeddings, "point_coords": point_coords, "point_labels": point_labels}
        if not self.gated:
            low_res_masks, iou_predictions = self._run(feeds)
            return low_res_masks, iou_predictions
        # float32 like the IoUs: `iou > t` in numpy (and in SAM's torch) compares in float32 too.
        gate = -np.inf if upscale_iou_threshold is None else upscale_iou_threshold
        feeds[manifest_mod.POINTS_DECODER_GATE[0]] = np.float32(gate)
        key = (self.IMAGE_SIDE_KEY, self.graph.sha256)  # another graph's image side is not this one's
        cached = None if cache is None else cache.get(key)
        feeds[manifest_mod.POINTS_DECODER_CACHE[0]] = self._empty_cache if cached is None else cached
        low_res_masks, iou_predictions, image_side = self._run(feeds)
        if cache is not None and cached is None:
            image_side.flags.writeable = False
            cache[key] = image_side
        return low_res_masks, iou_predictions

    @property
    def _empty_cache(self):
        """A size-0 image_side_cache: "compute the image side in this call"."""
        _, (_, *rest) = manifest_mod.POINTS_DECODER_CACHE
        return np.zeros((0, *rest), np.float32)


# The points decoder multiplies the later image-side projections through the prompt's tokens, so
# its work grows with the points per prompt; past about two dozen the plain decoder is faster
# (benchmarks/bench_points_per_prompt.py, 2 cores: at 24 points 1.09x / 1.12x in the points
# decoder's favour for 1 / 16 prompts per call, even at 25-28, 0.87x / 0.95x at 33, 0.65x / 0.52x at
# 101; benchmarks/RESULTS.md, session 12). Counted with the padding point or box corners.
POINTS_DECODER_MAX_POINTS = 24


class PromptDecoder:
    """The decoder stage: a `DecoderSession`, plus a `PointsDecoderSession` when the model has one.

    `run` has `DecoderSession.run`'s signature and results; a batch without any mask input and
    with at most POINTS_DECODER_MAX_POINTS points per prompt goes to the points decoder (same
    function, less work per prompt), anything else to the decoder.
    """

    def __init__(self, decoder, points_decoder=None):
        """
        Args:
            decoder: DecoderSession.
            points_decoder: PointsDecoderSession or None.
        """
        self.decoder = decoder
        self.points_decoder = points_decoder
        self._single_threaded = None
        self._lock = threading.Lock()

    def single_threaded(self):
        """This decoder's graphs again, each in a session with one intra-op thread; loaded on the
        first call (once, even from several threads), then kept.

        For running several decoder calls side by side, one per calling thread (ORT's `run` is
        thread-safe; with one intra-op thread a run stays on its caller's thread). Measured on
        2 cores: two everything-mode batches side by side beat one 2-thread session running them
        in turn (1.02x-1.25x; benchmarks/RESULTS.md, "Everything mode, session 7"), as most of the
        decoder's ops are too small to split well over threads. Costs a second copy of the decoder
        weights, unless this decoder's sessions have one thread already (then it is returned).
        """
        with self._lock:
            sessions = [s for s in (self.decoder, self.points_decoder) if s is not None]
            if self._single_threaded is None and all(s.intra_op_threads == 1 for s in sessions):
                self._single_threaded = self  # already one thread per run: no second copy
            if self._single_threaded is None:
                points = self.points_decoder
                self._single_threaded = PromptDecoder(
                    DecoderSession(self.decoder.graph, threads=1),
                    None if points is None else PointsDecoderSession(points.graph, threads=1),
                )
            return self._single_threaded

    def run(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input,
            upscale_iou_threshold=None, cache=None):
        """`DecoderSession.run`: (B, 3, 256, 256) logits and (B, 3) predicted IoU.

        `upscale_iou_threshold` and `cache` as in `PointsDecoderSession.run` (the plain decoder
        computes every mask and has nothing to cache).
        """
        if (self.points_decoder is not None and not np.any(has_mask_input)
                and point_coords.shape[1] <= POINTS_DECODER_MAX_POINTS):
            return self.points_decoder.run(image_embeddings, point_coords, point_labels, upscale_iou_threshold, cache)
        return self.decoder.run(image_embeddings, point_coords, point_labels, mask_input, has_mask_input)


def load_decoder(manifest, threads=None, session_options=None):
    """The `PromptDecoder` of a verified manifest (its points decoder only if the manifest has one)."""
    points = manifest.points_decoder
    return PromptDecoder(
        DecoderSession(manifest.decoder, threads, session_options),
        None if points is None else PointsDecoderSession(points, threads, session_options),
    )


def load_sessions(manifest, threads=None):
    """(EncoderSession, PromptDecoder) of a verified manifest, sharing one options factory."""
    return EncoderSession(manifest.encoder, threads), load_decoder(manifest, threads)
