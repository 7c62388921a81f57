"""Inference: the continuous-batching engine, sampling, prompts, chat, and the CPU fast paths it installs."""
