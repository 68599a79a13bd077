"""dlm-pretrain: distributed pretraining of masked and hybrid diffusion language models.

Kept import-light on purpose: the CLI, the data pipeline and the tests import sub-packages
directly, so importing ``pretrain`` must not pull in DeepSpeed, Megatron-core or MLflow.
"""

__version__ = "0.1.0"
