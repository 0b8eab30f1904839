"""The ``tap-server`` command: provision kits, revoke silos, serve the federation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click

from tap_core.errors import TapError
from tap_core.runtime import configure_logging


def _fail(exc: Exception) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """TAP federation server: provisioning and the long-running daemon."""


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the kits (KITS).")
@click.option("--silo", "silos", multiple=True, help="A silo id to provision (repeatable).")
@click.option(
    "--server-host",
    "hosts",
    multiple=True,
    help="Host name or IP the silos dial (repeatable); localhost is always added.",
)
@click.option(
    "--add-silo", "add", default=None, help="Add one silo to an existing provisioning (needs KITS/ca/ca.key)."
)
@click.option("--port", type=int, default=50051, show_default=True, help="Server port, for the silo README.")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True, help="Certificate validity.")
@click.option(
    "--helm-values",
    is_flag=True,
    help="Also write KITS/helm/: a Secret manifest and a Helm values file for the server and each silo.",
)
def provision(
    out: Path, silos: tuple[str, ...], hosts: tuple[str, ...], add: str | None, port: int, days: int, helm_values: bool
) -> None:
    """Create the CA, KITS/server and one kit per silo (or add a silo with --add-silo)."""
    from tap_server import helm_values as helm
    from tap_server.provision import add_silo, provision as run

    address = f"{hosts[0] if hosts else 'SERVER'}:{port}"
    try:
        if add:
            kit = add_silo(out, add, days, server=address)
            click.echo(f"added silo {add}: hand over {kit}/ (then SIGHUP the server or let it notice silos.json)")
            if helm_values:
                for path in [helm.write_server_secret(out), *helm.write_silo(out, add, address)]:
                    click.echo(f"wrote {path}")
            return
        if not silos:
            raise click.UsageError("give at least one --silo (or --add-silo)")
        if not hosts:
            raise click.UsageError("give --server-host: the name or IP the silos will dial")
        run(out, list(silos), list(hosts), days=days, port=port)
        written = (
            helm.write_server(out) + [p for s in silos for p in helm.write_silo(out, s, address)] if helm_values else []
        )
    except TapError as exc:
        _fail(exc)
    click.echo(f"CA: {out / 'ca'} (keep offline)\nserver kit: {out / 'server'}")
    for silo in silos:
        click.echo(f"silo kit: {out / silo}  (hand over securely; it holds the silo's private key)")
    for path in written:
        click.echo(f"wrote {path}")


@main.command()
@click.option(
    "--kit", type=click.Path(path_type=Path, file_okay=False), required=True, help="The server kit (KITS/server)."
)
@click.option("--silo", required=True)
def revoke(kit: Path, silo: str) -> None:
    """Refuse a silo from now on (the server re-reads silos.json; no restart needed)."""
    from tap_server.provision import SiloRegistry

    try:
        SiloRegistry(kit / "silos.json").revoke(silo)
    except TapError as exc:
        _fail(exc)
    click.echo(f"revoked {silo}")


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The folder of the original provisioning (KITS: holds ca/ca.key, server/ and the silo kits).",
)
@click.option("--server", "renew_server", is_flag=True, help="Renew the server certificate.")
@click.option("--silo", "silos", multiple=True, help="Renew this silo's certificate (repeatable).")
@click.option("--all-silos", is_flag=True, help="Renew the certificate of every provisioned silo.")
@click.option(
    "--server-host",
    "hosts",
    multiple=True,
    help="With --server: the names the new certificate is valid for (default: those of the current one).",
)
@click.option(
    "--days", type=click.IntRange(min=1), default=365, show_default=True, help="Validity of the new certificates."
)
@click.option(
    "--helm-values", is_flag=True, help="Also rewrite the Secret manifests in KITS/helm/ (kubectl apply them)."
)
def rotate(
    out: Path,
    renew_server: bool,
    silos: tuple[str, ...],
    all_silos: bool,
    hosts: tuple[str, ...],
    days: int,
    helm_values: bool,
) -> None:
    """Renew certificates before they expire, while the federation runs (no state or round is lost).

    A running server uses its new certificate from the next TLS handshake on (update its kit Secret first
    in Kubernetes). A renewed silo's previous certificate stays valid until the agent connects with the
    new kit, and is refused from then on.
    """
    from tap_server import helm_values as helm
    from tap_server.provision import SiloRegistry
    from tap_server.rotation import rotate_server, rotate_silo

    if hosts and not renew_server:
        raise click.UsageError("--server-host only applies with --server")
    try:
        names = list(silos)
        if all_silos:
            names += sorted(SiloRegistry(out / "server" / "silos.json").load()["silos"])
        names = list(dict.fromkeys(names))
        if not renew_server and not names:
            raise click.UsageError("say what to renew: --server, --silo ID or --all-silos")
        if renew_server:
            renewed = rotate_server(out, days, list(hosts) or None)
            click.echo(
                f"server: new certificate {renewed.path} (SHA-256 {renewed.sha256[:16]}…, until "
                f"{renewed.not_after:%Y-%m-%d}); a running server uses it from its next handshake"
            )
        for silo in names:
            renewed = rotate_silo(out, silo, days)
            click.echo(
                f"silo {silo}: new kit {renewed.path.parent}/ (SHA-256 {renewed.sha256[:16]}…, until "
                f"{renewed.not_after:%Y-%m-%d}); hand it over and restart the agent with it"
            )
        if helm_values:
            for path in [helm.write_server_secret(out), *(helm.write_silo_secret(out, s) for s in names)]:
                click.echo(f"wrote {path} (kubectl apply -f it)")
    except TapError as exc:
        _fail(exc)
    if names:
        click.echo(
            f"{out / 'server' / 'silos.json'} changed: update the server's kit (Secret) so it sees the new "
            "certificates; each previous one is refused once its successor has connected"
        )


@main.command()
@click.option(
    "--kit", type=click.Path(path_type=Path, file_okay=False), required=True, help="The server kit (KITS/server)."
)
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), required=True, help="federation.yaml"
)
@click.option("--listen", default="0.0.0.0:50051", show_default=True, help="HOST:PORT for gRPC with mTLS.")
@click.option(
    "--state",
    "state_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("tap-state"),
    show_default=True,
    help="State directory (resumed on restart).",
)
@click.option("--metrics-port", type=int, default=9090, show_default=True, help="Prometheus /metrics port (-1: off).")
@click.option(
    "--health-port",
    type=int,
    default=50052,
    show_default=True,
    help="Plaintext gRPC health port for Kubernetes probes (-1: off).",
)
@click.option("--exit-when-done", is_flag=True, help="Exit once the federation is done and every silo was told.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def serve(
    kit: Path,
    config_path: Path,
    listen: str,
    state_dir: Path,
    metrics_port: int,
    health_port: int,
    exit_when_done: bool,
    log_format: str,
    log_level: str,
) -> None:
    """Run the federation daemon."""
    configure_logging(log_level, log_format, "tap-server")
    from tap_core.scenario import load_federation_config
    from tap_server.daemon import ServeOptions, ServerDaemon

    try:
        config = load_federation_config(config_path)
        options = ServeOptions(
            kit=kit,
            listen=listen,
            state_dir=state_dir,
            metrics_port=None if metrics_port < 0 else metrics_port,
            health_port=None if health_port < 0 else health_port,
            exit_when_done=exit_when_done,
        )
        daemon = ServerDaemon(config, options)
        daemon.install_signal_handlers()
        daemon.start()
    except TapError as exc:
        _fail(exc)
    daemon.wait()


@main.command()
@click.option("--state", "state_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
def status(state_dir: Path) -> None:
    """Print the phase, round and silos of a state directory."""
    path = state_dir / "state.json"
    if not path.is_file():
        _fail(TapError(f"{path} not found: no federation state in {state_dir}"))
    from tap_server.federation_state import FederationState

    try:
        state = FederationState.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        _fail(TapError(f"{path} is not a state file of this tap-server: {exc}"))
    click.echo(
        f"phase {state.phase}, round {state.round}/{state.config['rounds']}, "
        f"{len(state.declarations)} silos joined, {len(state.results)} results"
    )
    for record in state.log.history:
        losses = ", ".join(f"{t}={v:.4f}" for t, v in record["task_losses"].items())
        click.echo(f"  round {record['round']}: {len(record['received'])}/{len(record['selected'])} updates; {losses}")


if __name__ == "__main__":
    main()
