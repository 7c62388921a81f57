"""The transformer for every Phi family member, plain PyTorch, switched by ModelConfig."""
