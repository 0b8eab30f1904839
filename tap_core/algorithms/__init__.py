"""Algorithms that run on the same server, clients and data (TAP_SPEC §5)."""

from __future__ import annotations

from tap_core.algorithms.base import Algorithm, FinalModel
from tap_core.algorithms.fedavg import FedAvg, FedAvgFineTune
from tap_core.algorithms.local import LocalOnly
from tap_core.algorithms.tap import Tap, TapNoKD
from tap_core.config import FederationConfig
from tap_core.errors import ConfigError
from tap_core.model.tap_model import ModelPlan

REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (Tap, TapNoKD, FedAvg, FedAvgFineTune, LocalOnly)}


def algorithm_class(name: str) -> type[Algorithm]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError("algorithm", f"unknown algorithm {name!r}", f"use one of {', '.join(REGISTRY)}") from None


def get_algorithm(config: FederationConfig) -> Algorithm:
    """The silo side of ``config.algorithm`` (the server never builds one)."""
    return algorithm_class(config.algorithm)(config)


def travelling_components(algorithm: str, plan: ModelPlan) -> list[str]:
    """Components that travel between the server and a silo holding ``plan`` under ``algorithm``."""
    return algorithm_class(algorithm).shared_components(plan)  # a class attribute: no algorithm object is built


__all__ = ["REGISTRY", "Algorithm", "FinalModel", "algorithm_class", "get_algorithm", "travelling_components"]
