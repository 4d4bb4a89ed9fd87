"""How close a quantized model is to FP32: metrics, held-out evaluation, the gate, the report.

The metrics are what a user of the runtime sees: the image embedding (cosine), the mask SAM's
`multimask_output=False` would return (highest predicted IoU of the 3; "selected" by each model
itself, so a changed choice counts as a miss) upscaled to the resized image, and its score.
"""

import numpy as np

from tinysam_export import calibration
from tinysam_rt import postprocess


def cosine(a, b):
    """Cosine similarity of two arrays of any equal shape, flattened (1.0 for two zero arrays)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return 1.0 if norm == 0 else float(a @ b / norm)


def mask_iou(a, b):
    """IoU of boolean masks.

    Args:
        a, b: (B, H, W) bool.

    Returns:
        (B,) float64; 1.0 where both masks are empty.
    """
    inter = np.logical_and(a, b).sum(axis=(1, 2))
    union = np.logical_or(a, b).sum(axis=(1, 2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def select_best(low_res, iou, tokens=None):
    """SAM's multimask_output=False choice: the mask with the highest predicted IoU.

    Args:
        low_res: (B, 3, 256, 256) float32 logits; iou: (B, 3) float32.
        tokens: (B,) int to take these masks instead of the highest-scoring ones.

    Returns:
        logits (B, 256, 256) float32, scores (B,) float32, the chosen tokens (B,) int.
    """
    best = np.argmax(iou, axis=1) if tokens is None else np.asarray(tokens)  # (B,)
    rows = np.arange(len(best))
    return low_res[rows, best], iou[rows, best], best


def budget_used(losses, budgets):
    """Largest fraction of an error budget used; <= 1 means every target is met.

    Args:
        losses, budgets: dicts metric -> 1 - value, and metric -> allowed 1 - value (> 0).
    """
    return max(losses[k] / budgets[k] if budgets[k] > 0 else (0.0 if losses[k] <= 0 else float("inf"))
               for k in budgets)


def refine_input(decoder, embeddings, coords, labels):
    """The runtime's iterative refinement: a first pass's best low-res mask as mask_input.

    Returns:
        (B, 1, 256, 256) float32 logits.
    """
    low_res, iou = decoder.run(**calibration.decoder_feeds(embeddings, coords, labels))
    return select_best(low_res, iou)[0][:, None]


def decode_prompts(decoder, embeddings, input_size, batches, tokens=None):
    """Every prompt through a decoder as the runtime runs it, keeping SAM's selected mask.

    Args:
        decoder: a tinysam_rt DecoderSession or PromptDecoder (point prompts then go through its
            points decoder, as in the runtime).
        embeddings: (1, 256, 64, 64) float32; input_size: (h, w) in the 1024 frame.
        batches: from calibration.sample_prompts.
        tokens: (P,) int, another model's choices: also return this decoder's masks at them.

    Returns:
        masks (P, h, w) bool selected masks, scores (P,) float32, chosen tokens (P,) int, and
        (P, h, w) bool masks at `tokens` (None without `tokens`).
    """
    masks, scores, chosen, at_tokens, start = [], [], [], [], 0

    def upscale(logits):
        return postprocess.upscale_logits(logits[:, None], input_size, input_size)[:, 0] > 0.0

    for kind, coords, labels in batches:
        mask_input = refine_input(decoder, embeddings, coords, labels) if kind == "refine" else None
        low_res, iou = decoder.run(**calibration.decoder_feeds(embeddings, coords, labels, mask_input))
        best, score, choice = select_best(low_res, iou)  # (B, 256, 256), (B,), (B,)
        masks.append(upscale(best))
        scores.append(score)
        chosen.append(choice)
        if tokens is not None:
            at_tokens.append(upscale(select_best(low_res, iou, tokens[start:start + len(choice)])[0]))
        start += len(choice)
    return (np.concatenate(masks), np.concatenate(scores), np.concatenate(chosen),
            np.concatenate(at_tokens) if tokens is not None else None)


def evaluate(pipelines, images, pre, sampling, seed):
    """Fidelity of each pipeline against the "fp32" one, on the same images and prompts.

    Args:
        pipelines: dict name -> (EncoderSession, DecoderSession or PromptDecoder); must contain "fp32". Pass the
            same session object where pipelines share a graph: it runs once per image.
        images: list of (name, (H, W, 3) uint8 RGB).
        pre: tinysam_rt.manifest.Preprocess of the model.
        sampling: calibration.PromptSampling; seed: int (prompts differ from calibration's).

    Returns:
        dict name -> metrics: embedding cosine mean/min, selected-mask IoU mean/worst,
        |score difference| mean/max, how often the selection matches FP32's and the mask IoU at
        FP32's selection, prompt and image counts.
    """
    acc = {name: {"cos": [], "iou": [], "dscore": [], "same_choice": [], "same_token_iou": []}
           for name in pipelines if name != "fp32"}
    for index, (_, image) in enumerate(images):
        tensor, input_size = calibration.encoder_input(image, pre)
        batches = calibration.sample_prompts(input_size, np.random.default_rng(seed + index), sampling)
        embeddings = {}  # pipelines sharing an encoder session share its run
        for encoder, _ in pipelines.values():
            if id(encoder) not in embeddings:
                embeddings[id(encoder)] = encoder.run(tensor)  # (1, 256, 64, 64)
        ref_emb = embeddings[id(pipelines["fp32"][0])]
        ref_masks, ref_scores, ref_choice, _ = decode_prompts(pipelines["fp32"][1], ref_emb, input_size, batches)
        for name, values in acc.items():
            encoder, decoder = pipelines[name]
            emb = embeddings[id(encoder)]
            masks, scores, choice, at_ref_choice = decode_prompts(decoder, emb, input_size, batches, ref_choice)
            values["cos"].append(cosine(emb, ref_emb))
            values["iou"].extend(mask_iou(masks, ref_masks).tolist())
            values["dscore"].extend(np.abs(scores - ref_scores).tolist())
            values["same_choice"].extend((choice == ref_choice).tolist())
            values["same_token_iou"].extend(mask_iou(at_ref_choice, ref_masks).tolist())
    return {
        name: {
            "embedding_cosine_mean": round(float(np.mean(v["cos"])), 6),
            "embedding_cosine_min": round(float(np.min(v["cos"])), 6),
            "mask_iou_mean": round(float(np.mean(v["iou"])), 5),
            "mask_iou_worst": round(float(np.min(v["iou"])), 5),
            "score_abs_diff_mean": round(float(np.mean(v["dscore"])), 5),
            "score_abs_diff_max": round(float(np.max(v["dscore"])), 5),
            # Diagnostics, not gated: how often the model picks the mask FP32 picks, and the IoU
            # of its mask at FP32's pick (a changed pick between near-tied scores is the other loss).
            "selection_agreement": round(float(np.mean(v["same_choice"])), 5),
            "same_token_mask_iou_mean": round(float(np.mean(v["same_token_iou"])), 5),
            "prompts": len(v["iou"]),
            "images": len(v["cos"]),
        }
        for name, v in acc.items()
    }


def gate_failures(fidelity, encoder_ratio, min_cosine, min_mask_iou, max_size_ratio):
    """Reasons the "static" model fails the accuracy/size gate (empty: it passes).

    Args:
        fidelity: from `evaluate`, with "static" and optionally "dynamic".
        encoder_ratio: INT8 / FP32 encoder bytes, or None when the encoder was not quantized.
    """
    static, dynamic = fidelity["static"], fidelity.get("dynamic")
    failures = []
    if static["embedding_cosine_min"] < min_cosine:
        failures.append(f"embedding cosine {static['embedding_cosine_min']:.5f} < {min_cosine}")
    if static["mask_iou_mean"] < min_mask_iou:
        failures.append(f"mean selected-mask IoU {static['mask_iou_mean']:.4f} < {min_mask_iou}")
    if dynamic is not None:
        for key in ("embedding_cosine_mean", "mask_iou_mean"):
            if static[key] < dynamic[key]:
                failures.append(f"INT8 {key} {static[key]} is further from FP32 than quantize_dynamic's {dynamic[key]}")
    if encoder_ratio is not None and encoder_ratio > max_size_ratio:
        failures.append(f"INT8 encoder is {encoder_ratio:.1%} of FP32 (> {max_size_ratio:.0%})")
    return failures


def _fraction(value):
    return "-" if value is None else f"{value:.1%}"


def _number(value):
    return "-" if value is None else f"{value:.4f}"


def _method(recipe):
    """The calibration method column: '(search only)' when the graph keeps no calibrated range."""
    method = recipe.get("method", "-")
    return f"{method} (search only)" if recipe.get("calibrated_ranges_used") is False else method


def report_markdown(report):
    """The fidelity and size tables of a `tinysam quantize` report, as markdown."""
    gate = report["gate"]
    lines = [
        f"# tinysam quantize: {report['model']} ({report['weights_id']})",
        "",
        f"Held out of calibration: {', '.join(report['held_out'])}; "
        f"{report['fidelity']['static']['prompts']} prompts. Gate {'passed' if gate['passed'] else 'FAILED'}"
        f"{'' if gate['enforced'] else ' (not enforced: --no-gate)'}: embedding cosine >= {gate['min_cosine']}, "
        f"mean selected-mask IoU >= {gate['min_mask_iou']}, ours at least as close as quantize_dynamic's, "
        f"INT8 encoder <= {gate['max_size_ratio']:.0%} of FP32.",
        "",
        "| vs FP32 | cosine mean | cosine min | mask IoU mean | mask IoU worst | abs d-score mean | abs d-score max "
        "| same mask chosen | mask IoU at FP32's choice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # "static" is the key of our output in the JSON (whatever its precision says), "dynamic" the baseline
    precisions = sorted({size["precision"] for size in report["sizes"].values() if size["precision"] != "fp32"})
    labels = {"static": f"tinysam quantize ({', '.join(precisions)})", "dynamic": "quantize_dynamic defaults"}
    for name, m in report["fidelity"].items():
        lines.append(f"| {labels.get(name, name)} | {m['embedding_cosine_mean']:.5f} | {m['embedding_cosine_min']:.5f} | "
                     f"{m['mask_iou_mean']:.4f} | {m['mask_iou_worst']:.4f} | {m['score_abs_diff_mean']:.4f} | "
                     f"{m['score_abs_diff_max']:.4f} | {_fraction(m.get('selection_agreement'))} | "
                     f"{_number(m.get('same_token_mask_iou_mean'))} |")
    lines += ["", "| graph | precision | FP32 MB | INT8 MB | ratio | quantize_dynamic MB | method | linear layers "
              "| nodes kept float |", "|---|---|---|---|---|---|---|---|---|"]
    for role, size in report["sizes"].items():
        recipe = report["graphs"].get(role, {})
        dynamic = "-" if size["dynamic_bytes"] is None else f"{size['dynamic_bytes'] / 1e6:.2f}"
        linear = recipe.get("linear", "-")
        if recipe.get("dynamic_weight_rounding"):
            linear += f", weights rounded by {recipe['dynamic_weight_rounding']}"
        lines.append(f"| {role} | {size['precision']} | {size['fp32_bytes'] / 1e6:.2f} | {size['bytes'] / 1e6:.2f} | "
                     f"{size['ratio']:.1%} | {dynamic} | {_method(recipe)} | {linear} | "
                     f"{len(recipe.get('excluded_nodes', []))} |")
    if gate["failures"]:
        lines += ["", "Gate failures: " + "; ".join(gate["failures"])]
    return "\n".join(lines) + "\n"
