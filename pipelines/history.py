"""The step-by-step record of a training run, `train.output/history.json`, that the run report draws:
loss, learning rate and samples/s at every logged step, and the metrics of every eval.

Rank 0 keeps it and rewrites it whole just before each checkpoint, so it always reaches at least the
latest checkpoint. A resumed run reads it back and drops what came after the checkpoint it resumes
from: those steps are trained again and logged anew. The file is replaced in one piece (a rename on a
local disk, a single PUT on an object store), so a crash never leaves half of it.
"""

from __future__ import annotations

import json
import os
import uuid

from pipelines.storage import Storage, storage_errors

HISTORY = "history.json"


class History:
    def __init__(self, storage: Storage, output: str, resumed_step: int | None):
        self.storage, self.uri = storage, f"{output.rstrip('/')}/{HISTORY}"
        self.records: list[dict] = []
        if resumed_step is not None:
            self.records = [r for r in read_history(storage, output) if r["step"] <= resumed_step]
            self.records.append({"kind": "resume", "step": resumed_step})

    def add(self, kind: str, step: int, **values) -> None:
        """kind: "train" (a logged step: loss, lr, samples_per_s, ...) or "eval" (eval_* metrics)."""
        self.records.append({"kind": kind, "step": step, **values})

    def write(self) -> None:
        text = json.dumps({"records": self.records})
        loc = self.storage.resolve(self.uri)
        if not loc.is_local:
            self.storage.write_text(self.uri, text)  # one PUT: all or nothing
            return
        with storage_errors(self.uri):
            os.makedirs(os.path.dirname(loc.path), exist_ok=True)
            tmp = f"{loc.path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, loc.path)


def read_history(storage: Storage, output: str) -> list[dict]:
    """The records of the run in `output`, oldest first; none when it has no history yet."""
    uri = f"{output.rstrip('/')}/{HISTORY}"
    if not storage.exists(uri):
        return []
    return json.loads(storage.read_text(uri))["records"]
