"""Benchmarks that compare this project with the vendor tools (not part of the package)."""
