"""Training: the loop, one step, the optimizer face, checkpoints, preemption, metrics, the curriculum."""
