"""Experiment configs: base.py holds the defaults and presets; one file per training stage."""
