"""Weights in and out: safetensors/HF folders, GGUF read and write, one public load, atomic writes."""
