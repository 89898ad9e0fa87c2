"""Trim: second-order importance, the kept entries' re-fit, and how each trim went."""
