"""Exceptions shared by the pipelines' modules (a leaf: it imports nothing of the package)."""


class Cancelled(RuntimeError):
    """The run was cancelled (between steps, or during a download); its memory has been released."""


class RequestError(ValueError):
    """A generation setting that cannot work; the message names the field."""
