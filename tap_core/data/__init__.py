"""The data layer: turn a task's ``data:`` block into train / val / test Examples.

Entry point: :func:`load_task_data`. Formats (docs/data.md): generic ``csv``,
``jsonl``, ``npz``, ``imagefolder``, ``hf_disk`` for operators' own data, and the
offline builtins ``easy_vqa``, ``fashion_mnist``, ``rotten_tomatoes``, ``trec``.
"""

from tap_core.data.loader import FORMATS, load_task_data, required_roles
from tap_core.data.types import Examples, TaskData

__all__ = ["FORMATS", "Examples", "TaskData", "load_task_data", "required_roles"]
