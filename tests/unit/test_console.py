"""What a person sees while a job runs: on a terminal one progress bar redrawn in place, elsewhere (CI,
`ray job logs`) the plain step lines; every line also lands in the job's log file."""

from __future__ import annotations

import io
import os
import pty

from pipelines.console import JobConsole, NativeStderr

# what Ray prints on the driver for a line that rank 0 prints (its prefix, coloured on a terminal)
STEPS = [
    f"\x1b[36m(RayTrainWorker pid=4242)\x1b[0m step {s}/40 epoch 0 loss 1.{s:04d} samples/s 55.0 lr 1.00e-03 "
    f"elapsed 0:{s:02d} ETA 0:{40 - s:02d}\n"
    for s in (10, 20, 30, 40)
]
EVAL = "\x1b[36m(RayTrainWorker pid=4242)\x1b[0m eval step 20: eval_loss=0.5000, eval_accuracy=0.9000\n"


def feed(console: JobConsole) -> None:
    for i, line in enumerate(STEPS):
        # print() writes the text and its newline apart
        console.write(line[:-1])
        console.write("\n")
        if i == 1:
            console.write(EVAL)
    console.close()


def test_off_a_terminal_every_step_stays_a_plain_line_and_the_log_file_gets_them_without_colours():
    out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
    feed(JobConsole(out, err, log, tty=False))
    # our own lines, without the prefix Ray puts on a line it forwards from a worker
    prefix = "\x1b[36m(RayTrainWorker pid=4242)\x1b[0m "
    assert out.getvalue() == "".join(s.removeprefix(prefix) for s in STEPS[:2] + [EVAL] + STEPS[2:])
    assert "\r" not in out.getvalue() and "█" not in out.getvalue()
    assert "\x1b" not in log.getvalue() and log.getvalue().count("(RayTrainWorker pid=4242) step ") == 4


def test_on_a_terminal_the_steps_are_one_bar_redrawn_in_place_with_the_eval_line_above_it():
    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w", encoding="utf-8", buffering=1)
    assert terminal.isatty()
    log = io.StringIO()
    feed(JobConsole(terminal, terminal, log, tty=terminal.isatty()))
    terminal.close()
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower side is closed: all was read
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    text = screen.decode("utf-8")
    # the bar: redrawn after a carriage return, the last one full and kept on screen with a newline
    assert text.count("\r\x1b[2Ktrain ") >= 4, text
    assert "train " + "█" * 28 + " 40/40 epoch 0 loss 1.0040" in text and "0:40<0:00" in text, text
    assert "train " + "█" * 7 + "░" * 21 + " 10/40" in text, text
    # no step becomes a line of its own; the eval line scrolls above the bar
    assert "step 10/40" not in text and "eval step 20: eval_loss=0.5000" in text, text
    lines = text.replace("\r\n", "\n").split("\n")
    assert sum("eval step 20" in line for line in lines) == 1
    assert log.getvalue().count("/40 epoch 0") == 4  # the log file keeps every step line as it came


# what Ray forwards or writes itself on a driver, none of which a user can act on
RAY_INTERNALS = [
    "\x1b[36m(TrainController pid=16532)\x1b[0m [2026-12-01 16:25:19,924 E 16532 16563] core_worker.cc:2465: Actor "
    "with class name: 'PreemptionWatcher' has constructor arguments in the object store and max_restarts > 0.\n",
    "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite retries remaining.\n",
]


def test_ray_internals_go_to_the_log_file_only_unless_verbose():
    for verbose in (False, True):
        out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
        console = JobConsole(out, err, log, tty=False, verbose=verbose)
        for line in RAY_INTERNALS:
            console.write(line, err=True)
        console.write("(MyOwnThing) a line of ours that happens to start with parentheses\n")
        # a traceback from one of Ray's internal actors keeps the actor's name
        console.write("\x1b[36m(PlacementGroupCleaner pid=77)\x1b[0m ConnectionError: Found multiple Ray\n", err=True)
        console.close()
        assert "core_worker.cc:2465" in log.getvalue() and "graceful_shutdown" in log.getvalue()
        assert ("core_worker.cc" in err.getvalue()) == verbose and ("graceful_shutdown" in err.getvalue()) == verbose
        assert out.getvalue() == "(MyOwnThing) a line of ours that happens to start with parentheses\n"
        assert "(PlacementGroupCleaner pid=77)\x1b[0m ConnectionError" in err.getvalue()


def test_a_search_shows_its_own_lines_and_sends_every_workers_line_to_the_log_file():
    out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
    console = JobConsole(out, err, log, tty=False, workers=False)  # tune: several runs' workers at once
    console.write("trial a_00001 (train.lr=0.01): step 4 eval_loss=1.4264\n")
    console.write("\x1b[36m(run_trial pid=9604)\x1b[0m text-classification: 160 training rows\n")
    feed(console)  # the step lines of a trial's rank 0, then the console closes
    assert out.getvalue() == "trial a_00001 (train.lr=0.01): step 4 eval_loss=1.4264\n" and not err.getvalue()
    assert "step 40/40" in log.getvalue() and "160 training rows" in log.getvalue()


def test_a_record_that_rays_cpp_core_writes_to_fd_2_goes_to_the_log_and_other_fd_2_output_passes(capfd):
    out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
    console = JobConsole(out, err, log, tty=False)
    native = NativeStderr(console)
    try:
        # as Ray's C++ core writes: straight to the file descriptor, past sys.stderr
        os.write(2, b"[2026-12-01 16:24:54,997 E 15738 15738] core_worker.cc:2465: Actor with class name: 'x'\n")
        os.write(2, b"a C library's own warning\n")
    finally:
        native.close()
    assert not native.thread.is_alive()
    seen = capfd.readouterr().err
    assert "core_worker.cc" not in seen and "a C library's own warning\n" in seen, seen
    assert "core_worker.cc:2465" in log.getvalue() and "C library" not in log.getvalue()
    os.write(2, b"after the job\n")  # fd 2 is the real stderr again
    assert capfd.readouterr().err == "after the job\n"
