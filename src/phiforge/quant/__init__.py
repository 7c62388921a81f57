"""Weight-only int8/int4 quantization and its checkpoints."""
