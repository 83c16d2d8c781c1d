"""Deployment exports of trained compressed models (packed low-bit checkpoints + model-zoo zip)."""
from espnet_compress.export.packed_export import ExportError, ExportResult, export_packed

__all__ = ["ExportError", "ExportResult", "export_packed"]
