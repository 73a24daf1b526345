"""Evidence that a removal worked, on the user's own model: attack success before and after, clean
fidelity against the original with the same seeds, and a report (JSON and figures)."""
