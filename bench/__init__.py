"""Constellation benchmark: run with `make bench` (or `python -m bench --smoke`)."""
