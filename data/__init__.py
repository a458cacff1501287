"""Data: document sources (TFDS builders), encoders, packing and per-host iterators."""
