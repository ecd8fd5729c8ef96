"""Torch-free planning: requests and batch files in, a checked Plan out (every image, its size, seed, path
and key)."""
