"""Multiface shards: read a downloaded entity, write and verify WebDataset shards, decode samples.

This package depends on numpy, Pillow and OpenCV only; it never imports torch or fastapi.
The format it writes is specified in ``shards/README.md``.
"""
