"""Rollouts: a mode table pushed to a brand's devices, optionally to a canary first, and steered."""
