"""dptq: catastrophic failure under dynamic post-training quantization, reproduced."""
__version__ = "0.1.0"
