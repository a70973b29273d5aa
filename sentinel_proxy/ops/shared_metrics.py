"""One set of metrics for a gateway of several processes (``--workers``): each worker's numbers in
prometheus_client's multiprocess files, read back together on every scrape.

A scrape lands on whichever worker the kernel hands the connection to; if each answered with its
own numbers, successive scrapes would go up and down and Prometheus would see counter resets. So
every worker copies its series into its own files in one directory per gateway, and /metrics
renders them with prometheus_client's ``MultiProcessCollector``, which sums the files of every
process, the dead ones' included: each file only grows, so no counter a scrape shows goes back,
whichever worker answers. Gauges are "live": a dead worker's share leaves with it
(``mark_process_dead``); most are summed ("livesum": in flight, bytes, memory), those every
worker says alike are not ("livemax": the version, the check intervals; "livemin": the start time).

The request path still counts in plain numbers (ops/metrics.py: no lock and no mmap write per
request); :meth:`MetricFiles.write_family` copies only the series that changed, every
:data:`SYNC_INTERVAL` and right before a scrape.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key

if TYPE_CHECKING:
    from sentinel_proxy.ops.metrics import Family

#: How often a worker copies its numbers into its files: a scrape's view of the other workers is
#: at most this old (its own numbers are copied as it renders).
SYNC_INTERVAL = 0.5

#: Gauge modes this module writes (prometheus_client multiprocess modes whose files go with a dead worker).
GAUGE_MODES = frozenset({"livesum", "livemax", "livemin"})


def _prefix(kind: str, mode: str) -> str:
    """File name prefix of a metric type, as ``MultiProcessCollector`` reads it (``{prefix}_{pid}.db``)."""
    if kind != "gauge":
        return kind
    if mode not in GAUGE_MODES:
        raise ValueError(f"gauge mode {mode!r} is not one of {sorted(GAUGE_MODES)}")
    return f"gauge_{mode}"


class MetricFiles:
    """This process's files in the gateway's metrics directory, and what was last written to them."""

    def __init__(self, directory: str, pid: int):
        self.directory = directory
        self.pid = pid
        self._files: dict[str, MmapedDict] = {}
        #: (sample name, label values) -> (its key in the file, the value written last).
        self._written: dict[tuple[str, tuple[str, ...]], tuple[str, float]] = {}
        #: (histogram name, label values) -> the bucket counts and sum written last.
        self._histograms: dict[tuple[str, tuple[str, ...]], tuple[list[int], float]] = {}

    def _put(self, prefix: str, metric: str, sample: str, documentation: str, labelnames: Sequence[str],
             labelvalues: tuple[str, ...], value: float) -> None:
        ident = (sample, labelvalues)
        written = self._written.get(ident)
        if written is not None and written[1] == value:
            return
        key = written[0] if written is not None else mmap_key(metric, sample, list(labelnames), list(labelvalues),
                                                              documentation)
        file = self._files.get(prefix)
        if file is None:
            file = self._files[prefix] = MmapedDict(os.path.join(self.directory, f"{prefix}_{self.pid}.db"))
        file.write_value(key, float(value), 0.0)
        self._written[ident] = (key, value)

    def write_family(self, family: Family) -> None:
        """Copy the changed series of one of ops/metrics.py's families (counter, gauge or histogram)."""
        kind, name, documentation, labelnames = family.kind, family.name, family.documentation, family.labelnames
        series = list(family.series.items())
        prefix = _prefix(kind, getattr(family, "mode", ""))
        if kind != "histogram":
            sample = name + "_total" if kind == "counter" else name
            for labels, value in series:
                self._put(prefix, name, sample, documentation, labelnames, labels, value.value)
            return
        bucket_labels = (*labelnames, "le")
        for labels, value in series:
            last = self._histograms.get((name, labels))
            if last is not None and last[0] == value.counts and last[1] == value.sum:
                continue
            # Buckets are not cumulated in the files: MultiProcessCollector cumulates them.
            for le, count in zip(family.les, value.counts):  # type: ignore[attr-defined]
                self._put(prefix, name, name + "_bucket", documentation, bucket_labels, (*labels, le), count)
            self._put(prefix, name, name + "_sum", documentation, labelnames, labels, value.sum)
            self._histograms[(name, labels)] = (list(value.counts), value.sum)

    def write_metric(self, metric: Metric, mode: str = "livesum") -> None:
        """Copy a counter or gauge family that a collector made (the stores' counters, process_*,
        python_*); ``mode``: how the workers' values of a gauge combine."""
        prefix = _prefix(metric.type, mode)
        for sample in metric.samples:
            self._put(prefix, metric.name, sample.name, metric.documentation, tuple(sample.labels),
                      tuple(sample.labels.values()), sample.value)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
