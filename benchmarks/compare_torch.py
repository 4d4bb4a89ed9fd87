"""Eager PyTorch FP32 vs ONNX Runtime FP32 vs ONNX Runtime INT8: same weights, same image.

    python benchmarks/compare_torch.py --model models/vit_t --model models/vit_t-int8 \\
        --threads 2 --runs 20 --json out.json --markdown

Needs the export extra (`pip install -e '.[export]'`): the PyTorch model is `build_tinysam` with
the weights the first model directory was exported from (its manifest names the seed or the
checkpoint's sha256). Further --model directories (an INT8 quantization) must come from the same
weights.

All backends time in this one process, round-robin within each run (torch, ORT FP32, ORT INT8,
torch, ...), so load from other processes lands on all of them alike. Time to first mask and
peak RSS come from a fresh process per backend, since one process's peak would mix them.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinysam_rt import bench_report, bench_run, preprocess, sysinfo
from tinysam_rt.atomic import atomic_write_text
from tinysam_rt.io import load_image
from tinysam_rt.manifest import load_manifest, sha256_file
from tinysam_rt.predictor import TinySAMPredictor
from tinysam_rt.sessions import EncoderSession, load_decoder

STAGES = ("encoder", "decoder_1", "decoder_batch", "end_to_end")


def build_torch_model(manifest, checkpoint):
    """The eager model with the manifest's weights (random seed, or the checkpoint it names)."""
    from tinysam_export.model.build import build_tinysam

    weights = manifest.raw["weights"]
    if weights["source"] == "random":
        return build_tinysam(checkpoint=None, seed=int(weights["seed"]))
    if checkpoint is None or sha256_file(checkpoint) != weights["checkpoint_sha256"]:
        raise SystemExit(f"compare_torch: {manifest.model_dir} was exported from checkpoint sha256 "
                         f"{weights['checkpoint_sha256'][:12]}…; pass that file with --checkpoint")
    return build_tinysam(checkpoint=checkpoint)


class TorchBackend:
    """Eager PyTorch stages with SAM's own calls (prompt encoder pads the point itself)."""

    label = "torch eager (fp32)"

    def __init__(self, model, image):
        import torch
        from segment_anything import SamPredictor

        self.torch, self.model = torch, model
        self.predictor = SamPredictor(model)
        self.image = image

    def encode(self, tensor):
        with self.torch.inference_mode():
            return self.model.image_encoder(self.torch.from_numpy(tensor))  # (1, 256, 64, 64)

    def decode(self, embeddings, coords, labels):
        """coords (B, 2, 2) / labels (B, 2) with our padding point last; SAM re-adds it."""
        torch = self.torch
        with torch.inference_mode():
            points = (torch.from_numpy(coords[:, :1].copy()), torch.from_numpy(labels[:, :1].copy()))
            sparse, dense = self.model.prompt_encoder(points=points, boxes=None, masks=None)
            return self.model.mask_decoder(image_embeddings=embeddings, image_pe=self.model.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=True)

    def end_to_end(self, center):
        self.predictor.set_image(self.image)
        return self.predictor.predict(point_coords=np.array(center), point_labels=np.array([1]))


class OrtBackend:
    """tinysam-rt's sessions and predictor for one model directory."""

    def __init__(self, manifest, label, threads, image):
        self.label = label
        self.encoder = EncoderSession(manifest.encoder, threads)
        self.decoder = load_decoder(manifest, threads)  # point prompts run the points decoder, as in predict
        self.predictor = TinySAMPredictor(model_dir=manifest.model_dir, threads=threads, cache_size=0)
        self.image = image
        self.mask = {}

    def encode(self, tensor):
        return self.encoder.run(tensor)

    def decode(self, embeddings, coords, labels):
        batch = len(coords)
        if batch not in self.mask:
            self.mask[batch] = (np.zeros((batch, 1, 256, 256), np.float32), np.zeros(batch, np.float32))
        return self.decoder.run(embeddings, coords, labels, *self.mask[batch])

    def end_to_end(self, center):
        self.predictor.set_image(self.image)
        return self.predictor.predict(point_coords=center, point_labels=[1])


def agreement(reference, other):
    """Max |difference| and cosine similarity of two embeddings (any array-likes)."""
    a, b = np.asarray(reference, np.float64).ravel(), np.asarray(other, np.float64).ravel()
    return {"max_abs_diff": float(np.abs(a - b).max()),
            "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}


def measure(backends, image, manifest, runs, warmup, batch):
    """Warm stage timings, round-robin across backends within every run."""
    pre = manifest.preprocess
    tensor = preprocess.normalize_pad(preprocess.resize_longest_side(image, pre.image_size),
                                      pre.pixel_mean, pre.pixel_std, pre.image_size, pre.pad_value)
    feeds_1 = bench_run.decoder_feeds(image.shape[:2], pre.image_size, 1)[:2]
    feeds_b = bench_run.decoder_feeds(image.shape[:2], pre.image_size, batch)[:2]
    center = [[image.shape[1] / 2, image.shape[0] / 2]]  # (x, y)
    embeddings = {b.label: b.encode(tensor) for b in backends}
    calls = {
        "encoder": lambda b: b.encode(tensor),
        "decoder_1": lambda b: b.decode(embeddings[b.label], *feeds_1),
        "decoder_batch": lambda b: b.decode(embeddings[b.label], *feeds_b),
        "end_to_end": lambda b: b.end_to_end(center),
    }
    results = {b.label: {} for b in backends}
    for stage, call in calls.items():
        samples = {b.label: [] for b in backends}
        for _ in range(warmup):
            for b in backends:
                call(b)
        for _ in range(runs):
            for b in backends:
                samples[b.label].append(bench_run.time_call(lambda: call(b))[1])
        for label, s in samples.items():
            results[label][stage] = bench_run.summarize(s)
    reference = embeddings[backends[0].label].numpy()
    agree = {b.label: agreement(reference, embeddings[b.label]) for b in backends[1:]}
    return results, agree


def torch_cold_child(request):
    """Fresh-process timing for torch: import, build, SamPredictor.set_image, predict."""
    marks = {"python_started": time.monotonic()}
    import torch
    from segment_anything import SamPredictor

    torch.set_num_threads(request["threads"])
    marks["imported"] = time.monotonic()
    model = build_torch_model(load_manifest(request["model_dir"]), request["checkpoint"])
    predictor = SamPredictor(model)
    marks["sessions_ready"] = time.monotonic()
    image = load_image(request["image"])
    marks["image_loaded"] = time.monotonic()
    predictor.set_image(image)
    marks["first_embedding"] = time.monotonic()
    predictor.predict(point_coords=np.array([[image.shape[1] / 2, image.shape[0] / 2]]), point_labels=np.array([1]))
    marks["first_mask"] = time.monotonic()
    marks.update(cpu_s=time.process_time(), peak_rss_bytes=sysinfo.peak_rss_bytes())
    print(json.dumps(marks))


def torch_cold_start(model_dir, checkpoint, image_path, threads):
    request = json.dumps({"model_dir": str(model_dir), "checkpoint": checkpoint, "image": str(image_path),
                          "threads": threads})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--cold-child", request],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"threads": threads, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"threads": threads, "process_start_to_first_mask_s": m["first_mask"] - start,
            "process_start_to_first_embedding_s": m["first_embedding"] - start,
            "interpreter_s": m["python_started"] - start, "import_s": m["imported"] - m["python_started"],
            "model_build_s": m["sessions_ready"] - m["imported"],
            "first_set_image_s": m["first_embedding"] - m["image_loaded"],
            "first_predict_s": m["first_mask"] - m["first_embedding"],
            "cpu_s": m["cpu_s"], "peak_rss_bytes": m["peak_rss_bytes"]}


def format_tables(report, markdown):
    labels = list(report["stages"])
    headers = ["stage"] + [f"{label} p50 / min ms" for label in labels] + [f"{label} / torch" for label in labels[1:]]
    rows = []
    for stage in STAGES:
        cells = [report["stages"][label][stage] for label in labels]
        name = f"decoder B={report['settings']['batch']}" if stage == "decoder_batch" else stage
        rows.append([name] + [f"{c['p50_s'] * 1e3:.1f} / {c['min_s'] * 1e3:.1f} (cpu/wall {c['cpu_per_wall']:.2f})"
                              for c in cells]
                    + [f"{c['p50_s'] / cells[0]['p50_s']:.2f}" for c in cells[1:]])
    out = [bench_report.render(headers, rows, markdown), ""]
    cold_rows = [[label, f"{c.get('process_start_to_first_mask_s', float('nan')):.2f}",
                  f"{c.get('peak_rss_bytes', 0) / bench_report.MIB:.0f}", c.get("error", "")]
                 for label, c in report["cold_start"].items()]
    out.append(bench_report.render(["backend", "process start -> first mask s", "peak RSS MiB", "error"],
                                   cold_rows, markdown))
    agree = "; ".join(f"{k}: max|diff| {v['max_abs_diff']:.2e}, cosine {v['cosine']:.6f}"
                      for k, v in report["embedding_agreement_vs_torch"].items())
    out += ["", f"embeddings vs torch: {agree}"]
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", action="append", metavar="DIR",
                        help="FP32 model dir first (its weights build the torch model), then e.g. INT8")
    parser.add_argument("--checkpoint", default=None, help="the .pth the FP32 model was exported from, if any")
    parser.add_argument("--threads", type=int, default=sysinfo.usable_cores(), help="torch and ORT intra-op threads")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16,
                        help="prompts per batched decoder call (eager torch needs ~0.5 s per prompt on 2 vCPUs)")
    parser.add_argument("--image", default=None, help="image path (default: tinysam-bench's generated scene)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--cold-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cold_child:
        return torch_cold_child(json.loads(args.cold_child))
    if not args.model:
        parser.error("give at least one --model (the FP32 export first)")
    if min(args.threads, args.runs, args.batch) < 1 or args.warmup < 0:
        parser.error("--threads, --runs and --batch must be >= 1, --warmup >= 0")
    import torch

    torch.set_num_threads(args.threads)
    manifests = [load_manifest(d) for d in args.model]
    for m in manifests[1:]:
        if m.weights_id != manifests[0].weights_id:
            parser.error(f"{m.model_dir} comes from weights {m.weights_id}, not {manifests[0].weights_id}")
    image = load_image(args.image) if args.image else bench_run.synthetic_image()
    model = build_torch_model(manifests[0], args.checkpoint)
    backends = [TorchBackend(model, image)] + [
        OrtBackend(m, f"ORT {Path(m.model_dir).name} ({m.encoder.precision})", args.threads, image) for m in manifests]
    print(f"[compare_torch] {len(backends)} backends, {args.threads} threads, {args.runs} runs", file=sys.stderr)
    stages, agree = measure(backends, image, manifests[0], args.runs, args.warmup, args.batch)
    report = {
        "command": ["python", "benchmarks/compare_torch.py", *(argv or sys.argv[1:])],
        "settings": {"threads": args.threads, "runs": args.runs, "warmup": args.warmup, "batch": args.batch,
                     "image": args.image or "generated 1280x960", "torch": torch.__version__},
        "system": sysinfo.system_info(),
        "stages": stages,
        "embedding_agreement_vs_torch": agree,
        "cold_start": {},
    }
    if not args.no_cold_start:
        del backends, model  # keep this process light while the children run
        with bench_run.temp_dir() as tmp:
            path = args.image or bench_run.write_image_for_child(image, tmp)
            report["cold_start"][TorchBackend.label] = torch_cold_start(manifests[0].model_dir, args.checkpoint, path,
                                                                        args.threads)
            for m in manifests:
                label = f"ORT {Path(m.model_dir).name} ({m.encoder.precision})"
                report["cold_start"][label] = bench_run.cold_start(m.model_dir, path, args.threads)
    report["load_average_end"] = sysinfo.load_average()
    sys.stdout.write(format_tables(report, args.markdown))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
