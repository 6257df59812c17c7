"""A stand-in for Hugging Face's ``spaces`` package that forks the way ZeroGPU does.

``spaces.GPU(fn)`` (or ``spaces.GPU(duration=...)(fn)``) returns a function that, on each call,
forks a child process, runs ``fn`` there with the caller's arguments (inherited through the
fork, not pickled), pickles the return value or the exception back through a pipe and
re-raises the exception in the parent. Nothing the child changes in memory reaches the
parent. Put this folder on PYTHONPATH to run the app as on a ZeroGPU Space.
"""

import functools
import multiprocessing
import os
import sys


def GPU(fn=None, *, duration=60):  # noqa: N802 - the real package's name
    if fn is None:
        return lambda f: GPU(f, duration=duration)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        context = multiprocessing.get_context("fork")
        reader, writer = context.Pipe(duplex=False)

        def child():
            print(f"spaces stand-in: {fn.__name__} runs in child {os.getpid()} of {os.getppid()}",
                  file=sys.stderr, flush=True)
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except BaseException as error:  # noqa: BLE001 - sent to the parent, as ZeroGPU does
                outcome = ("error", error)
            try:
                writer.send(outcome)
            except Exception as error:  # noqa: BLE001 - an unpicklable result or exception
                writer.send(("error", RuntimeError(f"the GPU worker's result could not be sent back: {error!r}")))

        process = context.Process(target=child, daemon=True)
        process.start()
        writer.close()
        try:
            kind, value = reader.recv()
        except EOFError:
            process.join()
            raise RuntimeError(f"the GPU worker died (exit code {process.exitcode})") from None
        process.join()
        if kind == "error":
            raise value
        return value

    return call
