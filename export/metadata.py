"""Stamp which weights a graph came from into the ONNX file itself (needs onnx, not torch).

The manifest pairs graphs by `weights_id`, but a manifest can be edited (re-hashed) around a
graph from another export. With the id inside the file too, the runtime's sessions compare the
two and refuse a graph whose own id differs (tinysam_rt.sessions).
"""

import onnx

from tinysam_rt.errors import ModelFileError
from tinysam_rt.manifest import WEIGHTS_ID_METADATA_KEY


def stamp_weights_id(path, weights_id):
    """Set the graph file's `tinysam_rt.weights_id` metadata property, in place.

    Args:
        path: Path of an ONNX file (rewritten; callers write into staging directories).
        weights_id: str, the manifest's weights_id ("random-seed-0", "sha256:...").
    Raises:
        ModelFileError: the file does not parse as ONNX (named).
    """
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends: name the file instead
        raise ModelFileError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    onnx.save(set_weights_id(model, weights_id), str(path))


def set_weights_id(model, weights_id):
    """Set the `tinysam_rt.weights_id` metadata property of an in-memory ModelProto; returns it."""
    props = {p.key: p.value for p in model.metadata_props}
    props[WEIGHTS_ID_METADATA_KEY] = weights_id
    onnx.helper.set_model_props(model, props)
    return model
