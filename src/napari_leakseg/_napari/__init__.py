"""napari integration: thin widgets, the thread-worker job runner, layer helpers,
sample data, reader and writer. Algorithm code lives outside this package."""
