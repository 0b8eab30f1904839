"""Process-level set-up shared by every entry point: threads, logging, data loading."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

# torch, the data loaders and the model are imported where they are used: entry points that only parse
# options, log or print help (`tap --help`, `tap demo`'s parent process) start in a fraction of a second
if TYPE_CHECKING:
    from tap_core.config import FederationConfig, SiloSpec
    from tap_core.data.types import TaskData


def configure_threads(threads: int) -> None:
    """Fix torch's thread count: results are bitwise reproducible only at a fixed count."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def configure_logging(level: str = "info", fmt: str = "text", name: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"{name} " if name else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "peft", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_silo_data(silo: SiloSpec, config: FederationConfig, where: str) -> dict[str, TaskData]:
    """Every task's data of one silo, at the model's image size; fails before any training starts."""
    from tap_core.data import load_task_data
    from tap_core.model import build_backbone

    image_size = build_backbone(config.model).image_size
    return {
        task.name: load_task_data(
            task, image_size, config.train.val_fraction, f"{where} silo {silo.id} task {task.name}"
        )
        for task in silo.tasks
    }


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
