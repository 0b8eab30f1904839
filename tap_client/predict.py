"""``tap-client predict``: an exported model over a file of new records, one JSON object per row.

The input is read by the training adapters (tap_core/data/inputs.py), the rows
are predicted in batches by :class:`tap_core.inference.TapPredictor`, and the
output is written to a temporary file renamed over ``--output`` only when every
row succeeded: a bad row stops the run with an error naming it, and an earlier
output file is left as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tap_core.data.inputs import read_inputs
from tap_core.model_card import read_card
from tap_core.atomic_files import atomic_file


@dataclass
class PredictOptions:
    model: Path
    task: str
    input: Path
    output: Path
    format: str | None = None
    columns: dict[str, str | None] = field(default_factory=dict)  # role (texts / images) -> column; None: trained
    images_dir: Path | None = None  # image generation: where the PNGs go (default: next to the output)
    batch_size: int | None = None  # default: evaluation's batch size (reproduces its numbers)
    device: str = "cpu"
    backbone_path: str | None = None
    text_encoder_path: str | None = None
    progress: bool = True


def predict_file(options: PredictOptions) -> int:
    """Predict every row of ``options.input``; returns the number of rows written."""
    card = read_card(options.model)
    exported = card.task(options.task)  # an unknown task fails before any input is read or model built
    task = card.plan.task(options.task)
    columns = {**exported.inputs, **{role: c for role, c in options.columns.items() if c}}
    inputs = read_inputs(
        options.input, task, columns, options.format, where=f"task {task.name}, --input {options.input}"
    )
    from tap_core.inference import load_model

    predictor = load_model(options.model, options.device, options.backbone_path, options.text_encoder_path)
    size = options.batch_size or card.batch_size
    images_dir = None
    if task.kind == "image_generation":
        images_dir = options.images_dir or options.output.with_name(options.output.stem + "-images")
        images_dir.mkdir(parents=True, exist_ok=True)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_file(options.output) as tmp,
        open(tmp, "w", encoding="utf-8") as out,
        tqdm(total=inputs.n, unit="row", desc=f"predict {task.name}", disable=not options.progress) as bar,
    ):
        for start in range(0, inputs.n, size):
            rows = np.arange(start, min(start + size, inputs.n))
            results = predictor.predict_examples(task.name, inputs.examples(rows, predictor.image_size))
            for row, result in zip(rows.tolist(), results):
                record: dict[str, Any] = {"row": row}
                if inputs.files is not None:
                    record["file"] = inputs.files[row]
                if images_dir is not None:
                    result = {"prediction": str(save_png(result["prediction"], images_dir / f"{row:06d}.png"))}
                record.update(result)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            bar.update(len(rows))
    return inputs.n


def save_png(image: np.ndarray, path: Path) -> Path:
    """A float (H, W, 3) image in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
    return path
