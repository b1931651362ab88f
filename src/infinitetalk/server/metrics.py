"""Prometheus metrics of one server process, in its own registry (no process-global state).

infinitetalk_queue_length, infinitetalk_jobs{state} (from the store: the whole queue),
infinitetalk_window_seconds (histogram of this process's windows), infinitetalk_gpu_memory_bytes
{device,kind} (allocated / reserved by this process), infinitetalk_model_loads_total,
infinitetalk_jobs_finished_total{state}, infinitetalk_webhook_attempts_total{result}.
"""
from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


class _StoreCollector:
    def __init__(self, store, devices: tuple[str, ...]):
        self.store, self.devices = store, devices

    def collect(self):
        jobs = GaugeMetricFamily("infinitetalk_jobs", "Jobs in the store by state", labels=["state"])
        queue = GaugeMetricFamily("infinitetalk_queue_length", "Jobs waiting for a worker")
        try:
            counts = self.store.counts()
            for state, n in counts.items():
                jobs.add_metric([state], n)
            queue.add_metric([], counts.get("queued", 0))
        except Exception:  # noqa: BLE001 - a scrape must not fail because the store is down
            log.exception("reading job counts for metrics failed")
        yield jobs
        yield queue
        mem = GaugeMetricFamily("infinitetalk_gpu_memory_bytes", "GPU memory of this process",
                                labels=["device", "kind"])
        import torch

        if torch.cuda.is_available():
            for dev in self.devices:
                if dev.startswith("cuda"):
                    mem.add_metric([dev, "allocated"], torch.cuda.memory_allocated(dev))
                    mem.add_metric([dev, "reserved"], torch.cuda.memory_reserved(dev))
        yield mem


class Metrics:
    def __init__(self, store, devices: tuple[str, ...]):
        self.registry = CollectorRegistry()
        self.window_seconds = Histogram("infinitetalk_window_seconds", "Wall time of one generated window",
                                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=self.registry)
        self.model_loads = Counter("infinitetalk_model_loads", "Pipelines loaded by this process's workers",
                                   registry=self.registry)
        self.jobs_finished = Counter("infinitetalk_jobs_finished", "Jobs ended by this process", ["state"],
                                     registry=self.registry)
        self.webhooks = Counter("infinitetalk_webhook_attempts", "Webhook delivery attempts", ["result"],
                                registry=self.registry)
        self.registry.register(_StoreCollector(store, devices))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
