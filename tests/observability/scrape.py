"""Read /metrics of the in-process app as {(sample name, labels): value}."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.base import http

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape() -> Samples:
    """GET /metrics from loopback; fail unless it answers 200."""
    reply = await http("GET", "/metrics", headers={"authorization": None})
    assert reply.status == 200, reply
    return parse(reply.body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """The value of one sample, 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def has(samples: Samples, name: str) -> bool:
    return any(key[0] == name for key in samples)
