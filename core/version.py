"""The pack's version: one place, read by the package, the provenance of saved files and the wheel."""

__version__ = "0.1.0"
