"""Benchmarks of the farm's serving path (`python -m bench.throughput --help`)."""
