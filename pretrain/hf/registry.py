"""Registering an exported model in MLflow: the directory becomes an artifact of the training run
(`hf_model/`) and a new version of a registered model whose source is that artifact."""

from __future__ import annotations

from pathlib import Path

ARTIFACT_PATH = "hf_model"


def register_export(client, run_id: str, out: Path, name: str):
    """Log `out` under the run's `hf_model/` artifacts and register it; returns the version."""
    from mlflow.exceptions import MlflowException

    client.log_artifacts(run_id, str(out), artifact_path=ARTIFACT_PATH)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="Masked diffusion LM exported by dlm-pretrain (Hugging Face format)"
        )
    source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}"
    return client.create_model_version(name, source=source, run_id=run_id)
