"""The images, built and run: a federation of one server and two client containers, to the end.

``deploy/build-local.sh`` builds ``localhost/tap-server`` and ``localhost/tap-client`` with podman from
a locally made Debian base (no registry); ``.ci/run`` calls it before the tests, so here it only checks
its cache. The containers run as the images' non-root user with a read-only root filesystem, no
capabilities and host networking on loopback, exactly the command lines of compose and the chart.
Skipped, with the reason, where podman cannot run containers. Static checks of the Dockerfiles and
locks run everywhere.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ops_federation import free_port, make_tiny_federation, read_metrics, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
REQUIREMENTS = DEPLOY / "requirements"
TAG = os.environ.get("TAP_IMAGE_TAG", "dev")
SERVER_IMAGE, CLIENT_IMAGE = f"localhost/tap-server:{TAG}", f"localhost/tap-client:{TAG}"
# What works where cgroups are in hybrid mode and the process lacks CAP_SYS_RESOURCE (see build-local.sh).
PODMAN = ["podman", "--runtime", os.environ.get("PODMAN_RUNTIME", "runc"), "--cgroup-manager", "cgroupfs"]
# --no-healthcheck: podman would schedule the images' HEALTHCHECK with systemd timers; the test runs the
# same script itself (podman exec), against the ports it chose.
RUN = [*PODMAN, "run", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000", "--no-healthcheck"]
# The runtime hardening of compose.yaml and the chart.
HARDENED = [
    "--network",
    "host",
    "--read-only",
    "--tmpfs",
    "/tmp:rw,size=512m,mode=1777",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
]
BUILD_TIMEOUT = 3600  # a cold build (debootstrap + ~1.5 GB of wheels) on two shared cores


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc


def why_podman_cannot_run() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (Debian: apt-get install podman buildah runc debootstrap)"
    try:
        info = subprocess.run(
            [*PODMAN, "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman does not answer: {exc}"
    if info.returncode != 0:
        return f"podman cannot run here: {(info.stderr or info.stdout).strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def images():
    reason = why_podman_cannot_run()
    if reason:
        pytest.skip(reason)
    # One build at a time (pytest-xdist workers, parallel CI jobs on one machine).
    with open(Path(os.environ.get("TMPDIR", "/tmp")) / "tap-build-local.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        proc = subprocess.run(
            [str(DEPLOY / "build-local.sh")], capture_output=True, text=True, timeout=BUILD_TIMEOUT, cwd=ROOT
        )
    assert proc.returncode == 0, f"deploy/build-local.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    print(f"deploy/build-local.sh: {time.monotonic() - started:.0f}s")
    return SERVER_IMAGE, CLIENT_IMAGE


def chown_for_the_image(*paths: Path) -> None:
    """The images run as uid/gid 10001: let it read the kits (keys are 0600) and write the state."""
    for path in paths:
        if os.geteuid() == 0:
            for p in [path, *path.rglob("*")]:
                os.chown(p, 10001, 10001)
        else:  # rootless: the user namespace maps 10001 to a subordinate uid
            podman("unshare", "chown", "-R", "10001:10001", str(path))


def container_logs(name: str) -> str:
    proc = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr)[-4000:]


class Containers:
    """Containers this test started (removed at the end, whatever happens)."""

    def __init__(self):
        self.names: list[str] = []
        self.prefix = f"tap-test-{uuid.uuid4().hex[:8]}"

    def run(self, name: str, image: str, *args: str, volumes: list[str]) -> str:
        full = f"{self.prefix}-{name}"
        mounts = [arg for v in volumes for arg in ("--volume", v)]
        proc = subprocess.run(
            [*RUN, "--detach", "--name", full, *HARDENED, *mounts, image, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"podman run {name}: {proc.stderr}"
        self.names.append(full)
        return full

    def wait(self, name: str, timeout: float) -> int:
        proc = subprocess.run([*PODMAN, "wait", name], capture_output=True, text=True, timeout=timeout)
        return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else -1

    def logs(self, name: str) -> str:
        return container_logs(name)

    def all_logs(self) -> str:
        return "\n".join(f"--- {n}\n{container_logs(n)}" for n in self.names)

    def remove(self) -> None:
        for name in self.names:
            subprocess.run([*PODMAN, "rm", "--force", "--time", "5", name], capture_output=True, timeout=120)


@pytest.mark.container
@pytest.mark.timeout(BUILD_TIMEOUT + 900)
def test_federation_of_containers_runs_to_the_end(images, tmp_path):
    server_image, client_image = images
    fed = make_tiny_federation(tmp_path, data_dir="/data")
    for silo in fed.silos:
        (fed.state / silo).mkdir(parents=True)
    (fed.state / "server").mkdir()
    chown_for_the_image(fed.kits, fed.state, fed.data)
    port, health, metrics = free_port(), free_port(), free_port()
    client_metrics = {silo: free_port() for silo in fed.silos}
    containers = Containers()
    try:
        server = containers.run(
            "server",
            server_image,
            "serve",
            "--kit",
            "/kit",
            "--config",
            "/kit/federation.yaml",
            "--listen",
            f"127.0.0.1:{port}",
            "--state",
            "/var/lib/tap/state",
            "--metrics-port",
            str(metrics),
            "--health-port",
            str(health),
            "--log-format",
            "json",
            "--exit-when-done",
            volumes=[f"{fed.kits / 'server'}:/kit:ro", f"{fed.state / 'server'}:/var/lib/tap/state"],
        )
        # the image's own health check script, inside the container, against the readiness service
        wait_for(
            lambda: (
                podman(
                    "exec",
                    server,
                    "python",
                    "/opt/tap/healthcheck.py",
                    "grpc",
                    f"127.0.0.1:{health}",
                    "tap.v1.Federation",
                    check=False,
                ).returncode
                == 0
            ),
            180,
            "the server container to report SERVING",
            interval=1.0,
            on_timeout=containers.all_logs,
        )
        assert read_metrics(metrics)[("tap_clients_joined", ())] == 0
        clients = {
            silo: containers.run(
                silo,
                client_image,
                "run",
                "--kit",
                "/kit",
                "--server",
                f"127.0.0.1:{port}",
                "--config",
                "/kit/silo.yaml",
                "--device",
                "cpu",
                "--state",
                "/var/lib/tap/state",
                "--threads",
                "1",
                "--metrics-port",
                str(client_metrics[silo]),
                "--log-format",
                "json",
                volumes=[
                    f"{fed.kits / silo}:/kit:ro",
                    f"{fed.data}:/data:ro",
                    f"{fed.state / silo}:/var/lib/tap/state",
                ],
            )
            for silo in fed.silos
        }
        assert containers.wait(server, timeout=600) == 0, containers.all_logs()
        for name in clients.values():
            assert containers.wait(name, timeout=120) == 0, containers.all_logs()
        server_log = containers.logs(server)
    finally:
        containers.remove()

    report = json.loads((fed.state / "server" / "report.json").read_text())
    assert [r["round"] for r in report["history"]] == [1, 2] and not report["dropped"]
    assert sorted(t["silo"] for t in report["tasks"]) == list(fed.silos)
    assert all(0.0 <= t["primary"] <= 1.0 for t in report["tasks"])
    for silo in fed.silos:
        assert (fed.state / silo / "results.json").is_file() and (
            fed.state / silo / "final_model.safetensors"
        ).is_file()
    assert json.loads(server_log.strip().splitlines()[0])["level"], "--log-format json: one JSON object per line"
    left = podman("ps", "--all", "--filter", f"name={containers.prefix}", "--format", "{{.Names}}").stdout.split()
    assert not left, f"containers left behind: {left}"


# podman settings for tools that call podman themselves (podman-compose): see build-local.sh.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""
COMPOSE_CLIENTS = ("client-a", "client-b", "client-c")


@pytest.mark.container
@pytest.mark.timeout(BUILD_TIMEOUT + 900)
def test_compose_stack_runs_the_federation(images, tmp_path):
    """deploy/compose.yaml as shipped, under podman-compose: the server and three agents on the compose network
    (the agents dial `server:50051`, a name in the server certificate) run a tiny federation to the end.
    Prometheus and Grafana come from registry images that cannot be pulled here (their config is run by
    tests/test_prometheus_live.py); the compose file must still refuse to start without a Grafana password."""
    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed (Debian: apt-get install podman-compose)")
    from tap_core.config import to_mapping
    from tap_server.provision import provision

    from ops_federation import tiny_config, write_csv

    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, deploy, ignore=shutil.ignore_patterns("requirements", "Dockerfile*", "*.sh"))
    silos = [c.replace("client-", "silo-") for c in COMPOSE_CLIENTS]
    provision(deploy / "kits", silos, ["server", "localhost"])
    (deploy / "kits" / "server" / "federation.yaml").write_text(yaml.safe_dump(to_mapping(tiny_config(2, len(silos)))))
    for i, silo in enumerate(silos):
        write_csv(deploy / "data" / silo / "reviews.csv", seed=i)
        task = {
            "name": "reviews",
            "kind": "classification",
            "modalities": ["text"],
            "domain": "reviews",
            "data": {
                "format": "csv",
                "path": "/data/reviews.csv",
                "text_column": "review",
                "label_column": "verdict",
                "test_fraction": 0.25,
            },
        }
        (deploy / "kits" / silo / "silo.yaml").write_text(yaml.safe_dump({"tasks": [task]}))
        (deploy / "state" / silo).mkdir(parents=True)
    (deploy / "state" / "server").mkdir(parents=True)
    chown_for_the_image(deploy / "kits", deploy / "data", deploy / "state")
    (tmp_path / "containers.conf").write_text(CONTAINERS_CONF)
    project = f"taptest{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(tmp_path / "containers.conf"),
        "TAP_UID": "10001",
        "TAP_GID": "10001",
        "TAP_VERSION": TAG,
    }
    env.pop("GRAFANA_ADMIN_PASSWORD", None)

    def compose(*args: str, password: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["podman-compose", "-p", project, *args],
            cwd=deploy,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**env, **({"GRAFANA_ADMIN_PASSWORD": "not-a-default"} if password else {})},
        )

    refused = compose("up", "-d", "server", password=False)
    assert refused.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in refused.stdout + refused.stderr
    server, clients = f"{project}_server_1", [f"{project}_{c}_1" for c in COMPOSE_CLIENTS]
    try:
        up = compose("up", "-d", "server", *COMPOSE_CLIENTS)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        for name in clients:
            proc = subprocess.run([*PODMAN, "wait", name], capture_output=True, text=True, timeout=600, env=env)
            assert proc.stdout.strip() == "0", "\n".join(f"--- {n}\n{container_logs(n)}" for n in [server, *clients])
        # the compose healthcheck of the server (its plaintext health port) says healthy
        assert (
            subprocess.run([*PODMAN, "healthcheck", "run", server], capture_output=True, timeout=60, env=env).returncode
            == 0
        )
    finally:
        down = compose("down", timeout=300)
        subprocess.run([*PODMAN, "network", "rm", "--force", f"{project}_default"], capture_output=True, timeout=60)
    assert down.returncode == 0, down.stderr[-2000:]
    report = json.loads((deploy / "state" / "server" / "report.json").read_text())
    assert sorted(t["silo"] for t in report["tasks"]) == silos
    assert [r["round"] for r in report["history"]] == [1, 2]
    left = podman("ps", "--all", "--filter", f"name={project}", "--format", "{{.Names}}").stdout.split()
    assert not left, f"containers left behind: {left}"


@pytest.mark.container
def test_images_run_as_the_tap_user_and_carry_no_kit(images):
    for image in images:
        inspect = json.loads(podman("image", "inspect", image).stdout)[0]
        assert inspect["Config"]["User"] == "10001:10001"
        proc = subprocess.run(
            [
                *RUN,
                "--rm",
                "--entrypoint",
                "sh",
                image,
                "-c",
                "id -u; find / -xdev \\( -name '*.key' -o -name 'ca.crt' \\) -not -path '/proc/*' "
                "-not -path '/usr/*' -not -path '/opt/venv/*' 2>/dev/null; true",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        listing = proc.stdout.split()
        assert listing[0] == "10001" and listing[1:] == [], f"{image}: {listing}"


# ---------------------------------------------------------------- static: Dockerfiles and locks


DOCKERFILES = ["Dockerfile.server", "Dockerfile.client", "Dockerfile.client-cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dependencies_come_from_the_locks_before_the_sources(dockerfile):
    text = (DEPLOY / dockerfile).read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "a syntax directive pulls a frontend image"
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+$", text, re.M), (
        "the base image is a build argument with a pinned default"
    )
    steps = _instructions(DEPLOY / dockerfile)
    installs = [
        (i, cmd.strip())
        for i, step in enumerate(steps)
        if step.startswith("RUN ")
        for cmd in step[4:].split("&&")
        if "pip install" in cmd
    ]
    locked = [(i, cmd) for i, cmd in installs if "--require-hashes" in cmd]
    assert locked and all("--no-deps" in cmd and ".lock" in cmd for _, cmd in locked)
    project = [(i, cmd) for i, cmd in installs if "/opt/tap/src" in cmd]
    assert len(project) == 1 and "--no-deps" in project[0][1] and "--no-build-isolation" in project[0][1]
    assert len(installs) == len(locked) + 1, "every other pip install must be hash-checked from a lock"
    first_source = next(i for i, step in enumerate(steps) if step.startswith("COPY tap_core"))
    assert all(i < first_source for i, _ in locked), "dependencies are installed before the sources are copied"
    assert project[0][0] > first_source


def test_cpu_and_cuda_images_share_one_python():
    cpu = (DEPLOY / "Dockerfile.server").read_text()
    cuda = (DEPLOY / "Dockerfile.client-cuda").read_text()
    python_image = re.search(r"^ARG BASE_IMAGE=(python:3\.11\.\d+-slim-bookworm)$", cpu, re.M).group(1)
    assert re.search(rf"^ARG PYTHON_IMAGE={re.escape(python_image)}$", cuda, re.M), (
        "the CUDA image copies the same CPython"
    )
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:[\d.]+-base-ubuntu24\.04$", cuda, re.M), "a -base CUDA image"
    for lock in ("cpu.lock", "cuda.lock", "models.lock", "datasets.lock"):
        assert "CPython 3.11" in (REQUIREMENTS / lock).read_text().splitlines()[1]
    server_steps = _instructions(DEPLOY / "Dockerfile.server")
    client_steps = _instructions(DEPLOY / "Dockerfile.client")
    shared = server_steps[
        : server_steps.index(next(s for s in server_steps if s.startswith("COPY deploy/healthcheck.py")))
    ]
    assert client_steps[: len(shared)] == shared, "the CPU images share their dependency layers"


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions without comments, continuation lines joined."""
    text = re.sub(
        r"\\\n\s*", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _pins(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """{normalised name: (version, [hashes])} of a lock file written by uv pip compile --generate-hashes."""
    out: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            current = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            out[current] = (m.group(2), [])
        elif current and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            out[current][1].append(h.group(1))
    return out


@pytest.mark.parametrize("lock", ["cpu.lock", "cuda.lock"])
def test_locks_pin_every_dependency_of_the_project_with_hashes(lock):
    """A dependency added to pyproject.toml without re-running compile.sh fails here, not in an image."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _pins(REQUIREMENTS / lock)
    assert pins and all(hashes for _, hashes in pins.values()), "every pin carries its hashes"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in project:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{lock} lacks {name}: run deploy/requirements/compile.sh"
        version = Version(pins[name][0])
        assert req.specifier.contains(Version(version.public) if name == "torch" else version, prereleases=True), (
            f"{lock} pins {name}=={version}, pyproject.toml wants {req.specifier}: run deploy/requirements/compile.sh"
        )
    assert pins["torch"][0] == ("2.13.0+cpu" if lock == "cpu.lock" else "2.13.0")
    cuda_only = {n for n in pins if n.startswith("nvidia-")}
    assert bool(cuda_only) == (lock == "cuda.lock"), "CUDA libraries only in the CUDA lock"
    for nodeps in ("models.lock", "datasets.lock"):
        assert all(h for _, h in _pins(REQUIREMENTS / nodeps).values())


def test_dockerignore_lets_only_the_locks_and_sources_in():
    for dockerfile in DOCKERFILES:
        rules = [
            ln.strip()
            for ln in (DEPLOY / f"{dockerfile}.dockerignore").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")
        ]
        assert "!deploy/requirements/*.lock" in rules
        assert not any(r.startswith("!") and ("kits" in r or "wheel" in r) for r in rules)


def test_build_script_documented_and_wired_into_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "deploy/build-local.sh" in ci
    ops = (ROOT / "docs" / "operations.md").read_text()
    for needed in ("deploy/build-local.sh", "deploy/requirements/compile.sh", "podman import", "debootstrap"):
        assert needed in ops, f"docs/operations.md does not mention {needed}"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["server"]["build"]["dockerfile"] == "deploy/Dockerfile.server"
