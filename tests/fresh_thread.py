"""Run a test's body in a new thread: one that holds no per-thread state of g4route's yet (the CPU paths keep
their buffers per thread), so the body meets the paths as a thread's first calls do."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable


def in_a_fresh_thread(body: Callable[[], None]) -> None:
    """Run ``body()`` in a new thread and wait for it; whatever it raised fails the caller, with its
    traceback (an exception in a thread would otherwise only be printed)."""
    failures: list[str] = []

    def run() -> None:
        try:
            body()
        except Exception:  # handed to the caller below, with where it failed
            failures.append(traceback.format_exc())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not failures, failures[0]
