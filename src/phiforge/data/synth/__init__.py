"""Synthetic textbook data: seeds, prompts, teachers, phi-4 techniques, resumable sharded output."""

from phiforge.data.synth.pipeline import SynthConfig, run_synth

__all__ = ["SynthConfig", "run_synth"]
