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
import math
import os
from dataclasses import dataclass
from pathlib import Path

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
#   returned by every run, and passed back as `image_side_cache` on later runs for the same image
#   it is not recomputed; an empty (0, 8, 4096, 16) cache means "compute it". Its first axis is
#   the graph's own business (3 slices in exports before the factored upscaler, 5 since).
# Exports made before these existed have the first three inputs and two outputs only (the
# "basic" contract); sessions accept both.
POINTS_DECODER_GATE = ("upscale_iou_threshold", ())
POINTS_DECODER_CACHE = ("image_side_cache", ("S", 8, 4096, 16))
POINTS_DECODER_IMAGE_SIDE = ("image_side", ("S", 8, 4096, 16))
POINTS_DECODER_INPUTS = DECODER_INPUTS[:3] + (POINTS_DECODER_GATE, POINTS_DECODER_CACHE)
POINTS_DECODER_OUTPUTS = DECODER_OUTPUTS + (POINTS_DECODER_IMAGE_SIDE,)
POINTS_DECODER_BASIC_INPUTS = DECODER_INPUTS[:3]
POINTS_DECODER_BASIC_OUTPUTS = DECODER_OUTPUTS


def default_model_dir():
    """The documented default location: `$XDG_CACHE_HOME/tinysam-rt/vit_t` (~/.cache/...)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "tinysam-rt" / "vit_t"


def resolve_model_dir(model_dir=None):
    """Pick the model directory: the argument, else $TINYSAM_MODEL_DIR, else the default.

    Raises:
        FileNotFoundError: the chosen directory has no manifest.json; the message says how to
            make one.
    """
    if model_dir is not None:
        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError(f"model_dir must be a str or os.PathLike path, got {type(model_dir).__name__}")
        chosen, why = Path(model_dir), "model_dir argument"
    elif os.environ.get(MODEL_DIR_ENV):
        chosen, why = Path(os.environ[MODEL_DIR_ENV]), f"${MODEL_DIR_ENV}"
    else:
        chosen, why = default_model_dir(), "default location"
    if not (chosen / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"no tinysam-rt model at {chosen} (from {why}): {MANIFEST_NAME} not found. "
            f"Export one with `tinysam export --checkpoint tinysam_42.3.pth --out {chosen}` "
            f"(or `--random-seed 0` for random weights), copy an exported model directory there, "
            f"or pass model_dir= / set ${MODEL_DIR_ENV}."
        )
    return chosen


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


def _field(doc, key, kind, where):
    if key not in doc:
        raise ModelFileError(f"{where}: missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind):
        raise ModelFileError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _finite(value, key, where):
    """A JSON number as float; bools, strings and NaN/inf are a ModelFileError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelFileError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _tensor_specs(items, where):
    specs = []
    for item in items:
        if not isinstance(item, dict):
            raise ModelFileError(f"{where}: tensor entry must be an object, got {item!r}")
        name = _field(item, "name", str, where)
        shape = tuple(_field(item, "shape", list, where))
        specs.append(TensorSpec(name, shape, str(item.get("dtype", "float32"))))
    return tuple(specs)


def _graph_spec(model_dir, role, doc, where):
    where = f"{where} graphs.{role}"
    return GraphSpec(
        role=role,
        path=(model_dir / _field(doc, "file", str, where)).resolve(),
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
            f"{where}: format_version {version!r} is not supported (this tinysam-rt reads "
            f"{FORMAT_VERSION}); re-export the model with this version"
        )
    model_dir = Path(model_dir)
    pre = _field(doc, "preprocess", dict, where)
    mean = tuple(_finite(v, "pixel_mean", where) for v in _field(pre, "pixel_mean", list, where))
    std = tuple(_finite(v, "pixel_std", where) for v in _field(pre, "pixel_std", list, where))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelFileError(f"{where}: pixel_mean/pixel_std must be 3 values (std > 0)")
    image_size = _field(pre, "image_size", int, where)
    # The encoder's input is fixed by the contract; another size would only fail at set_image.
    if isinstance(image_size, bool) or image_size != ENCODER_INPUTS[0][1][-1]:
        raise ModelFileError(
            f"{where}: preprocess.image_size must be {ENCODER_INPUTS[0][1][-1]} (the encoder's "
            f"input side), got {image_size!r}"
        )
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
    post = doc.get("postprocess", {})
    if not isinstance(post, dict):
        raise ModelFileError(f"{where}: field 'postprocess' must be dict, got {post!r}")
    opset = doc.get("opset", 0)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ModelFileError(f"{where}: field 'opset' must be int, got {opset!r}")
    return Manifest(
        model_dir=model_dir,
        model=_field(doc, "model", str, where),
        weights_id=weights_id,
        opset=opset,
        preprocess=Preprocess(
            image_size=image_size,
            pixel_mean=mean,
            pixel_std=std,
            pad_value=_finite(pre.get("pad_value", 0.0), "pad_value", where),
        ),
        mask_threshold=_finite(post.get("mask_threshold", 0.0), "mask_threshold", where),
        encoder=encoder,
        decoder=decoder,
        points_decoder=points_decoder,
        quantization=doc.get("quantization"),
        raw=doc,
    )


def load_manifest(model_dir, verify=True):
    """Read `model_dir/manifest.json`, validate it and (by default) sha256-verify every graph.

    Raises:
        FileNotFoundError: no manifest.json in `model_dir`.
        ModelFileError: invalid JSON or fields, a graph file missing, or a sha256 mismatch —
            the message names the file.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (is {model_dir} a tinysam-rt model dir?)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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
