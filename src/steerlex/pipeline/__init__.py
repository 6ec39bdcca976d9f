"""The whole chain in one command: ``steerlex run`` (docs/pipeline.md)."""
