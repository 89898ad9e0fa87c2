"""SparseGPT-importance TIES/DARE merge methods for mergekit.

Kept import-light on purpose: the ``.pth`` start-up hook imports this package in every
Python process, so nothing here may import torch or mergekit.
"""

__version__ = "0.1.0"
