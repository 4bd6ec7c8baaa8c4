"""Klio's shared contracts: events, formats, catalog and service runtime."""

__version__ = "0.1.0"
