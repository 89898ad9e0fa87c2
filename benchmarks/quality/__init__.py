"""Quality benchmark of the merge methods (issue 3 §1); run ``python -m benchmarks.quality``."""
