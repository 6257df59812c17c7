"""A tiny Hugging Face Hub on 127.0.0.1: a real ``ThreadingHTTPServer`` (port 0, in a thread)
serving one model repository from a local folder, with faults injected per file and per request.

Only the routes huggingface_hub 2.4's ``snapshot_download`` / ``HfApi.model_info`` call:

- ``GET  /api/models/<repo>[/revision/<rev>][?blobs=True]``  model info: ``sha``, ``siblings``
  (with ``size``, ``blobId`` and ``lfs`` when ``blobs`` is asked for), as ``HfApi.model_info``.
- ``GET  /api/models/<repo>/tree/<rev>?recursive=True``    the listing snapshot_download caches
  (``type``, ``path``, ``size``, ``oid``, ``lfs``), as ``HfApi.list_repo_tree``.
- ``HEAD /<repo>/resolve/<rev>/<file>``  ``X-Repo-Commit``, ``ETag`` (git blob sha1, or the
  sha256 for LFS files, which also get ``X-Linked-Etag`` / ``X-Linked-Size``), ``Content-Length``.
- ``GET  /<repo>/resolve/<rev>/<file>``  the bytes; ``Range: bytes=N-`` gives a 206 with
  ``Content-Range``.

And the routes modelscope 1.40.2's ``snapshot_download`` calls (it delegates to modelscope_hub's
``HubApi.download_repo`` / ``LegacyClient``), each answering ``{"Code", "Data", "Message",
"Success"}`` JSON like the real ModelScope:

- ``GET /api/v1/models/<repo>``            repository info (``get_repo_info``).
- ``GET /api/v1/models/<repo>/revisions``  ``Data.RevisionMap`` with the ``master`` branch.
- ``GET /api/v1/models/<repo>/repo/files?Revision=<rev>&Recursive=True[&Root=<dir>]``  the
  recursive listing, ``Data.Files``: ``Path``, ``Name``, ``Type`` (``blob``/``tree``), ``Size``,
  ``Sha256``, ``IsLFS``, ``Revision``.
- ``GET /api/v1/models/<repo>/repo?Revision=<rev>&FilePath=<file>``  the bytes, with the same
  ``Range`` handling and the same faults as the Hugging Face route.
- anything else (``/api/v1/repos/internalAccelerationInfo``, the region probe) is a 404.

``*.safetensors`` files are served as LFS files (their listing carries the sha256), the rest
as plain git files, as on the real Hub.

Faults (``server.fail(path, kind, times=..., at=...)``), each used by the next ``times`` GETs of
that file (``times=None``: until ``clear()``):

- ``"500"``        an HTTP 500 instead of the file;
- ``"reset"``      the headers and ``at`` bytes, then a TCP reset (SO_LINGER 0);
- ``"truncate"``   ``Content-Length`` of the whole range, ``at`` bytes of it, then a clean close;
- ``"stop"``       the server dies at file offset ``at``: whatever the Range, nothing past byte
                   ``at`` is sent, then the connection closes (a killed download);
- ``"wrong_bytes"`` the right size, different bytes (HEAD unchanged: only a hash shows it);
- ``"wrong_size"`` ``at`` extra bytes, and HEAD reports that size too (a consistent but wrong
                   file: only the listing shows it).

Every request is logged in ``server.requests`` as ``(method, path, headers)``, header names lower-cased.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
KINDS = ("500", "reset", "truncate", "stop", "wrong_bytes", "wrong_size")


@dataclass
class Fault:
    kind: str
    times: int | None = 1
    at: int = 0


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self, folder: Path, repo_id: str = "tests/tiny-model", commit: str = COMMIT):
        self.folder = Path(folder)
        self.repo_id = repo_id
        self.commit = commit
        self.files: dict[str, bytes] = {
            p.relative_to(self.folder).as_posix(): p.read_bytes()
            for p in sorted(self.folder.rglob("*")) if p.is_file() and ".cache" not in p.parts}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.faults: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    # -- control -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def fail(self, path: str, kind: str, *, times: int | None = 1, at: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"fault kind {kind!r}; one of {KINDS}")
        if path not in self.files:
            raise KeyError(path)
        with self._lock:
            self.faults.setdefault(path, []).append(Fault(kind, times, at))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(".safetensors")

    def gets(self, path: str) -> list[dict[str, str]]:
        """Headers of every GET of ``path`` (resolve route) so far."""
        suffix = f"/resolve/{self.commit}/{path}"
        return [h for m, p, h in self.requests if m == "GET" and unquote(urlsplit(p).path).endswith(suffix)]

    def resolve_requests(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.requests if "/resolve/" in p]

    # ModelScope: files are fetched from /api/v1/models/<repo>/repo?FilePath=<file>
    def ms_file_requests(self) -> list[tuple[str, str, dict[str, str]]]:
        route = f"/api/v1/models/{self.repo_id}/repo"
        return [(m, p, h) for m, p, h in self.requests if urlsplit(p).path == route]

    def ms_gets(self, path: str) -> list[dict[str, str]]:
        """Headers of every GET of ``path`` from the ModelScope file route so far."""
        return [h for m, p, h in self.ms_file_requests()
                if m == "GET" and parse_qs(urlsplit(p).query).get("FilePath") == [path]]

    # -- what a fault does to a file ------------------------------------------------------------------
    def _peek(self, path: str) -> Fault | None:
        with self._lock:
            queue = self.faults.get(path) or []
            return queue[0] if queue else None

    def _take(self, path: str) -> Fault | None:
        with self._lock:
            queue = self.faults.get(path) or []
            if not queue:
                return None
            fault = queue[0]
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    queue.pop(0)
            return fault

    def served_bytes(self, path: str, fault: Fault | None) -> bytes:
        data = self.files[path]
        if fault is None:
            return data
        if fault.kind == "wrong_bytes":
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            return bytes(flipped)
        if fault.kind == "wrong_size":
            return data + b"\0" * max(1, fault.at)
        return data

    # -- listings ------------------------------------------------------------------------------------
    def _entry(self, path: str) -> dict:
        data = self.files[path]
        if self.is_lfs(path):
            pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
                       f"size {len(data)}\n").encode()
            return {"size": len(data), "oid": git_blob_sha1(pointer),
                    "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}}
        return {"size": len(data), "oid": git_blob_sha1(data)}

    def model_info(self, blobs: bool) -> dict:
        siblings = []
        for path in self.files:
            sibling = {"rfilename": path}
            if blobs:
                entry = self._entry(path)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.commit, "private": False,
                "siblings": siblings}

    def tree(self) -> list[dict]:
        folders = sorted({"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)})
        items = [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                 for f in folders]
        items += [{"type": "file", "path": p, **self._entry(p)} for p in self.files]
        return items


    def ms_listing(self, root: str | None) -> list[dict]:
        folders = sorted({"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)})
        items = [{"Name": f.rsplit("/", 1)[-1], "Path": f, "Type": "tree", "Size": 0, "Sha256": "", "IsLFS": False,
                  "Revision": self.commit} for f in folders]
        items += [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": len(data),
                   "Sha256": hashlib.sha256(data).hexdigest(), "IsLFS": self.is_lfs(p), "Revision": self.commit}
                  for p, data in self.files.items()]
        if root:
            items = [i for i in items if i["Path"].startswith(root.rstrip("/") + "/")]
        return items


def _ms_body(data) -> dict:
    return {"Code": 200, "Data": data, "Message": "success", "RequestId": "test", "Success": True}


def _handler_for(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _log(self):
            with hub._lock:
                hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

        def _json(self, payload, status: int = 200):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Repo-Commit", hub.commit)
            self.end_headers()
            self.wfile.write(body)

        def _not_found(self, what: str):
            self._json({"error": f"{what} not found"}, 404)

        def _route(self):
            url = urlsplit(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            api = f"/api/models/{hub.repo_id}/"
            if path == api[:-1]:                     # model_info without a revision
                return "info", query.get("blobs", ["False"])[0].lower() == "true"
            if path.startswith(api):
                rest = path[len(api):]
                if rest.startswith("revision/"):
                    return "info", query.get("blobs", ["False"])[0].lower() == "true"
                if rest.startswith("tree/"):
                    return "tree", None
                return None, None
            ms = f"/api/v1/models/{hub.repo_id}"
            if path == ms:
                return "ms_info", None
            if path == ms + "/revisions":
                return "ms_revisions", None
            if path == ms + "/repo/files":
                return "ms_files", query.get("Root", [None])[0]
            if path == ms + "/repo":
                filename = query.get("FilePath", [""])[0]
                if query.get("Revision", ["master"])[0] in (hub.commit, "master") and filename in hub.files:
                    return "file", filename
                return None, None
            prefix = f"/{hub.repo_id}/resolve/"
            if path.startswith(prefix):
                rev, _, filename = path[len(prefix):].partition("/")
                if rev in (hub.commit, "main") and filename in hub.files:
                    return "file", filename
            return None, None

        def do_GET(self):
            self._log()
            route, arg = self._route()
            if route == "info":
                return self._json(hub.model_info(arg))
            if route == "tree":
                return self._json(hub.tree())
            if route == "ms_info":
                owner, _, name = hub.repo_id.partition("/")
                return self._json(_ms_body({"Id": 1, "Path": owner, "Name": name, "Revision": hub.commit}))
            if route == "ms_revisions":
                branch = {"Revision": "master", "CommitId": hub.commit, "CreatedAt": 1700000000}
                return self._json(_ms_body({"RevisionMap": {"Branches": [branch], "Tags": []}}))
            if route == "ms_files":
                return self._json(_ms_body({"Files": hub.ms_listing(arg)}))
            if route != "file":
                return self._not_found(self.path)
            self._send_file(arg, head=False)

        def do_HEAD(self):
            self._log()
            route, arg = self._route()
            if route != "file":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send_file(arg, head=True)

        def _file_headers(self, filename: str, data: bytes):
            if hub.is_lfs(filename):
                etag = hashlib.sha256(data).hexdigest()
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            else:
                etag = git_blob_sha1(data)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("Accept-Ranges", "bytes")

        def _send_file(self, filename: str, head: bool):
            fault = hub._peek(filename) if head else hub._take(filename)
            if head and fault is not None and fault.kind not in ("wrong_size",):
                fault = None                         # HEAD shows the listed file except for wrong_size
            if fault is not None and fault.kind == "500":
                body = b'{"error": "Internal Error"}'
                self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Repo-Commit", hub.commit)
                self.end_headers()
                self.wfile.write(body)
                return
            data = hub.served_bytes(filename, fault)
            start = 0
            ranged = self.headers.get("Range")
            if ranged and not head and ranged.startswith("bytes=") and ranged.endswith("-"):
                start = min(int(ranged[len("bytes="):-1]), len(data))
            body = data[start:]
            self.send_response(206 if start else 200)
            self._file_headers(filename, data)
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            kind = fault.kind if fault is not None else None
            if kind == "reset":
                self.wfile.write(body[:fault.at])
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
            elif kind == "truncate":
                self.wfile.write(body[:fault.at])
                self.close_connection = True
            elif kind == "stop":
                self.wfile.write(body[:max(0, fault.at - start)])
                self.close_connection = True
            else:
                self.wfile.write(body)

    return Handler
