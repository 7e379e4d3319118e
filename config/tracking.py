"""The `track` keys: where `rayformers train` and `predict` record their runs for comparison (MLflow, TensorBoard)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from config.section import Section


class TrackConfig(Section):
    mlflow: bool | str = Field(
        False,
        description=(
            "MLflow tracking: true (an SQLite store under train.output/mlflow/), a local folder (an SQLite store "
            "there, shared by the runs that name it), or a tracking URI (http://host:5000, sqlite:///..., "
            "databricks); false: off."
        ),
    )
    tensorboard: bool = Field(
        False, description="TensorBoard event files under train.output/tensorboard/, with the same scalars as MLflow."
    )
    experiment: str | None = Field(None, description="MLflow experiment that runs go to (default: the task name).")
    run_name: str | None = Field(None, description="MLflow run name (default: the last part of train.output).")
    log_model: Literal["reference", "artifact"] = Field(
        "reference",
        description=(
            "reference: the run records the model folder's URI (large models stay where they are); artifact: "
            "model/ is also copied into the run's artifacts."
        ),
    )
    timeout_s: float = Field(
        5.0,
        gt=0,
        description=(
            "Seconds one call to the tracking server may take. A server that does not answer is warned about once "
            "and not tracked to for the rest of the run; the run itself goes on."
        ),
    )

    @field_validator("mlflow", mode="after")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, str) and not value.strip():
            raise ValueError("expected true, false, a folder or a tracking URI, got ''")
        return value

    def mlflow_is_folder(self) -> bool:
        """A local folder rather than a tracking URI."""
        value = self.mlflow
        return isinstance(value, str) and "://" not in value and not value.startswith("databricks")
