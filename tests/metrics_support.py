"""Test support for the metrics: a Prometheus scrape read into sums by label, and the metric names that real
scrapes showed (tests/data/scraped_metric_names.txt), which the dashboard's queries may use and the scrape tests
check they still see."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCRAPED_NAMES_FILE = Path(__file__).resolve().parent / "data" / "scraped_metric_names.txt"


def recorded_names(source: str | None = None) -> set[str]:
    """The names in the recorded list (of one ``[source]`` section, or all)."""
    names: set[str] = set()
    section = None
    for raw in SCRAPED_NAMES_FILE.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and (source is None or section == source):
            names.add(line)
    return names


class Scrape:
    """One scrape of a ``/metrics`` page: sample values summed over every label but the ones asked for."""

    def __init__(self, text: str) -> None:
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    @classmethod
    def of(cls, url: str) -> Scrape:
        return cls(httpx.get(url, timeout=10).text)

    @property
    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def sums(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        """``name``'s values summed by ``labels`` (over processes, nodes and the other labels)."""
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for sample in self.samples:
            if sample.name == name:
                out[tuple(sample.labels.get(label, "") for label in labels)] += sample.value
        return dict(out)

    def total(self, name: str) -> float:
        return sum(s.value for s in self.samples if s.name == name)
