"""Unlearning: SKD and SKD-CAG train a trigger out of a model as a LoRA (SAU, at sampling time, is core/sau)."""
