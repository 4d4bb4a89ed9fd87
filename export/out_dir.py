"""The one rule for the --out of `tinysam export` and `tinysam quantize`.

Both publish with `tinysam_rt.atomic.atomic_directory`, which replaces its target whole. So an
existing --out is replaced only when nothing but a model would be lost: an empty directory, or a
tinysam-rt model directory (a re-export). Anything else is refused, before any slow step.
Torch-free, so the CLI checks --out before importing torch.
"""

import fnmatch
import json
import os
from pathlib import Path

from tinysam_rt.atomic import check_parent_writable
from tinysam_rt.manifest import MANIFEST_FORMAT, MANIFEST_NAME

REPORT_FILES = ("quantization_report.json", "quantization_report.md")
# Every file export and quantize write into a model directory; a directory holding anything
# else is not theirs to delete.
MODEL_FILE_PATTERNS = (MANIFEST_NAME, "*.onnx", *REPORT_FILES)
SHOWN_ENTRIES = 5  # unexpected entries named in the error


def check_model_out_dir(out_dir, model_dir=None):
    """Raise unless `out_dir` may be created, or replaced whole, by a model directory.

    Args:
        out_dir: str or Path, the output model directory.
        model_dir: str or Path of the model being read (quantize), or None (export).

    Raises:
        TypeError: `out_dir` is not a path.
        ValueError: naming `out_dir` and why: empty path; equal to, inside or containing
            `model_dir`; a symlink or a file; a non-empty directory that is not a tinysam-rt
            model directory (its unexpected entries named); no writable directory to create it in.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"--out must be a str or os.PathLike path, got {type(out_dir).__name__}")
    if os.fspath(out_dir) == "":
        raise ValueError("--out must be a directory path, got ''")
    path = Path(out_dir)
    if model_dir is not None:
        _check_apart(path, Path(model_dir))
    if path.is_symlink():
        raise ValueError(f"--out {out_dir} is a symlink; give the directory itself (it is replaced whole)")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory; give a new or empty directory")
    if path.is_dir():
        problem = _not_a_model_dir(path)
        if problem:
            raise ValueError(f"--out {out_dir} is a non-empty directory that is not a tinysam-rt model directory "
                             f"({problem}); it would be replaced whole, so give a new or empty directory")
    try:  # the swap renames beside the directory, so its parent must take new entries
        check_parent_writable(os.path.abspath(path))
    except OSError as exc:
        raise ValueError(f"--out {exc}") from None  # the message starts with the absolute path


def _check_apart(path, model_dir):
    """Refuse an output that is, holds or lies inside the model it is made from."""
    out, model = path.resolve(), model_dir.resolve()
    if out == model:
        raise ValueError(f"--out must differ from --model ({model_dir}): the FP32 model is the reference")
    if model in out.parents:
        raise ValueError(f"--out {path} is inside --model {model_dir}; give a directory outside it")
    if out in model.parents:
        raise ValueError(f"--out {path} contains --model {model_dir} and would be replaced whole, deleting it; "
                         f"give a directory outside it")


def _not_a_model_dir(path):
    """Why the existing directory `path` must not be replaced, or '' when it may be."""
    entries = sorted(path.iterdir())
    if not entries:
        return ""
    unexpected = [e.name + ("/" if e.is_dir() else "") for e in entries
                  if not (e.is_file() and any(fnmatch.fnmatchcase(e.name, p) for p in MODEL_FILE_PATTERNS))]
    if unexpected:
        more = f" and {len(unexpected) - SHOWN_ENTRIES} more" if len(unexpected) > SHOWN_ENTRIES else ""
        return f"unexpected entries: {', '.join(unexpected[:SHOWN_ENTRIES])}{more}"
    try:
        doc = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST_NAME}"
    except (OSError, ValueError, RecursionError):
        return f"{MANIFEST_NAME} is not valid JSON"
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST_NAME} is not a tinysam-rt manifest"
    return ""
