"""The ``tap`` command: ``tap simulate``, ``tap demo``, ``tap report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tap_core.runtime import configure_logging
from tap_cli.options import config_from_options, friendly_errors, training_options, write_outputs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level", default="warning", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def main(log_level: str) -> None:
    """TAP: two-stage adaptive personalization in federated learning."""
    configure_logging(log_level)


@main.command()
@training_options
@click.option(
    "--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write the JSON report here."
)
@click.option(
    "--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG of the results here."
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes running the silos in parallel [default: as many as the CPU cores allow at --threads "
    "each, at most one per silo]. The results do not depend on it.",
)
@friendly_errors
def simulate(
    report_path: Path | None, plot_path: Path | None, progress: bool, workers: int | None, **opts: Any
) -> None:
    """Run the whole federation on this machine (same logic as the deployed system)."""
    from tap_cli.progress import FederationProgress
    from tap_cli.simulate import run_simulation
    from tap_core.silo_pool import default_workers

    scenario, config = config_from_options(opts)
    workers = workers or default_workers(config.train.threads, len(scenario.silos))
    per_round = config.clients_per_round or len(scenario.silos)
    bar = (
        FederationProgress(
            config.rounds, min(per_round, len(scenario.silos)), len(scenario.silos), f"{config.algorithm}"
        )
        if progress
        else None
    )
    try:
        report = run_simulation(scenario, config, bar, workers=workers)
    finally:
        if bar:
            bar.close()
    write_outputs(report, report_path, plot_path)


@main.command()
@click.argument("report_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None)
def report(report_file: Path, plot_path: Path | None) -> None:
    """Print the results table of a report (and optionally plot it)."""
    data = json.loads(report_file.read_text())
    write_outputs(data, None, plot_path)


def _register_demo() -> None:
    from tap_cli.demo import demo

    main.add_command(demo)


_register_demo()


if __name__ == "__main__":
    main()
