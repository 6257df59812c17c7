"""Where model files come from: ModelScope (default), the Hugging Face Hub, or a local folder.

A registry model is downloaded once into ``models_dir/<key>``, limited to the files its
family needs (safetensors only), with progress reported. From either hub the file listing
comes first (sizes, and sha256: for LFS files on the Hugging Face Hub, for every file on
ModelScope): a download that would not fit on the disk is refused before anything is written,
and afterwards every needed file is checked against the listing (size, sha256, or the git blob
id); a wrong file is deleted and fetched once more, and one still wrong is deleted and named.
huggingface_hub resumes a file with a Range request after a dropped connection within one run;
across runs, finished files are kept and not fetched again (it deletes its partial files).
modelscope (modelscope_hub) checks each file's size and sha256 itself, retries a failed or
wrong transfer within the run, and keeps a partial file as ``<file>.incomplete`` next to it,
which the next run resumes with a Range request. Afterwards every needed file is checked,
headers included, so a truncated or missing shard is named before loading.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import Cancelled
from .loading import ModelFilesError, check_folder, family_of_folder
from .registry import Family, get_family

log = logging.getLogger(__name__)

SOURCES = ("modelscope", "huggingface", "local")
MODELS_DIR_ENV = "LOWVRAM_MODELS_DIR"

# progress(file name, bytes done, file size)
Progress = Callable[[str, int, int], None]


class DownloadError(RuntimeError):
    """A download failed; the message names the model id, the source and the files."""


def default_models_dir() -> Path:
    """``$LOWVRAM_MODELS_DIR``, else ``models/`` next to the project's code."""
    configured = os.environ.get(MODELS_DIR_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / "models"


def is_local(model: str | os.PathLike) -> bool:
    """A path to a folder (anything with a separator), not a registry key."""
    return isinstance(model, os.PathLike) or (isinstance(model, str) and ("/" in model or os.sep in model))


def locate(model: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> tuple[Path, Family]:
    """Where ``model``'s files are or will be, and its family; no download, no file checks
    beyond what naming the family needs. ``model`` is a registry key or a local folder."""
    if is_local(model):
        path = Path(model)
        if not path.is_dir():
            raise ModelFilesError(f"{path}: no such model folder")
        return path, family_of_folder(path)
    family = get_family(str(model))
    if family.bundled is not None:
        return family.bundled, family
    return Path(models_dir or default_models_dir()) / family.key, family


def resolve_model(model: str | os.PathLike, *, source: str = "modelscope", models_dir: str | os.PathLike | None = None,
                  progress: Progress | None = None) -> tuple[Path, Family]:
    """The folder holding ``model``'s files (downloading them if needed) and its family.

    ``model`` is a registry key or a path to a local diffusers folder."""
    if source not in SOURCES:
        raise ValueError(f"source: {source!r} is not one of {', '.join(SOURCES)}")
    folder, family = locate(model, models_dir)
    if is_local(model) or family.bundled is not None:
        return folder, family
    if family.converted_from is not None:
        if not (folder / "model_index.json").is_file():
            raise ModelFilesError(f"{family.key} is converted here, not downloaded, and {folder} does not hold it "
                                  f"yet: load it with load_pipeline (which converts it), or run "
                                  f"python -m pipelines.convert {family.converted_from} {folder}")
        check_folder(folder, family)
        return folder, family
    if source == "local":
        if not folder.is_dir():
            raise ModelFilesError(f"{family.key}: no local copy in {folder}; download it with source='modelscope' "
                                  f"or 'huggingface', or pass the folder's path as the model")
        return folder, family
    try:
        check_folder(folder, family)
        return folder, family                      # already complete: no network needed
    except ModelFilesError:
        pass
    download(family, folder, source=source, progress=progress)
    try:
        check_folder(folder, family)
    except ModelFilesError as error:
        repo = family.modelscope_id if source == "modelscope" else family.huggingface_id
        raise DownloadError(f"{repo} from {source}: the download ended but files are missing or damaged "
                            f"({error}); run again to fetch them") from None
    return folder, family


def download(family: Family, folder: Path, *, source: str = "modelscope", progress: Progress | None = None,
             endpoint: str | None = None) -> Path:
    """Fetch ``family``'s needed files into ``folder``.

    From either hub: the file listing comes first (sizes, and sha256: for LFS files on the
    Hugging Face Hub, for every file on ModelScope); too little free disk space is refused
    before anything is written; after the download each needed file is checked against the
    listing (size, sha256 or git blob id), a wrong one is deleted and fetched once more, and one
    still wrong is deleted and named in a DownloadError."""
    patterns = family.allow_patterns()
    repo = family.modelscope_id if source == "modelscope" else family.huggingface_id
    if repo is None:
        raise DownloadError(f"{family.key} has no {source} id; try another source")
    if source == "modelscope":
        return _download_modelscope(repo, folder, patterns, progress, endpoint)
    return _download_huggingface(repo, folder, patterns, progress, endpoint)


def _failed(repo: str, source: str, patterns: list[str], folder: Path, error: BaseException,
            detail: str = "") -> DownloadError:
    return DownloadError(
        f"downloading {repo} from {source} failed: {type(error).__name__}: {error}"
        f"{f' ({detail})' if detail else ''}. Needed files: "
        f"{', '.join(patterns)}. Finished files stay in {folder}; run again to resume, or try "
        f"source={'huggingface' if source == 'modelscope' else 'modelscope'}.")


def _download_huggingface(repo: str, folder: Path, patterns: list[str], progress: Progress | None,
                          endpoint: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    source = "huggingface"
    # huggingface_hub reads HF_ENDPOINT once, at import; read it here so a mirror set later counts.
    endpoint = endpoint or os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    try:
        # GET /api/models/<repo>?blobs=True: the commit, and every file's size
        # (and sha256 for LFS files). The download below is pinned to that commit.
        info = HfApi(endpoint=endpoint).model_info(repo, files_metadata=True)
    except (KeyboardInterrupt, Cancelled):
        raise
    except Exception as error:
        raise _failed(repo, source, patterns, folder, error) from error
    listing = {s.rfilename: s for s in info.siblings or ()}
    needed = {name: listing[name] for name in filter_repo_objects(sorted(listing), allow_patterns=patterns)}
    if not needed:
        raise DownloadError(f"{repo} on {source} has none of the needed files ({', '.join(patterns)}); "
                            f"it lists {len(listing)} files. Try source='modelscope'.")
    _check_free_space(repo, source, folder, needed)

    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from %s (commit %s) into %s: %d files", repo, source, info.sha, folder, len(needed))
    def fetch():
        try:
            snapshot_download(repo, local_dir=folder, allow_patterns=patterns, endpoint=endpoint,
                              revision=info.sha, tqdm_class=_hf_progress(progress) if progress else None)
        except (KeyboardInterrupt, Cancelled):
            raise
        except Exception as error:  # every hub/network failure becomes one message that says what to do
            raise _failed(repo, source, patterns, folder, error) from error
    return _fetch_checked(repo, source, folder, needed, fetch)


def _fetch_checked(repo: str, source: str, folder: Path, needed: dict, fetch: Callable[[], None]) -> Path:
    """Run ``fetch`` (the hub client's download), then check every needed file against the
    hub's listing: a wrong one is deleted and fetched once more; one still wrong is deleted
    and named in a DownloadError. Never leaves a file that looks complete but is not."""
    for attempt in (1, 2):
        fetch()
        wrong = {name: why for name, entry in needed.items() if (why := _mismatch(folder / name, entry))}
        for name in wrong:
            (folder / name).unlink(missing_ok=True)
        if not wrong:
            return folder
        log.warning("%s from %s: %s did not match the hub's listing (attempt %d); deleted",
                    repo, source, "; ".join(f"{n}: {w}" for n, w in wrong.items()), attempt)
    other = "modelscope" if source == "huggingface" else "huggingface"
    raise DownloadError(
        f"downloading {repo} from {source} failed: {len(wrong)} file(s) did not match the hub's listing even "
        f"after fetching them again: {'; '.join(f'{n} ({w})' for n, w in wrong.items())}. They were deleted "
        f"from {folder}; the other files stay. Run again later, or try source='{other}'.")


def _download_modelscope(repo: str, folder: Path, patterns: list[str], progress: Progress | None,
                         endpoint: str | None) -> Path:
    """What ``modelscope.snapshot_download`` does (modelscope 1.40 hands it to modelscope_hub's
    ``HubApi.download_repo``), in its steps: the listing first, then the download of that listing."""
    from modelscope_hub import HubApi
    from modelscope_hub._download import _matches_patterns

    source = "modelscope"
    revision = "master"                          # snapshot_download's default revision
    try:
        api = HubApi(endpoint=endpoint)          # endpoint None: $MODELSCOPE_ENDPOINT, else modelscope.cn
        if endpoint is None:                     # as snapshot_download: .cn or .ai, whichever has the repo
            try:
                api = HubApi(endpoint=api.resolve_endpoint_for_read(repo, repo_type="model"))
            except Exception:
                pass
        # GET /api/v1/models/<repo>/repo/files?Revision=master&Recursive=True: every file's Path,
        # Type, Size and Sha256; the same call download_repo makes, and its result is handed to
        # download_repo below so the download works from this very listing.
        files = api.legacy.list_repo_files(repo_id=repo, repo_type="model", revision=revision, recursive=True)
    except (KeyboardInterrupt, Cancelled):
        raise
    except Exception as error:
        raise _failed(repo, source, patterns, folder, error) from error
    listing = {}
    for item in files:
        name = item.get("Path") or item.get("path") or item.get("Name") or ""
        if name and (item.get("Type") or item.get("type") or "blob") != "tree":
            size = item.get("Size", item.get("size"))
            sha256 = item.get("Sha256") or item.get("sha256") or None
            listing[name] = _Listed(int(size) if size is not None else None,
                                    _Lfs(sha256) if sha256 else None)
    needed = {name: entry for name, entry in sorted(listing.items()) if _matches_patterns(name, patterns)}
    if not needed:
        raise DownloadError(f"{repo} on {source} has none of the needed files ({', '.join(patterns)}); "
                            f"it lists {len(listing)} files. Try source='huggingface'.")
    _check_free_space(repo, source, folder, needed)

    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from %s (%s) into %s: %d files", repo, source, revision, folder, len(needed))
    def fetch():
        try:
            api.download_repo(repo, "model", revision=revision, local_dir=folder, allow_patterns=patterns,
                              file_list=files,
                              progress_callbacks=[_modelscope_progress(progress)] if progress else None)
        except (KeyboardInterrupt, Cancelled):
            raise
        except Exception as error:  # every hub/network failure becomes one message that says what to do
            failed = getattr(error, "failed_files", None) or {}
            # The client retries each file and gathers the failures: a Cancel among them is
            # the reason, not a failure.
            cancelled = next((e for e in failed.values() if isinstance(e, Cancelled)), None)
            if cancelled is not None:
                raise cancelled from None
            detail = "; ".join(f"{n}: {type(e).__name__}" for n, e in sorted(failed.items()))
            raise _failed(repo, source, patterns, folder, error, detail) from error
    return _fetch_checked(repo, source, folder, needed, fetch)


@dataclass(frozen=True)
class _Lfs:
    sha256: str


@dataclass(frozen=True)
class _Listed:
    """A ModelScope listing entry in the shape ``_mismatch`` reads (huggingface_hub's RepoSibling)."""
    size: int | None
    lfs: _Lfs | None
    blob_id: str | None = None


def _local_size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _check_free_space(repo: str, source: str, folder: Path, needed: dict) -> None:
    """Refuse before any byte is written when the files still to fetch do not fit."""
    missing = {name: entry.size or 0 for name, entry in needed.items()
               if _local_size(folder / name) != entry.size}
    required = sum(missing.values())
    if not required:
        return
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if required > free:
        raise DownloadError(
            f"not downloading {repo} from {source}: its {len(missing)} file(s) still to fetch need "
            f"{required} bytes ({required / 2**30:.2f} GiB) but {existing} has only {free} bytes "
            f"({free / 2**30:.2f} GiB) free. Free some space or set {MODELS_DIR_ENV} to a folder on a larger disk; "
            f"nothing was written.")


def _mismatch(path: Path, entry) -> str | None:
    """Why the local file is not the one the hub lists (None when it is): its size always, then its
    sha256 for LFS files or its git blob id for the others."""
    size = _local_size(path)
    if size is None:
        return "missing"
    if entry.size is not None and size != entry.size:
        return f"{size} bytes, the hub lists {entry.size}"
    lfs = getattr(entry, "lfs", None)
    if lfs is not None and lfs.sha256:
        digest = hashlib.sha256()
        expected = lfs.sha256
    elif entry.blob_id:
        digest = hashlib.sha1(b"blob %d\0" % size)
        expected = entry.blob_id
    else:
        return None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        return f"{'sha256' if lfs is not None else 'git blob id'} {digest.hexdigest()[:12]}…, the hub lists {expected[:12]}…"
    return None


def _modelscope_progress(progress: Progress):
    from modelscope.hub.callback import ProgressCallback

    class Forward(ProgressCallback):
        def __init__(self, filename: str, file_size: int):
            super().__init__(filename, file_size)
            self.done = 0

        def update(self, size: int) -> None:
            self.done += size
            progress(self.filename, self.done, self.file_size)

        def end(self) -> None:
            progress(self.filename, self.file_size, self.file_size)
    return Forward


def _hf_progress(progress: Progress):
    from tqdm.auto import tqdm

    class Forward(tqdm):
        def update(self, n=1):
            result = super().update(n)
            if self.unit == "B":
                progress(str(self.desc or "file"), int(self.n), int(self.total or 0))
            return result
    return Forward
