"""What the engine needs from a model, and the only code that touches a runtime."""
