"""A job's live state as the page reads it (ui/jobs.py), without a server."""

import types

from ui.jobs import Job, JobState


def test_a_download_shows_its_bytes_as_the_bar():
    """The job's progress while a download runs: the fraction of the file's bytes, and the bytes
    in the text beside the bar."""
    job = Job(types.SimpleNamespace(choice=types.SimpleNamespace(name="flux.1-schnell")))
    job.state = JobState.LOADING
    assert job.progress() == (0.0, "loading flux.1-schnell")
    job.on_download("transformer/shard-1.safetensors", 3 * 2**20, 12 * 2**20)
    fraction, text = job.progress()
    assert fraction == 0.25 and text == "downloading transformer/shard-1.safetensors: 3.0 of 12.0 MiB"
    job.on_download("transformer/shard-1.safetensors", 12 * 2**20, 12 * 2**20)  # done: loading again
    assert job.progress() == (0.0, "loading flux.1-schnell")
