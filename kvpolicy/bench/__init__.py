"""Benchmarks that ship with the library (``kvpolicy bench ...``): latency and memory of the decode path."""
