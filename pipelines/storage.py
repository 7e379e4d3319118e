"""Every location is a URI (`s3://…`, `gs://…`, `file://…` or a plain path), resolved through fsspec.

The same filesystem object goes to Ray Data (wrapped for pyarrow) and to Ray Train's checkpoint
storage. S3-compatible endpoints come from `storage.endpoint_url` or `AWS_ENDPOINT_URL`;
credentials come from the standard AWS chain and are never printed. Storage failures a user
can cause become one-line `UserError`s naming the URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow.fs as pafs

from errors import UserError


@dataclass(frozen=True)
class Location:
    uri: str
    fs: fsspec.AbstractFileSystem
    path: str  # the path inside `fs` (no scheme)

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def arrow_fs(self) -> pafs.FileSystem:
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def join(self, *parts: str) -> "Location":
        uri = self.uri.rstrip("/")
        path = self.path.rstrip("/")
        for p in parts:
            uri, path = f"{uri}/{p}", f"{path}/{p}"
        return Location(uri, self.fs, path)


def _protocols(fs) -> tuple:
    p = fs.protocol
    return p if isinstance(p, tuple) else (p,)


class Storage:
    """Resolves URIs with the job's storage settings."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None, anonymous: bool = False):
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region
        self.anonymous = anonymous

    @classmethod
    def from_config(cls, cfg) -> "Storage":
        return cls(cfg.endpoint_url, cfg.region, cfg.anonymous)

    def resolve(self, uri: str) -> Location:
        if "://" not in uri:
            return Location(uri, fsspec.filesystem("file"), str(Path(uri).absolute()))
        scheme, _, rest = uri.partition("://")
        if scheme in ("s3", "s3a"):
            import s3fs

            client_kwargs = {"region_name": self.region} if self.region else {}
            # No listings cache: another process (a train worker, an earlier run) may have rewritten
            # the objects, and a stale ETag makes reads fail.
            fs = s3fs.S3FileSystem(
                anon=self.anonymous,
                endpoint_url=self.endpoint_url,
                client_kwargs=client_kwargs,
                use_listings_cache=False,
            )
            return Location(uri, fs, rest)
        if scheme == "file":
            return Location(
                uri, fsspec.filesystem("file"), rest if rest.startswith("/") else str(Path(rest).absolute())
            )
        try:
            fs = fsspec.filesystem(scheme)
        except (ImportError, ValueError) as exc:
            raise UserError(f"{uri}: unsupported storage scheme {scheme!r} ({exc})") from None
        return Location(uri, fs, rest)

    # --- inspection with one-line errors -----------------------------------------------------
    def list_files(self, uri: str, suffixes: tuple[str, ...]) -> list[Location]:
        """The data files behind a URI: the file itself, the files of a folder (recursively), or a glob."""
        loc = self.resolve(uri)
        with storage_errors(uri):
            if any(ch in loc.path for ch in "*?["):
                paths = sorted(loc.fs.glob(loc.path))
            elif loc.fs.isdir(loc.path):
                paths = sorted(p for p in loc.fs.find(loc.path) if p.lower().endswith(suffixes))
            elif loc.fs.exists(loc.path):
                paths = [loc.path]
            else:
                _check_bucket(loc)
                raise UserError(f"{uri}: no such file or folder")
        paths = [p for p in paths if not Path(p).name.startswith((".", "_"))]
        if not paths:
            raise UserError(f"{uri}: no data files ({', '.join(suffixes)}) found there")
        return [Location(_uri_for(loc, p), loc.fs, p) for p in paths]

    def check_writable(self, uri: str) -> Location:
        """Fails early (before Ray starts) when an output location cannot be written."""
        loc = self.resolve(uri)
        probe = loc.join(f".rayformers-write-check-{os.getpid()}")
        with storage_errors(uri):
            if not loc.is_local:
                _check_bucket(loc)
            loc.fs.makedirs(loc.path, exist_ok=True)
            with loc.fs.open(probe.path, "wb") as f:
                f.write(b"ok")
            loc.fs.rm(probe.path)
        return loc

    def exists(self, uri: str) -> bool:
        loc = self.resolve(uri)
        with storage_errors(uri):
            return loc.fs.exists(loc.path)

    # --- model directories -------------------------------------------------------------------
    def local_copy(self, uri: str) -> str:
        """A local directory holding what is at `uri` (downloaded once per content location)."""
        loc = self.resolve(uri)
        if loc.is_local:
            if not os.path.isdir(loc.path):
                raise UserError(f"{uri}: no such model directory")
            return loc.path
        cache = Path(tempfile.gettempdir()) / "rayformers-models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
        with storage_errors(uri):
            if not loc.fs.isdir(loc.path):
                _check_bucket(loc)
                raise UserError(f"{uri}: no such model directory")
            stamp = _content_stamp(loc)
            if (cache / ".complete").is_file() and (cache / ".complete").read_text() == stamp:
                return str(cache)
            partial = Path(tempfile.mkdtemp(prefix="download-", dir=cache.parent if cache.parent.exists() else None))
            loc.fs.get(loc.path.rstrip("/") + "/", str(partial) + "/", recursive=True)
        (partial / ".complete").write_text(stamp)
        cache.parent.mkdir(parents=True, exist_ok=True)
        if cache.exists():
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
        os.replace(partial, cache)
        return str(cache)

    def model_path(self, source: str) -> str:
        """What `from_pretrained` takes for a model source: a local directory for URIs and paths,
        the hub id unchanged otherwise. The `model/` folder of a training run is taken only once
        training has committed it (its marker is written last; a run killed while writing it has none)."""
        if "://" in source or os.path.isdir(source) or source.startswith((".", "/")):
            parent = source.rstrip("/").rsplit("/", 1)[0]
            if (
                source.rstrip("/").endswith("/model")
                and self.exists(f"{parent}/prepared/{COMPLETE}")
                and not self.exists(f"{source.rstrip('/')}/{COMPLETE}")
            ):
                raise UserError(
                    f"{source}: the training run in {parent} did not finish writing its model (no "
                    f"{COMPLETE}); run the same `rayformers train` again to finish it"
                )
            return self.local_copy(source)
        return source

    def read_text(self, uri: str) -> str:
        loc = self.resolve(uri)
        with storage_errors(uri):
            with loc.fs.open(loc.path, "r") as f:
                return f.read()

    def write_text(self, uri: str, text: str) -> None:
        loc = self.resolve(uri)
        with storage_errors(uri):
            loc.fs.makedirs(os.path.dirname(loc.path), exist_ok=True)
            with loc.fs.open(loc.path, "w") as f:
                f.write(text)

    def upload_dir(self, local_dir: str, uri: str) -> None:
        loc = self.resolve(uri)
        with storage_errors(uri):
            if loc.fs.exists(loc.path):
                loc.fs.rm(loc.path, recursive=True)
            loc.fs.makedirs(loc.path, exist_ok=True)
            for file in sorted(Path(local_dir).rglob("*")):
                if file.is_file():
                    target = loc.join(str(file.relative_to(local_dir))).path
                    loc.fs.makedirs(os.path.dirname(target), exist_ok=True)
                    loc.fs.put_file(str(file), target)


def _content_stamp(loc: Location) -> str:
    """Names, sizes and modification times of a remote folder: changes when its content does."""
    entries = loc.fs.find(loc.path, detail=True)
    parts = [f"{p}:{d.get('size')}:{d.get('LastModified') or d.get('mtime') or ''}" for p, d in sorted(entries.items())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _uri_for(loc: Location, path: str) -> str:
    if "://" not in loc.uri:
        return path
    scheme = loc.uri.split("://")[0]
    return f"{scheme}://{path}"


def _check_bucket(loc: Location) -> None:
    if "s3" in _protocols(loc.fs):
        bucket = loc.path.split("/")[0]
        try:
            loc.fs.info(bucket)  # HEAD on the bucket: 404 and 403 are told apart, unlike exists()
        except FileNotFoundError:
            raise UserError(f"{loc.uri}: bucket {bucket!r} does not exist") from None


@contextlib.contextmanager
def storage_errors(uri: str):
    """Turns what object stores raise for user mistakes into one line naming the URI."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as exc:
        text = str(exc)
        if "bucket" in text.lower():
            raise UserError(f"{uri}: bucket does not exist") from None
        raise UserError(f"{uri}: no such file or folder") from None
    except PermissionError:
        raise UserError(f"{uri}: access denied (the credentials were refused or lack permission)") from None
    except Exception as exc:  # botocore's errors are not importable without botocore; match by name
        name = type(exc).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            raise UserError(
                f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
            ) from None
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError"):
            raise UserError(f"{uri}: cannot reach the storage endpoint ({exc})") from None
        if name == "ClientError" and any(
            k in str(exc) for k in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")
        ):
            raise UserError(f"{uri}: access denied (the credentials were refused or lack permission)") from None
        raise


# --- folders that are complete or ignored ------------------------------------------------------
# Object stores have no rename, so a folder is committed by a marker written last that lists every
# file and its size; readers trust a folder only when its marker is there.
COMPLETE = "_COMPLETE.json"


def commit_dir(storage: Storage, source: str, uri: str) -> None:
    """Writes the folder `source` (a local directory or a URI) to `uri`, complete or ignored: the old
    marker goes first, then the old files, then the new files, and the marker last."""
    src, dst = storage.resolve(source), storage.resolve(uri)
    with storage_errors(uri):
        if dst.fs.exists(dst.join(COMPLETE).path):
            dst.fs.rm(dst.join(COMPLETE).path)
        if dst.fs.exists(dst.path):
            dst.fs.rm(dst.path, recursive=True)
        sizes = {}
        for path, info in sorted(src.fs.find(src.path, detail=True).items()):
            name = path[len(src.path.rstrip("/")) + 1 :]
            if name == COMPLETE:
                continue
            target = dst.join(name).path
            dst.fs.makedirs(os.path.dirname(target), exist_ok=True)
            if src.fs is dst.fs:
                src.fs.copy(path, target)
            elif src.is_local:
                dst.fs.put_file(path, target)
            else:
                with src.fs.open(path, "rb") as fin, dst.fs.open(target, "wb") as fout:
                    fout.write(fin.read())
            sizes[name] = info["size"]
        with dst.fs.open(dst.join(COMPLETE).path, "w") as f:
            f.write(json.dumps({"files": sizes}))


def is_committed(storage: Storage, uri: str) -> bool:
    """Whether `uri` is a folder that `commit_dir` finished writing."""
    return storage.exists(f"{uri.rstrip('/')}/{COMPLETE}")


def remove(storage: Storage, uri: str) -> None:
    """Removes a file or folder (its marker first, so that a half-removed folder reads as incomplete)."""
    loc = storage.resolve(uri)
    with storage_errors(uri):
        if loc.fs.exists(loc.join(COMPLETE).path):
            loc.fs.rm(loc.join(COMPLETE).path)
        if loc.fs.exists(loc.path):
            loc.fs.rm(loc.path, recursive=loc.fs.isdir(loc.path))
