"""After the federation: tap-client export, tap-client predict and load_model on a real federation's output.

One module fixture runs a deployed federation laid out as ``tap demo`` lays it
out (its kits, federation.yaml and silo.yaml files), with the tap-server daemon
and one agent per silo in this process (threads; mTLS over loopback; tiny model)
on small csv / jsonl / npz / image-folder data with their own test files.
Predicting those test files with the exported models must give the very numbers
each silo's results.json reports.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from tap_cli.compose import compose_config
from tap_cli.demo import DemoLayout, prediction_notes, prepare_workdir, write_rerun_notes
from tap_client.agent import Agent, AgentOptions
from tap_client.cli import main as tap_client
from tap_core.config import Scenario
from tap_core.errors import ModelMismatchError
from tap_core.scenario import load_federation_config, load_scenario, load_silo_config
from tap_server.daemon import ServeOptions, ServerDaemon

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
REVIEWS = {
    "fresh": "a wonderful and moving film",
    "rotten": "dull and far too long",
    "mixed": "good cast but a weak plot",
}
TRAIN = {"local_steps": 6, "batch_size": 8, "ft_steps": 2, "kd_steps": 2, "max_val_examples": 8, "eval_batch_size": 8}


# ------------------------------------------------------------------ the federation


def write_reviews_csv(path: Path, labels: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "verdict"])
        for i, label in enumerate(labels):
            writer.writerow([f"review {i}: {REVIEWS[label]}", label])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def colour_png(path: Path, colour: str, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_data(root: Path) -> Path:
    """Five tasks on two silos, every input format, each with its own test file; returns the scenario YAML."""
    rng = np.random.default_rng(0)
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    # clinic-a: reviews from a csv with two of the three labels; scans (reconstruction) from npz
    for name, n in (("reviews", 24), ("reviews_test", 12)):
        write_reviews_csv(a / f"{name}.csv", [["fresh", "rotten"][i % 2] for i in range(n)])
    for name, n in (("scans", 24), ("scans_test", 12)):
        base = np.linspace(0, 255, 32)[None, :, None] * np.ones((n, 32, 1, 3)) * rng.random((n, 1, 1, 3))
        np.savez(a / f"{name}.npz", x=np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8))
    # clinic-b: reviews from jsonl with all three labels; shapes from image folders; vqa from jsonl + png files
    for name, n in (("reviews", 24), ("reviews_test", 12)):
        labels = [list(REVIEWS)[i % 3] for i in range(n)]
        write_jsonl(
            b / f"{name}.jsonl",
            [{"review": f"review {i}: {REVIEWS[label]}", "verdict": label} for i, label in enumerate(labels)],
        )
    for f, (folder, n) in enumerate((("shapes", 8), ("shapes_test", 4))):
        for c, colour in enumerate(COLOURS):
            for i in range(n):
                colour_png(b / folder / colour / f"{i}.png", colour, 48, seed=100 * f + 10 * c + i)
    for name, n in (("vqa", 24), ("vqa_test", 12)):
        rows = []
        for i in range(n):
            colour = list(COLOURS)[i % 3]
            colour_png(b / "img" / f"{name}-{i}.png", colour, 32, seed=i)
            rows.append({"file": f"img/{name}-{i}.png", "question": "what colour is the picture", "answer": colour})
        write_jsonl(b / f"{name}.jsonl", rows)

    def task(name, kind, modalities, domain, **data):
        return {"name": name, "kind": kind, "modalities": modalities, "domain": domain, "data": data}

    scenario = {
        "name": "predict-test",
        "model": {"backbone": "flava", "size": "tiny"},
        "train": TRAIN,
        "silos": [
            {
                "id": "clinic-a",
                "tasks": [
                    task(
                        "reviews",
                        "classification",
                        ["text"],
                        "films",
                        format="csv",
                        path="a/reviews.csv",
                        test_path="a/reviews_test.csv",
                        text_column="review",
                        label_column="verdict",
                    ),
                    task(
                        "scans",
                        "image_generation",
                        ["image"],
                        "scans",
                        format="npz",
                        path="a/scans.npz",
                        test_path="a/scans_test.npz",
                        images_key="x",
                    ),
                ],
            },
            {
                "id": "clinic-b",
                "tasks": [
                    task(
                        "reviews",
                        "classification",
                        ["text"],
                        "films",
                        format="jsonl",
                        path="b/reviews.jsonl",
                        test_path="b/reviews_test.jsonl",
                        text_key="review",
                        label_key="verdict",
                    ),
                    task(
                        "shapes",
                        "classification",
                        ["image"],
                        "colours",
                        format="imagefolder",
                        path="b/shapes",
                        test_path="b/shapes_test",
                    ),
                    task(
                        "vqa",
                        "text_generation",
                        ["image", "text"],
                        "colours",
                        format="jsonl",
                        path="b/vqa.jsonl",
                        test_path="b/vqa_test.jsonl",
                        images_key="file",
                        prompt_key="question",
                        target_key="answer",
                    ),
                ],
            },
        ],
    }
    path = root / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    return path


def run_federation(layout: DemoLayout, scenario: Scenario) -> None:
    """``tap demo``'s federation with the server and the agents in this process."""
    prepare_workdir(layout, scenario, compose_config(scenario, algorithm="tap", rounds=2, seed=0), None)
    daemon = ServerDaemon(
        load_federation_config(layout.federation_yaml),
        ServeOptions(
            kit=layout.kits / "server",
            listen="127.0.0.1:0",
            state_dir=layout.state,
            metrics_port=None,
            health_port=None,
            exit_when_done=True,
            done_grace_s=5.0,
        ),
    )
    daemon.start()
    outcome: dict[str, object] = {}

    def agent(silo: str) -> None:
        try:
            spec, _ = load_silo_config(layout.silo_yaml(silo))
            outcome[silo] = Agent(
                AgentOptions(
                    kit=layout.kits / silo,
                    server=f"127.0.0.1:{daemon.port}",
                    silo=spec,
                    config_path=layout.silo_yaml(silo),
                    state_dir=layout.client_state(silo),
                    threads=1,
                )
            ).run()
        except BaseException as exc:  # reported below
            outcome[silo] = exc

    threads = [threading.Thread(target=agent, args=(s.id,), daemon=True) for s in scenario.silos]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert daemon.stop_event.wait(30), "the server did not finish"
    finally:
        daemon.stop(grace=1)
    assert outcome == {s.id: 0 for s in scenario.silos}, outcome


@dataclass
class Finished:
    data: Path
    layout: DemoLayout
    exports: Path
    scenario: Scenario

    def results(self, silo: str) -> dict[str, dict[str, float]]:
        results = json.loads((self.layout.client_state(silo) / "results.json").read_text())
        return {t["task"]: t["metrics"] for t in results["tasks"]}

    def model(self, silo: str) -> Path:
        return self.exports / silo


def tap_client_cli(*args: str):
    return CliRunner().invoke(tap_client, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Finished:
    root = tmp_path_factory.mktemp("after")
    scenario = load_scenario(str(write_data(root / "data")))
    done = Finished(root / "data", DemoLayout(root / "demo"), root / "exports", scenario)
    run_federation(done.layout, scenario)
    for silo in ("clinic-a", "clinic-b"):
        result = tap_client_cli("export", "--state", done.layout.client_state(silo), "--out", done.model(silo))
        assert result.exit_code == 0, result.output
    return done


def predict(finished: Finished, silo: str, task: str, input_path: Path, tmp_path: Path, *extra: str) -> list[dict]:
    output = tmp_path / f"{silo}-{task}.jsonl"
    result = tap_client_cli(
        "predict",
        "--model",
        finished.model(silo),
        "--task",
        task,
        "--input",
        input_path,
        "--output",
        output,
        "--no-progress",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in output.read_text().splitlines()]


# ------------------------------------------------------------------ same examples, same numbers


def test_predict_reproduces_classification_accuracy(finished, tmp_path):
    b = finished.data / "b"
    expected = [json.loads(line)["verdict"] for line in (b / "reviews_test.jsonl").read_text().splitlines()]
    rows = predict(finished, "clinic-b", "reviews", b / "reviews_test.jsonl", tmp_path)
    assert [r["row"] for r in rows] == list(range(12))
    accuracy = sum(r["prediction"] == label for r, label in zip(rows, expected)) / len(expected)
    assert accuracy == finished.results("clinic-b")["reviews"]["accuracy"]
    for row in rows:
        assert set(row["probabilities"]) == {"fresh", "mixed", "rotten"}
        assert math.isclose(sum(row["probabilities"].values()), 1.0, rel_tol=1e-5)
        assert row["prediction"] == max(row["probabilities"], key=row["probabilities"].get)

    folder = predict(finished, "clinic-b", "shapes", b / "shapes_test", tmp_path)
    truth = [r["file"].split("/")[0] for r in folder]
    assert truth == [c for c in sorted(COLOURS) for _ in range(4)]  # the image-folder order of evaluation
    accuracy = sum(r["prediction"] == label for r, label in zip(folder, truth)) / len(truth)
    assert accuracy == finished.results("clinic-b")["shapes"]["accuracy"]


def test_predict_reproduces_text_generation_exact_match(finished, tmp_path):
    test_file = finished.data / "b" / "vqa_test.jsonl"
    answers = [json.loads(line)["answer"] for line in test_file.read_text().splitlines()]
    rows = predict(finished, "clinic-b", "vqa", test_file, tmp_path)
    assert all(isinstance(r["prediction"], str) and "probabilities" not in r for r in rows)
    exact = sum(r["prediction"] == answer for r, answer in zip(rows, answers)) / len(answers)
    assert exact == finished.results("clinic-b")["vqa"]["exact_match"]


def test_predict_reproduces_image_generation_scores(finished, tmp_path):
    from tap_core import load_model

    test = np.load(finished.data / "a" / "scans_test.npz")["x"]  # (N, 32, 32, 3) uint8: the tiny model's size
    model = load_model(finished.model("clinic-a"))
    images = np.stack([p["prediction"] for p in model.predict(task="scans", images=test)])
    assert images.shape == test.shape and images.dtype == np.float32
    target = (test.astype(np.float32) / np.float32(255)).astype(np.float64)  # as evaluation's batches hold them
    mse = float(((images.astype(np.float64) - target) ** 2).mean())
    r2 = 1.0 - mse / float(target.var())
    reported = finished.results("clinic-a")["scans"]
    assert mse == pytest.approx(reported["mse"], rel=1e-9, abs=1e-12)
    assert r2 == pytest.approx(reported["r2"], rel=1e-9, abs=1e-9)

    rows = predict(finished, "clinic-a", "scans", finished.data / "a" / "scans_test.npz", tmp_path)
    for row, image in zip(rows, images):
        png = np.asarray(Image.open(row["prediction"]), dtype=np.float64)
        assert png.shape == (32, 32, 3) and np.abs(png - image * 255).max() <= 0.5 + 1e-3


def test_predict_keeps_to_the_silo_labels(finished, tmp_path):
    """clinic-a's reviews have two of the head's three labels: it never predicts the third."""
    card = json.loads((finished.model("clinic-a") / "model.json").read_text())["tasks"]["reviews"]
    assert card["labels"] == ["fresh", "mixed", "rotten"] and card["silo_labels"] == ["fresh", "rotten"]
    test_file = finished.data / "a" / "reviews_test.csv"
    with open(test_file) as handle:
        expected = [row["verdict"] for row in csv.DictReader(handle)]
    rows = predict(finished, "clinic-a", "reviews", test_file, tmp_path)
    assert {r["prediction"] for r in rows} <= {"fresh", "rotten"}
    assert all(list(r["probabilities"]) == ["fresh", "rotten"] for r in rows)
    assert all(math.isclose(sum(r["probabilities"].values()), 1.0, rel_tol=1e-5) for r in rows)
    accuracy = sum(r["prediction"] == label for r, label in zip(rows, expected)) / len(expected)
    assert accuracy == finished.results("clinic-a")["reviews"]["accuracy"]  # evaluation masks the same way


# ------------------------------------------------------------------ the export and the Python API


def test_the_export_says_what_it_is_and_how_it_was_made(finished):
    directory = finished.model("clinic-b")
    assert sorted(p.name for p in directory.iterdir()) == ["model.json", "model.safetensors", "tokenizer"]
    assert (directory / "tokenizer" / "vocab.txt").is_file()
    card = json.loads((directory / "model.json").read_text())
    owner = json.loads((finished.layout.client_state("clinic-b") / "federation.json").read_text())
    assert card["silo"] == "clinic-b" and "clinic-b" in card["description"]
    assert card["federation"] == {
        "name": "predict-test",
        "id": owner["federation_id"],
        "algorithm": "tap",
        "rounds": 2,
        "seed": 0,
    }
    assert card["base_model"]["spec"]["size"] == "tiny" and len(card["base_model"]["fingerprint"]) == 64
    assert {name: t["test_metrics"] for name, t in card["tasks"].items()} == finished.results("clinic-b")
    assert card["tasks"]["vqa"]["inputs"] == {"texts": "question", "images": "file"}
    assert card["tasks"]["shapes"]["labels"] == card["tasks"]["shapes"]["silo_labels"] == sorted(COLOURS)
    assert card["evaluation"]["batch_size"] == TRAIN["eval_batch_size"]
    assert [t["name"] for t in card["plan"]["tasks"]] == ["reviews", "shapes", "vqa"]


def test_load_model_takes_lists_paths_arrays_and_dicts_alike(finished):
    import tap_core

    model = tap_core.load_model(finished.model("clinic-b"), device="cpu")
    assert model.tasks == ["reviews", "shapes", "vqa"]
    b = finished.data / "b"
    rows = [json.loads(line) for line in (b / "vqa_test.jsonl").read_text().splitlines()][:5]
    paths = [str(b / r["file"]) for r in rows]
    by_paths = model.predict(task="vqa", texts=[r["question"] for r in rows], images=paths)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]  # 32x32: the model's size, no resize
    assert model.predict(task="vqa", texts=[r["question"] for r in rows], images=arrays) == by_paths
    as_dicts = [{"question": r["question"], "file": p} for r, p in zip(rows, paths)]
    assert model.predict(task="vqa", rows=as_dicts) == by_paths
    one_by_one = [model.predict(task="shapes", images=[p], batch_size=1)[0]["prediction"] for p in paths]
    assert [r["prediction"] for r in model.predict(task="shapes", images=paths)] == one_by_one
    review = model.predict(task="reviews", texts=["what a wonderful and moving film"])[0]
    assert review["prediction"] in review["probabilities"]


def test_load_model_refuses_bad_calls_clearly(finished):
    from tap_core import load_model
    from tap_core.errors import TapError

    model = load_model(finished.model("clinic-b"))
    with pytest.raises(TapError, match=r"no task 'nope'; it has reviews, shapes, vqa"):
        model.predict(task="nope", texts=["x"])
    with pytest.raises(TapError, match=r"task vqa reads images"):
        model.predict(task="vqa", texts=["x"])
    with pytest.raises(TapError, match=r"task reviews does not read images"):
        model.predict(task="reviews", texts=["x"], images=["y.png"])
    with pytest.raises(TapError, match=r"rows\[1\]: has no 'review' or 'text' or 'prompt' or 'question' field"):
        model.predict(task="reviews", rows=[{"review": "fine"}, {"comment": "meh"}])
    with pytest.raises(TapError, match=r"images\[0\]: image file not found"):
        model.predict(task="shapes", images=["/no/such.png"])


def test_import_tap_core_stays_cheap():
    import tap_core
    from tap_core import inference

    code = "import sys, tap_core; assert 'torch' not in sys.modules and 'tap_core.inference' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert tap_core.load_model is inference.load_model and tap_core.TapPredictor is inference.TapPredictor
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        tap_core.nothing  # noqa: B018


# ------------------------------------------------------------------ bad input: file, row, field


@pytest.mark.parametrize(
    "case", ["missing column", "unreadable image", "missing image", "missing text", "unknown task", "missing array"]
)
def test_bad_input_is_named_and_loses_nothing(finished, tmp_path, case):
    b = finished.data / "b"
    output = tmp_path / "out.jsonl"
    output.write_text("an earlier output\n")
    task, input_path, expected = "vqa", tmp_path / "in.jsonl", []
    if case == "missing column":
        task, input_path = "reviews", tmp_path / "in.csv"
        input_path.write_text("comment\nvery good\n")
        expected = [str(input_path), "'review' not found", "--text-column", "comment"]
    elif case in ("unreadable image", "missing image"):
        (tmp_path / "broken.png").write_text("not a png")
        bad = "broken.png" if case == "unreadable image" else "gone.png"
        write_jsonl(
            input_path,
            [
                {"question": "what colour", "file": str(b / "img" / "vqa-0.png")},
                {"question": "what colour", "file": bad},
            ],
        )
        problem = "cannot be read as an image" if case == "unreadable image" else "image file not found"
        expected = [f"line 2 of {input_path}", "column 'file'", "--image-column", problem]
    elif case == "missing text":
        write_jsonl(input_path, [{"question": "what colour", "file": "a.png"}, {"file": "b.png"}])
        expected = [f"line 2 of {input_path}", "column 'question'", "has no value", "--text-column"]
    elif case == "unknown task":
        task, input_path = "diagnosis", b / "reviews_test.jsonl"
        expected = ["no task 'diagnosis'", "reviews, shapes, vqa"]
    elif case == "missing array":
        task, input_path = "shapes", tmp_path / "in.npz"
        np.savez(input_path, pixels=np.zeros((2, 8, 8, 3), dtype=np.uint8))
        expected = [str(input_path), "no 'images' array", "--image-column", "pixels"]
    result = tap_client_cli(
        "predict",
        "--model",
        finished.model("clinic-b"),
        "--task",
        task,
        "--input",
        input_path,
        "--output",
        output,
        "--no-progress",
    )
    assert result.exit_code == 2, result.output
    for part in expected:
        assert part in result.output, (part, result.output)
    assert output.read_text() == "an earlier output\n"


def copy_export(finished: Finished, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(finished.model("clinic-b"), tmp_path / "copy"))


@pytest.mark.parametrize("change", ["tokenizer vocabulary", "backbone seed"])
def test_a_different_frozen_backbone_is_refused_on_load(finished, tmp_path, change):
    from tap_core import load_model

    directory = copy_export(finished, tmp_path)
    if change == "tokenizer vocabulary":
        with open(directory / "tokenizer" / "vocab.txt", "a") as handle:
            handle.write("[EXTRA]\n")
    else:
        card = json.loads((directory / "model.json").read_text())
        card["base_model"]["spec"]["init_seed"] = 7
        (directory / "model.json").write_text(json.dumps(card))
    with pytest.raises(
        ModelMismatchError,
        match=r"was trained on a frozen backbone with fingerprint .* but the one "
        r"built here \(flava/tiny\) has",
    ):
        load_model(directory)
    result = tap_client_cli(
        "predict",
        "--model",
        directory,
        "--task",
        "reviews",
        "--input",
        finished.data / "b" / "reviews_test.jsonl",
        "--output",
        tmp_path / "o.jsonl",
    )
    assert result.exit_code == 2 and "fingerprint" in result.output


def test_export_refuses_what_it_cannot_use(finished, tmp_path):
    (tmp_path / "empty-state").mkdir()
    result = tap_client_cli("export", "--state", tmp_path / "empty-state", "--out", tmp_path / "m")
    assert result.exit_code == 2
    assert "has no federation.json or final_model.safetensors or results.json" in result.output
    assert not (tmp_path / "m").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = tap_client_cli("export", "--state", finished.layout.client_state("clinic-b"), "--out", foreign)
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # an earlier export is replaced by a new one, and nothing else is left beside it
    again = copy_export(finished, tmp_path)
    result = tap_client_cli("export", "--state", finished.layout.client_state("clinic-b"), "--out", again)
    assert result.exit_code == 0, result.output
    assert "clinic-b" in result.output and "vqa: test exact_match" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "empty-state", "foreign"]


# ------------------------------------------------------------------ tap demo's RERUN.md


def test_the_rerun_notes_predict_with_one_silo(finished):
    """What ``tap demo`` writes to RERUN.md after the agents' commands: export and predict, ready to paste."""
    layout = finished.layout
    write_rerun_notes(
        layout, 1, 2, 3, [s.id for s in finished.scenario.silos], prediction_notes(layout, finished.scenario)
    )
    notes = (layout.root / "RERUN.md").read_text()
    commands = [
        shlex.split(line)
        for line in notes.splitlines()
        if " tap_client.cli export " in line or " tap_client.cli predict " in line
    ]
    assert len(commands) == 2 and commands[1][commands[1].index("--task") + 1] == "reviews"
    samples = [json.loads(line) for line in layout.sample_input("reviews").read_text().splitlines()]
    assert len(samples) == 3 and all(set(s) == {"review"} for s in samples)  # the column the silo trained with
    for command in commands:
        assert command[:3] == [sys.executable, "-m", "tap_client.cli"]
        result = tap_client_cli(*command[3:])
        assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in layout.predictions("clinic-a", "reviews").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2] and all(r["prediction"] in ("fresh", "rotten") for r in rows)
