"""manifest.json: the contract between an export and the runtime.

Everything the runtime needs to know about a model directory — graph files and their sha256,
input/output names and shapes, preprocessing constants, which weights the graphs came from — is
read from here. Nothing is guessed from the graphs themselves.

Layout (format_version 1)::

    {
      "format": "tinysam-rt-manifest", "format_version": 1,
      "model": "tinysam_vit_t", "tinysam_rt_version": "0.1.0",
      "weights": {"source": "checkpoint" | "random", "checkpoint_sha256": str | null,
                  "seed": int | null, "weights_id": str},
      "opset": 17,
      "preprocess": {"image_size": 1024, "pixel_mean": [3 floats], "pixel_std": [3 floats],
                     "resize": "longest_side", "resize_filter": "bilinear_antialias",
                     "pad": "bottom_right", "pad_value": 0.0, "normalize": "runtime"},
      "postprocess": {"mask_threshold": 0.0, "low_res_size": 256, "mask_tokens": [1, 2, 3]},
      "graphs": {
        "encoder": {"file": "encoder.onnx", "sha256": hex, "bytes": int, "precision": "fp32",
                    "weights_id": str, "inputs": [{"name", "shape", "dtype"}], "outputs": [...]},
        "decoder": {... same keys ...},
        "points_decoder": {... same keys ...}   # optional, see below
      },
      "quantization": null | {...recipe...},
      "export": {...free-form provenance: versions, exporter, date...}
    }

Shapes use ints for fixed axes and strings ("B", "N") for dynamic ones.

`points_decoder` is optional: the same function as `decoder` for prompts without a mask input,
computed with less work per prompt (the image side shared by the batch). Directories without it
(older exports, INT8 directories whose decoder was quantized) run every prompt through `decoder`.
Its extra inputs let everything mode skip the mask upscaler for prompts it would drop anyway and
let every caller skip the per-image part of its first layer after the first call on an image
(see POINTS_DECODER_INPUTS).
"""

import hashlib
import json
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinysam_rt.errors import ModelFileError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tinysam-rt-manifest"
FORMAT_VERSION = 1
MODEL_DIR_ENV = "TINYSAM_MODEL_DIR"
# ONNX metadata property holding the weights_id inside each graph file (exports since 0.1.0):
# sessions refuse a graph whose own id differs from the manifest's.
WEIGHTS_ID_METADATA_KEY = "tinysam_rt.weights_id"
GRAPH_ROLES = ("encoder", "decoder")  # required in every manifest
OPTIONAL_GRAPH_ROLES = ("points_decoder",)

# The I/O contract every tinysam-rt export satisfies; sessions check the graphs against it.
ENCODER_INPUTS = (("image", (1, 3, 1024, 1024)),)
ENCODER_OUTPUTS = (("image_embeddings", (1, 256, 64, 64)),)
DECODER_INPUTS = (
    ("image_embeddings", (1, 256, 64, 64)),
    ("point_coords", ("B", "N", 2)),
    ("point_labels", ("B", "N")),
    ("mask_input", ("B", 1, 256, 256)),
    ("has_mask_input", ("B",)),
)
DECODER_OUTPUTS = (
    ("low_res_masks", ("B", 3, 256, 256)),
    ("iou_predictions", ("B", 3)),
)
# The points decoder: the decoder's contract without the mask input (has_mask_input = 0), plus
# - a scalar gate: a prompt's masks are computed only if one of its 3 predicted IoUs is above it
#   (the others come back as zeros; everything mode drops them by the same threshold);
# - the per-image part of its first layer (`image_side`, the same for every prompt of an image):
#   returned by a run that computed it, and passed back as `image_side_cache` on later runs for
#   the same image it is not recomputed; an empty (0, 8, 4096, 16) cache means "compute it". Its
#   first axis is the graph's own business (3 slices in exports before the factored upscaler, 5
#   before the image tokens joined it, 7 since). Since then a run given the cache returns an empty
#   image_side (earlier exports return the cache again, a copy per call).
# Exports made before these existed have the first three inputs and two outputs only (the
# "basic" contract); sessions accept both.
POINTS_DECODER_GATE = ("upscale_iou_threshold", ())
POINTS_DECODER_CACHE = ("image_side_cache", ("S", 8, 4096, 16))
POINTS_DECODER_IMAGE_SIDE = ("image_side", ("S", 8, 4096, 16))
POINTS_DECODER_INPUTS = DECODER_INPUTS[:3] + (POINTS_DECODER_GATE, POINTS_DECODER_CACHE)
POINTS_DECODER_OUTPUTS = DECODER_OUTPUTS + (POINTS_DECODER_IMAGE_SIDE,)
POINTS_DECODER_BASIC_INPUTS = DECODER_INPUTS[:3]
POINTS_DECODER_BASIC_OUTPUTS = DECODER_OUTPUTS

# Sane ranges of the numbers the runtime computes with (checked together in `_numbers`). The
# runtime computes in float32, so a value finite as a JSON (float64) number but beyond float32
# would load and then turn every score into NaN.
FLOAT32_MAX = float(np.finfo(np.float32).max)
PIXEL_RANGE = (0.0, 255.0)  # uint8 pixels: pixel_mean is on this scale; a larger std flattens them
# A smaller std puts (pixel - mean) / std beyond +-2.55e5, an input no encoder was trained on; near
# float32's denormals (std 1e-36 on vit_t) the embedding is NaN.
MIN_PIXEL_STD = 1e-3


def default_model_dir():
    """The documented default location: `$XDG_CACHE_HOME/tinysam-rt/vit_t` (~/.cache/...)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "tinysam-rt" / "vit_t"


def resolve_model_dir(model_dir=None):
    """Pick the model directory: the argument, else $TINYSAM_MODEL_DIR, else the default.

    `~` is expanded in the argument and in $TINYSAM_MODEL_DIR.

    Raises:
        TypeError: `model_dir` is not a path.
        FileNotFoundError: the chosen directory has no manifest.json (the message says how to
            make one), or the path is manifest.json itself or another file (the message names
            the directory to use).
    """
    if model_dir is not None:
        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError(f"model_dir must be a str or os.PathLike path, got {type(model_dir).__name__}")
        chosen, why, name = Path(os.path.expanduser(model_dir)), "model_dir argument", "model_dir"
    elif os.environ.get(MODEL_DIR_ENV):
        chosen, why = Path(os.path.expanduser(os.environ[MODEL_DIR_ENV])), f"${MODEL_DIR_ENV}"
        name = why
    else:
        chosen, why, name = default_model_dir(), "default location", "the model directory"
    _refuse_manifest_path(chosen, name)
    if chosen.is_file():
        # Exporting "to" a file would replace it: advise a directory instead.
        raise FileNotFoundError(
            f"no tinysam-rt model at {chosen} (from {why}): it is a file, and {MANIFEST_NAME} not "
            f"found; {name} must be a tinysam-rt model directory (the one holding {MANIFEST_NAME})"
        )
    if not (chosen / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"no tinysam-rt model at {chosen} (from {why}): {MANIFEST_NAME} not found. "
            f"Export one with `tinysam export --checkpoint tinysam_42.3.pth --out {chosen}` "
            f"(or `--random-seed 0` for random weights), copy an exported model directory there, "
            f"or pass model_dir= / set ${MODEL_DIR_ENV}."
        )
    return chosen


def _refuse_manifest_path(path, name):
    """A path ending in manifest.json is the manifest itself, not its directory: say which
    directory to use (the generic advice, `tinysam export --out <path>`, would be harmful)."""
    if path.name == MANIFEST_NAME and not (path / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"{name} must be the directory holding {MANIFEST_NAME}, not the path of {MANIFEST_NAME} itself: got "
            f"{path}; use {path.parent}"
        )


def sha256_file(path):
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the manifest declares it."""

    name: str
    shape: tuple  # ints for fixed axes, str for dynamic ones ("B", "N")
    dtype: str


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file of a model directory."""

    role: str  # "encoder" | "decoder" | "points_decoder"
    path: Path  # resolved against the model directory
    sha256: str
    precision: str  # "fp32", "int8-static-qdq", ...
    weights_id: str  # which weights this graph was made from; encoder and decoder must agree
    inputs: tuple  # of TensorSpec
    outputs: tuple  # of TensorSpec


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing constants (SAM's): resize longest side, normalise, pad bottom-right."""

    image_size: int
    pixel_mean: tuple  # 3 floats, RGB order
    pixel_std: tuple  # 3 floats, RGB order
    pad_value: float


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest.json. Build with `load_manifest`."""

    model_dir: Path
    model: str
    weights_id: str
    opset: int
    preprocess: Preprocess
    mask_threshold: float
    encoder: GraphSpec
    decoder: GraphSpec
    points_decoder: object  # GraphSpec, or None when the directory has no points-only decoder
    quantization: object  # None or the recipe dict written by `tinysam quantize`
    raw: dict  # the whole JSON document, for provenance display

    @property
    def graphs(self):
        """Every graph file of the directory: (encoder, decoder[, points_decoder])."""
        return tuple(g for g in (self.encoder, self.decoder, self.points_decoder) if g is not None)

    @property
    def model_id(self):
        """Identity of the image embeddings this model produces: the encoder file's sha256."""
        return self.encoder.sha256


def _shown(value):
    """A value for an error message, abbreviated (a malformed manifest may hold anything)."""
    return reprlib.repr(value)


def _field(doc, key, kind, where):
    if key not in doc:
        raise ModelFileError(f"{where}: missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind):
        raise ModelFileError(f"{where}: field {key!r} must be {kind.__name__}, got {_shown(value)}")
    return value


def _number(value, key, where):
    """A JSON number as float, finite in float32 (what the runtime computes in); bools, strings,
    NaN/inf and numbers beyond float32 are a ModelFileError naming `key`."""
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float64
            number = float("inf")
        if abs(number) <= FLOAT32_MAX:  # False for NaN too
            return number
    raise ModelFileError(
        f"{where}: field {key!r} must be a finite number (float32: magnitude at most {FLOAT32_MAX:.4g}), "
        f"got {_shown(value)}"
    )


def _in_range(values, key, low, high, why, where):
    for value in values:
        if not low <= value <= high:
            raise ModelFileError(f"{where}: field {key!r} must be in [{low:.6g}, {high:.6g}] ({why}), got {value!r}")


def _numbers(pre, post, where):
    """Every number the runtime computes with, checked in one place.

    - preprocess.image_size: the encoder's input side (1024), an int;
    - pixel_mean: 3 values in [0, 255], the uint8 pixel scale it is subtracted from;
    - pixel_std: 3 values in [MIN_PIXEL_STD, 255] (std > 0 and not float32-denormal);
    - pad_value: in the encoder's input frame, so within the span normalised pixels cover
      ((0 - mean) / std .. (255 - mean) / std), which always holds SAM's 0;
    - postprocess.mask_threshold: a logit threshold, finite in float32.

    Returns:
        (Preprocess, mask_threshold float).
    """
    image_size = _field(pre, "image_size", int, where)
    # The encoder's input is fixed by the contract; another size would only fail at set_image.
    if isinstance(image_size, bool) or image_size != ENCODER_INPUTS[0][1][-1]:
        raise ModelFileError(
            f"{where}: preprocess.image_size must be {ENCODER_INPUTS[0][1][-1]} (the encoder's "
            f"input side), got {_shown(image_size)}"
        )
    mean, std = (tuple(_number(v, key, where) for v in _field(pre, key, list, where))
                 for key in ("pixel_mean", "pixel_std"))
    for key, values in (("pixel_mean", mean), ("pixel_std", std)):
        if len(values) != 3:
            raise ModelFileError(f"{where}: field {key!r} must be 3 values (RGB), got {len(values)}")
    _in_range(mean, "pixel_mean", *PIXEL_RANGE, "the uint8 pixel scale", where)
    _in_range(std, "pixel_std", MIN_PIXEL_STD, PIXEL_RANGE[1],
              "std > 0: pixels are divided by it; tinier blows them up, larger than the pixel range flattens them", where)
    pad_value = _number(pre.get("pad_value", 0.0), "pad_value", where)
    low = min((PIXEL_RANGE[0] - m) / s for m, s in zip(mean, std))
    high = max((PIXEL_RANGE[1] - m) / s for m, s in zip(mean, std))
    _in_range((pad_value,), "pad_value", low, high, "the span of normalised pixels for this pixel_mean/pixel_std", where)
    mask_threshold = _number(post.get("mask_threshold", 0.0), "mask_threshold", where)
    return Preprocess(image_size, mean, std, pad_value), mask_threshold


def _quantization(doc, where):
    """The recipe block: null (FP32) or what `tinysam quantize` wrote. The runtime reads its
    `graphs` (role -> recipe object) and each recipe's `reduce_range` (8-bit weights when false)."""
    recipe = doc.get("quantization")
    if recipe is None:
        return None
    if not isinstance(recipe, dict):
        raise ModelFileError(f"{where}: field 'quantization' must be null or an object (a quantize recipe), "
                             f"got {_shown(recipe)}")
    graphs = recipe.get("graphs", {})
    if not isinstance(graphs, dict):
        raise ModelFileError(f"{where}: field 'quantization.graphs' must be an object (graph role -> recipe), "
                             f"got {_shown(graphs)}")
    for role, entry in graphs.items():
        if not isinstance(entry, dict):
            raise ModelFileError(f"{where}: field 'quantization.graphs.{role}' must be an object (a graph's "
                                 f"recipe), got {_shown(entry)}")
        reduce_range = entry.get("reduce_range", True)
        if not isinstance(reduce_range, bool):
            raise ModelFileError(f"{where}: field 'quantization.graphs.{role}.reduce_range' must be true or "
                                 f"false, got {_shown(reduce_range)}")
    return recipe


def _tensor_specs(items, where):
    specs = []
    for item in items:
        if not isinstance(item, dict):
            raise ModelFileError(f"{where}: tensor entry must be an object, got {_shown(item)}")
        name = _field(item, "name", str, where)
        shape = tuple(_field(item, "shape", list, where))
        for dim in shape:
            if isinstance(dim, bool) or not (isinstance(dim, int) and dim >= 0 or isinstance(dim, str) and dim):
                raise ModelFileError(f"{where}: {name!r} shape entries must be ints >= 0 (fixed axes) or axis "
                                     f"names (dynamic ones), got {_shown(list(shape))}")
        specs.append(TensorSpec(name, shape, str(item.get("dtype", "float32"))))
    return tuple(specs)


def _graph_spec(model_dir, role, doc, where):
    where = f"{where} graphs.{role}"
    file = _field(doc, "file", str, where)
    if not file or "\0" in file:  # the model directory itself, or a path no OS call accepts
        raise ModelFileError(f"{where}: field 'file' must name the graph's file, got {_shown(file)}")
    return GraphSpec(
        role=role,
        path=(model_dir / file).resolve(),
        sha256=_field(doc, "sha256", str, where).lower(),
        precision=_field(doc, "precision", str, where),
        weights_id=_field(doc, "weights_id", str, where),
        inputs=_tensor_specs(_field(doc, "inputs", list, where), where),
        outputs=_tensor_specs(_field(doc, "outputs", list, where), where),
    )


def parse_manifest(doc, model_dir, where="manifest.json"):
    """Validate a manifest document (dict) and build a `Manifest`.

    Raises:
        ModelFileError: naming `where` and the bad field.
    """
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise ModelFileError(f"{where}: not a tinysam-rt manifest (format != {MANIFEST_FORMAT!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{where}: format_version {_shown(version)} is not supported (this tinysam-rt reads "
            f"{FORMAT_VERSION}); re-export the model with this version"
        )
    model_dir = Path(model_dir)
    post = doc.get("postprocess", {})
    if not isinstance(post, dict):
        raise ModelFileError(f"{where}: field 'postprocess' must be dict, got {_shown(post)}")
    preprocess, mask_threshold = _numbers(_field(doc, "preprocess", dict, where), post, where)
    graphs = _field(doc, "graphs", dict, where)
    encoder, decoder = (
        _graph_spec(model_dir, role, _field(graphs, role, dict, f"{where} graphs"), where)
        for role in GRAPH_ROLES
    )
    optional = {role: _graph_spec(model_dir, role, _field(graphs, role, dict, f"{where} graphs"), where)
                for role in OPTIONAL_GRAPH_ROLES if role in graphs}
    points_decoder = optional.get("points_decoder")
    weights = _field(doc, "weights", dict, where)
    weights_id = _field(weights, "weights_id", str, where)
    for graph in (encoder, decoder, points_decoder):
        if graph is None:
            continue
        if graph.weights_id != weights_id:
            raise ModelFileError(
                f"{where}: {graph.role} {graph.path.name} was made from weights "
                f"{graph.weights_id!r} but the model is {weights_id!r}; encoder and decoder must "
                f"come from the same weights"
            )
    opset = doc.get("opset", 0)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ModelFileError(f"{where}: field 'opset' must be int, got {_shown(opset)}")
    return Manifest(
        model_dir=model_dir,
        model=_field(doc, "model", str, where),
        weights_id=weights_id,
        opset=opset,
        preprocess=preprocess,
        mask_threshold=mask_threshold,
        encoder=encoder,
        decoder=decoder,
        points_decoder=points_decoder,
        quantization=_quantization(doc, where),
        raw=doc,
    )


def load_manifest(model_dir, verify=True):
    """Read `model_dir/manifest.json`, validate it and (by default) sha256-verify every graph.

    Raises:
        FileNotFoundError: no manifest.json in `model_dir`, or `model_dir` is the path of
            manifest.json itself (the message names its directory).
        ModelFileError: invalid JSON (including nesting too deep to parse) or fields, a graph file missing, or a sha256 mismatch —
            the message names the file.
    """
    model_dir = Path(os.path.expanduser(model_dir))
    _refuse_manifest_path(model_dir, "model_dir")
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (is {model_dir} a tinysam-rt model dir?)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: bad JSON, bad UTF-8, an int over Python's digit limit; RecursionError: nesting
    # deeper than the interpreter's stack.
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from None
    manifest = parse_manifest(doc, model_dir, where=str(path))
    if verify:
        for graph in manifest.graphs:
            verify_graph_file(graph)
    return manifest


def verify_graph_file(graph):
    """Check that a graph file exists and its sha256 matches the manifest.

    Raises:
        ModelFileError: naming the file, with both hashes on mismatch.
    """
    if not graph.path.is_file():
        raise ModelFileError(f"{graph.path}: {graph.role} file listed in the manifest is missing")
    actual = sha256_file(graph.path)
    if actual != graph.sha256:
        raise ModelFileError(
            f"{graph.path}: sha256 {actual[:12]}… does not match the manifest's {graph.role} "
            f"sha256 {graph.sha256[:12]}… (file corrupt, truncated, swapped, or from another export)"
        )


def graph_entry(role, file_path, precision, weights_id, inputs, outputs):
    """Build the manifest dict entry for one graph file (used by export and quantize).

    Args:
        role: "encoder" | "decoder" | "points_decoder".
        file_path: Path of the written ONNX file; stored by name, relative to the manifest.
        inputs/outputs: sequences of (name, shape) pairs, e.g. `DECODER_INPUTS`.
    """
    file_path = Path(file_path)
    return {
        "file": file_path.name,
        "sha256": sha256_file(file_path),
        "bytes": file_path.stat().st_size,
        "precision": precision,
        "weights_id": weights_id,
        "inputs": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in inputs],
        "outputs": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in outputs],
    }
