"""Benchmarks: each script runs as ``python bench/NAME.py`` (or ``python -m bench.NAME``) from
the dev install, whose path entries make ``bench`` importable (docs/development.md)."""
