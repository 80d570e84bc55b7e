"""Thin napari widgets, one per capability, all built on ``base.JobWidget``."""
