"""SAU (spatial attention unlearning): fix triggered outputs at sampling time, training nothing."""
