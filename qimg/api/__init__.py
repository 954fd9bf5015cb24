"""The Python API behind ``qimg``'s top-level names: images as streams, commands as functions."""
