"""The int8 quantizer's parts; model_build/quantize.py is its entry point and design note."""
