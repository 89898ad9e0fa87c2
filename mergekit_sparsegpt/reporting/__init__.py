"""Reporting: the run's report and the model card."""
