"""tinysam-bench: flag errors, light --help/--version, and every JSON field of a real (tiny) run.

Speed is never asserted; the run uses --runs 1 only to check the report's structure and the
relations between its numbers.
"""

import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinysam_rt import bench, bench_report, gemm_peak

STAGE_FIELDS = {"runs", "p50_s", "p95_s", "min_s", "mean_s", "cpu_p50_s", "cpu_per_wall",
                "runqueue_wait_p50_s", "runqueue_wait_max_s"}


def _main(argv, capsys):
    """Run bench.main in-process; return (exit code, stdout, stderr)."""
    try:
        code = bench.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "argument --threads: each thread count must be an integer >= 1, got '0'"),
    (["--threads", "1,,4"], "argument --threads: expected a comma-separated list like 1,2,4, got '1,,4'"),
    (["--threads", "two"], "argument --threads: each thread count must be an integer >= 1, got 'two'"),
    (["--threads", "2,2"], "argument --threads: a thread count is listed twice in '2,2'"),
    (["--runs", "0"], "argument --runs: value must be an integer >= 1, got '0'"),
    (["--warmup", "-1"], "argument --warmup: value must be an integer >= 0, got '-1'"),
    (["--batch", "x"], "argument --batch: value must be an integer >= 1, got 'x'"),
])
def test_bad_flags_give_one_line_and_exit_2(argv, message, capsys):
    code, out, err = _main(argv, capsys)
    assert code == 2
    assert out == ""
    assert err == f"tinysam-bench: error: {message}\n"


def test_unknown_model_dir(tmp_path, capsys):
    code, _, err = _main(["--model", str(tmp_path / "nope")], capsys)
    assert code == 2
    assert err == f"tinysam-bench: error: --model {tmp_path / 'nope'}: does not exist (expected a tinysam-rt model directory)\n"
    code, _, err = _main(["--model", str(tmp_path)], capsys)
    assert code == 2
    assert err == f"tinysam-bench: error: --model {tmp_path}: has no manifest.json (expected a tinysam-rt model directory)\n"


def test_no_model_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYSAM_MODEL_DIR", str(tmp_path / "missing"))
    code, _, err = _main([], capsys)
    assert code == 2
    assert err.startswith("tinysam-bench: error: no --model given and no tinysam-rt model at ")
    assert err.count("\n") == 1


@pytest.mark.torch  # the test model is exported with torch
def test_missing_image_and_json_directory(fp32_model_dir, tmp_path, capsys):
    code, _, err = _main(["--model", str(fp32_model_dir), "--image", str(tmp_path / "x.jpg")], capsys)
    assert (code, err) == (2, f"tinysam-bench: error: --image {tmp_path / 'x.jpg'}: no such file\n")
    code, _, err = _main(["--model", str(fp32_model_dir), "--json", str(tmp_path)], capsys)
    assert (code, err) == (2, f"tinysam-bench: error: --json {tmp_path} is a directory; give a file path\n")
    code, _, err = _main(["--model", str(fp32_model_dir), "--model", str(fp32_model_dir)], capsys)
    assert (code, err) == (2, f"tinysam-bench: error: --model {fp32_model_dir} is given twice\n")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    code, _, err = _main(["--model", str(fp32_model_dir), "--image", str(not_image)], capsys)
    assert code == 2
    assert err == f"tinysam-bench: error: --image {not_image}: not a readable image (unsupported format or corrupt file)\n"


@pytest.mark.torch  # the test model is exported with torch
@pytest.mark.parametrize("shape, message", [((1, 1, 3), "image must be at least 2x2 pixels, got 1x1"),
                                            ((2, 6000, 3), "too elongated")])
def test_image_the_predictor_would_refuse_is_refused_up_front(fp32_model_dir, tmp_path, capsys, shape, message):
    import cv2
    import numpy as np

    path = tmp_path / "odd.png"
    cv2.imwrite(str(path), np.full(shape, 128, np.uint8))
    # the measuring flags are minimal so that a regression fails fast instead of benchmarking
    code, out, err = _main(["--model", str(fp32_model_dir), "--image", str(path), "--runs", "1", "--warmup", "0",
                            "--threads", "1", "--no-flops", "--no-cold-start", "--no-peak", "--quiet"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(f"tinysam-bench: error: --image {path}: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.torch  # the test model is exported with torch
def test_corrupt_model_is_a_runtime_error(fp32_model_dir, tmp_path, capsys):
    broken = tmp_path / "vit_t"
    shutil.copytree(fp32_model_dir, broken)
    with open(broken / "decoder.onnx", "r+b") as f:
        f.truncate(1000)
    code, out, err = _main(["--model", str(broken), "--no-peak", "--quiet"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"tinysam-bench: error: {broken / 'decoder.onnx'}: sha256 ")
    assert err.count("\n") == 1


def _fake_model(tmp_path):
    """Enough for check_args (a directory with manifest.json): flag checks that come first."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "manifest.json").write_text("{}")
    return model


def test_json_that_cannot_be_written_is_refused_up_front(tmp_path, capsys):
    model = _fake_model(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cases = [(blocker / "b.json", f"--json {blocker / 'b.json'}: {blocker} is not a directory"),
             (tmp_path / "missing" / "b.json", f"--json {tmp_path / 'missing' / 'b.json'}: directory {tmp_path / 'missing'} does not exist"),
             ("", "--json expects a file path, got ''")]
    if Path("/proc/self").is_dir():  # even root cannot create files there
        cases.append(("/proc/tinysam.json", "--json /proc/tinysam.json: cannot create files in /proc (No such file or directory)"))
    for path, message in cases:
        code, out, err = _main(["--model", str(model), "--json", str(path), "--no-peak", "--quiet"], capsys)
        assert (code, out, err) == (2, "", f"tinysam-bench: error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "m"]


def test_thread_counts_beyond_the_bound_are_refused(capsys):
    from tinysam_rt.sysinfo import THREADS_PER_CPU, max_threads

    code, _, err = _main(["--threads", f"1,{max_threads() + 1}"], capsys)
    assert code == 2
    assert err == (f"tinysam-bench: error: argument --threads: each thread count must be at most {max_threads()} "
                   f"({THREADS_PER_CPU} per CPU), got {max_threads() + 1}\n")


def _no_machine_limits(*args):
    raise AssertionError("the GEMM machine limit was measured before the models were verified")


@pytest.mark.torch  # the test model is exported with torch
def test_corrupt_model_fails_before_the_machine_limit_benchmark(fp32_model_dir, tmp_path, capsys, monkeypatch):
    from tinysam_rt import bench_run

    monkeypatch.setattr(bench_run, "machine_limits", _no_machine_limits)
    broken = tmp_path / "vit_t"
    shutil.copytree(fp32_model_dir, broken)
    with open(broken / "encoder.onnx", "r+b") as f:
        f.seek(2000)
        f.write(b"\xff\xfe")
    code, out, err = _main(["--model", str(fp32_model_dir), "--model", str(broken), "--quiet"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"tinysam-bench: error: {broken / 'encoder.onnx'}: sha256 ") and err.count("\n") == 1


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "m/manifest.json"),
                                   ValueError("m/manifest.json: something else is wrong")])
def test_other_model_loading_errors_are_one_line(tmp_path, capsys, monkeypatch, error):
    from tinysam_rt import bench_run

    def fail(model_dir):
        raise error

    monkeypatch.setattr(bench_run, "machine_limits", _no_machine_limits)
    monkeypatch.setattr(bench_run, "model_info", fail)
    code, out, err = _main(["--model", str(_fake_model(tmp_path)), "--quiet"], capsys)
    assert (code, out, err) == (1, "", f"tinysam-bench: error: {error}\n")


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_onnxruntime(flag):
    code = (f"import sys\nfrom tinysam_rt.bench import main\ntry:\n    main([{flag!r}])\nexcept SystemExit as e:\n"
            f"    assert e.code == 0, e.code\nassert 'onnxruntime' not in sys.modules\nassert 'numpy' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert ("usage: tinysam-bench" in result.stdout) if flag == "--help" else result.stdout.startswith("tinysam-bench 0.")


def test_default_threads_sweep_powers_of_two_up_to_the_cores():
    threads = bench.default_threads()
    assert threads[0] == 1 and threads == sorted(set(threads))


def test_budget_stops_early_but_not_below_three_runs():
    from tinysam_rt import bench_run

    calls = []
    stats = bench_run.time_stage(lambda: (calls.append(1), time.sleep(0.02)), runs=50, warmup=2, budget_s=0.001)
    assert stats["runs"] == bench_run.MIN_RUNS_IN_BUDGET == 3
    assert len(calls) == 2 + 3
    assert bench_run.time_stage(lambda: None, runs=7, warmup=0, budget_s=100)["runs"] == 7


@pytest.fixture(scope="module")
def bench_report_json(fp32_model_dir, tmp_path_factory):
    """One real tinysam-bench run on the test model, as small as the flags allow."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "tinysam_rt.bench", "--model", str(fp32_model_dir), "--threads", "1", "--runs", "2",
         "--warmup", "0", "--batch", "2", "--gemm-n", "64", "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet
    return json.loads(out.read_text()), result.stdout


@pytest.mark.torch  # the test model is exported with torch
def test_json_has_every_field(bench_report_json, fp32_model_dir):
    report, _ = bench_report_json
    assert report["schema"] == bench.SCHEMA
    assert report["settings"] == {"runs": 2, "warmup": 0, "threads": [1], "batch": 2, "budget_s": None, "gemm_n": 64}
    system = report["system"]
    for key in ("cpu_model", "logical_cores", "usable_cores", "isa", "isa_summary", "onnxruntime", "numpy", "load_average"):
        assert key in system
    assert report["image"] == {"source": "generated", "height": 960, "width": 1280}
    limits = report["machine_limits"]
    assert limits["numpy_float32"]["best_gflops"] > 0
    assert limits["ort_float32"]["1"]["best_gflops"] > 0 and limits["ort_u8s8"]["1"]["best_gflops"] > 0
    assert limits["ort_u8s8_saturates"] is gemm_peak.u8s8_kernel_saturates()
    assert report["main_process_peak_rss_bytes"] > 0
    (model,) = report["models"]
    assert model["label"] == "vit_t (fp32)" and model["model_dir"] == str(fp32_model_dir)
    for role in ("encoder", "decoder"):
        assert model["files"][role]["bytes"] == (fp32_model_dir / f"{role}.onnx").stat().st_size
    assert model["total_bytes"] == sum(f["bytes"] for f in model["files"].values())
    (entry,) = model["threads"]
    assert entry["threads"] == 1
    assert set(entry["cold"]) == {"encoder_session_s", "encoder_first_call_s", "decoder_session_s", "decoder_first_call_s"}
    assert set(entry["stages"]) == set(bench_report.STAGES)
    for stage in entry["stages"].values():
        assert STAGE_FIELDS <= set(stage)
        assert stage["runs"] == 2
        assert stage["min_s"] <= stage["p50_s"] <= stage["p95_s"]
    assert entry["stages"]["decoder_batch"]["batch"] == 2
    assert set(entry["achieved"]) == {"encoder", "decoder_1", "decoder_batch"}
    cold = model["cold_start"]
    assert "error" not in cold, cold
    steps = ("interpreter_s", "import_s", "sessions_s", "image_load_s", "first_set_image_s", "first_predict_s")
    assert cold["process_start_to_first_mask_s"] == pytest.approx(sum(cold[k] for k in steps))
    assert cold["peak_rss_bytes"] > model["files"]["encoder"]["bytes"]


@pytest.mark.torch  # the test model is exported with torch
def test_flops_are_consistent_and_near_the_published_figure(bench_report_json):
    report, _ = bench_report_json
    flops = report["models"][0]["flops"]
    for key in ("encoder", "decoder_1", "decoder_batch"):
        assert flops[key]["flops"] == 2 * flops[key]["macs"] > 0
        assert sum(flops[key]["by_kind"].values()) == flops[key]["macs"]
        assert flops[key]["uncountable_heavy_ops"] == {}
    assert flops["decoder_batch"]["batch"] == 2
    # Point prompts are counted on the graph that serves them: the points decoder, which runs
    # layer 0's image side once per call, so the second prompt costs less than the first.
    assert flops["decoder_1"]["graph"] == flops["decoder_batch"]["graph"] == "points_decoder"
    shared = 2 * flops["decoder_1"]["macs"] - flops["decoder_batch"]["macs"]
    per_prompt = flops["decoder_batch"]["macs"] - flops["decoder_1"]["macs"]
    # 3 of layer 0's 4096 x 256 x 128 image-side projections and the image's part of the first
    # upscaler GEMM (4096 x 256 x 256) are shared (~0.67 GMAC); about 0.66 GMAC stays per prompt
    # (vs 0.80 before that GEMM was factored, 1.83 in the plain decoder).
    assert shared == pytest.approx(3 * 4096 * 256 * 128 + 4096 * 256 * 256, rel=0.05)
    assert 0.6e9 < per_prompt < 0.72e9, per_prompt
    assert flops["encoder"]["by_kind"]["matmul_batched"] > 0  # window attention is counted
    # TinySAM reports 42.0 G "FLOPs" = multiply-accumulates; our count of the same graph is close.
    assert 0.9 < flops["published"]["ours_over_published"] < 1.1


@pytest.mark.torch  # the test model is exported with torch
def test_terminal_and_markdown_tables_show_the_json_numbers(bench_report_json):
    report, stdout = bench_report_json
    assert stdout == bench_report.format_report(report)
    stage = report["models"][0]["threads"][0]["stages"]["encoder"]
    assert f"{stage['p50_s'] * 1e3:.1f}" in stdout
    markdown = bench_report.format_report(report, markdown=True)
    assert "| model | threads | stage | runs | p50 ms |" in markdown
    assert "| % of fp32 limit | % of int8 limit |" in markdown
    for name in ("preprocess", "encoder", "decoder_1", "decoder B=2", "postprocess", "end_to_end"):
        assert f"| {name} |" in markdown


@pytest.mark.torch  # the test model is exported with torch
def test_side_by_side_ratios(bench_report_json):
    report, _ = bench_report_json
    base = report["models"][0]
    other = copy.deepcopy(base)
    other["label"] = "half"
    other["total_bytes"] = base["total_bytes"] // 2
    for stage in other["threads"][0]["stages"].values():
        stage["p50_s"] /= 4
        stage["min_s"] /= 2
    rows = bench_report.comparisons([base, other])
    timed = [r for r in rows if "threads" in r]
    assert {r["stage"] for r in timed} == set(bench_report.STAGES)
    assert all(r["p50_ratio"] == pytest.approx(0.25) and r["min_ratio"] == pytest.approx(0.5) for r in timed)
    size = next(r for r in rows if r["stage"] == "size")
    assert size["ratio"] == pytest.approx(0.5, rel=1e-6)
    assert "Side by side" in bench_report.format_report({**report, "models": [base, other], "comparisons": rows})


@pytest.mark.torch  # the test model is exported with torch
def test_report_without_optional_parts_still_renders(bench_report_json):
    report, _ = bench_report_json
    bare = copy.deepcopy(report)
    bare["machine_limits"] = None
    for model in bare["models"]:
        model["flops"] = model["cold_start"] = None
        for entry in model["threads"]:
            entry["achieved"] = None
    text = bench_report.format_report(bare)
    assert "encoder" in text and "machine limit (best" not in text


@pytest.mark.torch  # the test model is exported with torch
@pytest.mark.parametrize("saturates, says", [(True, "16-bit pair sums saturate"), (False, "exact"),
                                             (None, "unknown"), ("absent", None)])
def test_report_names_the_u8s8_kernel_kind(bench_report_json, saturates, says):
    report, _ = bench_report_json
    report = copy.deepcopy(report)
    if saturates == "absent":  # a report written before the probe existed
        del report["machine_limits"]["ort_u8s8_saturates"]
    else:
        report["machine_limits"]["ort_u8s8_saturates"] = saturates
    lines = [line for line in bench_report.format_report(report).splitlines() if "ORT u8s8 kernel:" in line]
    assert ([says in line for line in lines] == [True]) if says else lines == []


def test_merge_limits_keeps_the_better_measurement():
    from tinysam_rt import bench_run

    def limits(numpy, f32, u8):
        return {"numpy_float32": {"best_gflops": numpy, "n": 64},
                "ort_float32": {"1": {"best_gflops": f32, "n": 64}},
                "ort_u8s8": {"1": {"best_gflops": u8, "n": 64}}, "ort_u8s8_saturates": False}

    merged = bench_run.merge_limits(limits(10.0, 50.0, 300.0), limits(20.0, 40.0, 310.0))
    assert merged["ort_u8s8_saturates"] is False
    assert merged["numpy_float32"]["best_gflops"] == 20.0
    assert merged["ort_float32"]["1"]["best_gflops"] == 50.0
    assert merged["ort_float32"]["1"]["best_gflops_samples"] == [50.0, 40.0]
    assert merged["ort_u8s8"]["1"]["best_gflops"] == 310.0


def test_labels_name_every_graph_that_is_not_fp32():
    from pathlib import Path
    from types import SimpleNamespace

    def manifest(*precisions):
        graphs = [SimpleNamespace(role=r, precision=p) for r, p in zip(("encoder", "decoder", "points_decoder"), precisions)]
        return SimpleNamespace(encoder=graphs[0], graphs=tuple(graphs))

    dirs = [Path("a/vit_t"), Path("a/vit_t-int8"), Path("b/vit_t-int8")]
    manifests = [manifest("fp32", "fp32", "fp32"), manifest("int8-dynamic", "fp32", "int8-upscaler"),
                 manifest("int8-dynamic", "int8-static-qdq")]
    assert bench._labels(dirs, manifests) == [
        "vit_t (fp32)", "vit_t-int8 (int8-dynamic, points_decoder int8-upscaler)", "vit_t-int8 (int8-dynamic, decoder int8-static-qdq)"]
    assert bench._labels(dirs[1:2] * 2, manifests[1:2] * 2) == ["a/vit_t-int8 (int8-dynamic, points_decoder int8-upscaler)"] * 2


@pytest.mark.torch  # the test model is exported with torch
def test_decoder_workers_are_measured_on_the_same_prompts_and_shown(fp32_model_dir, bench_report_json):
    """At 2+ threads each thread entry compares one session with that many decoder workers."""
    from tinysam_rt import bench_run
    from tinysam_rt.predictor import TinySAMPredictor

    predictor = TinySAMPredictor(bench_run.synthetic_image(240, 320), model_dir=fp32_model_dir, threads=2, cache_size=0)
    result = bench_run.measure_decoder_workers(predictor, 2, runs=1, warmup=0, prompts_per_worker=2)
    assert result["workers"] == 2 and result["prompts_per_call"] == 4 and result["load_s"] > 0
    for key in ("one_session", "workers_run"):
        assert STAGE_FIELDS <= set(result[key]) and result[key]["runs"] == 1
    assert result["speedup_p50"] == pytest.approx(result["one_session"]["p50_s"] / result["workers_run"]["p50_s"])
    assert result["speedup_min"] == pytest.approx(result["one_session"]["min_s"] / result["workers_run"]["min_s"])
    # rendered in the report, per model and thread count; reports without it render as before
    report, _ = bench_report_json
    assert "decoder workers" not in bench_report.format_report(report)
    report = copy.deepcopy(report)
    report["models"][0]["threads"][0]["decoder_workers"] = result
    markdown = bench_report.format_report(report, markdown=True)
    per_prompt = result["workers_run"]["p50_s"] / 4
    assert f"| {report['models'][0]['label']} | 1 | 4 |" in markdown and f"{per_prompt * 1e3:.1f}" in markdown
    assert f"{result['speedup_p50']:.2f}" in markdown
