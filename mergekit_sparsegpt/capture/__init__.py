"""Capture: reading weights, running the models block by block, and the hooks that collect each
linear's input statistics."""
