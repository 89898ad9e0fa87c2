"""Performance benchmark of the plugin: ``python -m benchmarks.perf`` (see README.md here)."""
