"""One set_image + predict run of an installed tinysam-rt, saved to .npz for cross-ISA comparison.

Runs unchanged on x86-64 (native) and on aarch64 (under qemu-user, started by
scripts/arm64-check). Imports only what the runtime wheel brings: stdlib, numpy, cv2,
onnxruntime and tinysam_rt. Prints one JSON line describing the platform and the run.

    python smoke.py --model DIR --image photo.jpg --out run.npz [--threads N]
    python smoke.py ... --embedding-from x86.npz   # decoder only: reuse that run's embedding

`--embedding-from` skips the 77.5 GFLOP encoder (minutes under emulation) so that many
onnxruntime releases can be tried on the decoder quickly; the full run is the real check.

The .npz holds, for prompt k (see `prompts_for`):
    p{k}_masks      (3, H, W) bool, original frame
    p{k}_scores     (3,) float32 predicted IoU
    p{k}_low_res    (3, 256, 256) float32 logits, 1024-frame low-res grid
and once per image:
    image_sha256    sha256 of the decoded (H, W, 3) uint8 RGB pixels
    input_sha256    sha256 of the (1, 3, 1024, 1024) float32 encoder input
    embedding       (1, 256, 64, 64) float32 image embedding
"""

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time

import cv2
import numpy as np
import onnxruntime

import tinysam_rt
from tinysam_rt import preprocess
from tinysam_rt.embedding import ImageEmbedding
from tinysam_rt.io import load_image
from tinysam_rt.predictor import TinySAMPredictor


def prompts_for(height, width):
    """Point and box prompts placed by fractions of the image size, identical on every ISA.

    Returns:
        list of (name, point_coords (N, 2) float32 XY pixels or None, point_labels (N,) or None,
        box (4,) float32 XYXY pixels or None), original frame.
    """
    w, h = float(width), float(height)
    center = np.array([[0.5 * w, 0.5 * h]], np.float32)
    fg_bg = np.array([[0.35 * w, 0.45 * h], [0.8 * w, 0.2 * h]], np.float32)
    box = np.array([0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h], np.float32)
    return [
        ("center point", center, np.array([1], np.int64), None),
        ("fg + bg points", fg_bg, np.array([1, 0], np.int64), None),
        ("box", None, None, box),
        ("box + fg point", center, np.array([1], np.int64), box),
    ]


def tensor_input_size(image, long_side):
    """(h, w) of the image resized so its longest side is `long_side` (SAM's rule)."""
    return preprocess.preprocess_shape(image.shape[0], image.shape[1], long_side)


def environment():
    """What this interpreter is: the facts a reader needs to trust an aarch64 claim."""
    return {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cv2": cv2.__version__,
        "tinysam_rt": tinysam_rt.__version__,
        "tinysam_rt_path": os.path.dirname(tinysam_rt.__file__),
        "providers": onnxruntime.get_available_providers(),
    }


def run(model_dir, image_path, threads, embedding_from=None):
    """set_image (or set_embedding of a saved embedding) + predict for every prompt.

    Returns:
        (arrays dict for np.savez, timings dict in seconds).
    """
    image = load_image(image_path)  # (H, W, 3) uint8 RGB
    predictor = TinySAMPredictor(model_dir=model_dir, threads=threads, cache_size=0)
    pre = predictor.manifest.preprocess
    # The encoder input is rebuilt here only to fingerprint it: if it differs across ISAs the
    # disagreement is in preprocessing, not in ONNX Runtime.
    tensor = preprocess.normalize_pad(preprocess.resize_longest_side(image, pre.image_size),
                                      pre.pixel_mean, pre.pixel_std, pre.image_size, pre.pad_value)
    arrays = {
        "image_sha256": np.array(hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()),
        "input_sha256": np.array(hashlib.sha256(np.ascontiguousarray(tensor, np.float32).tobytes()).hexdigest()),
    }
    start = time.perf_counter()
    if embedding_from is None:
        embedding = predictor.set_image(image)
    else:
        with np.load(embedding_from) as saved:
            features = saved["embedding"]  # (1, 256, 64, 64)
        embedding = ImageEmbedding(features, tuple(image.shape[:2]), tuple(tensor_input_size(image, pre.image_size)),
                                   predictor.manifest.model_id)
        predictor.set_embedding(embedding)
    timings = {"set_image_s": time.perf_counter() - start, "encoder_ran": embedding_from is None}
    arrays["embedding"] = np.asarray(embedding.features, np.float32)  # (1, 256, 64, 64)
    names = []
    start = time.perf_counter()
    for k, (name, coords, labels, box) in enumerate(prompts_for(*image.shape[:2])):
        masks, scores, low_res = predictor.predict(coords, labels, box, multimask_output=True)
        arrays[f"p{k}_masks"] = masks  # (3, H, W) bool
        arrays[f"p{k}_scores"] = scores  # (3,)
        arrays[f"p{k}_low_res"] = low_res  # (3, 256, 256)
        names.append(name)
    timings["predict_s_total"] = time.perf_counter() - start
    arrays["prompt_names"] = np.array(names)
    return arrays, timings


def save_npz(path, arrays):
    """np.savez_compressed to a temp file beside `path`, then rename: no half-written .npz."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory (manifest.json)")
    parser.add_argument("--image", required=True, help="photo to segment")
    parser.add_argument("--out", required=True, help=".npz to write")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    parser.add_argument("--embedding-from", default=None, metavar="NPZ",
                        help="skip the encoder: use the embedding saved in this smoke.py output")
    args = parser.parse_args(argv)
    info = environment()
    arrays, timings = run(args.model, args.image, args.threads, args.embedding_from)
    save_npz(args.out, arrays)
    info.update(timings, model=args.model, image=args.image, out=args.out,
                prompts=[str(n) for n in arrays["prompt_names"]])
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
