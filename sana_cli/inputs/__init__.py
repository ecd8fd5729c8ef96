"""Checking what comes from outside before anything loads: option values, input images, LoRA files,
ControlNet directories. Torch-free."""
