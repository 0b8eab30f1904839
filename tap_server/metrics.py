"""Prometheus metrics of the server. One registry per server instance (tests run several).

The names here are a contract with deploy/ (alerts, Grafana) and docs/operations.md;
tests/test_deploy.py fails if those use a name that is not exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tap_core.layout import layout_bytes
from tap_core.messages import SiloResult
from tap_core.model.components import component_kind

if TYPE_CHECKING:
    from tap_server.federation_api import Status, Transfer
from tap_server.certificates import CertificateExpiryCollector

PHASES = ("waiting_for_silos", "training", "aggregating", "finishing", "done")

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.round = Gauge("tap_round", "Current federated round (0 before the first).", registry=r)
        self.rounds_total = Gauge("tap_rounds_planned", "Rounds this federation runs.", registry=r)
        self.rounds_completed = Counter("tap_rounds_completed", "Rounds aggregated and persisted.", registry=r)
        self.phase = Gauge("tap_phase", "1 for the server's current phase, 0 otherwise.", ["phase"], registry=r)
        self.clients_joined = Gauge("tap_clients_joined", "Silos registered with the federation.", registry=r)
        self.clients_connected = Gauge(
            "tap_clients_connected", "Silos heard from within the heartbeat window.", registry=r
        )
        self.clients_selected = Gauge("tap_clients_selected", "Silos selected for the current round.", registry=r)
        self.clients_dropped = Counter(
            "tap_clients_dropped", "Selected silos that missed a round or finish deadline.", registry=r
        )
        self.updates_received = Counter(
            "tap_updates_received", "Client updates accepted into an aggregate.", registry=r
        )
        self.results_received = Gauge("tap_results_received", "Silos that reported their stage-2 results.", registry=r)
        self.bytes_sent = Counter(
            "tap_bytes_sent", "Bytes of tensor streams sent, by component kind.", ["kind"], registry=r
        )
        self.bytes_received = Counter(
            "tap_bytes_received", "Bytes of tensor streams received, by component kind.", ["kind"], registry=r
        )
        self.stream_seconds = Histogram(
            "tap_stream_seconds", "Duration of tensor streams.", ["direction"], buckets=_DURATION_BUCKETS, registry=r
        )
        self.aggregation_seconds = Histogram(
            "tap_aggregation_seconds", "Time to finalise a round's aggregate.", buckets=_DURATION_BUCKETS, registry=r
        )
        self.rejected = Counter("tap_rejected_requests", "Requests refused, by reason.", ["reason"], registry=r)
        self.calls_in_flight = Gauge(
            "tap_calls_in_flight", "Calls in progress, by kind (poll, download, upload, unary).", ["kind"], registry=r
        )
        self.weights_capped = Counter(
            "tap_weights_capped",
            "Rounds x silos whose aggregation weight was capped (aggregation.max_weight_share).",
            registry=r,
        )
        self.replacements = Counter(
            "tap_replacements", "Adaptive replacement events reported by silos, by task.", ["task"], registry=r
        )
        self.task_loss = Gauge(
            "tap_task_loss", "Mean training loss of the global copy in the last round, by task.", ["task"], registry=r
        )
        self.kd_loss = Gauge(
            "tap_kd_loss", "Mean distillation loss reported in stage 2, by task.", ["task"], registry=r
        )
        self.state_writes = Counter("tap_state_writes", "State checkpoints written.", registry=r)
        self.state_write_failures = Counter(
            "tap_state_write_failures", "State checkpoints that failed to write.", registry=r
        )
        self.state_write_seconds = Histogram(
            "tap_state_write_seconds", "Duration of a state checkpoint write.", buckets=_DURATION_BUCKETS, registry=r
        )
        # days left of the server, CA and silo certificates; the daemon attaches the sources
        self.certificate_days_left = CertificateExpiryCollector(registry=r)
        self.set_phase(PHASES[0])

    def set_phase(self, phase: str) -> None:
        for name in PHASES:
            self.phase.labels(phase=name).set(1.0 if name == phase else 0.0)

    def publish(self, status: "Status") -> None:
        """The gauges that describe where the federation stands."""
        self.round.set(status.round)
        self.rounds_total.set(status.rounds)
        self.set_phase(status.phase)
        self.clients_joined.set(len(status.joined))
        self.clients_selected.set(len(status.selected))
        self.clients_connected.set(status.connected)
        self.results_received.set(len(status.results))

    def record_transfer(self, transfer: "Transfer") -> None:
        """A tensor stream: its wire bytes split over component kinds in proportion to their payload, its duration."""
        upload = transfer.direction == "up"
        counter = self.bytes_received if upload else self.bytes_sent
        sizes: dict[str, int] = {}
        for component, tensors in transfer.layout.items():
            kind = component_kind(component)
            sizes[kind] = sizes.get(kind, 0) + layout_bytes({component: tensors}, "fp32")
        total = sum(sizes.values()) or 1
        for kind, size in sizes.items():
            counter.labels(kind=kind).inc(transfer.wire_bytes * size / total)
        self.stream_seconds.labels(direction="upload" if upload else "download").observe(transfer.seconds)

    def round_closed(self, record: dict[str, Any], aggregation_seconds: float) -> None:
        """A round's history record (``tap_server.round_log``), once it is aggregated."""
        for tasks in record["replacements"].values():
            for task in tasks:
                self.replacements.labels(task=task).inc()
        self.aggregation_seconds.observe(aggregation_seconds)
        self.rounds_completed.inc()
        self.clients_dropped.inc(len(record["dropped"]))
        for task, loss in record["task_losses"].items():
            self.task_loss.labels(task=task).set(loss)

    def result_received(self, result: SiloResult) -> None:
        for task, loss in result.kd_losses.items():
            self.kd_loss.labels(task=task).set(loss)

    def exported_names(self) -> set[str]:
        """Every sample name this registry can expose, labelled series included before they have values.

        Counters add ``_total`` (and ``_created``), histograms ``_bucket``, ``_sum``, ``_count``.
        """
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",),
            "summary": ("_sum", "_count", "_created"),
        }
        names: set[str] = set()
        for family in self.registry.collect():
            for suffix in suffixes.get(family.type, ("",)):
                names.add(family.name + suffix)
            names.update(sample.name for sample in family.samples)
        return names
