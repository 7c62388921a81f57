"""Configuration: the model config and presets, the one TOML + overrides loader, published RoPE factors."""
