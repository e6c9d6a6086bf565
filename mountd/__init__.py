"""mountd: mounts, stages and uploads datastore references around a training process."""

__version__ = "0.1.0"
