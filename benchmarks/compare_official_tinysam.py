"""Hierarchical everything mode: the official TinySAM code vs tinysam-rt, on the same weights.

    python benchmarks/compare_official_tinysam.py --tinysam-repo PATH --image ../shared/images/picture1.jpg

PATH is a checkout of github.com/xinghaochen/TinySAM (its `tinysam` package is imported from
there; it is not a dependency and nothing of it is copied here). Needs the export extra (torch,
torchvision, timm). Steps:

1. a random-weight checkpoint in the official layout (`save_random_checkpoint`, seeded);
2. the official model: `sam_model_registry["vit_t"](checkpoint=...)`, then `eval()` once more,
   because the official builder calls `eval()` before `load_state_dict` and TinyViT caches its
   attention biases at `eval()` (without it the official model ignores the checkpoint's biases);
3. `SamHierarchicalMaskGenerator(...).hierarchical_generate(image)`, recording the points each of
   its two passes ran;
4. `tinysam export --checkpoint` of the same file, and `TinySAMAutomaticMaskGenerator` with
   `HierarchicalConfig()` (the published "tinysam" dense points), recording its prompts;
5. the dense point sets, mask counts, per-point matched mask IoU and scores, side by side.

Random weights make logits of a few units at most and predicted IoUs near 0, so the default
thresholds keep nothing and cover nothing; the defaults below are lowered (and named in the
output) so that masks survive and the sparse pass covers part of the image, which is what
exercises the skip logic. Pass TinySAM's own values to see that both keep nothing.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tinysam_rt import preprocess
from tinysam_rt.everything import AmgConfig, HierarchicalConfig, TinySAMAutomaticMaskGenerator
from tinysam_rt.io import load_image
from tinysam_rt.manifest import load_manifest
from tinysam_rt.predictor import TinySAMPredictor

# Thresholds at which random weights leave masks and coverage (see the module docstring).
RANDOM_WEIGHT_THRESHOLDS = dict(pred_iou_thresh=0.1, stability_score_thresh=0.003, high_score_thresh=0.5,
                                box_nms_thresh=1.0)


class _PromptRecorder:
    """Wraps a TinySAMPredictor; keeps the 1024-frame point of every prompt it decodes."""

    def __init__(self, predictor):
        self._predictor = predictor
        self.points = []  # one (b, 2) array per decoder call

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def predict_batch(self, point_coords, point_labels, mask_input=None, embedding=None, upscale_iou_threshold=None):
        self.points.append(np.asarray(point_coords)[:, 0, :].copy())
        return self._predictor.predict_batch(point_coords, point_labels, mask_input, embedding, upscale_iou_threshold)


def run_official(repo, checkpoint, image, points_per_side, thresholds):
    """The official hierarchical generator. Returns (records, [sparse points, dense points] in
    original pixels, seconds)."""
    import torch

    sys.path.insert(0, str(repo))
    try:
        from tinysam import SamHierarchicalMaskGenerator, sam_model_registry
    finally:
        sys.path.remove(str(repo))
    sam = sam_model_registry["vit_t"](checkpoint=str(checkpoint))
    sam.eval()  # re-cache TinyViT's attention biases from the loaded checkpoint (see docstring)
    generator = SamHierarchicalMaskGenerator(sam, points_per_side=points_per_side, **thresholds)
    passes = []
    generate = generator.generate

    def recording_generate(img, need_high):
        passes.append(generator.point_grids[0] * np.array(img.shape[:2])[None, ::-1])
        return generate(img, need_high)

    generator.generate = recording_generate
    start = time.perf_counter()
    with torch.no_grad():
        records = generator.hierarchical_generate(image)
    return records, passes, time.perf_counter() - start


def run_ours(model_dir, image, points_per_side, thresholds, threads):
    """tinysam-rt's hierarchical mode. Returns (records, stats, prompts in the 1024 frame, seconds)."""
    hier = dict(high_score_thresh=thresholds["high_score_thresh"])
    config = AmgConfig(points_per_side=points_per_side,
                       **{k: v for k, v in thresholds.items() if k != "high_score_thresh"})
    recorder = _PromptRecorder(TinySAMPredictor(model_dir=model_dir, threads=threads))
    start = time.perf_counter()
    result = TinySAMAutomaticMaskGenerator(recorder, config, HierarchicalConfig(**hier)).run(image)
    seconds = time.perf_counter() - start
    prompts = np.concatenate(recorder.points) if recorder.points else np.zeros((0, 2))
    return result.records, result.stats, prompts, seconds


def _iou(a, b):
    """IoU of two (H, W) bool masks (fidelity.mask_iou on a batch of one)."""
    from tinysam_export.fidelity import mask_iou

    return float(mask_iou(np.asarray(a)[None], np.asarray(b)[None])[0])


def _point_set_diff(ours, theirs, tol=1e-3):
    """(points only in ours, points only in theirs), matched within `tol` pixels."""
    ours, theirs = np.asarray(ours).reshape(-1, 2), np.asarray(theirs).reshape(-1, 2)
    if len(ours) == 0 or len(theirs) == 0:
        return len(ours), len(theirs)
    close = np.abs(ours[:, None, :] - theirs[None, :, :]).max(-1) <= tol  # (O, T)
    return int((~close.any(1)).sum()), int((~close.any(0)).sum())


def compare(ours, theirs):
    """Per reference mask: the best IoU among our masks from the same prompt point, and the
    |difference| of predicted IoU and stability score for that match."""
    # Matched within 1e-3 px, not by rounded keys: TinySAM's dense points go through x / W * W.
    our_points = np.array([record["point_coords"][0] for record in ours]).reshape(-1, 2)
    ious, d_iou, d_stab = [], [], []
    for record in theirs:
        near = np.abs(our_points - np.asarray(record["point_coords"][0])).max(axis=1) <= 1e-3
        candidates = [ours[i] for i in np.flatnonzero(near)]
        if not candidates:
            ious.append(0.0)
            continue
        iou, best = max(((_iou(record["segmentation"], c["segmentation"]), c) for c in candidates),
                        key=lambda scored: scored[0])
        ious.append(iou)
        d_iou.append(abs(record["predicted_iou"] - best["predicted_iou"]))
        d_stab.append(abs(record["stability_score"] - best["stability_score"]))
    ious = np.array(ious)
    return {
        "matched_iou_mean": float(ious.mean()) if len(ious) else None,
        "matched_iou_min": float(ious.min()) if len(ious) else None,
        "max_abs_predicted_iou_diff": float(max(d_iou, default=0.0)),
        "max_abs_stability_diff": float(max(d_stab, default=0.0)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tinysam-repo", required=True, type=Path, help="checkout of xinghaochen/TinySAM")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="random weights of the checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    for name, value in RANDOM_WEIGHT_THRESHOLDS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=value)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not (args.tinysam_repo / "tinysam" / "hierarchical_mask_generator.py").is_file():
        parser.error(f"--tinysam-repo {args.tinysam_repo} has no tinysam/hierarchical_mask_generator.py")
    from tinysam_export.export_onnx import export_model
    from tinysam_export.model.build import save_random_checkpoint

    thresholds = {name: getattr(args, name) for name in RANDOM_WEIGHT_THRESHOLDS}
    image = load_image(args.image)
    with tempfile.TemporaryDirectory(prefix="tinysam-official-") as tmp:
        checkpoint = save_random_checkpoint(Path(tmp) / "random.pth", seed=args.seed)
        manifest_path = export_model(Path(tmp) / "model", checkpoint=checkpoint)
        long_side = load_manifest(manifest_path.parent).preprocess.image_size  # the frame prompts are fed in
        ours, stats, our_prompts, our_s = run_ours(Path(tmp) / "model", image, args.points_per_side, thresholds,
                                                   args.threads)
        theirs, passes, their_s = run_official(args.tinysam_repo, checkpoint, image, args.points_per_side, thresholds)

    their_prompts = [preprocess.coords_to_input_frame(p, image.shape[:2], long_side) for p in passes]
    sparse_n = len(their_prompts[0])
    only_ours, only_theirs = _point_set_diff(our_prompts[stats.sparse_points:], their_prompts[1])
    report = {
        "image": str(args.image), "image_size": list(image.shape[:2]), "points_per_side": args.points_per_side,
        "thresholds": thresholds, "weights": f"random seed {args.seed}, official checkpoint layout",
        "official": {"sparse_points": sparse_n, "dense_points": len(their_prompts[1]), "masks": len(theirs),
                     "seconds": round(their_s, 1)},
        "tinysam_rt": {"sparse_points": stats.sparse_points, "dense_points": stats.points_run - stats.sparse_points,
                       "dense_skipped": stats.dense_skipped, "covered_fraction": round(stats.covered_fraction, 4),
                       "points_upscaled": stats.points_upscaled, "masks": len(ours), "seconds": round(our_s, 1)},
        "sparse_points_differ": _point_set_diff(our_prompts[:stats.sparse_points], their_prompts[0]),
        "dense_points_only_ours": only_ours, "dense_points_only_official": only_theirs,
        **compare(ours, theirs),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
