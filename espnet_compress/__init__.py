"""espnet_compress: one training run, many deployable compressed ESPnet speech recognisers.

Importing this package is cheap (no torch, no ESPnet); the heavy modules load on first use.
"""
__version__ = "0.1.0"


def register() -> None:
    """Register this package's encoders/models into ESPnet's ASR task (see :mod:`.registry`)."""
    from espnet_compress.registry import register as _register

    _register()


__all__ = ["register", "__version__"]
