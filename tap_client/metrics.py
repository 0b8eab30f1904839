"""Optional Prometheus endpoint of the agent (``--metrics-port``): what this silo is doing."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from tap_core.messages import ClientUpdate, SiloResult


class ClientMetrics:
    def __init__(self, port: int, host: str = "0.0.0.0"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.round = Gauge("tap_client_round", "Last round this silo trained.", registry=r)
        self.task_loss = Gauge(
            "tap_client_task_loss", "Global-copy training loss in the last round.", ["task"], registry=r
        )
        self.personal_loss = Gauge(
            "tap_client_personal_loss", "Personal model loss after the last round.", ["task"], registry=r
        )
        self.replacements = Counter("tap_client_replacements", "Adaptive replacements, by task.", ["task"], registry=r)
        self.train_seconds = Counter("tap_client_train_seconds", "Seconds spent in local training.", registry=r)
        self.final_primary = Gauge("tap_client_final_primary", "Final primary score, by task.", ["task"], registry=r)
        self.kd_loss = Gauge("tap_client_kd_loss", "Stage-2 distillation loss, by task.", ["task"], registry=r)
        self._http, _ = start_http_server(port, addr=host, registry=r)

    def record_round(self, update: ClientUpdate) -> None:
        self.round.set(update.round)
        for task, loss in update.stats.task_losses.items():
            self.task_loss.labels(task=task).set(loss)
        for task, loss in update.stats.personal_losses.items():
            self.personal_loss.labels(task=task).set(loss)
        for event in update.stats.replacements:
            self.replacements.labels(task=event.task).inc()
        self.train_seconds.inc(update.stats.train_seconds)

    def record_result(self, result: SiloResult) -> None:
        for outcome in result.tasks:
            self.final_primary.labels(task=outcome.task).set(outcome.primary)
        for task, loss in result.kd_losses.items():
            self.kd_loss.labels(task=task).set(loss)
