"""The SLHF trainer (PAPER.md, Algorithm 2): config, losses, data, rollouts, checkpoints, loop."""
