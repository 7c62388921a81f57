"""Evaluation: perplexity and the phi reports' benchmarks."""
