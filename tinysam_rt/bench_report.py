"""Turn a `tinysam-bench` report dict into ratios and tables (terminal text or Markdown).

Pure functions over the JSON-ready report; the numbers shown are exactly those in the JSON.
"""

MIB = 1024 * 1024
# The timed stages, in pipeline order (keys of every thread entry's "stages").
STAGES = ("preprocess", "encoder", "decoder_1", "decoder_batch", "postprocess", "end_to_end")


def comparisons(models):
    """Each model against the first one, per thread count and stage, plus size/FLOPs/memory.

    Args:
        models: the report's "models" list.

    Returns:
        list of dicts {"model", "baseline", "threads", "stage", "p50_ratio", "min_ratio"} where
        ratio = model / baseline (below 1: the model is faster), and {"model", "baseline",
        "stage": "size"|"peak_rss"|"encoder_macs", "ratio"} rows.
    """
    if len(models) < 2:
        return []
    base, rows = models[0], []
    base_threads = {entry["threads"]: entry for entry in base.get("threads", [])}
    for other in models[1:]:
        for entry in other.get("threads", []):
            ref = base_threads.get(entry["threads"])
            if ref is None:
                continue
            for stage in STAGES:
                a, b = ref["stages"][stage], entry["stages"][stage]
                rows.append({"model": other["label"], "baseline": base["label"], "threads": entry["threads"],
                             "stage": stage, "p50_ratio": b["p50_s"] / a["p50_s"], "min_ratio": b["min_s"] / a["min_s"]})
        pairs = [("size", base["total_bytes"], other["total_bytes"])]
        rss = [m.get("cold_start") or {} for m in (base, other)]
        if all("peak_rss_bytes" in r for r in rss):
            pairs.append(("peak_rss", rss[0]["peak_rss_bytes"], rss[1]["peak_rss_bytes"]))
        if base.get("flops") and other.get("flops"):
            pairs.append(("encoder_macs", base["flops"]["encoder"]["macs"], other["flops"]["encoder"]["macs"]))
        rows += [{"model": other["label"], "baseline": base["label"], "stage": name, "ratio": b / a}
                 for name, a, b in pairs]
    return rows


def thread_scaling(model):
    """Speedup of each thread count over the first one, per stage: {stage: {threads: speedup}}."""
    entries = model.get("threads", [])
    if len(entries) < 2:
        return {}
    first = entries[0]["stages"]
    return {stage: {str(e["threads"]): first[stage]["p50_s"] / e["stages"][stage]["p50_s"] for e in entries}
            for stage in STAGES}


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def render(headers, rows, markdown):
    """Rows of strings as an aligned text table, or a Markdown pipe table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def _header_lines(report):
    system = report["system"]
    isa = ", ".join(k for k, v in system["isa_summary"].items() if v) or "none detected"
    lines = [
        f"CPU: {system['cpu_model']} ({system['machine']}), {system['usable_cores']} usable of "
        f"{system['logical_cores']} logical cores; ISA: {isa}",
        f"onnxruntime {system['onnxruntime']}, numpy {system['numpy']}, opencv {system['opencv']}, "
        f"python {system['python']}; load average at start {system['load_average']}, "
        f"at end {report.get('load_average_end')}",
        f"image: {report['image']['source']} {report['image']['width']}x{report['image']['height']}; "
        f"{report['settings']['runs']} timed runs after {report['settings']['warmup']} warm-up; "
        f"decoder batch {report['settings']['batch']}"
        + (f"; a stage stops after {report['settings']['budget_s']} s (min 3 runs)"
           if report["settings"].get("budget_s") else ""),
    ]
    limits = report.get("machine_limits")
    if limits:
        ort32 = ", ".join(f"{v['best_gflops']:.0f} @{t}t" for t, v in limits["ort_float32"].items())
        ort8 = ", ".join(f"{v['best_gflops']:.0f} @{t}t" for t, v in limits["ort_u8s8"].items())
        lines.append(f"machine limit (best {limits['numpy_float32']['n']}^3 GEMM): numpy float32 "
                     f"{limits['numpy_float32']['best_gflops']:.0f} GFLOP/s; ORT MatMul float32 {ort32} "
                     f"GFLOP/s; ORT MatMulInteger u8s8 {ort8} GOP/s")
        if "ort_u8s8_saturates" in limits:  # reports from before the probe lack it
            lines.append("ORT u8s8 kernel: " + {
                True: "16-bit pair sums saturate (AVX2-class, no VNNI): INT8 models need 7-bit weights (reduce_range)",
                False: "exact (no 16-bit saturation: 8-bit weights are safe)",
                None: "unknown (neither exact nor pair-saturated on the probe)"}[limits["ort_u8s8_saturates"]])
    return lines


def _model_rows(models):
    rows = []
    for m in models:
        f, cold = m.get("flops"), m.get("cold_start") or {}
        enc = f["encoder"]["macs"] / 1e9 if f else None
        dec = f["decoder_1"]["macs"] / 1e9 if f else None
        pub = f["published"]["ours_over_published"] if f else None
        rows.append([m["label"], f"{m['files']['encoder']['bytes'] / MIB:.1f}", f"{m['files']['decoder']['bytes'] / MIB:.1f}",
                     _num(enc, ".2f"), _num(enc and 2 * enc, ".1f"), _num(dec, ".3f"),
                     _num(pub and 100 * pub, ".0f") + ("%" if pub else ""),
                     _num(cold.get("process_start_to_first_mask_s"), ".2f"),
                     _num(cold.get("peak_rss_bytes") and cold["peak_rss_bytes"] / MIB, ".0f")])
    headers = ["model", "encoder MiB", "decoder MiB", "encoder GMAC", "encoder GFLOP", "decoder GMAC/prompt",
               "enc+1 prompt vs paper 42.0 GMAC", "start->first mask s", "peak RSS MiB"]
    return headers, rows


_KINDS = ("conv", "matmul_weight", "matmul_batched", "conv_transpose", "gemm")


def _flops_rows(models):
    rows = []
    for m in models:
        f = m.get("flops")
        if not f:
            continue
        decoder = f["decoder_1"].get("graph", "decoder")  # "points_decoder" serves point prompts when present
        for graph, name in (("encoder", "encoder"), ("decoder_1", f"{decoder} B=1"),
                            ("decoder_batch", f"{decoder} B={f['decoder_batch']['batch']}")):
            g = f[graph]
            rows.append([m["label"], name, f"{g['macs'] / 1e9:.3f}", f"{g['flops'] / 1e9:.2f}"]
                        + [f"{g['by_kind'].get(k, 0) / 1e9:.3f}" for k in _KINDS]
                        + [", ".join(g["uncountable_heavy_ops"]) or "none"])
    headers = ["model", "graph", "GMAC", "GFLOP", "conv GMAC", "linear MatMul GMAC", "batched MatMul GMAC",
               "ConvTranspose GMAC", "Gemm GMAC", "uncounted heavy ops"]
    return headers, rows


def _latency_rows(models):
    rows = []
    for m in models:
        quantized = m["files"]["encoder"]["precision"] != "fp32"
        for entry in m.get("threads", []):
            for stage, s in entry["stages"].items():
                ach = (entry.get("achieved") or {}).get(stage, {})
                name = f"decoder B={s['batch']}" if stage == "decoder_batch" else stage
                int8_pct = ach.get("pct_of_ort_u8s8_peak_p50") if quantized else None
                rows.append([m["label"], str(entry["threads"]), name, str(s["runs"]), _ms(s["p50_s"]), _ms(s["p95_s"]),
                             _ms(s["min_s"]), _num(s["cpu_per_wall"], ".2f"), _ms(s["runqueue_wait_p50_s"]),
                             _num(ach.get("gflops_per_s_p50"), ".1f"), _num(ach.get("pct_of_ort_float32_peak_p50"), ".0f"),
                             _num(int8_pct, ".0f")])
    headers = ["model", "threads", "stage", "runs", "p50 ms", "p95 ms", "min ms", "cpu/wall",
               "run-queue wait p50 ms (all threads)", "GFLOP/s p50", "% of fp32 limit", "% of int8 limit"]
    return headers, rows


def _workers_rows(models):
    rows = []
    for m in models:
        for entry in m.get("threads", []):
            w = entry.get("decoder_workers")
            if not w:
                continue
            per_prompt = [w[k]["p50_s"] / w["prompts_per_call"] for k in ("one_session", "workers_run")]
            rows.append([m["label"], str(entry["threads"]), str(w["prompts_per_call"]), _ms(per_prompt[0]),
                         _ms(per_prompt[1]), f"{w['speedup_p50']:.2f}", f"{w['speedup_min']:.2f}",
                         _ms(w["load_s"])])
    headers = ["model", "threads = workers", "prompts per call", "one session p50 ms/prompt",
               "workers p50 ms/prompt", "speed-up p50", "speed-up min", "single-thread sessions load ms"]
    return headers, rows


def _cold_rows(models):
    rows = []
    for m in models:
        for entry in m.get("threads", []):
            c = entry["cold"]
            rows.append([m["label"], str(entry["threads"]), _ms(c["encoder_session_s"]), _ms(c["encoder_first_call_s"]),
                         _ms(c["decoder_session_s"]), _ms(c["decoder_first_call_s"])])
    headers = ["model", "threads", "encoder session ms", "encoder 1st call ms", "decoder session ms",
               "decoder 1st call ms"]
    return headers, rows


def _process_rows(models):
    rows = []
    for m in models:
        c = m.get("cold_start")
        if not c:
            continue
        if "error" in c:
            rows.append([m["label"], str(c["threads"]), f"error: {c['error']}"] + [""] * 7)
            continue
        rows.append([m["label"], str(c["threads"])] + [_num(c[k], ".2f") for k in (
            "interpreter_s", "import_s", "sessions_s", "image_load_s", "first_set_image_s", "first_predict_s",
            "process_start_to_first_mask_s", "cpu_s")])
    headers = ["model", "threads", "python s", "import s", "sessions s", "image s", "1st set_image s",
               "1st predict s", "start->first mask s", "cpu s"]
    return headers, rows


def _comparison_rows(rows_in):
    rows = []
    for r in rows_in:
        if "threads" in r:
            rows.append([r["model"], r["baseline"], str(r["threads"]), r["stage"], f"{r['p50_ratio']:.2f}",
                         f"{r['min_ratio']:.2f}"])
        else:
            rows.append([r["model"], r["baseline"], "", r["stage"], f"{r['ratio']:.2f}", ""])
    return ["model", "vs", "threads", "what", "ratio p50 (or value)", "ratio min"], rows


def format_report(report, markdown=False):
    """The whole report as text; Markdown tables (with headings) when `markdown`."""
    models = report["models"]
    sections = [
        ("Models: size, FLOPs (MAC = multiply-accumulate, FLOP = 2 MAC), cold start", _model_rows(models)),
        ("FLOPs by kind: MACs of Conv, ConvTranspose, MatMul, Gemm (and their integer forms) from shapes "
         "ORT recorded in one unoptimised run; batched MatMul = activation x activation (attention "
         "scores/values, mask hypernetwork); bias adds, norms, softmax, GELU, resizes not counted",
         _flops_rows(models)),
        ("Warm latency (p50/p95/min over timed runs; cpu/wall ~ threads when uncontended; % of fp32 "
         "machine limit = GFLOP/s p50 / best ORT float32 MatMul GFLOP/s at the same thread count; for "
         "quantized models also % of the u8s8 MatMulInteger GOP/s limit, which bounds a fully integer "
         "graph)", _latency_rows(models)),
        ("Everything mode's decoder: one session of N threads vs N single-thread decoder workers side by "
         "side (tinysam everything --decoder-workers N), same prompts, every mask computed; more "
         "than 1 is worth it where the speed-up is above 1, at the cost of a second copy of the decoder",
         _workers_rows(models)),
        ("Cold: session creation and first call after it (in this process)", _cold_rows(models)),
        ("Fresh process: time from start to first mask", _process_rows(models)),
    ]
    if report.get("comparisons"):
        sections.append(("Side by side (ratio = model / baseline; < 1 is faster or smaller)",
                         _comparison_rows(report["comparisons"])))
    out = [("- " if markdown else "") + line for line in _header_lines(report)]
    for title, (headers, rows) in sections:
        if rows:
            out += ["", f"**{title}**" if markdown else f"== {title}", "", render(headers, rows, markdown)]
    return "\n".join(out) + "\n"
