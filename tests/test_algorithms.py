"""TAP's two stages, the baselines, losses and metrics — on tiny synthetic silos. (Aggregation: test_aggregation.py.)"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import TASKS, synthetic_task_data, tiny_config
from tap_core.algorithms import REGISTRY, get_algorithm, travelling_components
from tap_core.algorithms.tap import Tap
from tap_core.config import ALGORITHMS, SiloSpec, TrainConfig, margin_for
from tap_core.messages import SiloDeclaration
from tap_core.model.tap_model import Batch
from tap_core.plan import united_tasks
from tap_core.silo import SiloRuntime
from tap_core.training.losses import kd_logits, kd_loss
from tap_core.training.metrics import ClassificationMetrics, ImageGenerationMetrics, TextGenerationMetrics
from tap_core.training.trainer import warmup_schedule
from tap_cli.simulate import run_federation
from tap_server.federation import Federation

DEVICE = torch.device("cpu")


def without_timing(report):
    return {k: v for k, v in report.items() if k != "timing"}


def test_algorithm_registry_matches_the_config_choices():
    assert set(REGISTRY) == set(ALGORITHMS)


def test_which_components_travel_is_known_without_building_an_algorithm(joined):
    federation, rts = joined(tiny_config("fedavg"))
    plan = rts["a"].plan
    for name in ALGORITHMS:
        travelling = travelling_components(name, plan)
        assert travelling == ([] if name == "local" else plan.components)
        assert travelling == get_algorithm(tiny_config(name)).shared_components(plan)  # what the silo sends


# ---------------------------------------------------------------- replacement


def test_first_participation_adopts_every_task_because_personal_loss_starts_at_infinity(joined):
    config = tiny_config("tap")
    federation, rts = joined(config)
    silo = rts["a"]
    assert math.isinf(silo.state.personal_loss("colour"))
    algorithm = Tap(config)
    update = algorithm.local_round(silo, 1, federation.payload("a", 1).values)
    assert sorted(e.task for e in update.stats.replacements) == ["colour", "vqa"]
    assert silo.state.rounds_done == []  # the agent records a round as done, not the algorithm
    assert all(math.isinf(e.personal_loss) for e in update.stats.replacements)
    assert silo.state.replacements == {"colour": 1, "vqa": 1}
    assert set(silo.state.personal_losses) == {"colour", "vqa"}


def test_replacement_copies_exactly_the_winning_task_components_and_only_past_the_margin(joined):
    config = tiny_config("tap")
    federation, rts = joined(config)
    silo = rts["a"]
    algorithm = Tap(config)
    algorithm.local_round(silo, 1, federation.payload("a", 1).values)  # personal model now trained
    global_copy = silo.global_model(federation.payload("a", 1).values)
    with torch.no_grad():  # make every global value differ from the personal one
        for p in global_copy.trainable_parameters():
            p.add_(1.0)
    margin = 0.01  # image_classification and text_generation default
    silo.state.personal_losses = {"colour": 1.0, "vqa": 1.0}
    before = silo.personal.values()

    # not past the margin: L_g + margin == L_p + 0.005 -> nothing happens
    events = algorithm.replace(silo, 2, global_copy, {"colour": 1.0 - margin + 0.005, "vqa": 5.0})
    assert events == []
    assert all(torch.equal(before[c][n], v) for c, t in silo.personal.values().items() for n, v in t.items())

    # colour beats its margin, vqa does not
    events = algorithm.replace(silo, 2, global_copy, {"colour": 1.0 - margin - 0.005, "vqa": 5.0})
    assert [e.task for e in events] == ["colour"]
    colour = set(silo.plan.task_components("colour"))
    assert set(events[0].components) == colour
    after, new_global = silo.personal.values(), global_copy.values()
    for component in silo.plan.components:
        for name in after[component]:
            if component in colour:
                assert torch.equal(after[component][name], new_global[component][name]), component
            else:
                assert torch.equal(after[component][name], before[component][name]), component
    assert silo.state.replacements["colour"] == 2  # round 1 + this one


def test_the_replacement_mode_changes_which_tasks_are_replaced(joined, make_runtimes):
    """``validation`` compares the global copy's validation loss, ``train_loss`` its training loss, with L_p.

    The global copy trains the same way in both modes (same seed, values and data), so a probe round tells both
    losses of each task; with L_p set between them, exactly the mode that sees the lower one adopts the task.
    """
    by_validation = tiny_config("tap")
    by_training = tiny_config("tap", replacement="train_loss")
    federation, probes = joined(by_validation)
    values = federation.payload("a", 1).values
    probe = Tap(by_validation).local_round(probes["a"], 1, values)
    train_loss = probe.stats.task_losses  # L_g by training loss
    val_loss = {e.task: e.global_loss for e in probe.stats.replacements}  # L_g by validation (all adopted: L_p = inf)
    assert set(val_loss) == set(train_loss) == {"colour", "vqa"}
    assert all(abs(val_loss[t] - train_loss[t]) > 1e-3 for t in train_loss), (val_loss, train_loss)
    margins = {t.name: margin_for(t, by_validation.train) for t in probes["a"].plan.tasks}
    personal = {t: (val_loss[t] + train_loss[t]) / 2 + margins[t] for t in train_loss}
    replaced = {}
    for config in (by_validation, by_training):
        silo = make_runtimes(config)["a"]
        silo.set_plan(federation.silo_plan("a"))
        silo.state.personal_losses = dict(personal)
        update = Tap(config).local_round(silo, 1, values)
        replaced[config.train.replacement] = {e.task for e in update.stats.replacements}
        assert update.stats.task_losses == train_loss  # the same training in both modes
    assert replaced["validation"] == {t for t in train_loss if val_loss[t] < train_loss[t]}
    assert replaced["train_loss"] == {t for t in train_loss if train_loss[t] < val_loss[t]}
    assert replaced["validation"] != replaced["train_loss"]


# ---------------------------------------------------------------- algorithms end to end


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_through_the_same_federation(algorithm, joined):
    config = tiny_config(algorithm)
    federation, rts = joined(config)
    report = run_federation(rts, config, federation=federation)
    assert report["algorithm"] == algorithm
    assert len(report["tasks"]) == 5
    for task in report["tasks"]:
        assert math.isfinite(task["primary"])
    if algorithm == "local":
        assert report["wire"]["bytes_down"] == 0 and report["wire"]["bytes_up"] == 0
    else:
        assert report["wire"]["bytes_up"] > 0
    if algorithm.startswith("tap"):
        assert sum(sum(v.values()) for v in report["replacements"].values()) >= 5
    else:
        assert report["replacements"] == {}


def test_the_same_seed_gives_the_same_report_and_another_seed_does_not(make_runtimes):
    config = tiny_config("tap")
    first = without_timing(run_federation(make_runtimes(config), config))
    second = without_timing(run_federation(make_runtimes(config), config))
    assert first == second
    other = dataclasses.replace(config, seed=1)
    assert without_timing(run_federation(make_runtimes(other), other))["tasks"] != first["tasks"]


def test_clients_per_round_selects_a_deterministic_subset(make_runtimes):
    config = dataclasses.replace(tiny_config("fedavg", rounds=3), clients_per_round=2)
    report = run_federation(make_runtimes(config), config)
    selections = [tuple(h["selected"]) for h in report["history"]]
    assert all(len(s) == 2 for s in selections)
    again = run_federation(make_runtimes(config), config)
    assert selections == [tuple(h["selected"]) for h in again["history"]]


def test_label_spaces_are_united_in_natural_order():
    decls = [
        SiloDeclaration("x", (TASKS["colour"],), {"colour": 5}, {"colour": ["red", "10", "2"]}, "f"),
        SiloDeclaration("y", (TASKS["colour"],), {"colour": 5}, {"colour": ["blue", "2"]}, "f"),
    ]
    assert united_tasks(decls)["colour"].labels == ("2", "10", "blue", "red")
    declared = dataclasses.replace(TASKS["colour"], labels=("red", "blue", "2", "10"))
    decls[0] = dataclasses.replace(decls[0], tasks=(declared,))
    assert united_tasks(decls)["colour"].labels == ("red", "blue", "2", "10")


def test_a_silo_missing_some_labels_uses_the_federation_indices():
    silos = [SiloSpec("a", (TASKS["colour"],)), SiloSpec("b", (TASKS["colour"],))]
    data = {
        "a": {"colour": synthetic_task_data("classification", 1)},
        "b": {"colour": synthetic_task_data("classification", 2)},
    }
    for split in (data["a"]["colour"].train, data["a"]["colour"].val, data["a"]["colour"].test):
        split.labels = ["red" if label == "blue" else label for label in split.labels]  # silo a never sees blue
    config = tiny_config("fedavg", rounds=1)
    rts = {s.id: SiloRuntime(s, data[s.id], config, DEVICE) for s in silos}
    federation = Federation(config, expected_silos=2)
    for rt in rts.values():
        federation.register(rt.declaration())
    rts["a"].set_plan(federation.silo_plan("a"))
    rts["b"].set_plan(federation.silo_plan("b"))
    assert rts["a"].plan.task("colour").labels == ("blue", "green", "red")
    red = rts["a"].plan.task("colour").labels.index("red")
    assert (rts["a"].tensors["colour"].train.labels == red).sum() > 0
    assert rts["a"].new_model().part("head.colour").out.out_features == 3


# ---------------------------------------------------------------- losses and metrics


def test_kd_scales_by_temperature_squared_and_masks_padding():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    t = 3.0
    manual = (
        torch.nn.functional.kl_div(
            torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1), log_target=True, reduction="none"
        )
        .sum(-1)
        .mean()
        * t
        * t
    )
    assert torch.allclose(kd_logits(teacher, student, t), manual, atol=1e-6)
    targets = torch.tensor([[5, 102, 0, 0], [6, 7, 102, 0]])
    batch = Batch(target_ids=targets)
    masked = kd_loss("text_generation", teacher, student, batch, t)
    noisy_student = student.clone()
    noisy_student[targets == 0] += 100.0 * torch.randn_like(noisy_student[targets == 0])
    assert torch.allclose(kd_loss("text_generation", teacher, noisy_student, batch, t), masked)
    assert kd_logits(teacher, teacher, t).abs() < 1e-6


def test_kd_for_images_is_the_mse_to_the_teacher():
    teacher, student = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert kd_loss("image_generation", teacher, student, Batch(), 2.0).item() == pytest.approx(0.25)


def test_metrics_on_hand_computed_cases():
    cls = ClassificationMetrics()
    cls.update(torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]]), Batch(labels=torch.tensor([0, 1, 1])))
    assert cls.result()["accuracy"] == pytest.approx(2 / 3)

    sep = 102
    text = TextGenerationMetrics(end_id=sep)
    targets = torch.tensor([[7, sep, 0], [8, 9, sep]])
    predicted = torch.tensor([[7, sep, 4], [8, 5, sep]])  # first exact (junk after [SEP] ignored), second not
    logits = torch.nn.functional.one_hot(predicted, 200).float()
    text.update(logits, Batch(target_ids=targets))
    result = text.result()
    assert result["exact_match"] == pytest.approx(0.5)
    assert result["token_accuracy"] == pytest.approx(4 / 5)

    image = ImageGenerationMetrics()
    target = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    image.update(torch.full_like(target, 0.5), Batch(images=target))
    r = image.result()
    assert r["mse"] == pytest.approx(0.25)
    assert r["psnr"] == pytest.approx(10 * math.log10(4))
    assert r["r2"] == pytest.approx(0.0, abs=1e-9)  # predicting the mean explains nothing


def test_warmup_goes_from_min_to_peak_over_the_first_rounds():
    cfg = TrainConfig(local_steps=4, warmup_rounds=2, min_lr=1e-4, peak_lr=1e-3)
    first = warmup_schedule(cfg, first_step=0)
    assert first(0) == pytest.approx(1e-4 + 9e-4 / 8)
    assert first(3) == pytest.approx(1e-4 + 9e-4 * 4 / 8)
    second = warmup_schedule(cfg, first_step=4)
    assert second(3) == pytest.approx(1e-3)
    assert warmup_schedule(cfg, first_step=40)(0) == pytest.approx(1e-3)


def test_get_algorithm_names_the_choices():
    from tap_core.errors import ConfigError

    with pytest.raises(ConfigError, match="use one of"):
        get_algorithm(dataclasses.replace(tiny_config(), algorithm="ditto"))
