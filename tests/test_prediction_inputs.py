"""Prediction inputs read by the training adapters (tap_core/data/inputs.py) and the label mask (tap_core/labels.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tap_core.config import TaskSpec
from tap_core.data import load_task_data
from tap_core.data.inputs import guess_format, read_inputs, trained_columns
from tap_core.data.types import Examples, TaskData
from tap_core.errors import DataError
from tap_core.labels import allowed_outputs, mask_logits, silo_label_subset, silo_label_subsets

S = 16
TEXT = TaskSpec("reviews", "classification", ("text",))
IMAGE = TaskSpec("shapes", "classification", ("image",))
VQA = TaskSpec("vqa", "text_generation", ("image", "text"))


def png(path: Path, color: tuple[int, int, int], size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# -- reading ------------------------------------------------------------------------------------


def test_csv_rows_are_read_in_order_without_labels(tmp_path):
    path = write_csv(tmp_path / "new.csv", ["id", "review"], [[1, "great"], [2, "awful"], [3, ""]])
    rows = read_inputs(path, TEXT, {"texts": "review"})
    assert rows.n == 3 and rows.texts == ["great", "awful", ""] and rows.images is None
    assert rows.examples(np.array([2, 0]), S).texts == ["", "great"]


def test_default_columns_apply_when_the_task_named_none(tmp_path):
    path = tmp_path / "new.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_inputs(path, TEXT, {}).texts == ["one", "two"]


def test_the_same_rows_as_the_training_reader_gives_for_a_test_file(tmp_path):
    """Prediction on a task's test file sees exactly the test split's images and texts, in order."""
    lines = []
    for i in range(6):
        png(tmp_path / "img" / f"{i}.png", (40 * i, 255 - 30 * i, 7), size=24 + i)
        lines.append(json.dumps({"file": f"img/{i}.png", "question": f"what is {i}", "answer": "x"}))
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    data = {
        "format": "jsonl",
        "path": str(tmp_path / "train.jsonl"),
        "test_path": str(tmp_path / "test.jsonl"),
        "images_key": "file",
        "prompt_key": "question",
        "target_key": "answer",
    }
    test = load_task_data(TaskSpec("vqa", "text_generation", ("image", "text"), data=data), S).test
    rows = read_inputs(
        tmp_path / "test.jsonl", VQA, trained_columns(TaskSpec("vqa", "text_generation", ("image", "text"), data=data))
    )
    got = rows.examples(np.arange(rows.n), S)
    assert got.texts == test.texts
    np.testing.assert_array_equal(got.images, test.images)


def test_npz_arrays_by_trained_key(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", pixels=images)
    rows = read_inputs(tmp_path / "x.npz", IMAGE, {"images": "pixels"})
    assert rows.examples(np.arange(4), 8).images.shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(rows.examples(np.arange(4), 8).images, images.transpose(0, 3, 1, 2))


def test_an_unlabelled_image_folder_reads_loose_files_then_subfolders(tmp_path):
    png(tmp_path / "in" / "b.png", (255, 0, 0))
    png(tmp_path / "in" / "a.png", (0, 255, 0))
    png(tmp_path / "in" / "sub" / "c.png", (0, 0, 255))
    rows = read_inputs(tmp_path / "in", IMAGE)
    assert rows.files == ["a.png", "b.png", "sub/c.png"]
    pixels = rows.examples(np.arange(3), S).images
    assert [int(pixels[i, :, 0, 0].argmax()) for i in range(3)] == [1, 0, 2]


def test_a_labelled_image_folder_still_reads_labels_and_ignores_loose_files(tmp_path):
    png(tmp_path / "train" / "loose.png", (1, 2, 3))
    for label in ("cat", "dog"):
        for i in range(3):
            png(tmp_path / "train" / label / f"{i}.png", (10, 20, 30))
    data = load_task_data(
        TaskSpec(
            "t",
            "classification",
            ("image",),
            data={"format": "imagefolder", "path": str(tmp_path / "train"), "test_fraction": 0.34},
        ),
        S,
    )
    assert sorted(set(data.train.labels + data.test.labels)) == ["cat", "dog"]
    assert len(data.train) + len(data.val) + len(data.test) == 6


def test_a_saved_hugging_face_dataset_is_recognised_and_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"sentence": ["first", "second"], "label": [0, 1]}).save_to_disk(str(tmp_path / "ds"))
    assert guess_format(tmp_path / "ds") == "hf_disk"
    assert read_inputs(tmp_path / "ds", TEXT, {"texts": "sentence"}).texts == ["first", "second"]


def test_format_from_the_name(tmp_path):
    assert guess_format(Path("a.csv.gz")) == "csv" and guess_format(Path("a.TSV")) == "csv"
    assert guess_format(Path("x.jsonl")) == "jsonl" and guess_format(Path("x.npz")) == "npz"
    (tmp_path / "folder").mkdir()
    assert guess_format(tmp_path / "folder") == "imagefolder"
    with pytest.raises(DataError, match="--format"):
        guess_format(Path("data.parquet"))


def test_trained_columns_come_from_any_spelling():
    note = TaskSpec("t", "classification", ("text",), data={"text_column": "note"})
    assert trained_columns(note) == {"texts": "note"}
    task = TaskSpec("t", "text_generation", ("image", "text"), data={"prompt_key": "q", "image_key": "img"})
    assert trained_columns(task) == {"texts": "q", "images": "img"}
    assert trained_columns(TaskSpec("t", "classification", ("text",), data={"format": "trec"})) == {}


# -- errors name the file, the row and the option ---------------------------------------------------


def test_missing_column_names_file_column_and_option(tmp_path):
    path = write_csv(tmp_path / "new.csv", ["comment"], [["fine"]])
    with pytest.raises(DataError) as info:
        read_inputs(path, TEXT, {"texts": "review"})
    message = str(info.value)
    assert "'review' not found" in message and str(path) in message and "--text-column" in message
    assert "comment" in message  # the columns it has
    with pytest.raises(DataError, match=r"--text-column.*'text' or 'prompt' or 'question'"):
        read_inputs(path, TEXT, {})


def test_empty_text_cell_and_missing_key_name_the_row(tmp_path):
    path = tmp_path / "new.jsonl"
    path.write_text('{"review": "ok"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"line 2 of .*new.jsonl \(column 'review'\) has no value"):
        read_inputs(path, TEXT, {"texts": "review"})


def test_unreadable_image_names_file_row_and_column(tmp_path):
    png(tmp_path / "ok.png", (1, 2, 3))
    (tmp_path / "broken.png").write_text("not an image")
    path = write_csv(tmp_path / "new.csv", ["image"], [["ok.png"], ["broken.png"], ["gone.png"]])
    rows = read_inputs(path, IMAGE)
    assert rows.examples(np.array([0]), S).images.shape == (1, 3, S, S)
    with pytest.raises(
        DataError,
        match=r"\(--image-column\): data row 2 of .*new.csv \(column 'image'\) "
        r"cannot be read as an image",
    ):
        rows.examples(np.array([0, 1]), S)
    with pytest.raises(DataError, match=r"data row 3 .* image file not found"):
        rows.examples(np.array([2]), S)


def test_an_image_folder_cannot_feed_a_text_task_and_an_empty_one_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="imagefolder holds only images"):
        read_inputs(tmp_path / "empty", TEXT)
    with pytest.raises(DataError, match="no images in label subfolders or in itself"):
        read_inputs(tmp_path / "empty", IMAGE)
    with pytest.raises(DataError, match="not found"):
        read_inputs(tmp_path / "nothing.csv", TEXT)


# -- the label mask -------------------------------------------------------------------------------


def test_silo_label_subset_prefers_the_declared_list_and_keeps_head_order():
    head = ("ant", "bee", "cat", "dog")
    assert silo_label_subset(head, None, ["dog", "bee", "dog"]) == ("bee", "dog")
    assert silo_label_subset(head, ("cat", "ant"), ["dog"]) == ("ant", "cat")


def test_silo_label_subsets_use_training_rows_never_test_rows():
    own = [TaskSpec("t", "classification", ("text",)), TaskSpec("g", "text_generation", ("text",))]
    head = [TaskSpec("t", "classification", ("text",), labels=("a", "b", "c")), own[1]]
    data = {
        "t": TaskData(Examples(labels=["a"]), Examples(labels=["b"]), Examples(labels=["c"])),
        "g": TaskData(Examples(), Examples(), Examples()),
    }
    assert silo_label_subsets(own, data, head) == {"t": ("a", "b")}


def test_mask_logits_restricts_argmax_and_softmax():
    logits = torch.tensor([[5.0, 1.0, 2.0], [0.0, 3.0, 4.0]])
    allowed = allowed_outputs(("a", "b", "c"), ("b", "c"))
    masked = mask_logits(logits, allowed)
    assert masked.argmax(-1).tolist() == [2, 2]
    probabilities = torch.softmax(masked, -1)
    assert probabilities[:, 0].tolist() == [0.0, 0.0]
    torch.testing.assert_close(probabilities[:, 1:], torch.softmax(logits[:, 1:], -1))
    assert mask_logits(logits, allowed_outputs(("a", "b", "c"), ("a", "b", "c"))) is logits
