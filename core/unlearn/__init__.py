"""Backdoor removal: SKD and SKD-CAG (weight unlearning); SAU joins later (sampling-time)."""
