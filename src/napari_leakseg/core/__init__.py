"""Shared mechanisms used by every capability (no napari, no Qt)."""
