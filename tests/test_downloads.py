"""Downloads from the Hugging Face source against a real HTTP server on 127.0.0.1 (hub_server.py)
serving the tiny FLUX pipeline as a repository, with faults injected per file and per request."""

from __future__ import annotations

import hashlib
import shutil
import types
from dataclasses import replace
from pathlib import Path

import pytest

from hub_server import HubServer
from pipelines import DownloadError, get_family, registry
from pipelines.sources import download, resolve_model

REPO = "tests/tiny-flux"
KEY = "tiny-flux-hub"
CHUNK = 4096


@pytest.fixture
def hub(tiny_family, monkeypatch):
    """The server, and the family ``tiny-flux-hub`` (FLUX.1-schnell's files) pointing at it;
    online for this test only."""
    import huggingface_hub.constants
    import huggingface_hub.file_download

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (constants.py:194); every request
    # checks constants.is_offline_mode(), which returns that module attribute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # http_get waits 1 s before each in-run retry (file_download.py:474); no need to here.
    fast_time = types.SimpleNamespace(**{k: getattr(__import__("time"), k) for k in ("time", "monotonic",
                                                                                     "perf_counter")},
                                      sleep=lambda seconds: None)
    monkeypatch.setattr(huggingface_hub.file_download, "time", fast_time)
    # http_get writes what it reads in chunks of DOWNLOAD_CHUNK_SIZE (10 MB; constants.py), so
    # the bytes of a broken response before the last whole chunk are kept and resumed from.
    # Chunks of 4 KiB make that visible with files of a few dozen KiB.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    yield from _serve(tiny_family, monkeypatch, "HF_ENDPOINT", key=KEY, huggingface_id=REPO, modelscope_id=None)


def _serve(tiny_family, monkeypatch, endpoint_variable: str, **family_fields):
    """The local hub serving the tiny FLUX repository, with a registry family pointing at it
    (FLUX.1-schnell's files under ``family_fields``); stopped when the test ends."""
    server = HubServer(tiny_family("flux"), repo_id=REPO).start()
    monkeypatch.setenv(endpoint_variable, server.url)
    family = replace(get_family("flux.1-schnell"), **family_fields)
    monkeypatch.setitem(registry.FAMILIES, family.key, family)
    server.family = family
    try:
        yield server
    finally:
        server.stop()


def fetch(hub, folder: Path, **kwargs) -> Path:
    return download(hub.family, folder, source="huggingface", endpoint=hub.url, **kwargs)


def needed(hub) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects
    return list(filter_repo_objects(sorted(hub.files), allow_patterns=hub.family.allow_patterns()))


def assert_identical(hub, folder: Path) -> None:
    for name in needed(hub):
        assert (folder / name).read_bytes() == hub.files[name], name


def no_wrong_files(hub, folder: Path) -> None:
    """Every final file in the folder (not the client's .cache, nor ModelScope's ``*.incomplete``
    partials, which it resumes from and which no loader takes for a weight file) is
    byte-identical to the source."""
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not name.startswith(".cache/") and not name.endswith(".incomplete"):
            assert path.read_bytes() == hub.files[name], f"{name} looks complete but is not"


def biggest_shard(hub) -> str:
    return max((n for n in needed(hub) if n.endswith(".safetensors")), key=lambda n: len(hub.files[n]))


def test_the_server_is_a_hub_the_client_downloads_from(hub, tmp_path):
    # The whole user path: a registry key, source='huggingface', a models_dir: downloaded,
    # checked, byte-identical; and a second run needs no network.
    calls = []
    folder, family = resolve_model(KEY, source="huggingface", models_dir=tmp_path,
                                   progress=lambda *a: calls.append(a))
    assert family.key == KEY and folder == tmp_path / KEY
    assert_identical(hub, folder)
    methods = {(m, p.split("?")[0].split("/")[1]) for m, p, _ in hub.requests}
    assert ("GET", "api") in methods and ("HEAD", REPO.split("/")[0]) in methods
    assert calls and calls[-1][1] == calls[-1][2] > 0  # progress reached the total
    hub.clear()
    assert resolve_model(KEY, source="huggingface", models_dir=tmp_path)[0] == folder
    assert hub.requests == []  # a complete local copy: no request at all


def test_a_killed_download_resumes_with_a_range_request(hub, tmp_path):
    # The server dies half-way through the biggest shard (once): the client sees the connection
    # close and continues the file from where it stopped with a Range request.
    name = biggest_shard(hub)
    half = len(hub.files[name]) // 2 // CHUNK * CHUNK
    hub.fail(name, "stop", at=half)
    fetch(hub, tmp_path / "m")
    gets = hub.gets(name)
    assert len(gets) == 2 and "range" not in gets[0] and gets[1]["range"] == f"bytes={half}-"
    assert_identical(hub, tmp_path / "m")


def test_a_download_killed_for_the_whole_run_fails_then_the_next_run_completes(hub, tmp_path):
    # The server stops at the same byte for every request of this run: the client's retries
    # (Range requests from that byte) get nothing more, the run fails with a DownloadError and
    # no final file for that shard; the other files are kept and the next run fetches only it.
    name = biggest_shard(hub)
    half = len(hub.files[name]) // 2 // CHUNK * CHUNK
    hub.fail(name, "stop", at=half, times=None)
    with pytest.raises(DownloadError, match=rf"(?s){REPO} from huggingface failed.*run again to resume"):
        fetch(hub, tmp_path / "m")
    assert any(h.get("range") == f"bytes={half}-" for h in hub.gets(name))
    assert not (tmp_path / "m" / name).exists()
    no_wrong_files(hub, tmp_path / "m")
    hub.clear()
    fetch(hub, tmp_path / "m")
    assert [m for m, p in hub.resolve_requests() if m == "GET"] == ["GET"]  # only the missing shard
    assert len(hub.gets(name)) == 1
    assert_identical(hub, tmp_path / "m")


@pytest.mark.parametrize("kind, at, error", [
    ("500", 0, r"HfHubHTTPError: Server error '500"),
    ("reset", 1000, r"ReadError"),
    ("truncate", 1000, r"RemoteProtocolError|OSError"),
])
def test_a_failed_transfer_is_a_clear_error_and_the_next_attempt_succeeds(hub, tmp_path, kind, at, error):
    name = biggest_shard(hub)
    # Truncation is retried by the client (Range from the byte it got to), so for it to fail the
    # run the server truncates every request of this run.
    hub.fail(name, kind, at=at, times=None if kind == "truncate" else 1)
    with pytest.raises(DownloadError) as failure:
        fetch(hub, tmp_path / "m")
    message = str(failure.value)
    assert REPO in message and "huggingface" in message and "transformer/*.safetensors" in message
    assert __import__("re").search(error, message, __import__("re").S), message
    assert not (tmp_path / "m" / name).exists()
    no_wrong_files(hub, tmp_path / "m")
    hub.clear()
    fetch(hub, tmp_path / "m")
    assert_identical(hub, tmp_path / "m")


@pytest.mark.parametrize("kind", ["wrong_bytes", "wrong_size"])
def test_a_file_with_wrong_content_is_fetched_again(hub, tmp_path, kind):
    name = biggest_shard(hub)
    hub.fail(name, kind, at=7)  # the first GET serves the wrong file (HEAD agrees for wrong_size)
    fetch(hub, tmp_path / "m")
    assert len(hub.gets(name)) == 2
    assert_identical(hub, tmp_path / "m")


@pytest.mark.parametrize("kind", ["wrong_bytes", "wrong_size"])
def test_a_file_that_stays_wrong_is_named_and_removed(hub, tmp_path, kind):
    name = biggest_shard(hub)
    hub.fail(name, kind, at=7, times=None)
    with pytest.raises(DownloadError, match=rf"(?s){REPO} from huggingface.*{name} \((sha256|\d+ bytes)"):
        fetch(hub, tmp_path / "m")
    assert len(hub.gets(name)) == 2  # fetched once more, not used
    assert not (tmp_path / "m" / name).exists()
    no_wrong_files(hub, tmp_path / "m")
    hub.clear()
    fetch(hub, tmp_path / "m")
    assert hub.gets(name) and len([p for m, p in hub.resolve_requests() if m == "GET"]) == 1
    assert_identical(hub, tmp_path / "m")


def test_a_wrong_plain_file_is_caught_by_its_git_blob_id(hub, tmp_path):
    hub.fail("transformer/config.json", "wrong_bytes", times=None)
    with pytest.raises(DownloadError, match=r"transformer/config.json \(git blob id"):
        fetch(hub, tmp_path / "m")
    assert not (tmp_path / "m" / "transformer/config.json").exists()


def test_too_little_disk_space_is_refused_before_downloading(hub, tmp_path, monkeypatch):
    import pipelines.sources
    total = sum(len(hub.files[n]) for n in needed(hub))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pipelines.sources.shutil, "disk_usage",
                        lambda path: usage._replace(free=total - 1))
    target = tmp_path / "models" / KEY
    with pytest.raises(DownloadError, match=rf"(?s){REPO} from huggingface.*need {total} bytes.*only {total - 1} "
                                            r"bytes.*free.*LOWVRAM_MODELS_DIR.*nothing was written"):
        fetch(hub, target)
    assert not (tmp_path / "models").exists()
    assert hub.resolve_requests() == []  # only the listing was asked for
    # Enough room: it downloads.
    monkeypatch.setattr(pipelines.sources.shutil, "disk_usage", lambda path: usage._replace(free=total))
    fetch(hub, target)
    assert_identical(hub, target)


def test_files_already_there_do_not_count_against_free_space(hub, tmp_path, monkeypatch):
    import pipelines.sources
    target = tmp_path / "m"
    fetch(hub, target)
    name = biggest_shard(hub)
    (target / name).unlink()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pipelines.sources.shutil, "disk_usage",
                        lambda path: usage._replace(free=len(hub.files[name])))
    hub.clear()
    fetch(hub, target)
    assert [p for m, p in hub.resolve_requests() if m == "GET"] and len(hub.gets(name)) == 1
    assert hashlib.sha256((target / name).read_bytes()).digest() == hashlib.sha256(hub.files[name]).digest()


# -- ModelScope ------------------------------------------------------------------------------------
# modelscope 1.40's snapshot_download hands over to modelscope_hub (HubApi.download_repo): one
# listing GET /api/v1/models/<repo>/repo/files, a region probe, then one GET
# /api/v1/models/<repo>/repo?Revision=master&FilePath=<file> per file (hub_server.py).

MS_KEY = "tiny-flux-ms"


@pytest.fixture
def ms_hub(tiny_family, monkeypatch, tmp_path):
    """The server, and the family ``tiny-flux-ms`` (FLUX.1-schnell's files) on ModelScope
    pointing at it through $MODELSCOPE_ENDPOINT; lock files in this test's folder."""
    import modelscope_hub._download
    import modelscope_hub.config

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    # The process-wide HubConfig reads MODELSCOPE_ENDPOINT / MODELSCOPE_CACHE once (config.py:378).
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    # Retry waits (_download.py:348 and :1059): backoff 0, 2, 4 ... s, integrity retries 1, 2 s.
    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_RETRY_MAX_DELAY_SECONDS", 0)
    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.0)
    yield from _serve(tiny_family, monkeypatch, "MODELSCOPE_ENDPOINT", key=MS_KEY, modelscope_id=REPO,
                      huggingface_id=None)


def ms_fetch(hub, folder: Path, **kwargs) -> Path:
    return download(hub.family, folder, source="modelscope", endpoint=hub.url, **kwargs)


def ms_file_gets(hub) -> list[str]:
    from urllib.parse import parse_qs, urlsplit
    return [parse_qs(urlsplit(p).query)["FilePath"][0] for m, p, _ in hub.ms_file_requests() if m == "GET"]


def no_wrong_ms_files(hub, folder: Path) -> None:
    """As no_wrong_files; a ``.incomplete`` file is modelscope's partial file, resumed next run."""
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not name.endswith(".incomplete"):
            assert path.read_bytes() == hub.files[name], f"{name} looks complete but is not"


def test_modelscope_downloads_byte_identical_and_needs_no_network_the_second_time(ms_hub, tmp_path):
    calls = []
    folder, family = resolve_model(MS_KEY, source="modelscope", models_dir=tmp_path / "models",
                                   progress=lambda *a: calls.append(a))
    assert family.key == MS_KEY and folder == tmp_path / "models" / MS_KEY
    assert_identical(ms_hub, folder)
    no_wrong_ms_files(ms_hub, folder)
    listings = [p for m, p, _ in ms_hub.requests if "/repo/files" in p]
    assert len(listings) == 1 and "Recursive=True" in listings[0]  # listed once, for both steps
    assert sorted(ms_file_gets(ms_hub)) == needed(ms_hub)           # each needed file once
    assert calls and {c[0] for c in calls} == set(needed(ms_hub))
    assert all(calls[-1][1] == calls[-1][2] for c in calls[-1:])    # progress reached the total
    ms_hub.clear()
    assert resolve_model(MS_KEY, source="modelscope", models_dir=tmp_path / "models")[0] == folder
    assert ms_hub.requests == []  # a complete local copy: no request at all


def test_modelscope_retries_a_single_failed_request_within_the_run(ms_hub, tmp_path):
    name = biggest_shard(ms_hub)
    ms_hub.fail(name, "500")
    ms_hub.fail(name, "reset", at=1000)
    ms_fetch(ms_hub, tmp_path / "m")
    assert len(ms_hub.ms_gets(name)) == 3
    assert_identical(ms_hub, tmp_path / "m")


@pytest.mark.parametrize("kind, at, error", [
    ("500", 0, r"ServerError"),
    ("reset", 1000, r"NetworkError|ConnectionError|ChunkedEncodingError|ProtocolError"),
    ("truncate", 1000, r"NetworkError|IncompleteBody|ProtocolError|ChunkedEncodingError"),
])
def test_modelscope_failed_transfer_is_a_clear_error_and_the_next_attempt_succeeds(ms_hub, tmp_path, kind, at,
                                                                                   error):
    import re
    name = biggest_shard(ms_hub)
    ms_hub.fail(name, kind, at=at, times=None)  # every request of this run: the client's retries fail too
    with pytest.raises(DownloadError) as failure:
        ms_fetch(ms_hub, tmp_path / "m")
    message = str(failure.value)
    assert REPO in message and "from modelscope failed" in message and name in message, message
    assert "transformer/*.safetensors" in message and "run again to resume" in message
    assert re.search(error, message, re.S), message
    tries = len(ms_hub.ms_gets(name))
    assert tries > 1  # modelscope retried it within the run
    assert not (tmp_path / "m" / name).exists()
    no_wrong_ms_files(ms_hub, tmp_path / "m")
    ms_hub.clear()
    ms_fetch(ms_hub, tmp_path / "m")
    assert ms_file_gets(ms_hub) == [name]  # only the failed file; the others were kept
    resumed = ms_hub.ms_gets(name)[0].get("range")
    if kind == "truncate":  # each try kept the bytes before its break; the next run resumes after them all
        assert resumed == f"bytes={at * tries}-"
    elif kind == "reset":  # a TCP reset may discard bytes the client had not read yet: at most as many
        assert resumed is None or int(resumed[len("bytes="):-1]) in range(at, at * tries + 1, at), resumed
    assert_identical(ms_hub, tmp_path / "m")


@pytest.mark.parametrize("kind", ["wrong_bytes", "wrong_size"])
def test_modelscope_file_with_wrong_content_is_fetched_again(ms_hub, tmp_path, kind):
    name = biggest_shard(ms_hub)
    ms_hub.fail(name, kind, at=7)  # the first GET serves the wrong file
    ms_fetch(ms_hub, tmp_path / "m")
    assert len(ms_hub.ms_gets(name)) == 2
    assert_identical(ms_hub, tmp_path / "m")


def test_modelscope_file_that_stays_wrong_is_named_and_removed(ms_hub, tmp_path):
    name = biggest_shard(ms_hub)
    ms_hub.fail(name, "wrong_bytes", times=None)
    with pytest.raises(DownloadError, match=rf"(?s){REPO} from modelscope failed.*{name}: FileIntegrityError"):
        ms_fetch(ms_hub, tmp_path / "m")
    assert not (tmp_path / "m" / name).exists()
    no_wrong_ms_files(ms_hub, tmp_path / "m")
    ms_hub.clear()
    ms_fetch(ms_hub, tmp_path / "m")
    assert ms_file_gets(ms_hub) == [name]
    assert_identical(ms_hub, tmp_path / "m")


def test_modelscope_a_wrong_file_the_client_lets_through_is_caught_and_fetched_once_more(ms_hub, tmp_path,
                                                                                        monkeypatch):
    # Our own check after modelscope's: a file left wrong (here: damaged right after the client's
    # own checks, once) is found against the listing's sha256, deleted and fetched again.
    from modelscope_hub._download import DownloadManager
    name = biggest_shard(ms_hub)
    real = DownloadManager.download_file
    damaged = []

    def download_file(self, *args, **kwargs):
        target = real(self, *args, **kwargs)
        if kwargs.get("file_path") == name and not damaged:
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
            damaged.append(name)
        return target
    monkeypatch.setattr(DownloadManager, "download_file", download_file)
    ms_fetch(ms_hub, tmp_path / "m")
    assert damaged == [name] and len(ms_hub.ms_gets(name)) == 2
    assert sorted(ms_file_gets(ms_hub)) == sorted(needed(ms_hub) + [name])
    assert_identical(ms_hub, tmp_path / "m")


def test_modelscope_too_little_disk_space_is_refused_before_downloading(ms_hub, tmp_path, monkeypatch):
    import pipelines.sources
    total = sum(len(ms_hub.files[n]) for n in needed(ms_hub))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pipelines.sources.shutil, "disk_usage", lambda path: usage._replace(free=total - 1))
    target = tmp_path / "models" / MS_KEY
    with pytest.raises(DownloadError, match=rf"(?s){REPO} from modelscope.*need {total} bytes.*only {total - 1} "
                                            r"bytes.*free.*LOWVRAM_MODELS_DIR.*nothing was written"):
        ms_fetch(ms_hub, target)
    assert not (tmp_path / "models").exists()
    assert ms_hub.ms_file_requests() == [] and [p for m, p, _ in ms_hub.requests if "/repo/files" in p]
    monkeypatch.setattr(pipelines.sources.shutil, "disk_usage", lambda path: usage._replace(free=total))
    ms_fetch(ms_hub, target)
    assert_identical(ms_hub, target)


# -- Cancel stops a download ----------------------------------------------------------------------

def _cancel_after_first_bytes(hub):
    """A progress callback as the app's: Cancel is pressed once the first bytes have arrived
    (presets.auto wraps the job's progress so that it raises Cancelled once cancel is set)."""
    import threading

    from presets.auto import _stops_on_cancel
    cancel = threading.Event()
    seen = []

    def progress(name, done, total):
        seen.append((name, done, total))
        if done > 0:
            cancel.set()
    return _stops_on_cancel(progress, cancel), seen


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_cancel_stops_a_download_and_the_next_run_completes(request, source, tmp_path):
    from pipelines import Cancelled
    hub = request.getfixturevalue("hub" if source == "huggingface" else "ms_hub")
    get = fetch if source == "huggingface" else ms_fetch
    progress, seen = _cancel_after_first_bytes(hub)
    folder = tmp_path / "m"
    with pytest.raises(Cancelled, match="cancelled while downloading"):
        get(hub, folder, progress=progress)
    assert seen and seen[-1][1] < sum(len(hub.files[n]) for n in needed(hub))  # stopped early
    no_wrong_files(hub, folder)  # nothing left that looks complete but is not
    get(hub, folder)
    assert_identical(hub, folder)
