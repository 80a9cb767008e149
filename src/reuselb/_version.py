"""The package version: the one place it is written (hatch reads it at build time)."""

__version__ = "0.2.0.dev0"
