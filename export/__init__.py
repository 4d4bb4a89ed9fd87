"""tinysam_export: the torch side of tinysam-rt (installed from export/).

Builds TinySAM vit_t in PyTorch (`model.build.build_tinysam`) and exports it to the ONNX model
directory the torch-free runtime reads (`export_onnx.export_model`). The only package that
imports torch.
"""
