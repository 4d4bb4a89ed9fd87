"""The image embedding value object and the predictor's bounded LRU cache of them."""

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageEmbedding:
    """Everything needed to decode prompts for one image.

    Attributes:
        features: (1, 256, 64, 64) float32, read-only.
        original_size: (H, W) of the user's image.
        input_size: (h, w) after resizing the longest side to 1024, before padding.
        model_id: sha256 of the encoder that made `features`.
        decoder_cache: per-image tensors the decoder derives from `features` once and reuses for
            every later prompt on this image (the points decoder's image side, 14 MiB; 10 or 6 in
            older exports), filled on the first prompt. Not part of equality.
    """

    features: np.ndarray
    original_size: tuple
    input_size: tuple
    model_id: str
    decoder_cache: dict = field(default_factory=dict, compare=False, repr=False)


def image_digest(image):
    """Content hash of an image array (shape, dtype and pixels), hex.

    Args:
        image: (H, W, 3) uint8; views and read-only arrays are fine.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.shape}{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class EmbeddingCache:
    """Bounded LRU of ImageEmbeddings keyed by (image digest, model id). Thread-safe."""

    def __init__(self, max_entries):
        if not isinstance(max_entries, (int, np.integer)) or isinstance(max_entries, bool) or max_entries < 0:
            raise ValueError(f"cache_size must be an int >= 0 (0 disables the cache), got {max_entries!r}")
        self.max_entries = int(max_entries)
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._entries)

    def get(self, key):
        """The cached embedding for `key` (marked most recent), or None."""
        with self._lock:
            embedding = self._entries.get(key)
            if embedding is not None:
                self._entries.move_to_end(key)
            return embedding

    def put(self, key, embedding):
        """Insert, evicting the least recently used entries beyond `max_entries`."""
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = embedding
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self):
        with self._lock:
            self._entries.clear()
