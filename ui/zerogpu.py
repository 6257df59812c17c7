"""The GPU's part of a job under Hugging Face's ``spaces.GPU``, which on a ZeroGPU Space runs
the function in a forked child process and sends its return value (or exception) back.

In a child, the job's callbacks would write to the child's copy of the job, which the page
never reads, and setting the parent's cancel event would change nothing there. So the call
crosses the fork through a bridge:

* every callback (``on_plan``, ``on_event``, ``on_message``, ``progress``) becomes a message on
  a pipe that a thread of the parent reads and hands to the real callback, in order;
* ``cancel`` becomes a process-shared event that the parent sets when the job's is set;
* errors come back as the child's exception (``spaces.GPU`` re-raises it in the parent).

What cannot cross: the child's memory. A pipeline the child loads dies with it, so on ZeroGPU
every job loads its pipeline (the parent's cache stays empty, and the page says "loaded for
this run"). Where ``spaces.GPU`` does not fork (a Space with its own GPU, or no ``spaces``
package), the same bridge runs in one process and costs one pipe.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import threading
from typing import Callable

log = logging.getLogger(__name__)

CALLBACKS = ("on_plan", "on_event", "on_message", "progress")
_POLL_S = 0.1  # how often the parent looks at the job's cancel event


def across_fork(fn: Callable, gpu: Callable[[Callable], Callable]) -> Callable:
    """``fn(session, plan, on_plan, *, cancel=None, **callbacks)`` run under ``gpu`` (such as
    ``spaces.GPU``) with its callbacks and cancel event bridged to the calling process."""
    @gpu
    def in_child(session, plan, channel, stop, names):
        def forward(name):
            def send(*args):
                channel.put((name, args))
            return send
        callbacks = {name: forward(name) for name in names if name != "on_plan"}
        on_plan = forward("on_plan") if "on_plan" in names else (lambda plan: None)
        return fn(session, plan, on_plan, cancel=stop, **callbacks)

    @functools.wraps(fn)
    def call(session, plan, on_plan, *, cancel=None, **callbacks):
        context = multiprocessing.get_context("fork")
        channel = context.SimpleQueue()
        stop = context.Event()
        targets = {name: cb for name, cb in {"on_plan": on_plan, **callbacks}.items() if cb is not None}
        finished = threading.Event()

        def pump():
            while True:
                item = channel.get()
                if item is None:
                    return
                name, args = item
                try:
                    targets[name](*args)
                except Exception:  # noqa: BLE001 - a page callback must not stop the messages
                    log.exception("%s callback failed", name)

        def watch():
            while not finished.wait(_POLL_S):
                if cancel is not None and cancel.is_set():
                    stop.set()
                    return

        threads = [threading.Thread(target=pump, name="gpu-bridge", daemon=True),
                   threading.Thread(target=watch, name="gpu-cancel", daemon=True)]
        for thread in threads:
            thread.start()
        try:
            return in_child(session, plan, channel, stop, tuple(targets))
        finally:
            finished.set()
            channel.put(None)  # after every message the child sent: they are read first
            for thread in threads:
                thread.join()

    return call
