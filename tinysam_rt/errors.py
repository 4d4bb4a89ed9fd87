"""The one custom error type of tinysam-rt."""


class ModelFileError(ValueError):
    """A model directory, manifest or ONNX file is missing, corrupt, or does not match its manifest.

    The message always names the offending file.
    """
