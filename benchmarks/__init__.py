"""Benchmarks run by hand (python -m benchmarks.<name>), not by the default test suite."""
