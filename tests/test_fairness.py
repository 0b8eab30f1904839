"""Fair comparisons (issue 7 §1): equal step budgets, trivial baselines, label spaces, fusion really federated."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TASKS, synthetic_task_data, tiny_config
from tap_core.config import SiloSpec
from tap_core.errors import ConfigError, TapError
from tap_core.labels import allowed_outputs
from tap_core.messages import SiloDeclaration
from tap_core.model import build_backbone
from tap_core.model.tap_model import PAD_ID
from tap_core.plan import check_label_spaces, united_tasks
from tap_core.silo import SiloRuntime
from tap_core.training.baselines import trivial_score
from tap_core.training.batches import SplitTensors, TaskTensors
from tap_cli.simulate import run_federation
from tap_server.federation import Federation


def task_scores(report):
    return {(t["silo"], t["task"]): t["metrics"] for t in report["tasks"]}


# ------------------------------------------------------------- step budgets


def test_tap_nokd_is_tap_with_the_distillation_term_off(make_runtimes):
    """Same stage-2 steps on the same batches: with KD weight 0, tap and tap-nokd end with the same model."""
    base = tiny_config("tap", rounds=1, kd_steps=3)
    kd_off = dataclasses.replace(base, train=dataclasses.replace(base.train, kd_weights={"default": 0.0}))
    nokd = dataclasses.replace(base, algorithm="tap-nokd")
    tap_report = run_federation(make_runtimes(base), base)
    off_report = run_federation(make_runtimes(kd_off), kd_off)
    nokd_report = run_federation(make_runtimes(nokd), nokd)
    assert task_scores(off_report) == task_scores(nokd_report)
    assert task_scores(tap_report) != task_scores(nokd_report)  # the KD term (weight 1 on text classification) acts
    assert tap_report["kd_losses"] and not nokd_report["kd_losses"]
    # stage 2 really trained the personal model in tap-nokd: its final metrics differ from before stage 2
    before = {(s, t): m for s, tasks in nokd_report["stage1_metrics"].items() for t, m in tasks.items()}
    assert before != task_scores(nokd_report)


def test_every_algorithm_reports_the_steps_of_its_final_model_and_budgets_are_equal(make_runtimes):
    """tap, tap-nokd, fedavg-ft and local give every task rounds x E + stage-2 steps; fedavg has no stage 2."""
    rounds, local_steps, stage2 = 2, 2, 3
    steps = {}
    for algorithm in ("tap", "tap-nokd", "fedavg", "fedavg-ft", "local"):
        config = tiny_config(algorithm, rounds=rounds, local_steps=local_steps, ft_steps=stage2, kd_steps=stage2)
        report = run_federation(make_runtimes(config), config)
        steps[algorithm] = {t["steps"] for t in report["tasks"]}
    assert steps["fedavg"] == {rounds * local_steps}
    for algorithm in ("tap", "tap-nokd", "fedavg-ft", "local"):
        assert steps[algorithm] == {rounds * local_steps + stage2}, algorithm


def test_a_silo_selected_in_fewer_rounds_reports_fewer_steps(make_runtimes):
    config = dataclasses.replace(tiny_config("fedavg-ft", rounds=3, local_steps=2, ft_steps=1), clients_per_round=2)
    report = run_federation(make_runtimes(config), config)
    rounds_in = {s: sum(s in h["selected"] for h in report["history"]) for s in ("a", "b", "c")}
    for task in report["tasks"]:
        assert task["steps"] == 2 * rounds_in[task["silo"]] + 1


# ---------------------------------------------------------------- baselines


def split(labels=None, images=None, input_ids=None, targets=None) -> SplitTensors:
    mask = None if input_ids is None else (input_ids != PAD_ID).long()
    return SplitTensors(images, input_ids, mask, labels, targets)


def tensors(task, train: SplitTensors, test: SplitTensors) -> TaskTensors:
    return TaskTensors(task, train, split(), test)


def test_classification_baseline_is_the_majority_training_label():
    train = split(labels=torch.tensor([0, 2, 2, 1, 2]))
    test = split(labels=torch.tensor([2, 2, 0, 1]))
    assert trivial_score(tensors(TASKS["colour"], train, test), end_id=102) == pytest.approx(0.5)


def test_text_generation_baseline_answers_each_question_with_its_most_frequent_training_answer():
    q1, q2, q3 = [5, 6, 0], [7, 8, 0], [9, 9, 9]
    yes, no, red = [11, 102, 0], [12, 102, 0], [13, 102, 0]
    train = split(input_ids=torch.tensor([q1, q1, q1, q2, q2, q2]), targets=torch.tensor([yes, yes, no, red, red, no]))
    # q3 was never asked in training: the most frequent answer overall (yes and red tie at 2 with no... no: 2)
    test = split(input_ids=torch.tensor([q1, q2, q1, q3]), targets=torch.tensor([yes, red, no, no]))
    score = trivial_score(tensors(TASKS["vqa"], train, test), end_id=102)
    # q1 -> yes (right, then wrong), q2 -> red (right), q3 -> the overall mode: no/yes/red all 2; ties break
    # on the smallest token ids, i.e. yes -> wrong
    assert score == pytest.approx(2 / 4)


def test_image_baseline_is_the_mean_training_image():
    train = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    train[:2] = 200  # mean image: 100 everywhere
    test = torch.full((3, 3, 8, 8), 100, dtype=torch.uint8)
    test[0, :, :4] = 50
    test[0, :, 4:] = 150
    score = trivial_score(tensors(TASKS["recon"], split(images=train), split(images=test)), end_id=102)
    # MSE of predicting 100 everywhere is exactly the test set's pixel variance around its mean (100): R^2 = 0
    assert score == pytest.approx(0.0, abs=1e-9)


def test_every_report_entry_carries_the_baseline_of_its_silo_and_task(make_runtimes):
    config = tiny_config("fedavg", rounds=1)
    rts = make_runtimes(config)
    report = run_federation(rts, config)
    for task in report["tasks"]:
        runtime = rts[task["silo"]]
        assert task["baseline"] == pytest.approx(trivial_score(runtime.tensors[task["task"]], runtime.end_id))
    assert all(info["mean_baseline"] is not None for info in report["per_task"].values())


# ------------------------------------------------------------- label spaces


def declaration(silo: str, task, labels: list[str]) -> SiloDeclaration:
    return SiloDeclaration(silo, (task,), {task.name: 10}, {task.name: labels}, "f")


def test_disjoint_undeclared_label_sets_are_refused_naming_both_silos_the_task_and_both_sets():
    decls = [
        declaration("north", TASKS["colour"], ["red", "green"]),
        declaration("south", TASKS["colour"], ["cat", "dog"]),
    ]
    with pytest.raises(ConfigError) as refused:
        united_tasks(decls)
    message = str(refused.value)
    for word in ("colour", "north", "south", "'red'", "'green'", "'cat'", "'dog'", "shared_labels: true"):
        assert word in message


@pytest.mark.parametrize("opt_in", [{"shared_labels": True}, {"labels": ("red", "green", "cat", "dog")}])
def test_a_declared_shared_label_space_unites_disjoint_sets(opt_in):
    task = dataclasses.replace(TASKS["colour"], **opt_in)
    decls = [declaration("north", task, ["red", "green"]), declaration("south", task, ["cat", "dog"])]
    assert set(united_tasks(decls)["colour"].labels) == {"red", "green", "cat", "dog"}


def test_overlapping_label_sets_are_united_without_an_opt_in():
    decls = [
        declaration("north", TASKS["colour"], ["red", "green"]),
        declaration("south", TASKS["colour"], ["green", "blue"]),
    ]
    check_label_spaces(decls)
    assert united_tasks(decls)["colour"].labels == ("blue", "green", "red")


def test_the_silo_whose_join_introduces_disjoint_labels_is_the_one_refused():
    fingerprint = build_backbone(tiny_config().model).fingerprint
    good = dataclasses.replace(declaration("north", TASKS["colour"], ["red", "green"]), fingerprint=fingerprint)
    bad = dataclasses.replace(declaration("south", TASKS["colour"], ["cat", "dog"]), fingerprint=fingerprint)
    federation = Federation(tiny_config("fedavg"), expected_silos=3)
    federation.register(good)
    with pytest.raises(TapError, match="silo south has labels"):
        federation.register(bad)
    federation.register(dataclasses.replace(good, silo="east"))  # the federation still admits good silos
    assert federation.report()["mean_primary"] is None


def test_evaluation_never_predicts_a_label_the_silo_does_not_have(make_runtimes):
    """Silo a never sees 'blue' (silo b does): a head biased towards blue cannot cost silo a anything."""
    silos = [SiloSpec("a", (TASKS["colour"],)), SiloSpec("b", (TASKS["colour"],))]
    data = {
        "a": {"colour": synthetic_task_data("classification", 1)},
        "b": {"colour": synthetic_task_data("classification", 2)},
    }
    for part in (data["a"]["colour"].train, data["a"]["colour"].val, data["a"]["colour"].test):
        part.labels = ["red" if label == "blue" else label for label in part.labels]
    config = tiny_config("fedavg", rounds=1)
    rts = make_runtimes(config, silos, data)
    federation = Federation(config, expected_silos=2)
    for rt in rts.values():
        federation.register(rt.declaration())
    silo = rts["a"]
    silo.set_plan(federation.silo_plan("a"))
    labels = silo.plan.task("colour").labels
    assert "blue" in labels and "blue" not in silo.own_labels["colour"]
    model = silo.new_model()
    with torch.no_grad():
        model.part("head.colour").out.bias[labels.index("blue")] += 1e4  # the head now always says blue
    accuracy = silo.evaluate(model)[0].primary
    expected = silo.trainer.evaluate(
        model, silo.tensors["colour"], silo.end_id, allowed=allowed_outputs(labels, ["red", "green"])
    )["accuracy"]
    assert accuracy == expected and accuracy > 0
    assert silo.trainer.evaluate(model, silo.tensors["colour"], silo.end_id)["accuracy"] == 0.0


# ----------------------------------------------------- fusion is federated


FUSION_KINDS = ("mote.", "mome.", "expert.")


def test_every_component_a_silo_trains_from_in_round_two_is_the_aggregate_of_round_one(monkeypatch, make_runtimes):
    """Catches the reference's bug: silos that silently skip loading fusion values still trained and uploaded."""
    config = tiny_config("tap", rounds=2)
    rts = make_runtimes(config)
    starts: dict[tuple[str, int], dict] = {}
    uploads: dict[tuple[str, int], object] = {}
    train = SiloRuntime.train

    def recording_train(self, model, phase, round_index, *args, **kwargs):
        if phase == "global":
            starts[(self.id, round_index)] = model.values()
        return train(self, model, phase, round_index, *args, **kwargs)

    submit = Federation.submit_update

    def recording_submit(self, update):
        uploads[(update.silo, update.round)] = update
        return submit(self, update)

    monkeypatch.setattr(SiloRuntime, "train", recording_train)
    monkeypatch.setattr(Federation, "submit_update", recording_submit)
    run_federation(rts, config)

    totals: dict[str, float] = {}
    sums: dict[str, dict[str, torch.Tensor]] = {}
    for (_silo, round_index), update in uploads.items():
        if round_index != 1:
            continue
        for component, tensors_ in update.values.items():
            weight = update.weights[component]
            totals[component] = totals.get(component, 0.0) + weight
            for name, value in tensors_.items():
                sums.setdefault(component, {}).setdefault(name, torch.zeros_like(value, dtype=torch.float64))
                sums[component][name] += value.double() * weight
    checked_fusion = 0
    for silo, runtime in rts.items():
        start = starts[(silo, 2)]
        assert set(start) == set(runtime.plan.components)
        for component, values in start.items():
            for name, value in values.items():
                expected = (sums[component][name] / totals[component]).float()
                assert torch.allclose(value, expected, rtol=0, atol=1e-6), f"silo {silo} {component}/{name}"
            if component.startswith(FUSION_KINDS):
                checked_fusion += 1
                moved = any(not torch.equal(v, starts[(silo, 1)][component][n]) for n, v in values.items())
                assert moved, f"{component} did not change over round 1"
    assert checked_fusion >= 10
