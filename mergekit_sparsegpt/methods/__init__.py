"""Merge methods: the kernels mergekit calls, and what each needs from the pre-pass."""
