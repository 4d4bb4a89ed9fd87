"""tinysam-rt: TinySAM (distilled Segment Anything) on ONNX Runtime, without torch.

Public surface::

    from tinysam_rt import TinySAMPredictor
    masks, scores, low_res = TinySAMPredictor(image).predict([(x, y)])
"""

__version__ = "0.1.0"

# Lazy attribute access keeps `tinysam --version` from importing onnxruntime.
_PUBLIC = {
    "TinySAMPredictor": "tinysam_rt.predictor",
    "ImageEmbedding": "tinysam_rt.embedding",
    "ModelFileError": "tinysam_rt.errors",
    "Manifest": "tinysam_rt.manifest",
    "load_manifest": "tinysam_rt.manifest",
    "resolve_model_dir": "tinysam_rt.manifest",
    "TinySAMAutomaticMaskGenerator": "tinysam_rt.everything",
    "AmgConfig": "tinysam_rt.everything",
    "HierarchicalConfig": "tinysam_rt.everything",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'tinysam_rt' has no attribute {name!r}")
