"""The ``tap-client`` command: the agent at a silo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tap_core.errors import TapError
from tap_core.runtime import configure_logging

EXIT_AUTH = 3
EXIT_REFUSED = 4


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """TAP federation client: trains next to the data, which never leaves."""


@main.command()
@click.option("--kit", type=click.Path(path_type=Path, file_okay=False), required=True, help="This silo's kit folder.")
@click.option("--server", required=True, help="HOST:PORT of tap-server.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="silo.yaml: this silo's tasks and data.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Overrides the federation's train.device.")
@click.option("--state", "state_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Personal model and histories (default: silo.yaml's state_dir, else ./tap-client-state).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Overrides the federation's train.threads.")
@click.option("--server-name", default=None, help="TLS name to verify when it differs from HOST (proxies).")
@click.option("--metrics-port", type=int, default=None, help="Serve this agent's Prometheus metrics.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def run(kit: Path, server: str, config_path: Path, device: str | None, state_dir: Path | None, threads: int | None,
        server_name: str | None, metrics_port: int | None, log_format: str, log_level: str) -> None:
    """Join the federation, train, distil, evaluate; exit 0 when the federation is done."""
    configure_logging(log_level, log_format, "tap-client")
    from tap_client.agent import Agent, AgentOptions
    from tap_client.connection import AuthFailure, Refused
    from tap_core.scenario import load_silo_config

    try:
        silo, settings = load_silo_config(config_path)
        state = state_dir or Path(settings.get("state_dir") or "tap-client-state")
        if not state.is_absolute() and state_dir is None and settings.get("state_dir"):
            state = config_path.parent / state
        options = AgentOptions(kit=kit, server=server, silo=silo, config_path=config_path, state_dir=state,
                               device=device or settings.get("device"), threads=threads or settings.get("threads"),
                               server_name=server_name, metrics_port=metrics_port or settings.get("metrics_port"))
        code = Agent(options).run()
    except AuthFailure as exc:
        click.echo(f"authentication failed: {exc}", err=True)
        sys.exit(EXIT_AUTH)
    except Refused as exc:
        click.echo(f"refused by the server: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    except TapError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
