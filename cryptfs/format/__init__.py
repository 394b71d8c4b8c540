"""On-disk (on-bucket) format v1: body, names, metadata, volume config. Pure and synchronous.

Must not import: store, fs, fuse, trio.
"""
