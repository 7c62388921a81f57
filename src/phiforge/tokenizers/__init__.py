"""Tokenizers: byte-level BPE and SentencePiece through `tokenizers`, cl100k, chat templates, sources."""
