"""Benchmark evaluation of diffusion LMs on lm-evaluation-harness tasks (docs/evaluation.md).

Importing the package registers the harness model `dlm` lazily (the class, `harness.py`, and its
torch imports load when the harness first asks for it), so `dlm --help` stays fast.
`TASKS_DIR` holds the local tasks shipped with the project (the demo grammar's agreement tasks).
"""

import lm_eval.models  # noqa: F401  (the harness's own model names stay registered next to ours)
from lm_eval.api.registry import model_registry

from pretrain.evaluation.taskdirs import TASKS_DIR, task_manager

if "dlm" not in model_registry:
    model_registry.register("dlm", target="pretrain.evaluation.harness:DLMEvalHarness")

__all__ = ["TASKS_DIR", "task_manager"]
