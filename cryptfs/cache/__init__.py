"""Local state in the cache directory: encrypted staging of dirty files (and its journal)."""
