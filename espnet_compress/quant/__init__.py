"""Weight quantization: quantizers, quantized layers, ``quantize_`` and packed checkpoints."""
from espnet_compress.quant.api import QuantConfig, QuantConfigError, quantize_, quantized_modules
from espnet_compress.quant.quantizers import SUPPORTED_BITS, UnsupportedBitWidth, check_bits

__all__ = ["QuantConfig", "QuantConfigError", "quantize_", "quantized_modules", "SUPPORTED_BITS",
           "UnsupportedBitWidth", "check_bits"]
