"""Peak resident memory of one set_image + predict in this (fresh) process: the README's footprint.

    python scripts/arm64/peak_rss.py --model DIR --image PHOTO [--threads N]

Prints one JSON line: VmHWM (peak RSS, MiB) after python start, imports, session creation,
set_image and one single-point predict. Run it as its own process: the peak is per process.
Under qemu-user the figure includes the emulator's own memory (translated code), so it is an
upper bound there; the native figure is the one to quote.
"""

import argparse
import json
import platform


def peak_rss_mib():
    """VmHWM of /proc/self/status in MiB (Linux). Not ru_maxrss, which survives execve."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main(argv=None):
    marks = {"python": peak_rss_mib()}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory (manifest.json)")
    parser.add_argument("--image", required=True, help="photo")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    args = parser.parse_args(argv)

    import onnxruntime

    from tinysam_rt.io import load_image
    from tinysam_rt.predictor import TinySAMPredictor

    marks["imports"] = peak_rss_mib()
    predictor = TinySAMPredictor(model_dir=args.model, threads=args.threads, cache_size=1)
    marks["sessions"] = peak_rss_mib()
    image = load_image(args.image)  # (H, W, 3) uint8
    predictor.set_image(image)
    marks["set_image"] = peak_rss_mib()
    height, width = image.shape[:2]
    predictor.predict(point_coords=[[width / 2, height / 2]], point_labels=[1])
    marks["predict"] = peak_rss_mib()
    print(json.dumps({"machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
                      "precision": predictor.manifest.encoder.precision, "image": f"{height}x{width}",
                      "threads": args.threads, "peak_rss_mib": {k: round(v) for k, v in marks.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
