"""The folder `rayformers predict` writes, and the rules that keep it from losing work:

    predict.output/part-000000.parquet   one part per unit (an input file, or a slice of a folder's rows)
    predict.output/_manifest/run.json    the fingerprint of model, input and settings, and the unit count
    predict.output/_manifest/commits-*.jsonl   committed units; a part is done once it is listed here
    predict.output/_SUCCESS              the summary, written last: trust an output only with it

A part is written whole or not at all (a temporary name and a rename on local disks; a single PUT on
object stores, which have no rename). The manifest is the commit point: a part it does not list is
ignored and written again by the next run, under the same name. Nothing predict did not write is
ever deleted, and an earlier complete output is replaced only with `predict.overwrite=true`, and
only once the new one is complete (it is built in `_next/` meanwhile).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from errors import UserError
from pipelines.storage import Location, Storage, storage_errors

MANIFEST, MARKER, NEXT, TMP = "_manifest", "_SUCCESS", "_next", "_tmp"
COMMIT_EVERY_S = 2.0  # committed units are written in batches: a crash costs at most this much redone work


def part_name(unit: int) -> str:
    return f"part-{unit:06d}.parquet"


# --- what may not be touched ---------------------------------------------------------------------


def _place(storage: Storage, uri: str) -> tuple[str, str]:
    """(filesystem kind, normalised path) of a URI; a glob stands for the folder it starts in."""
    loc = storage.resolve(uri)
    path = loc.path
    if any(ch in path for ch in "*?["):
        path = posixpath.dirname(path[: min(path.index(ch) for ch in "*?[" if ch in path)])
    if loc.is_local:
        return "file", os.path.realpath(path).rstrip("/") or "/"
    kind = loc.fs.protocol if isinstance(loc.fs.protocol, str) else loc.fs.protocol[0]
    return kind, path.strip("/")


def _relation(a: str, b: str) -> str | None:
    if a == b:
        return "is"
    if a.startswith(b.rstrip("/") + "/"):
        return "is inside"
    if b.startswith(a.rstrip("/") + "/"):
        return "is a parent of"
    return None


def check_no_overlap(storage: Storage, output: str, others: dict[str, str | None]) -> None:
    """predict.output equal to, inside or a parent of what the job reads (input, model, train.output)
    is refused before anything runs: writing there could destroy it."""
    kind, out = _place(storage, output)
    for key, uri in others.items():
        if not uri:
            continue
        other_kind, other = _place(storage, uri)
        relation = _relation(out, other) if kind == other_kind else None
        if relation:
            raise UserError(
                f"predict.output: {output} {relation} {key} ({uri}); predictions need a folder of their own"
            )


# --- fingerprints --------------------------------------------------------------------------------


def file_entries(loc: Location, paths: list[str] | None = None) -> dict[str, dict]:
    """Path -> listing details (size, ETag or modification time) of the files at `loc` (or of `paths`)."""
    with storage_errors(loc.uri):
        if any(ch in loc.path for ch in "*?["):
            entries = {}  # a glob: its files are `paths`, looked up one by one below
        elif loc.fs.isdir(loc.path):
            entries = loc.fs.find(loc.path, detail=True)
        else:
            entries = {loc.path: loc.fs.info(loc.path)}
    if paths is not None:
        wanted = set(paths)
        missing = wanted - set(entries)
        entries = {p: d for p, d in entries.items() if p in wanted}
        with storage_errors(loc.uri):  # files named by a glob, outside one folder listing
            entries.update({p: loc.fs.info(p) for p in missing})
    return entries


def folder_stamp(loc: Location, paths: list[str] | None = None, entries: dict | None = None) -> str:
    """A digest of the names, sizes and versions of the files at `loc`: changes when any file does."""
    entries = entries if entries is not None else file_entries(loc, paths)
    lines = [
        f"{p}:{d.get('size')}:{d.get('ETag') or d.get('LastModified') or d.get('mtime') or ''}"
        for p, d in sorted(entries.items())
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:20]


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --- the output folder ---------------------------------------------------------------------------


@dataclass
class Output:
    root: Location  # predict.output
    work: Location  # where this run writes: the root, or root/_next while a complete output is replaced
    run_id: str
    done: dict[int, dict] = field(default_factory=dict)  # unit -> commit record, from earlier runs
    replaces: dict | None = None  # run.json of the complete output this run replaces

    def write_file(self, name: str, data: bytes) -> None:
        write_whole(self.work, name, data)


def write_whole(folder: Location, name: str, data: bytes) -> None:
    """One file, whole or not at all: local disks get a temporary name and a rename; an object
    store's PUT is already all-or-nothing."""
    target = folder.join(name).path
    with storage_errors(folder.uri):
        if folder.is_local:
            tmp = folder.join(TMP, f"{name.replace('/', '_')}.{uuid.uuid4().hex[:8]}").path
            folder.fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.makedirs(posixpath.dirname(target), exist_ok=True)
            os.replace(tmp, target)
        else:
            folder.fs.pipe_file(target, data)


def write_part(folder: Location, unit: int, table: pa.Table) -> str:
    name = part_name(unit)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_whole(folder, name, sink.getvalue().to_pybytes())
    return name


def _names(loc: Location) -> set[str]:
    with storage_errors(loc.uri):
        if not loc.fs.exists(loc.path):
            return set()
        return {posixpath.basename(p.rstrip("/")) for p in loc.fs.ls(loc.path, detail=False)} - {""}


def _run_info(loc: Location) -> dict | None:
    run = loc.join(MANIFEST, "run.json")
    with storage_errors(run.uri):
        if not loc.fs.exists(run.path):
            return None
        return json.loads(loc.fs.cat_file(run.path))


def load_commits(loc: Location) -> dict[int, dict]:
    manifest = loc.join(MANIFEST)
    done: dict[int, dict] = {}
    with storage_errors(manifest.uri):
        if not loc.fs.exists(manifest.path):
            return done
        segments = sorted(
            p for p in loc.fs.ls(manifest.path, detail=False) if posixpath.basename(p).startswith("commits-")
        )
        for segment in segments:
            for line in loc.fs.cat_file(segment).decode().splitlines():
                if line.strip():
                    record = json.loads(line)
                    done[record["unit"]] = record
    return done


def _remove_ours(loc: Location, run: dict | None) -> None:
    """Deletes what an earlier predict run wrote in `loc`: its parts, manifest, marker, temporaries."""
    names = _names(loc)
    ours = [part_name(i) for i in range((run or {}).get("units", 0))] + [MARKER, MANIFEST, TMP, NEXT]
    with storage_errors(loc.uri):
        for name in ours:
            if name in names:
                loc.fs.rm(loc.join(name).path, recursive=True)


def _changed(old: dict, new: dict) -> str | None:
    for key, words in (("model", "the model"), ("input", "the input files"), ("settings", "the prediction settings")):
        if old.get(key) != new.get(key):
            return words
    return None


def open_output(storage: Storage, uri: str, fingerprint: dict, units: int, overwrite: bool) -> Output:
    """Where this run writes and what an earlier run already committed there; refuses (one line)
    to touch what predict did not write, a complete output without `predict.overwrite=true`, and a
    partial run of a different model, input or settings."""
    root = storage.check_writable(uri)
    names = {n for n in _names(root) if not n.startswith(".rayformers-write-check-")}
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if names and MANIFEST not in names:
        raise UserError(
            f"predict.output: {uri} holds files that rayformers predict did not write "
            f"({', '.join(sorted(names)[:3])}); choose an empty or new folder"
        )
    work, replaces = root, None
    if MARKER in names:
        if not overwrite:
            raise UserError(
                f"predict.output: {uri} already holds a complete prediction (its {MARKER} marker); "
                "set predict.overwrite=true to replace it, or choose another folder"
            )
        work, replaces = root.join(NEXT), _run_info(root) or {}
    run = _run_info(work)
    if run is not None and run.get("fingerprint") != fingerprint:
        what = _changed(run.get("fingerprint", {}), fingerprint)
        if not overwrite:
            raise UserError(
                f"predict.output: {uri} holds a partial run made with other {what.split(' ', 1)[1]} "
                f"({what} changed since it started); re-run with the same ones to resume it, "
                "or set predict.overwrite=true to start over"
            )
        _remove_ours(work, run)
        run = None
    if run is None:
        _remove_ours(work, None)  # temporaries of a run that died before it wrote run.json
        write_whole(
            work,
            f"{MANIFEST}/run.json",
            json.dumps({"fingerprint": fingerprint, "units": units, "started": run_id}).encode(),
        )
    out = Output(root, work, run_id, load_commits(work), replaces)
    out.done = {u: r for u, r in out.done.items() if u < units}
    return out


class Commits:
    """Committed units, written to the manifest in batches (one small file per batch)."""

    def __init__(self, out: Output):
        self.out = out
        self.pending: list[dict] = []
        self.batch = 0
        self.last = time.monotonic()

    def add(self, record: dict) -> None:
        self.pending.append({**record, "run": self.out.run_id})
        if time.monotonic() - self.last >= COMMIT_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.pending:
            return
        text = "".join(json.dumps(r) + "\n" for r in self.pending)
        self.out.write_file(f"{MANIFEST}/commits-{self.out.run_id}-{self.batch:06d}.jsonl", text.encode())
        self.batch += 1
        self.pending = []


def finish(out: Output, summary: dict) -> None:
    """Marks the output complete (the marker last). When a complete output is being replaced, its
    files go only now, and the new run's move up from `_next/`."""
    root, fs = out.root, out.root.fs
    if out.replaces is not None:
        with storage_errors(root.uri):
            fs.rm(root.join(MARKER).path)
            old = {n for n in _names(root) if n != NEXT}
            for name in [part_name(i) for i in range(out.replaces.get("units", 0))] + [MANIFEST, TMP]:
                if name in old:
                    fs.rm(root.join(name).path, recursive=True)
            base = out.work.path.rstrip("/")
            for path in fs.find(out.work.path):
                relative = path[len(base) + 1 :]
                if relative.startswith(TMP + "/"):
                    continue
                fs.makedirs(posixpath.dirname(root.join(relative).path), exist_ok=True)
                fs.mv(path, root.join(relative).path)
            if fs.exists(out.work.path):  # an object store has no folder left once its objects moved
                fs.rm(out.work.path, recursive=True)
    write_whole(root, MARKER, (json.dumps(summary, indent=1) + "\n").encode())
    if root.is_local:
        with storage_errors(root.uri):
            if fs.exists(root.join(TMP).path):
                fs.rm(root.join(TMP).path, recursive=True)


def first_rows(out: Output, parts: list[str], n: int = 5) -> list[dict]:
    """A few output rows to show, read from the first part without loading the rest."""
    for name in parts[:1]:
        with storage_errors(out.root.uri), out.root.fs.open(out.root.join(name).path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=n):
                return batch.to_pylist()
    return []
