"""Typed run configuration: dataclasses (`schema`, with the model and evaluation sections in
`model` and `evaluation`) and the strict YAML loader (`loader`)."""

from pretrain.config.loader import field_docs, flatten, load_config, to_dict, to_yaml
from pretrain.config.schema import (
    Config,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "DiffusionConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "field_docs",
    "flatten",
    "load_config",
    "to_dict",
    "to_yaml",
]
