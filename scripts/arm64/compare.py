"""Agreement between two smoke.py runs (x86-64 native vs aarch64 emulated). Pure numpy.

    python compare.py x86.npz aarch64.npz [--min-iou 0.99]

Prints one line per prompt and a summary; exits 1 when the min mask IoU is below --min-iou.
"""

import argparse
import json
import os
import sys

import numpy as np


def mask_iou(a, b):
    """IoU of two boolean masks of the same shape; 1.0 when both are empty.

    Args:
        a, b: (H, W) bool.
    """
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def agreement(ref, other):
    """Per-prompt and overall agreement figures between two smoke.py outputs.

    Args:
        ref, other: mappings loaded from smoke.py .npz files (same model, image and prompts).

    Returns:
        dict: image_identical, input_identical (bools), embedding_max_abs, embedding_cosine,
        per_prompt (list of dicts: name, iou (3,), max_abs_score, max_abs_logits, flipped_px),
        min_iou, max_abs_score, max_abs_logits.
    """
    names = [str(n) for n in ref["prompt_names"]]
    if names != [str(n) for n in other["prompt_names"]]:
        raise ValueError(f"the two runs used different prompts: {names} vs {list(other['prompt_names'])}")
    e_ref = ref["embedding"].astype(np.float64).ravel()
    e_oth = other["embedding"].astype(np.float64).ravel()
    result = {
        "image_identical": str(ref["image_sha256"]) == str(other["image_sha256"]),
        "input_identical": str(ref["input_sha256"]) == str(other["input_sha256"]),
        "embedding_max_abs": float(np.abs(e_ref - e_oth).max()),
        "embedding_cosine": float(e_ref @ e_oth / (np.linalg.norm(e_ref) * np.linalg.norm(e_oth))),
        "per_prompt": [],
    }
    for k, name in enumerate(names):
        m_ref, m_oth = ref[f"p{k}_masks"], other[f"p{k}_masks"]  # (3, H, W) bool
        if m_ref.shape != m_oth.shape:
            raise ValueError(f"prompt {name!r}: mask shapes differ, {m_ref.shape} vs {m_oth.shape}")
        result["per_prompt"].append({
            "name": name,
            "iou": [mask_iou(a, b) for a, b in zip(m_ref, m_oth)],
            "max_abs_score": float(np.abs(ref[f"p{k}_scores"] - other[f"p{k}_scores"]).max()),
            "max_abs_logits": float(np.abs(ref[f"p{k}_low_res"] - other[f"p{k}_low_res"]).max()),
            "flipped_px": int((m_ref != m_oth).sum()),
            "mask_px": [int(m.sum()) for m in m_ref],
        })
    prompts = result["per_prompt"]
    result["min_iou"] = min(min(p["iou"]) for p in prompts)
    result["max_abs_score"] = max(p["max_abs_score"] for p in prompts)
    result["max_abs_logits"] = max(p["max_abs_logits"] for p in prompts)
    return result


def format_report(result, label):
    """Human-readable lines for one comparison."""
    lines = [
        f"[{label}] decoded image identical: {result['image_identical']}; "
        f"encoder input identical: {result['input_identical']}",
        f"[{label}] embedding: max |delta| {result['embedding_max_abs']:.3g}, cosine {result['embedding_cosine']:.8f}",
    ]
    for p in result["per_prompt"]:
        ious = ", ".join(f"{v:.5f}" for v in p["iou"])
        lines.append(f"[{label}] {p['name']:<16} IoU (masks 1..3) {ious}; max |delta score| "
                     f"{p['max_abs_score']:.3g}; max |delta logits| {p['max_abs_logits']:.3g}; "
                     f"pixels flipped {p['flipped_px']} (mask px {p['mask_px']})")
    lines.append(f"[{label}] min IoU {result['min_iou']:.5f}; max |delta score| {result['max_abs_score']:.3g}; "
                 f"max |delta logits| {result['max_abs_logits']:.3g}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", help="smoke.py .npz from the reference platform (x86-64)")
    parser.add_argument("other", help="smoke.py .npz from the platform under test (aarch64)")
    parser.add_argument("--min-iou", type=float, default=0.99, help="fail below this min mask IoU")
    parser.add_argument("--label", default="compare", help="prefix for the printed lines")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    with np.load(args.reference) as ref, np.load(args.other) as other:
        result = agreement(ref, other)
    print("\n".join(format_report(result, args.label)))
    if args.json:  # temp file + rename: never a half-written report
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as handle:
            json.dump(result, handle, indent=1)
        os.replace(tmp, args.json)
    if result["min_iou"] < args.min_iou:
        print(f"[{args.label}] FAIL: min IoU {result['min_iou']:.5f} < {args.min_iou}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
