"""Atelier's kernel: settings, errors, storage, hashing and the command line."""

__version__ = "0.1.0"
