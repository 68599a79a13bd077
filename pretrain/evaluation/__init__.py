"""Evaluation: validation NELBO and the joint-consistency metric during training."""
