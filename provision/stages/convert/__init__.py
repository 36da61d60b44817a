"""Conversion between on-disk layouts and dtypes/quantization schemes.

``keymap`` holds the Mistral <-> transformers key renames and q/k RoPE permutation; the other
modules of this package cast, quantize and write converted checkpoints. Importing the package
imports nothing heavy.
"""
