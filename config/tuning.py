"""The `tune` keys: the hyper-parameter search that `rayformers tune` runs with Ray Tune over training runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from config.section import Section

# distribution -> what its list holds
DISTRIBUTIONS = {
    "loguniform": "[low, high]",
    "uniform": "[low, high]",
    "randint": "[low, high) of integers",
    "choice": "[value, ...] drawn at random",
    "grid": "[value, ...] each tried (times num_samples)",
}


class SearchConfig(Section):
    space: dict[str, dict[str, list[Any]]] = Field(
        {},
        description=(
            "Dotted config keys mapped to a distribution: {loguniform: [1e-5, 1e-3]}, {uniform: [low, high]}, "
            "{randint: [low, high]}, {choice: [a, b]} or {grid: [a, b]} (every value tried), e.g. "
            "train.lr: {loguniform: [1e-5, 1e-3]}."
        ),
    )
    num_samples: int = Field(4, ge=1, description="Trials drawn from the space (with grid keys: per grid point).")
    max_concurrent_trials: int = Field(
        1, ge=1, description="Trials run at once; each takes train.num_workers workers and its preprocessing actors."
    )
    metric: str | None = Field(
        None, description="The eval metric trials are compared on (eval_accuracy, eval_loss, ...); default: the task's."
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="Whether a higher (max) or lower (min) metric wins; default: the task's."
    )
    scheduler: Literal["asha", "none"] = Field(
        "asha", description="asha: stop trials early that trail the others at the same step (Ray Tune's ASHA)."
    )
    grace_steps: int | None = Field(
        None, ge=1, description="ASHA: steps every trial trains before it may be stopped (default: train.eval_every)."
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA: at each rung only the best 1/reduction_factor of the trials go on."
    )
    output: str | None = Field(
        None,
        description=(
            "Where the search goes (default: train.output): trials/<trial>/ (each a train.output), best.yaml (the "
            "best trial's config), best/ (its model) and search/ (Ray Tune's state: the same command resumes)."
        ),
    )

    @field_validator("space", mode="after")
    @classmethod
    def _distributions(cls, space):
        for key, spec in space.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                kinds = ", ".join(DISTRIBUTIONS)
                raise ValueError(f"{key}: expected one distribution ({kinds}), got {sorted(spec)}")
            ((kind, values),) = spec.items()
            if kind in ("loguniform", "uniform", "randint") and len(values) != 2:
                raise ValueError(f"{key}: {kind} takes {DISTRIBUTIONS[kind]}, got {values}")
            if kind in ("choice", "grid") and not values:
                raise ValueError(f"{key}: {kind} takes {DISTRIBUTIONS[kind]}, got none")
            if key.startswith(("tune.", "train.output", "task")):
                raise ValueError(f"{key}: cannot be searched")
        return space
