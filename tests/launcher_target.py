"""A tiny command for tests/test_launcher.py: says what its process had imported, sleeps, exits with a code."""

import os
import sys
import time

import click


@click.command()
@click.option("--sleep", type=float, default=0.0)
@click.option("--exit-code", type=int, default=0)
@click.option("--show-env", default=None, help="Also print this environment variable.")
def main(sleep: float, exit_code: int, show_env: str | None) -> None:
    click.echo(f"torch imported before main: {'torch' in sys.modules}")
    if show_env:
        click.echo(f"{show_env}={os.environ.get(show_env)}")
    time.sleep(sleep)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
