"""Benchmarks: one command each, dcrouter side by side with a peer in the same run.

See docs/performance.md.
"""
