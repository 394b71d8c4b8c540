"""Key providers: unlocking a volume's keyslots, wrapping and unwrapping per-file data keys
(local master keys or AWS KMS), the in-memory data-key cache, and master-key rotation.

Must not import: fs, fuse, cache, daemon, cli.
"""
