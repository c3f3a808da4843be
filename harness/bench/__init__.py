"""Benchmarks behind ``teelab bench``: each returns a ``BenchResult`` printed as a table or JSON."""
