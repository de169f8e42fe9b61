"""Helpers of bench/detection.py: fleet simulator, exporter feed, rule evaluation, Alertmanager model, report."""
