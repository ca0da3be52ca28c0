"""The worker loop: plain PyTorch, one process per rank."""
