"""The engine: loading Sana pipelines, the pipeline families, running a Plan, VAE decode, LoRA, ControlNet,
quantization and compile. The only layer that imports torch at module level."""
