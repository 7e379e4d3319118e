"""What a person sees on the console while `train`, `predict` or `tune` runs, and the log file kept with the output.

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

# A log record of Ray's C++ core ("[2026-12-01 16:24:54,997 E 15738 15738] core_worker.cc:2465: ..."), and the
# prefix Ray puts on a line it forwards from a worker ("(RayTrainWorker pid=16600) ", "(raylet) "), coloured or not
NATIVE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")
FORWARDED = re.compile(
    r"^(?:\x1b\[[0-9;]*m)?"
    r"\((?:(?P<actor>[^()\s]+) pid=\d+(?:, ip=[^)]*)?|(?P<ray>raylet|gcs_server)[^)]*)\)"
    r"(?:\x1b\[0m)? "
)
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


def shown_line(line: str, verbose: bool, workers: bool = True) -> str | None:
    """What the console shows of one line: without -v, the log records of Ray's own processes (its C++ core's,
    the raylet's) go to the log file only (None), and a line our train loop printed loses Ray's prefix; lines
    of any other actor keep theirs, so that what Ray's internals print is told apart from ours. Without
    `workers` (tune: several runs at once, which the driver reports trial by trial) no forwarded line is shown."""
    if verbose:
        return line
    m = FORWARDED.match(line)
    body = line[m.end() :] if m else line
    if NATIVE_LOG.match(ANSI.sub("", body)) or (m and (m.group("ray") or not workers)):
        return None
    return body if m and m.group("actor") == "RayTrainWorker" else line


class JobConsole:
    """Stands in for sys.stdout and sys.stderr while a job runs (see the module's docstring)."""

    def __init__(self, stdout, stderr, log, tty: bool, verbose: bool = False, workers: bool = True):
        self.stdout, self.stderr, self.log, self.tty, self.verbose = stdout, stderr, log, tty, verbose
        self.workers = workers  # whether lines forwarded from Ray's workers are shown (see shown_line)
        self.lock = threading.RLock()
        self.partial = {False: "", True: ""}  # stdout's and stderr's text after their last newline
        self.shown = ""  # the bar now on screen
        self.handler: logging.Handler | None = None  # the log file's, for log records
        self.undo: list = []  # what to put back on the loggers when the job ends

    def write(self, text: str, err: bool = False) -> None:
        with self.lock:
            if self.log:
                self.log.write(ANSI.sub("", text))
            lines = (self.partial[err] + text).split("\n")
            self.partial[err] = lines.pop()
            for line in lines:
                shown = shown_line(line, self.verbose, self.workers)
                if shown is not None:
                    self._line(shown, err)

    def _line(self, line: str, err: bool) -> None:
        if not self.tty:
            (self.stderr if err else self.stdout).write(line + "\n")
            return
        bar_text = None if err else step_bar(line)
        if bar_text is not None:
            m = STEP_LINE.search(ANSI.sub("", line))
            self.show(bar_text, last=m.group(1) == m.group(2))
            return
        self._clear()
        (self.stderr if err else self.stdout).write(line + "\n")
        (self.stderr if err else self.stdout).flush()
        self._redraw()

    def native(self, line: str) -> bool:
        """A line written straight to file descriptor 2 (see NativeStderr): a log record of Ray's C++ core goes
        to the log file (and the console with -v); whether to pass it on to the real stderr."""
        if not NATIVE_LOG.match(line):
            return True
        with self.lock:
            if self.log:
                self.log.write(line)
        return self.verbose

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
            for err in (False, True):
                if self.partial[err]:
                    self.write("\n", err)
            if self.shown:
                self.stdout.write("\n")  # the last bar stays on screen
                self.shown = ""
            self.flush()


class NativeStderr:
    """Ray's C++ core writes its log records to file descriptor 2 itself, past sys.stderr: among them an ERROR
    record for every actor whose constructor arguments sit in Ray's object store (Ray Data's map actors, Ray
    Train's watcher: ray-project/ray#53727), which a user can do nothing about. While a job runs, fd 2 is a
    pipe read here: those records go to the log file (and the console with -v, as with Ray's other lines) and
    everything else written to fd 2 goes on to the real stderr unchanged."""

    def __init__(self, console: JobConsole):
        self.console = console
        sys.__stderr__.flush()
        self.real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self.pump, args=(read,), name="native-stderr", daemon=True)
        self.thread.start()

    def pump(self, read: int) -> None:
        with os.fdopen(read, "rb") as pipe:
            for raw in pipe:
                if self.console.native(raw.decode(errors="replace")):
                    os.write(self.real, raw)

    def close(self) -> None:
        sys.__stderr__.flush()
        os.dup2(self.real, 2)  # the pipe's last writer here is gone: the pump reads to its end and stops
        self.thread.join(5)
        if not self.thread.is_alive():  # else a child process still holds the pipe and the pump needs the fd
            os.close(self.real)


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
    """For the length of a `train`, `predict` or `tune` run: the console (bar or lines), the log file, the header."""
    global _active
    if _active is not None:  # nested (a test calling train twice in one process): the outer one does it
        yield
        return
    final = log_uri(output, verb)
    fd, local = tempfile.mkstemp(prefix=f"rayformers-{verb}-", suffix=".log")
    log = os.fdopen(fd, "w", buffering=1)
    from pipelines.cluster import verbose

    real_out, real_err = sys.stdout, sys.stderr
    console = JobConsole(real_out, real_err, log, tty=real_out.isatty(), verbose=verbose(), workers=verb != "tune")
    try:
        native = NativeStderr(console)
    except OSError:  # no file descriptor 2 to stand in for
        native = None
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
        flush_held_worker_lines()
        for logger, level, added in reversed(console.undo):
            logger.setLevel(level)
            for h in added:
                logger.removeHandler(h)
        console.close()
        if native is not None:
            native.close()
        sys.stdout, sys.stderr = real_out, real_err
        _active = None
        log.close()
        keep_log(cfg, verb, output, final, local, failed)


def flush_held_worker_lines() -> None:
    """Ray's driver holds back a worker line that looks like another's (to print "[repeated 2x ...]") and prints
    what it holds when Ray disconnects, after the job: seen as a raw "(RayTrainWorker pid=...) worker rank 1
    on node ..." under the summary. Printed now, through this console (Ray's own private API, hence the
    guard: a Ray without it only loses this)."""
    try:
        from ray._private import worker as ray_worker

        if not ray_worker.global_worker.connected:
            return
        plain = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        for held, sink in ((ray_worker.stdout_deduplicator, sys.stdout), (ray_worker.stderr_deduplicator, sys.stderr)):
            for batch in held.flush():
                ray_worker.print_worker_logs(batch, sink, plain)
    except (AttributeError, ImportError, RuntimeError):  # RuntimeError: Ray's log thread changed the buffer
        pass


def print_header(cfg, verb: str, output: str | None, final: str | None, local: str) -> None:
    model = cfg.model.source or (f"{cfg.model.init.architecture} {cfg.model.init.size}" if cfg.model.init else "")
    if verb == "predict":
        model = cfg.predict.model or model
        data = f"input {cfg.predict.input}"
        workers = f"actors {cfg.predict.actors or 'auto'}"
    else:
        data = f"train {cfg.data.train}" + (f", eval {cfg.data.eval}" if cfg.data.eval else "")
        workers = f"workers {cfg.train.num_workers}"
        if verb == "tune":
            workers += f" per trial, {cfg.tune.max_concurrent_trials} trials at once at most"
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
