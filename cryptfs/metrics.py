"""Prometheus metrics of a mount, through ``prometheus-client``: latency histograms of S3
requests per operation and of FUSE operations, and the mount's counters and gauges (those of
``cryptfs stats``), read from its snapshot at each scrape.

Owns: the process's metric registry (``REGISTRY``; one mount per process) and what a scrape
answers.  Observing a histogram is thread-safe (S3 requests are timed on the asyncio
bridge's thread); the snapshot is taken on the trio thread, by the endpoint's handler.
Must not import: ``cryptfs.fs``, ``cryptfs.fuse``, ``cryptfs.store`` (they import this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "FUSE_SECONDS", "REGISTRY", "S3_SECONDS", "exposition"]

REGISTRY = CollectorRegistry(auto_describe=True)

# from a cached HEAD on loopback (~0.3 ms) to a multipart part over a slow link (tens of s)
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

S3_SECONDS = Histogram(
    "cryptfs_s3_request_seconds",
    "S3 request latency per operation, retries included (404 and 412 answers too)",
    ["op"],
    registry=REGISTRY,
    buckets=_BUCKETS,
)
FUSE_SECONDS = Histogram(
    "cryptfs_fuse_op_seconds",
    "Latency of FUSE operations as this process answers them, per operation",
    ["op"],
    registry=REGISTRY,
    buckets=_BUCKETS,
)

# name, type, help; the keys of a snapshot (``cryptfs stats``)
COUNTS = [
    ("pending_files", "gauge", "Closed or fsynced files not yet uploaded"),
    ("pending_bytes", "gauge", "Bytes of files not yet uploaded"),
    ("uploads", "counter", "File bodies uploaded"),
    ("upload_bytes", "counter", "Plaintext bytes uploaded"),
    ("upload_copied_bytes", "counter", "Of those, copied by S3 from the version replaced"),
    ("upload_failures", "counter", "Failed upload attempts (transient ones are retried)"),
    ("conflicts", "counter", "Conflict copies saved (another host changed a file)"),
    ("integrity_failures", "counter", "Objects that failed authentication (read as EIO)"),
    ("cache_bytes", "gauge", "Decrypted chunk cache in memory"),
    ("cache_limit_bytes", "gauge", "Its bound"),
    ("cache_hits", "counter", "Chunk cache hits"),
    ("cache_misses", "counter", "Chunk cache misses"),
    ("staging_bytes", "gauge", "Encrypted staging files on the cache disk"),
    ("disk_cache_bytes", "gauge", "Encrypted chunks kept on the cache disk"),
    ("disk_cache_limit_bytes", "gauge", "Their bound (--cache-size)"),
    ("disk_cache_hits", "counter", "Chunks read from the cache disk instead of S3"),
    ("s3_requests", "counter", "S3 requests"),
    ("s3_errors", "counter", "S3 requests failed after retries"),
    ("s3_bytes_in", "counter", "Bytes downloaded from S3"),
    ("s3_bytes_out", "counter", "Bytes uploaded to S3"),
    ("kms_requests", "counter", "AWS KMS requests"),
    ("dek_cache_entries", "gauge", "Unwrapped data keys held in memory"),
    ("open_files", "gauge", "Open file handles"),
    ("uptime_seconds", "gauge", "Seconds since the mount started"),
]


class SnapshotCollector(Collector):
    """The mount's counters, from ``snapshot()`` at each scrape, labelled by mount point."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # (nothing to check at registration: the names are ours)

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        mp = str(snap["mountpoint"])
        for name, kind, help_text in COUNTS:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            metric = family(f"cryptfs_{name}", help_text, labels=["mountpoint"])
            metric.add_metric([mp], float(snap.get(name, 0)))
            yield metric
        hits, misses = snap.get("cache_hits", 0), snap.get("cache_misses", 0)
        ratio = GaugeMetricFamily(
            "cryptfs_cache_hit_ratio", "Chunk cache hits / lookups (memory)", labels=["mountpoint"]
        )
        ratio.add_metric([mp], hits / (hits + misses) if hits + misses else 0.0)
        yield ratio


def exposition(snapshot: Callable[[], dict[str, Any]]) -> bytes:
    """The text a scrape gets: the histograms and the snapshot's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(REGISTRY) + generate_latest(registry)
