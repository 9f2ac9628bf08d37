"""The SLHF trainer (PAPER.md, Algorithm 2): config, losses, and later the trainer loop."""
