"""Merge methods: the kernels mergekit calls, and what each needs from the pre-pass."""

# The start-up hook registers our methods when mergekit.merge_methods finishes importing;
# importing it first means that never happens while one of our method modules is half-executed.
import mergekit.merge_methods  # noqa: F401
