"""The chart as an operator lives with it: the agent as a Job, NetworkPolicies, PDB, digests, provisioned
values, release-scoped alerts, client metrics, probes that mean different things.

Rendered offline by the real Helm engine (helm-python-sdk); manifests are checked against Kubernetes'
schemas (kubernetes-validate); the release-scoped rules are run by promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tap"
KUBE_VERSION = "1.33.0"
DIGEST = "sha256:" + "ab" * 32

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install helm-python-sdk)")


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict[str, Any], name: str = "fl", namespace: str = "federation") -> list[dict[str, Any]]:
    out = chart.render(values, name=name, namespace=namespace, is_install=True)
    return [
        doc
        for path, text in sorted(out.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(docs, kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def validate(docs) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: not in kubernetes-validate's schemas
        kv.validate(doc, KUBE_VERSION, strict=True)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


CLIENT = {"client": {"enabled": True, "server": "tap.example.org:443", "siloName": "silo-a"}}


# ------------------------------------------------------------------ the agent as a Job


def test_agent_is_a_job_that_fails_on_the_final_exit_codes(chart):
    from tap_client import cli as client_cli

    docs = render(chart, CLIENT)
    validate(docs)
    job = one(docs, "Job", "fl-tap-client")
    assert not [d for d in docs if d["kind"] == "Deployment"]
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail) == 1 and fail[0]["onExitCodes"]["containerName"] == "client"
    assert fail[0]["onExitCodes"]["operator"] == "In"
    # the agent's final exits: configuration error (2), authentication (3), refused (4)
    assert sorted(fail[0]["onExitCodes"]["values"]) == sorted({2, client_cli.EXIT_AUTH, client_cli.EXIT_REFUSED})
    (container,) = spec["template"]["spec"]["containers"]
    assert container["name"] == "client"
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert spec["backoffLimit"] >= 1, "crashes (OOM) are retried: the agent resumes from its state"


def test_deployment_remains_available(chart):
    docs = render(chart, {"client": {**CLIENT["client"], "workload": "Deployment"}})
    dep = one(docs, "Deployment", "fl-tap-client")
    assert "restartPolicy" not in dep["spec"]["template"]["spec"] and "podFailurePolicy" not in dep["spec"]


# ------------------------------------------------------------------ NetworkPolicies


def test_server_network_policy_opens_only_grpc_to_everyone(chart):
    docs = render(chart, {})
    validate(docs)
    policy = one(docs, "NetworkPolicy", "fl-tap-server")
    sts = one(docs, "StatefulSet", "fl-tap-server")
    assert policy["spec"]["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"]: p["containerPort"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    open_to_all, restricted = set(), {}
    for rule in policy["spec"]["ingress"]:
        names = {p["port"] for p in rule["ports"]}
        assert names <= set(ports), f"NetworkPolicy names ports the pod does not have: {names}"
        if not rule.get("from"):
            open_to_all |= names
        else:
            for name in names:
                restricted.setdefault(name, []).extend(rule["from"])
    assert open_to_all == {"grpc"}, "only the mTLS port is reachable from anywhere"
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert restricted["metrics"] == [monitoring] and restricted["health"] == [monitoring]

    docs = render(
        chart,
        {
            "server": {
                "networkPolicy": {
                    "kubeletCIDRs": ["10.0.0.0/16"],
                    "grpcFrom": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
                }
            }
        },
    )
    validate(docs)
    ingress = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert ingress[0]["from"] == [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    assert {"from": [{"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"port": "health", "protocol": "TCP"}]} in ingress
    assert not [
        d for d in render(chart, {"server": {"networkPolicy": {"enabled": False}}}) if d["kind"] == "NetworkPolicy"
    ]


def test_agent_network_policy_allows_dns_and_the_server_port_only(chart):
    docs = render(chart, {"server": {"enabled": False}, **CLIENT})
    validate(docs)
    policy = one(docs, "NetworkPolicy", "fl-tap-client")
    job = one(docs, "Job")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], job["spec"]["template"]["metadata"]["labels"])
    assert policy["spec"]["ingress"] == [], "nothing reaches an agent without a metrics port"
    egress_ports = sorted((p["port"], p["protocol"]) for rule in policy["spec"]["egress"] for p in rule["ports"])
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (443, "TCP")], "DNS and the port of client.server"

    docs = render(
        chart,
        {
            "server": {"enabled": False},
            "client": {
                **CLIENT["client"],
                "metrics": {"enabled": True},
                "networkPolicy": {"serverCIDRs": ["198.51.100.7/32"]},
            },
        },
    )
    validate(docs)
    policy = one(docs, "NetworkPolicy", "fl-tap-client")
    assert [p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]] == ["metrics"]
    assert {"ipBlock": {"cidr": "198.51.100.7/32"}} in policy["spec"]["egress"][1]["to"]


# ------------------------------------------------------------------ PDB, digests, probes


def test_pdb_is_optional_and_protects_the_server_pod(chart):
    assert not [d for d in render(chart, {}) if d["kind"] == "PodDisruptionBudget"]
    docs = render(chart, {"server": {"podDisruptionBudget": {"enabled": True}}})
    validate(docs)
    pdb = one(docs, "PodDisruptionBudget", "fl-tap-server")
    sts = one(docs, "StatefulSet")
    assert pdb["spec"]["maxUnavailable"] == 0
    assert selects(pdb["spec"]["selector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"])


def test_images_can_be_pinned_by_digest(chart):
    docs = render(
        chart,
        {
            "server": {"image": {"repository": "registry.example.org/tap/tap-server", "digest": DIGEST}},
            "client": {**CLIENT["client"], "gpu": 1, "image": {"cudaDigest": DIGEST, "digest": "sha256:" + "cd" * 32}},
        },
    )
    validate(docs)
    server = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    client = one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["image"]
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert server == f"registry.example.org/tap/tap-server:{version}@{DIGEST}"
    assert client == f"tap-client-cuda:{version}@{DIGEST}", "gpu > 0 takes the CUDA image's digest"
    assert (
        one(render(chart, {}), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["image"]
        == f"tap-server:{version}"
    )
    with pytest.raises(helm.HelmValuesError, match="digest"):
        chart.validate_schema({"server": {"image": {"digest": "latest"}}})


def test_readiness_and_liveness_ask_different_questions(chart):
    from tap_server.daemon import LIVENESS_SERVICE, SERVICE_NAME

    container = one(render(chart, {}), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert SERVICE_NAME != LIVENESS_SERVICE


# ------------------------------------------------------------------ provision --helm-values


def test_provisioned_values_and_secrets_install_server_and_silos(chart, tmp_path):
    from click.testing import CliRunner

    from tap_core.config import FederationConfig, from_mapping, validate_federation
    from tap_server.cli import main as server_cli

    kits = tmp_path / "KITS"
    result = CliRunner().invoke(
        server_cli,
        [
            "provision",
            "--out",
            str(kits),
            "--silo",
            "hospital-a",
            "--silo",
            "Lab_B",
            "--server-host",
            "tap.example.org",
            "--helm-values",
        ],
    )
    assert result.exit_code == 0, result.output
    helm_dir = kits / "helm"
    for secret_file in helm_dir.glob("*-secret.yaml"):
        assert secret_file.stat().st_mode & 0o077 == 0, f"{secret_file} holds a private key"

    secret = yaml.safe_load((helm_dir / "server-secret.yaml").read_text())
    values = yaml.safe_load((helm_dir / "server-values.yaml").read_text())
    chart.validate_schema(values)
    docs = render(chart, values)
    validate([secret, *docs])
    assert secret["stringData"]["server.key"] == (kits / "server" / "server.key").read_text()
    assert set(secret["stringData"]) == {"ca.crt", "server.crt", "server.key", "silos.json"}
    sts = one(docs, "StatefulSet")
    kit_volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "kit")
    assert kit_volume["secret"]["secretName"] == secret["metadata"]["name"]
    federation = yaml.safe_load(one(docs, "ConfigMap", "fl-tap-server-config")["data"]["federation.yaml"])
    config = from_mapping(FederationConfig, federation, "federation")
    validate_federation(config)
    assert config.expected_silos == 2 and config.clients_per_round == 2, (
        "sized for this federation, not the chart default"
    )

    for silo in ("hospital-a", "Lab_B"):
        secret = yaml.safe_load((helm_dir / f"{silo}-secret.yaml").read_text())
        values = yaml.safe_load((helm_dir / f"{silo}-values.yaml").read_text())
        chart.validate_schema(values)
        docs = render(chart, values, name=silo.lower().replace("_", "-"), namespace="silo")
        validate([secret, *docs])
        assert not [d for d in docs if d["kind"] == "StatefulSet"], "a silo release runs only the agent"
        job = one(docs, "Job")
        pod = job["spec"]["template"]["spec"]
        kit_volume = next(v for v in pod["volumes"] if v["name"] == "kit")
        assert kit_volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert set(secret["stringData"]) == {"ca.crt", "client.crt", "client.key", "silo.yaml"}
        assert secret["stringData"]["client.crt"] == (kits / silo / "client.crt").read_text()
        args = pod["containers"][0]["args"]
        assert args[args.index("--server") + 1] == "tap.example.org:50051"
        assert args[args.index("--config") + 1] == "/etc/tap/kit/silo.yaml"


def test_rotate_rewrites_the_secret_manifests(tmp_path):
    from click.testing import CliRunner

    from tap_server.cli import main as server_cli

    kits = tmp_path / "KITS"
    runner = CliRunner()
    assert (
        runner.invoke(
            server_cli, ["provision", "--out", str(kits), "--silo", "a", "--server-host", "h", "--helm-values"]
        ).exit_code
        == 0
    )
    before = yaml.safe_load((kits / "helm" / "a-secret.yaml").read_text())["stringData"]["client.crt"]
    result = runner.invoke(server_cli, ["rotate", "--out", str(kits), "--silo", "a", "--helm-values"])
    assert result.exit_code == 0, result.output
    after = yaml.safe_load((kits / "helm" / "a-secret.yaml").read_text())["stringData"]
    assert after["client.crt"] != before and after["client.crt"] == (kits / "a" / "client.crt").read_text()
    silos = json.loads(yaml.safe_load((kits / "helm" / "server-secret.yaml").read_text())["stringData"]["silos.json"])
    assert silos["silos"]["a"]["previous"]["sha256"], "the server Secret carries the hand-over"


# ------------------------------------------------------------------ monitoring


def test_alert_rules_are_scoped_to_their_release(chart, tmp_path):
    """Two releases: release A's server is gone, B's is up. A's TapServerMetricsAbsent fires, B's does not."""
    promtool = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    if not Path(promtool).exists():
        pytest.skip("promtool not found (Debian package prometheus)")
    files = []
    for release, namespace in (("alpha", "team-a"), ("beta", "team-b")):
        rule = one(
            render(chart, {"server": {"prometheusRule": {"enabled": True}}}, release, namespace), "PrometheusRule"
        )
        exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
        for expr in exprs:
            for selector in re.findall(r"\btap_[a-z_]+(\{[^}]*\})?", expr):
                assert f'namespace="{namespace}", job="{release}-tap-server"' in selector, expr
        for group in rule["spec"]["groups"]:
            group["name"] = f"{release}-{group['name']}"
        path = tmp_path / f"{release}.yml"
        path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        files.append(path.name)
    (tmp_path / "test.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": files,
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [
                            {
                                "series": 'tap_round{namespace="team-b", job="beta-tap-server", instance="10.0.0.2:9090"}',
                                "values": "3x10",
                            }
                        ],
                        "alert_rule_test": [
                            {
                                "eval_time": "6m",
                                "alertname": "TapServerMetricsAbsent",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {
                                            "severity": "critical",
                                            "namespace": "team-a",
                                            "job": "alpha-tap-server",
                                        },
                                        "exp_annotations": {
                                            "summary": "No metrics from the TAP federation server",
                                            "description": "Prometheus has scraped no TAP server metrics for 5 minutes. The server is down, "
                                            "crash-looping, still loading its state, or the scrape target is wrong.",
                                        },
                                    }
                                ],
                            }
                        ],
                    }
                ],
            }
        )
    )
    proc = subprocess.run(
        [promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_agent_metrics_are_scraped_with_a_silo_label(chart):
    values = {
        "server": {"enabled": False},
        "client": {
            **CLIENT["client"],
            "metrics": {"enabled": True, "podMonitor": {"enabled": True}, "service": {"enabled": True}},
        },
    }
    docs = render(chart, values)
    validate(docs)
    job = one(docs, "Job")
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    assert container["args"][container["args"].index("--metrics-port") + 1] == "9100"
    monitor = one(docs, "PodMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], pod_labels)
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"
    # the pod label tap.federation/silo becomes the `silo` label the dashboard groups by
    assert pod_labels["tap.federation/silo"] == "silo-a"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_tap_federation_silo"], "targetLabel": "silo"} in endpoint[
        "relabelings"
    ]
    service = one(docs, "Service", "fl-tap-client-metrics")
    assert selects(service["spec"]["selector"], pod_labels) and service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_dashboard_shows_agents_and_certificates():
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboard.json").read_text())
    exprs = {t["expr"] for p in dash["panels"] for t in p.get("targets", [])}
    assert any("tap_certificate_days_left" in e for e in exprs)
    for metric in (
        "tap_client_round",
        "tap_client_task_loss",
        "tap_client_train_seconds_total",
        "tap_client_final_primary",
    ):
        assert any(metric in e and "by (silo" in e for e in exprs), f"dashboard lacks {metric} by silo"
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    clients = next(j for j in prom["scrape_configs"] if j["job_name"] == "tap-clients")
    assert all(sc["labels"].get("silo") for sc in clients["static_configs"]), "compose targets carry the silo label"


def test_operations_doc_covers_upgrades_rollback_and_rotation():
    text = (ROOT / "docs" / "operations.md").read_text()
    for needed in (
        "volumeClaimTemplate",
        "--cascade=orphan",
        "helm rollback",
        "tap-server rotate",
        "--helm-values",
        "podFailurePolicy",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "digest",
        "tap_certificate_days_left",
    ):
        assert needed in text, f"docs/operations.md does not cover {needed}"
