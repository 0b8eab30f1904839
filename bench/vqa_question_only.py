"""How well easy-VQA can be answered from the question alone — the bar a VQA model must clear to show it uses the image.

    python bench/vqa_question_only.py --scenario tap-bench-mini

For each VQA (text_generation with image + text) task of each silo: the
majority answer per question text in the silo's training split (falling back
to the majority answer per question type, then overall), scored by exact match on
the silo's test split. Needs no model: it reads the same slices the federation uses.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from tap_core.data import load_task_data
from tap_core.scenario import load_scenario


def question_type(question: str) -> str:
    q = question.lower()
    if q.startswith(("is ", "does ", "are ")):
        return "yes/no"
    if "color" in q or "colour" in q:
        return "color"
    return "shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="tap-bench-mini")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    image_size = 64 if scenario.model.size != "tiny" else 32
    print(f"{'silo':<14} {'task':<10} {'train':>6} {'test':>5} {'question-only exact match':>26}")
    for silo in scenario.silos:
        for task in silo.tasks:
            if task.kind != "text_generation" or task.modalities != ("image", "text"):
                continue
            data = load_task_data(task, image_size, 0.1, f"{silo.id}/{task.name}")
            by_question, by_type = defaultdict(Counter), defaultdict(Counter)
            overall = Counter()
            for question, answer in zip(data.train.texts, data.train.targets):
                by_question[question][answer] += 1
                by_type[question_type(question)][answer] += 1
                overall[answer] += 1
            correct = 0
            for question, answer in zip(data.test.texts, data.test.targets):
                table = by_question.get(question) or by_type.get(question_type(question)) or overall
                correct += table.most_common(1)[0][0] == answer
            print(f"{silo.id:<14} {task.name:<10} {len(data.train):>6} {len(data.test):>5} "
                  f"{correct / max(len(data.test), 1):>26.4f}")


if __name__ == "__main__":
    main()
