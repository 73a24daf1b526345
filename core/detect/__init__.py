"""Trigger detection: flag triggered prompts, localise the trigger token, scan a model's vocabulary."""
