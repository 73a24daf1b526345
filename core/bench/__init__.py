"""Benchmarks: commands that print measured figures as JSON, speed as ratios measured side by side."""
