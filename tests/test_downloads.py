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
    server = HubServer(tiny_family("flux"), repo_id=REPO).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    family = replace(get_family("flux.1-schnell"), key=KEY, huggingface_id=REPO, modelscope_id=None)
    monkeypatch.setitem(registry.FAMILIES, KEY, family)
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
    """Every final file in the folder (not the client's .cache) is byte-identical to the source."""
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not name.startswith(".cache/"):
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
