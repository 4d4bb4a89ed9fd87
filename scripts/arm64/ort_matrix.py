"""Which onnxruntime releases work on aarch64: import + decoder agreement per release and core.

    python scripts/arm64/ort_matrix.py --cache DIR --model FP32_DIR --versions 1.19.2,1.21.0,1.32.0 \\
        [--cpus cortex-a72,cortex-a76,max] [--no-fake-cpuinfo]

Needs the arm64 root that scripts/arm64-check built in the same --cache. For every release it
installs aarch64 cp311 wheels (cached per release), then under each qemu core runs smoke.py with
the x86-64 run's embedding (decoder only: seconds, not the encoder's minutes) and compares the
masks with x86-64. One table line per (release, core). Exit 0 when the table was produced (the
point is to record failures), 3 when the environment is missing.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
import emulated_env as env  # noqa: E402
import numpy as np  # noqa: E402


def outcome(proc, stage):
    """'SIGSEGV at import', 'SIGILL in predict', ... from a failed guest process."""
    text = proc.stdout + proc.stderr
    if "compiled using NumPy 1.x" in text:
        return f"ImportError at {stage}: wheel built for NumPy 1.x, numpy 2 installed"
    names = {-4: "SIGILL", -11: "SIGSEGV", 132: "SIGILL", 139: "SIGSEGV"}
    last = text.strip().splitlines()[-1][:80] if text.strip() else ""
    return f"{names.get(proc.returncode, f'exit {proc.returncode}')} at {stage} {last}".strip()


def guest_run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=1800)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="the --cache of scripts/arm64-check")
    parser.add_argument("--model", type=Path, required=True, help="FP32 model dir")
    parser.add_argument("--image", type=Path, default=HERE.parents[2] / "shared" / "images" / "picture1.jpg")
    parser.add_argument("--versions", required=True, help="comma-separated onnxruntime releases")
    parser.add_argument("--cpus", default="cortex-a72", help="comma-separated qemu -cpu models")
    parser.add_argument("--no-fake-cpuinfo", action="store_true", help="guest reads the host's /proc/cpuinfo")
    parser.add_argument("--wheel", type=Path, required=True, help="tinysam-rt wheel to test")
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    root = cache / "rootfs-arm64-bookworm"
    qemu = env.find_qemu()
    if qemu is None or not (root / env.STAMP).is_file():
        print(f"ort_matrix: error: no qemu or no arm64 root in {cache}; run scripts/arm64-check --cache {cache} first",
              file=sys.stderr)
        return 3
    work = Path(tempfile.mkdtemp(prefix="ort-matrix-", dir=cache))
    wheel_site = env.install_wheel_only(args.wheel.resolve(), work / "wheel-site")
    smoke = HERE / "smoke.py"
    flags = ["--model", args.model.resolve(), "--image", args.image.resolve(), "--threads", "2"]
    ref = work / "x86.npz"
    subprocess.run([sys.executable, smoke, *flags, "--out", ref], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(wheel_site)})
    requires, _ = env.wheel_metadata(args.wheel)
    print(f"qemu {env.qemu_version(qemu)}; fake /proc/cpuinfo: {not args.no_fake_cpuinfo}")
    print("| onnxruntime | -cpu | result | decoder min IoU vs x86-64 | max abs delta logits |")
    print("|---|---|---|---|---|")
    for version in args.versions.split(","):
        try:
            site = env.install_guest_site(cache, env.pin_requirements(requires, version), lambda m: None)
        except env.EnvError as exc:
            print(f"| {version} | - | no aarch64 cp311 wheel set: {str(exc).splitlines()[0][:80]} | | |", flush=True)
            continue
        for cpu in args.cpus.split(","):
            if args.no_fake_cpuinfo:
                (root / "proc" / "cpuinfo").unlink(missing_ok=True)
            else:
                env.write_cpuinfo(root, cpu)
            proc = guest_run(env.guest_command(qemu, cpu, root, [wheel_site, site], ["-c", "import onnxruntime"]))
            if proc.returncode != 0:
                print(f"| {version} | {cpu} | {outcome(proc, 'import')} | | |", flush=True)
                continue
            out = work / f"{version}-{cpu}.npz"
            proc = guest_run(env.guest_command(qemu, cpu, root, [wheel_site, site],
                                               [smoke, *flags, "--out", out, "--embedding-from", ref]))
            if proc.returncode != 0:
                print(f"| {version} | {cpu} | {outcome(proc, 'predict')} | | |", flush=True)
                continue
            got = json.loads(proc.stdout.strip().splitlines()[-1])["onnxruntime"]
            with np.load(ref) as a, np.load(out) as b:
                result = compare.agreement(a, b)
            print(f"| {got} | {cpu} | ok | {result['min_iou']:.5f} | {result['max_abs_logits']:.2g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
