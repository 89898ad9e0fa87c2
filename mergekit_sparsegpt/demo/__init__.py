"""Tiny-model demo and toolkit: corpora that ship with CPython, tiny Llama training, merges.

Run ``python -m mergekit_sparsegpt.demo`` for the main job on its built-in default.
"""
