"""The gauge families the scrape-time collectors yield, and how their samples
become Prometheus metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from tlserve.service.metrics import NAMESPACE


@dataclasses.dataclass(frozen=True)
class Family:
    """A gauge family a collector yields: its full name, help and label names."""

    name: str
    doc: str
    labels: tuple[str, ...]

    def empty(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.doc, labels=list(self.labels))


def gauge(name: str, doc: str, *labels: str) -> Family:
    return Family(f"{NAMESPACE}_{name}", doc, labels)


Sample = tuple[Family, tuple[str, ...], float]


def assemble(families: Iterable[Family], samples: Iterable[Sample]) -> list[Metric]:
    """Gauge families with their samples, the first of any duplicate label set kept;
    families without samples are left out (absent, not zero)."""
    built = {family.name: family.empty() for family in families}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for family, labels, value in samples:
        if (family.name, labels) not in seen:
            seen.add((family.name, labels))
            built[family.name].add_metric(list(labels), float(value))
    return [metric for metric in built.values() if metric.samples]
