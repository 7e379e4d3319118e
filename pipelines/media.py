"""Media columns (images, clips, masks, depth maps): whatever a row or a request holds -> the file's bytes.

In data a media cell holds the bytes themselves, or a path: a URI (`s3://…`, `file://…`), an absolute
path, or a path relative to the folder of the data file the row came from (as `metadata.jsonl`, COCO
and imagefolder layouts write them). In an HTTP request it holds base64 or a `data:` URL (a URI only
when `serve.allow_uris` is on). A cell that cannot be fetched becomes None with a one-line reason, so
the row turns into an error row instead of failing the job.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
import time

from errors import UserError
from pipelines.storage import Storage, storage_errors

MAX_MEDIA_BYTES = 512 * 1024 * 1024  # one file; anything larger is surely not one image or clip
FETCH_TRIES, FETCH_BACKOFF_S = 3, 0.5  # transient storage errors are retried before the row becomes an error row
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def fetch_file(storage: Storage, fs, uri_or_path: str, is_uri: bool) -> bytes:
    """The bytes of one file; `fs` reads paths inside the data's own filesystem."""
    if is_uri:
        loc = storage.resolve(uri_or_path)
        fs, path = loc.fs, loc.path
    else:
        path = uri_or_path
    for attempt in range(FETCH_TRIES):
        try:
            with storage_errors(uri_or_path):
                # one ranged read (no separate size request): a byte past the limit means the file is too big
                data = fs.cat_file(path, start=0, end=MAX_MEDIA_BYTES + 1)
            break
        except (IsADirectoryError, NotADirectoryError):
            raise UserError(f"{uri_or_path}: a folder, not a file") from None
        except UserError:
            if _is_folder(fs, path):  # object stores call a folder a missing file
                raise UserError(f"{uri_or_path}: a folder, not a file") from None
            raise
        except (
            Exception
        ) as exc:  # a dropped connection, a throttled or failing store: try again, then give up on the row
            if attempt == FETCH_TRIES - 1:
                why = f"{type(exc).__name__}: {exc}"
                raise UserError(f"{uri_or_path}: could not be read after {FETCH_TRIES} tries ({why})") from None
            time.sleep(FETCH_BACKOFF_S * 2**attempt)
    if len(data) > MAX_MEDIA_BYTES:
        raise UserError(f"{uri_or_path}: more than the {MAX_MEDIA_BYTES} bytes a media file may have")
    return data


def _is_folder(fs, path: str) -> bool:
    try:
        return bool(fs.isdir(path))
    except Exception:  # the question is only asked to word an error better
        return False


def resolve_paths(values: list, sources: list[str | None], storage: Storage, fs, column: str) -> tuple[list, list]:
    """Batch data: bytes stay, paths are read. Returns (bytes or None per row, reason or None per row)."""
    out, errors = [], []
    for value, source in zip(values, sources):
        if value is None or isinstance(value, (bytes, bytearray)):
            out.append(bytes(value) if value is not None else None)
            errors.append(None if value is not None else f"{column} is null")
            continue
        if isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets' Image/Audio features
            value = value["bytes"] if value["bytes"] is not None else value.get("path")
            if isinstance(value, (bytes, bytearray)):
                out.append(bytes(value))
                errors.append(None)
                continue
        if not isinstance(value, str) or not value.strip():
            out.append(None)
            errors.append(
                f"{column}: expected file bytes or a path, got {type(value).__name__ if value is not None else 'null'}"
            )
            continue
        try:
            if _URI.match(value):
                out.append(fetch_file(storage, fs, value, is_uri=True))
            elif value.startswith("/") or not source:
                out.append(fetch_file(storage, fs, value, is_uri=False))
            else:
                folder = posixpath.dirname(source)
                out.append(fetch_file(storage, fs, posixpath.normpath(posixpath.join(folder, value)), is_uri=False))
            errors.append(None)
        except UserError as exc:
            out.append(None)
            errors.append(f"{column}: {exc}")
    return out, errors


def decode_request_value(value, storage: Storage | None, column: str) -> bytes:
    """An HTTP request's media value -> bytes: base64, a data: URL, or (with serve.allow_uris) a URI."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise UserError(
            f"{column}: expected base64 file content, got {type(value).__name__ if value is not None else 'null'}"
        )
    if _URI.match(value) and not value.startswith("data:"):
        if storage is None:
            raise UserError(f"{column}: URIs are not accepted here (serve.allow_uris is off); send the file as base64")
        return fetch_file(storage, None, value, is_uri=True)
    text = _DATA_URL.sub("", value, count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(
            f"{column}: not valid base64 (send the file's bytes base64-encoded, or as a multipart upload)"
        ) from None
