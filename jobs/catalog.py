"""`rayformers tasks` and `rayformers demo-data`: what each task is, and a dataset to try it on."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from models import get_task, task_names
from pipelines.storage import Storage, storage_errors


def print_tasks() -> None:
    print(f"{'task':<32}{'architectures (model.init)':<30}input columns")
    for name in task_names():
        task = get_task(name)
        columns = ", ".join(
            c.name + ("" if c.required else "?") + (" (train)" if c.training_only else "") for c in task.columns
        )
        print(f"{name:<32}{', '.join(task.architectures):<30}{columns}")
    print("\ntask_options (under `task_options:` in the YAML) and the data formats each task adds:")
    for name in task_names():
        task = get_task(name)
        options = ", ".join(task.Options.model_fields) if task.Options is not None else "none"
        formats = f"; data.format also {', '.join(sorted(task.formats))}" if task.formats else ""
        print(f"  {name}: {options}{formats}")


def write_demo_data(task_name: str, uri: str, rows: int, seed: int) -> None:
    """URI/train and URI/eval in the columns that jobs/examples/<task>.yaml expects."""
    task = get_task(task_name)
    storage = Storage()
    for split, n, split_seed in (("train", rows, seed), ("eval", max(rows // 5, 1), seed + 1)):
        target = storage.check_writable(f"{uri.rstrip('/')}/{split}")
        table = pa.Table.from_pylist(task.demo_data(n, split_seed))
        with storage_errors(target.uri):
            with target.fs.open(f"{target.path}/part-00000.parquet", "wb") as f:
                pq.write_table(table, f)
        print(f"wrote {n} {task_name} rows to {target.uri}/part-00000.parquet")
