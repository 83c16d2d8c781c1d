"""Small shared helpers used across espnet_compress stages."""
from espnet_compress.utils.tools import MissingToolError, require_tool

__all__ = ["MissingToolError", "require_tool"]
