"""Benchmarks that print numbers: `python -m lib.bench <subcommand>`."""
