"""Algorithms that run on the same server, clients and data (TAP_SPEC §5)."""

from __future__ import annotations

from tap_core.algorithms.base import Algorithm, FinalModel
from tap_core.algorithms.fedavg import FedAvg, FedAvgFineTune
from tap_core.algorithms.local import LocalOnly
from tap_core.algorithms.tap import Tap, TapNoKD
from tap_core.config import FederationConfig
from tap_core.errors import ConfigError

REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (Tap, TapNoKD, FedAvg, FedAvgFineTune, LocalOnly)}


def get_algorithm(config: FederationConfig) -> Algorithm:
    try:
        return REGISTRY[config.algorithm](config)
    except KeyError:
        raise ConfigError("algorithm", f"unknown algorithm {config.algorithm!r}", f"use one of {', '.join(REGISTRY)}") from None


__all__ = ["Algorithm", "FinalModel", "REGISTRY", "get_algorithm"]
