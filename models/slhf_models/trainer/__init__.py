"""The SLHF trainer (Algorithm 2, docs/algorithm.md): config, losses, data, rollouts, loop."""
