"""A tiny command for tests/test_launcher.py: says what its process had imported, sleeps, exits with a code."""

import sys
import time

import click


@click.command()
@click.option("--sleep", type=float, default=0.0)
@click.option("--exit-code", type=int, default=0)
def main(sleep: float, exit_code: int) -> None:
    click.echo(f"torch imported before main: {'torch' in sys.modules}")
    time.sleep(sleep)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
