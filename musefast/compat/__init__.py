"""Compatibility with peer libraries: weight loading/conversion and drop-in adapters."""
