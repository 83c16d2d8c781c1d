"""Command-line entry points (run with ``python -m espnet_compress.bin.<name>``)."""
