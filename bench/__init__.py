"""Benchmarks: `python -m bench NAME --json OUT` (JSON + Markdown + plots under bench/results/)."""
