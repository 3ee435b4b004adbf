"""Ctrl-C, SIGTERM and SLURM's warning signal, from the first moment a command runs to its exit.

Inside a Lightning stage, Lightning is in charge of SIGTERM: it stops at its next safe point
with `SIGTERMException` (our handler, which Lightning calls after its own, only notes the
signal). Anywhere else SIGTERM raises `Terminated`, a `KeyboardInterrupt`, so every place that
handles Ctrl-C (a run marked KILLED, a search's trial given back) handles it too. SLURM's warning
signal only ever notes: `mlplab.safety.slurm.SLURMRequeue` acts on it at an epoch boundary,
and after training it changes nothing (the job finishes testing and logging the model).

Kept free of heavy imports: installed before torch, Lightning and MLflow are imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM outside Lightning's loops."""


class State:
    interrupted = False  # a Ctrl-C arrived
    terminated = False  # a SIGTERM arrived
    requeue_wanted = False  # SLURM's warning signal arrived
    said = False  # a line about the interrupt has been printed (by `RunStatus`)


def on_sigint(signum, frame) -> None:
    State.interrupted = True
    raise KeyboardInterrupt


def on_sigterm(signum, frame) -> None:
    State.terminated = True
    if signal.getsignal(signal.SIGTERM) is on_sigterm:  # no Lightning stage is running
        raise Terminated


def on_requeue_signal(signum, frame) -> None:
    State.requeue_wanted = True


def install() -> None:
    """SIGTERM raises at any moment; under SLURM, the warning signal (SIGUSR1, whose default
    action kills the process) is noted from start-up to exit."""
    State.interrupted = State.terminated = State.said = False  # a command run in-process again
    if threading.current_thread() is not threading.main_thread():
        return  # Python takes handlers from the main thread only (`main` called from a thread)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (`nohup`)
        signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    if "SLURM_JOB_ID" in os.environ:
        signal.signal(signal.SIGUSR1, on_requeue_signal)


def check() -> None:
    """At a safe point between stages: a SIGTERM that arrived as a stage ended stops here."""
    if State.terminated:
        raise Terminated


@contextlib.contextmanager
def deferred():
    """Ctrl-C and SIGTERM wait until the block has run (a run's final status being written),
    then arrive as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def exit_code(err: BaseException) -> int | None:
    """130 or 143 for an interrupt, however it surfaced (raised inside an import, it can come
    out as another library's error: seen here, a RecursionError from numpy); None otherwise."""
    if State.terminated or State.interrupted:
        return EXIT_TERMINATED if State.terminated else EXIT_INTERRUPTED
    if isinstance(err, SystemExit) and type(err).__name__ != "SIGTERMException":
        # Lightning ends a Ctrl-C inside a stage with `sys.exit(1)`, raised while handling it
        if err.code in (0, None) or not isinstance(err.__context__, KeyboardInterrupt):
            return None
        err = err.__context__
    if isinstance(err, Terminated) or type(err).__name__ == "SIGTERMException":
        return EXIT_TERMINATED
    return EXIT_INTERRUPTED if isinstance(err, KeyboardInterrupt) else None


def leave(code: int) -> None:
    """Exit with `code`, saying so in one line unless that is said already; a second Ctrl-C
    while leaving changes nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not State.said:
        what = "terminated (SIGTERM)" if code == EXIT_TERMINATED else "interrupted"
        print(f"mlplab: {what}", file=sys.stderr)
    sys.exit(code)
