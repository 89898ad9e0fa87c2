"""Calibration data: where the text comes from and the token windows cut from it."""
