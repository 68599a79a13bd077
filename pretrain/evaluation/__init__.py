"""Evaluation: validation NELBO, the joint-consistency metric, and benchmark tasks through
lm-evaluation-harness (`dlm eval`, docs/evaluation.md).

Nothing is imported here: the trainer imports `validation` without paying for the harness.
`pretrain.evaluation.harness` registers our harness model under the name `dlm`.
"""
