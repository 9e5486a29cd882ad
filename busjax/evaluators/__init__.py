"""Evaluators: metrics with confidence intervals, calibration, report figures."""
