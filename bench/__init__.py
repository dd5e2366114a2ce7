"""Benchmark scripts (run them as scripts; tests reuse a few helpers from here)."""
