"""sana-cli: a fast, scriptable command line and Python API for NVIDIA's Sana text-to-image models.

    import sana_cli
    results = sana_cli.generate("a cyberpunk cat with a neon sign", model="tiny", seed=1)

Importing this package is cheap: torch and diffusers load only when a model does.
"""

from .version import __version__

__all__ = ["generate", "video", "batch", "load", "Session", "__version__"]


def __getattr__(name):
    # Lazy, so `import sana_cli` (and `sana --help`) never pays for torch.
    if name in ("generate", "video", "batch", "load", "Session"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sana_cli' has no attribute {name!r}")
