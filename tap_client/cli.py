"""The ``tap-client`` command: the agent at a silo."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

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
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="silo.yaml: this silo's tasks and data.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Overrides the federation's train.device.",
)
@click.option(
    "--state",
    "state_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Personal model and histories (default: silo.yaml's state_dir, else ./tap-client-state).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Overrides the federation's train.threads.")
@click.option("--server-name", default=None, help="TLS name to verify when it differs from HOST (proxies).")
@click.option("--metrics-port", type=int, default=None, help="Serve this agent's Prometheus metrics.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def run(
    kit: Path,
    server: str,
    config_path: Path,
    device: str | None,
    state_dir: Path | None,
    threads: int | None,
    server_name: str | None,
    metrics_port: int | None,
    log_format: str,
    log_level: str,
) -> None:
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
        options = AgentOptions(
            kit=kit,
            server=server,
            silo=silo,
            config_path=config_path,
            state_dir=state,
            device=device or settings.get("device"),
            threads=threads or settings.get("threads"),
            server_name=server_name,
            metrics_port=metrics_port or settings.get("metrics_port"),
        )
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


@contextlib.contextmanager
def _exit_on_tap_error() -> Iterator[None]:
    try:
        yield
    except TapError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.option(
    "--state",
    "state_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The agent's state directory (tap-client run --state) after the federation ended.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory to write the model to (new or empty; an earlier export there is replaced).",
)
def export(state_dir: Path, out_dir: Path) -> None:
    """Write this silo's final model as a self-contained directory for predict and load_model."""
    configure_logging("warning")
    from tap_client.agent import VERSION
    from tap_client.export import export_model

    with _exit_on_tap_error():
        card = export_model(state_dir, out_dir, VERSION)
    click.echo(card.describe())
    for task in card.tasks.values():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(task.metrics.items()))
        click.echo(f"  {task.name}: test {shown}")
    click.echo(
        f"exported to {out_dir}; use it with: tap-client predict --model {out_dir} --task "
        f"{next(iter(card.tasks))} --input FILE --output predictions.jsonl"
    )


@main.command()
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="A directory written by tap-client export.",
)
@click.option("--task", required=True, help="Which of the model's tasks to predict.")
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    required=True,
    help="csv / tsv, jsonl, npz, an image folder or a saved Hugging Face dataset (no labels needed).",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help='JSON lines: one object per input row with "prediction" (and "probabilities").',
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl", "npz", "imagefolder", "hf_disk"]),
    default=None,
    help="Input format (default: from the file name; a folder is an image folder).",
)
@click.option("--text-column", default=None, help="Column / key / array of the input text (default: as trained).")
@click.option(
    "--image-column", default=None, help="Column / key / array of the images or image paths (default: as trained)."
)
@click.option(
    "--images-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Image generation: folder for the PNGs (default: OUTPUT's name + '-images').",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per batch (default: the federation's evaluation batch size).",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads (default: the federation's; the same count reproduces its numbers bit for bit).",
)
@click.option("--backbone-path", default=None, help="Local directory of the pretrained backbone, if it moved.")
@click.option("--text-encoder-path", default=None, help="Local directory of the pretrained text encoder, if it moved.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def predict(
    model_dir: Path,
    task: str,
    input_path: Path,
    output: Path,
    fmt: str | None,
    text_column: str | None,
    image_column: str | None,
    images_dir: Path | None,
    batch_size: int | None,
    device: str,
    threads: int | None,
    backbone_path: str | None,
    text_encoder_path: str | None,
    progress: bool,
) -> None:
    """Predict every row of INPUT with an exported model; write one JSON object per row to OUTPUT."""
    configure_logging("warning")
    from tap_client.predict import PredictOptions, predict_file
    from tap_core.model_card import read_card
    from tap_core.runtime import configure_threads

    with _exit_on_tap_error():
        configure_threads(threads or read_card(model_dir).threads)
        options = PredictOptions(
            model=model_dir,
            task=task,
            input=input_path,
            output=output,
            format=fmt,
            columns={"texts": text_column, "images": image_column},
            images_dir=images_dir,
            batch_size=batch_size,
            device=device,
            backbone_path=backbone_path,
            text_encoder_path=text_encoder_path,
            progress=progress,
        )
        rows = predict_file(options)
    click.echo(f"{rows} predictions written to {output}")


if __name__ == "__main__":
    main()
