"""A real Prometheus (Debian's ``prometheus``) scraping a running tap-server and its agents.

The project's scrape config (deploy/prometheus/prometheus.yml) and rules (alerts.yml) are used as
they are, except for what a test must change: the targets (free loopback ports), 1 s scrape and
evaluation intervals, and every alert's ``for`` set to 0 s so that an alert fires as soon as its
condition holds. A tiny federation runs to the end; then:

- the server's ``tap_*`` series and both agents' ``tap_client_*`` series (labelled by silo) arrive;
- every recording and alert rule evaluates without error, and the recording rules give the
  values the server reported;
- certificates provisioned for 10 days make ``TapCertificateExpiringSoon`` fire for the server
  and each silo; stopping the server makes ``TapServerMetricsAbsent`` fire.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from ops_federation import free_port, make_tiny_federation, metrics_up, read_metrics, wait_for

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"


def prometheus_config(directory: Path, server_metrics: int, client_metrics: dict[str, int]) -> Path:
    """deploy/prometheus/prometheus.yml and alerts.yml, pointed at loopback, with test-sized intervals."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["tap-server"]["static_configs"] = [{"targets": [f"127.0.0.1:{server_metrics}"], "labels": {"role": "server"}}]
    labels = [sc["labels"] for sc in jobs["tap-clients"]["static_configs"]]
    jobs["tap-clients"]["static_configs"] = [
        {"targets": [f"127.0.0.1:{port}"], "labels": {**labels[0], "silo": silo}}
        for silo, port in client_metrics.items()
    ]
    config["scrape_configs"] = [jobs["tap-server"], jobs["tap-clients"]]
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
    (directory / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    assert config["rule_files"] == ["alerts.yml"]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Prometheus:
    def __init__(self, directory: Path, config: Path):
        self.port = free_port()
        self.log = directory / "prometheus.log"
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self.ready, 60, "Prometheus to start", on_timeout=lambda: self.log.read_text()[-3000:])

    def ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def firing(self, alert: str) -> list[dict]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == alert and a["state"] == "firing"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.mark.slow
def test_prometheus_scrapes_the_federation_and_the_alerts_fire(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not found (Debian package prometheus; scripts/setup.sh --test installs it)")
    # rounds long enough (seconds) that the 1 s scrapes see every agent mid-federation, however loaded the machine
    fed = make_tiny_federation(tmp_path, days=10, local_steps=60)
    port, health, metrics = free_port(), free_port(), free_port()
    client_metrics = {silo: free_port() for silo in fed.silos}
    prometheus = Prometheus(tmp_path, prometheus_config(tmp_path, metrics, client_metrics))
    server = fed.start(fed.server_command(port, health, metrics), "server")
    agents = {}
    try:
        wait_for(lambda: metrics_up(metrics), 90, "tap-server metrics", on_timeout=lambda: fed.log("server"))
        agents = {
            s: fed.start(fed.client_command(s, port, "--metrics-port", str(client_metrics[s])), s) for s in fed.silos
        }
        for silo, agent in agents.items():
            assert agent.wait(timeout=300) == 0, fed.log(silo)
        # the server keeps serving after the federation (no --exit-when-done), as in Kubernetes
        wait_for(lambda: prometheus.query('tap_phase{job="tap-server", phase="done"} == 1'), 30, "phase done scraped")

        # the server's series, and each agent's, labelled by silo (the agents stop once done: query the past)
        names = set(prometheus.api("label/__name__/values"))
        server_names = {n for n in names if n.startswith("tap_") and not n.startswith("tap_client_")}
        assert {
            "tap_round",
            "tap_rounds_completed_total",
            "tap_clients_joined",
            "tap_phase",
            "tap_certificate_days_left",
            "tap_bytes_sent_total",
            "tap_updates_received_total",
        } <= server_names
        assert prometheus.query('max(tap_rounds_completed_total{job="tap-server"})')[0]["value"][1] == "2"
        # (an agent may finish its last round and exit between two scrapes: at least round 1 was seen)
        rounds = prometheus.query('max by (silo) (max_over_time(tap_client_round{job="tap-clients"}[10m]))')
        assert sorted(r["metric"]["silo"] for r in rounds) == sorted(fed.silos)
        assert all(float(r["value"][1]) >= 1 for r in rounds), rounds
        losses = prometheus.query('count by (silo) (last_over_time(tap_client_task_loss{job="tap-clients"}[10m]))')
        assert sorted(r["metric"]["silo"] for r in losses) == sorted(fed.silos)

        # every rule evaluates without error; the recording rules agree with the server's own numbers
        def evaluated():
            rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
            return rules if all(r["health"] != "unknown" for r in rules) else None

        rules = wait_for(evaluated, 30, "every rule to be evaluated")
        assert len(rules) == sum(
            len(g["rules"]) for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        )
        broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
        assert not broken, broken
        own = read_metrics(metrics)
        soonest = min(v for (name, _), v in own.items() if name == "tap_certificate_days_left")
        recorded = wait_for(lambda: prometheus.query("tap:certificate_days_left:min"), 10, "the recording rule")
        assert abs(float(recorded[0]["value"][1]) - soonest) < 0.01 and 9 < soonest <= 10
        assert float(prometheus.query("tap:silos_disconnected")[0]["value"][1]) >= 0

        # conditions made true: certificates provisioned for 10 days, then the server stopped
        expiring = wait_for(lambda: prometheus.firing("TapCertificateExpiringSoon"), 30, "TapCertificateExpiringSoon")
        assert {(a["labels"]["certificate"], a["labels"].get("silo", "")) for a in expiring} == {
            ("server", ""),
            *(("silo", s) for s in fed.silos),
        }
        assert not prometheus.firing("TapServerMetricsAbsent")
        server.terminate()
        assert server.wait(timeout=30) == 0
        absent = wait_for(
            lambda: prometheus.firing("TapServerMetricsAbsent"),
            60,
            "TapServerMetricsAbsent to fire",
            on_timeout=lambda: json.dumps(prometheus.api("alerts"))[:2000],
        )
        assert absent[0]["labels"]["job"] == "tap-server" and absent[0]["labels"]["severity"] == "critical"
    finally:
        for process in [server, *agents.values()]:
            if process.poll() is None:
                process.kill()
        prometheus.stop()
    assert "err" not in {line.get("level") for line in _logfmt(prometheus.log)}, prometheus.log.read_text()[-3000:]


def _logfmt(path: Path) -> list[dict]:
    """Prometheus's logfmt lines as dicts (enough for the level field)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        fields = {}
        for token in line.split(" "):
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value.strip('"')
        out.append(fields)
    return out
