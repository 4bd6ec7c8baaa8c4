"""Benchmarks of the WAL archive against PostgreSQL's own tools (``make bench``)."""
