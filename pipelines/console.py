"""What a person sees on the console while `train` or `predict` runs, and the log file kept with the output.

On a terminal (stdout is a TTY) progress is one bar redrawn in place: the training step lines that rank 0
prints (Ray forwards them to the driver) and predict's progress become that bar, other lines scroll
above it. Elsewhere (CI, `ray job logs`, a pipe or a file) every progress line stays a plain line.

Everything the console gets also goes to a log file, together with the log records of Ray and
transformers in this process, which reach the console only with -v. The file is written on this
machine while the job runs and copied under the output when it ends (`train.output/logs/`,
`predict.output/_logs/`); the log of the workers themselves stays in Ray's session folder, which the
log file names.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

from pipelines.storage import Storage

STEP_LINE = re.compile(r"step (\d+)/(\d+) epoch (\d+) loss (\S+) samples/s (\S+) lr (\S+) elapsed (\S+) ETA (\S+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR_WIDTH = 28
LOGGERS = ("ray", "ray.data", "transformers", "")  # "" is the root: Ray Train's and our own records

_active: "JobConsole | None" = None


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = min(width, int(width * done / max(total, 1)))
    return "█" * filled + "░" * (width - filled)


def step_bar(line: str) -> str | None:
    """A training step line as a bar, or None when `line` is not one."""
    m = STEP_LINE.search(ANSI.sub("", line))
    if not m:
        return None
    step, total, epoch, loss, speed, lr, elapsed, eta = m.groups()
    return (
        f"train {bar(int(step), int(total))} {step}/{total} epoch {epoch} loss {loss} lr {lr} "
        f"{speed} samples/s {elapsed}<{eta}"
    )


class JobConsole:
    """Stands in for sys.stdout and sys.stderr while a job runs (see the module's docstring)."""

    def __init__(self, stdout, stderr, log, tty: bool):
        self.stdout, self.stderr, self.log, self.tty = stdout, stderr, log, tty
        self.lock = threading.RLock()
        self.partial = ""  # stdout text after its last newline (a TTY only)
        self.shown = ""  # the bar now on screen
        self.handler: logging.Handler | None = None  # the log file's, for log records
        self.undo: list = []  # what to put back on the loggers when the job ends

    def write(self, text: str, err: bool = False) -> None:
        with self.lock:
            if self.log:
                self.log.write(ANSI.sub("", text))
            if not self.tty:
                (self.stderr if err else self.stdout).write(text)
                return
            if err:
                self._clear()
                self.stderr.write(text)
                self.stderr.flush()
                self._redraw()
                return
            lines = (self.partial + text).split("\n")
            self.partial = lines.pop()
            for line in lines:
                shown = step_bar(line)
                if shown is not None:
                    m = STEP_LINE.search(ANSI.sub("", line))
                    self.show(shown, last=m.group(1) == m.group(2))
                else:
                    self._clear()
                    self.stdout.write(line + "\n")
                    self._redraw()

    def show(self, text: str, last: bool = False) -> None:
        """Draws `text` as the bar (a TTY) or prints it as a line. The `last` bar stays on screen, and
        what comes next is written below it."""
        with self.lock:
            if not self.tty:
                self.write(text + "\n")
                return
            if self.log and not text.startswith("train "):
                self.log.write(text + "\n")
            self.shown = text[: shutil.get_terminal_size((120, 24)).columns - 1]
            self._redraw()
            if last:
                self.stdout.write("\n")
                self.shown = ""

    def _clear(self) -> None:
        if self.shown:
            self.stdout.write("\r\x1b[2K")

    def _redraw(self) -> None:
        if self.shown:
            self.stdout.write("\r\x1b[2K" + self.shown)
            self.stdout.flush()

    def flush(self) -> None:
        with self.lock:
            self.stdout.flush()
            self.stderr.flush()
            if self.log:
                self.log.flush()

    def close(self) -> None:
        with self.lock:
            if self.partial:
                self.write("\n")
            if self.shown:
                self.stdout.write("\n")  # the last bar stays on screen
                self.shown = ""
            self.flush()


class _Stream:
    """sys.stdout / sys.stderr while a job runs: writes go through the JobConsole, the rest to the real stream."""

    def __init__(self, console: JobConsole, real, err: bool):
        self._console, self._real, self._err = console, real, err

    def write(self, text: str) -> int:
        self._console.write(text, self._err)
        return len(text)

    def flush(self) -> None:
        self._console.flush()

    def isatty(self) -> bool:
        return self._real.isatty()

    def __getattr__(self, name):
        return getattr(self._real, name)


def progress(done: int, total: int, text: str) -> None:
    """predict's progress: a bar on a terminal, else `text` as a line."""
    if _active is not None and _active.tty:
        _active.show(f"predict {bar(done, total)} {text.removeprefix('predict: ')}", last=done >= total)
    else:
        print(text, flush=True)


def on_terminal() -> bool:
    return _active is not None and _active.tty


def log_uri(output: str | None, verb: str) -> str | None:
    if not output:
        return None
    folder = "_logs" if verb == "predict" else "logs"  # predict.output: readers skip names starting with _
    return f"{output.rstrip('/')}/{folder}/{verb}-{time.strftime('%Y%m%dT%H%M%S')}.log"


def attach_log_handlers() -> None:
    """Ray's, transformers' and the root logger's records go to the job's log file too; without -v their
    consoles keep the levels they had (what was quiet stays quiet there). Called again once Ray is up:
    `ray.init` and `quiet_logs` set those loggers anew."""
    if _active is None or _active.handler is None:
        return
    from pipelines.cluster import verbose

    handler, seen = _active.handler, {id(logger) for logger, _, _ in _active.undo}
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if id(logger) not in seen:
            _active.undo.append((logger, logger.level, [handler]))
        if not verbose():
            console_level = logger.getEffectiveLevel()
            if name == "" and not [h for h in logger.handlers if h is not handler]:
                stderr = logging.StreamHandler(_active.stderr)  # Python's last-resort handler would fall silent
                logger.addHandler(stderr)
                _active.undo[-1][2].append(stderr)
            for h in logger.handlers:  # the console's; Ray's own session log files keep theirs
                if h is not handler and type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler):
                    h.setLevel(max(h.level, console_level))
        if handler not in logger.handlers:
            logger.addHandler(handler)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))


@contextmanager
def job_console(cfg, verb: str, output: str | None):
    """For the length of a `train` or `predict` run: the console (bar or lines), the log file, the header."""
    global _active
    if _active is not None:  # nested (a test calling train twice in one process): the outer one does it
        yield
        return
    final = log_uri(output, verb)
    fd, local = tempfile.mkstemp(prefix=f"rayformers-{verb}-", suffix=".log")
    log = os.fdopen(fd, "w", buffering=1)
    real_out, real_err = sys.stdout, sys.stderr
    console = JobConsole(real_out, real_err, log, tty=real_out.isatty())
    console.handler = logging.StreamHandler(log)
    console.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _active = console
    sys.stdout, sys.stderr = _Stream(console, real_out, False), _Stream(console, real_err, True)
    attach_log_handlers()
    print_header(cfg, verb, output, final, local)
    failed = True
    try:
        yield
        failed = False
    finally:
        for logger, level, added in reversed(console.undo):
            logger.setLevel(level)
            for h in added:
                logger.removeHandler(h)
        console.close()
        sys.stdout, sys.stderr = real_out, real_err
        _active = None
        log.close()
        keep_log(cfg, verb, output, final, local, failed)


def print_header(cfg, verb: str, output: str | None, final: str | None, local: str) -> None:
    model = cfg.model.source or (f"{cfg.model.init.architecture} {cfg.model.init.size}" if cfg.model.init else "")
    if verb == "predict":
        model = cfg.predict.model or model
        data = f"input {cfg.predict.input}"
        workers = f"actors {cfg.predict.actors or 'auto'}"
    else:
        data = f"train {cfg.data.train}" + (f", eval {cfg.data.eval}" if cfg.data.eval else "")
        workers = f"workers {cfg.train.num_workers}"
    ray_at = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
    print(f"rayformers {verb}: {cfg.task} | model {model} | {data} | output {output} | {workers} | Ray: {ray_at}")
    if final:
        print(f"log: {final} (Ray's and transformers' own lines; -v shows them here too; until the end: {local})")
    sys.stdout.flush()


def keep_log(cfg, verb: str, output: str | None, final: str | None, local: str, failed: bool) -> None:
    """Copies the log under the output when the job got as far as writing there (predict: only to a
    folder that predict wrote, never one it refused); else the job failed at its start, said why in one
    line, and the log goes."""
    try:
        storage = Storage.from_config(cfg.storage)
        marker = f"{output}/_manifest" if verb == "predict" else output
        if not final or not storage.exists(marker):
            os.remove(local)
            return
        loc = storage.resolve(final)
        loc.fs.makedirs(os.path.dirname(loc.path), exist_ok=True)
        loc.fs.put_file(local, loc.path)
        os.remove(local)
    except Exception as exc:  # the job's own outcome matters more than its log
        if not failed:
            print(f"log: kept at {local} (could not copy it to {final}: {exc})", file=sys.stderr)
