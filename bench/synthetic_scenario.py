"""Write a self-contained synthetic scenario (npz data + YAML) — a smoke test for machines without the datasets.

    python bench/synthetic_scenario.py --out /tmp/synth [--tokenizer DIR]
    tap simulate --scenario /tmp/synth/scenario.yaml --model tiny --device cuda

Three silos, every task kind, both modalities: coloured squares (class = colour),
a text task naming the colour, VQA ("what colour is the square?" -> the colour)
and image reconstruction. Files are written with numpy only; the scenario uses
the generic ``npz`` format, so nothing but this folder (and a BERT tokenizer
directory) is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

COLOURS = ["red", "green", "blue"]


def write_npz(path: Path, n: int, seed: int, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 3, n)
    images = rng.integers(0, 40, (n, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(classes):
        images[i, :, :, c] += 200
    labels = np.array([COLOURS[c] for c in classes])
    texts = np.array(
        [
            f"a {COLOURS[c]} square number {i % 7}" if i % 2 else "what colour is the square"
            for i, c in enumerate(classes)
        ]
    )
    np.savez(path, images=images, labels=labels, texts=texts, targets=labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", default=None, help="a local BERT tokenizer directory (default: MiniLM's)")
    parser.add_argument("--examples", type=int, default=400)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        write_npz(args.out / f"silo{i}.npz", args.examples, seed=i)

    def data(i: int, **keys) -> dict:
        return {"format": "npz", "path": f"silo{i}.npz", "images_key": "images", "test_fraction": 0.25, **keys}

    colour = {"name": "colour", "kind": "classification", "modalities": ["image"], "domain": "squares"}
    words = {"name": "words", "kind": "classification", "modalities": ["text"], "domain": "words"}
    vqa = {"name": "vqa", "kind": "text_generation", "modalities": ["image", "text"], "domain": "squares"}
    recon = {"name": "recon", "kind": "image_generation", "modalities": ["image"], "domain": "squares"}
    scenario = {
        "name": "synthetic",
        "model": {"backbone": "flava", "size": "tiny", **({"tokenizer": args.tokenizer} if args.tokenizer else {})},
        "silos": [
            {
                "id": "s0",
                "tasks": [
                    {**colour, "data": data(0, labels_key="labels")},
                    {**vqa, "data": data(0, texts_key="texts", targets_key="targets")},
                ],
            },
            {
                "id": "s1",
                "tasks": [
                    {**colour, "data": data(1, labels_key="labels")},
                    {**words, "data": {**data(1, texts_key="texts", labels_key="labels")}},
                ],
            },
            {
                "id": "s2",
                "tasks": [
                    {**recon, "data": data(2)},
                    {**vqa, "data": data(2, texts_key="texts", targets_key="targets")},
                ],
            },
        ],
    }
    (args.out / "scenario.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
    print(args.out / "scenario.yaml")


if __name__ == "__main__":
    main()
