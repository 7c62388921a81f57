"""phiforge: build Phi-style small language models end to end."""

__version__ = "0.1.0"
