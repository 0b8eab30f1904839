"""Command-line options and outputs shared by ``tap simulate`` and ``tap demo``."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from tap_core.config import ALGORITHMS, REPLACEMENT_MODES, WIRE_DTYPES
from tap_core.errors import TapError
from tap_core.scenario import load_scenario
from tap_cli.compose import MODEL_PRESETS, compose_config
from tap_cli.results import plot_report, results_table


def friendly_errors(func: Callable) -> Callable:
    """Turn the project's own errors into a one-line message and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TapError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def training_options(func: Callable) -> Callable:
    """Options shared by ``simulate`` and ``demo`` (None = the scenario's value)."""
    options = [
        click.option(
            "--scenario", default="tap-bench-mini", show_default=True, help="Built-in scenario name or YAML path."
        ),
        click.option("--algorithm", type=click.Choice(ALGORITHMS), default="tap", show_default=True),
        click.option(
            "--rounds",
            type=click.IntRange(min=1),
            default=None,
            help="Federated rounds (default: the scenario's rounds:, else 3).",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--model",
            type=click.Choice(list(MODEL_PRESETS)),
            default=None,
            help="Model preset instead of the scenario's (tiny: random, fast, for tests).",
        ),
        click.option("--clients-per-round", type=click.IntRange(min=1), default=None),
        click.option("--local-steps", type=click.IntRange(min=1), default=None, help="E: optimiser steps per phase."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None),
        click.option("--grad-accum", type=click.IntRange(min=1), default=None),
        click.option("--peak-lr", type=float, default=None),
        click.option("--min-lr", type=float, default=None),
        click.option(
            "--replacement",
            type=click.Choice(REPLACEMENT_MODES),
            default=None,
            help="Compare on a validation slice (default) or on training losses (the authors' mode).",
        ),
        click.option("--margin", type=float, default=None, help="One replacement margin for every task."),
        click.option("--ft-steps", type=click.IntRange(min=0), default=None),
        click.option("--kd-steps", type=click.IntRange(min=0), default=None),
        click.option("--kd-temperature", type=float, default=None),
        click.option(
            "--kd-weight",
            type=float,
            default=None,
            help="One distillation weight for every task (0: stage 2 without the KD term).",
        ),
        click.option("--device", default=None, help="auto | cpu | cuda"),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads per process."),
        click.option("--wire-dtype", type=click.Choice(WIRE_DTYPES), default=None),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def config_from_options(opts: dict[str, Any]):
    scenario = load_scenario(opts["scenario"])
    train = {
        "local_steps": opts["local_steps"],
        "batch_size": opts["batch_size"],
        "grad_accum": opts["grad_accum"],
        "peak_lr": opts["peak_lr"],
        "min_lr": opts["min_lr"],
        "replacement": opts["replacement"],
        "ft_steps": opts["ft_steps"],
        "kd_steps": opts["kd_steps"],
        "kd_temperature": opts["kd_temperature"],
        "device": opts["device"],
        "threads": opts["threads"],
        "margins": {"default": opts["margin"]} if opts["margin"] is not None else None,
        "kd_weights": {"default": opts["kd_weight"]} if opts.get("kd_weight") is not None else None,
    }
    federation = {"clients_per_round": opts["clients_per_round"]}
    if opts["wire_dtype"]:
        federation["wire"] = {"dtype": opts["wire_dtype"]}
    config = compose_config(
        scenario,
        algorithm=opts["algorithm"],
        rounds=opts["rounds"] or scenario.rounds,
        seed=opts["seed"],
        model=opts["model"],
        train=train,
        federation=federation,
    )
    return scenario, config


def write_outputs(report: dict[str, Any], report_path: Path | None, plot_path: Path | None) -> None:
    click.echo(results_table(report))
    if report_path:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2, sort_keys=True))
        click.echo(f"report: {report_path}")
    if plot_path:
        click.echo(f"plot: {plot_report(report, plot_path)}")
