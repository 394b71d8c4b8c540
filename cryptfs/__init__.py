"""cryptfs: mount an S3 bucket as a client-side encrypted directory."""

__version__ = "0.1.0"
