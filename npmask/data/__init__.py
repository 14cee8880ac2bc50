"""Data: the on-disk domain format, the batch iterator and the built-in synthetic benchmark.

- :mod:`npmask.data.format`: ``write_domain`` / ``load_domain`` / ``list_domains`` (one folder per
  domain: train/test(/val).npz with uint8 NHWC images and int64 labels, plus meta.json).
- :mod:`npmask.data.loader`: ``BatchIterator``, seeded shuffling, paper-style augmentation,
  normalisation, float32 NCHW batches on NumPy or CuPy.
- :mod:`npmask.data.synthetic`: ``ensure_synthetic`` builds (once) and caches a small
  multi-domain benchmark drawn with Pillow: a base domain for pretraining and five targets.
"""
from .format import (FORMAT_VERSION, SPLITS, DataFormatError, Domain, channel_stats, list_domains,
                     load_domain, read_meta, write_domain)

__all__ = ["FORMAT_VERSION", "SPLITS", "DataFormatError", "Domain", "channel_stats", "list_domains",
           "load_domain", "read_meta", "write_domain"]
