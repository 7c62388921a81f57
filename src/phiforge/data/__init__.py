"""Data stages: documents -> token shards (packing) -> weighted, resumable sequence streams (mixture)."""
