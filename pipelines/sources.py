"""Where model files come from: ModelScope (default), the Hugging Face Hub, or a local folder.

A registry model is downloaded once into ``models_dir/<key>``, limited to the files its
family needs (safetensors only), with progress reported per file and resumption after an
interruption (both hubs keep partial files and continue them). Afterwards every needed file
is checked, headers included, so a truncated or missing shard is named before loading.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

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
    """Fetch ``family``'s needed files into ``folder`` (resuming partial files)."""
    patterns = family.allow_patterns()
    repo = family.modelscope_id if source == "modelscope" else family.huggingface_id
    if repo is None:
        raise DownloadError(f"{family.key} has no {source} id; try another source")
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from %s into %s (files: %s)", repo, source, folder, ", ".join(patterns))
    try:
        if source == "modelscope":
            from modelscope import snapshot_download
            snapshot_download(repo, local_dir=str(folder), allow_patterns=patterns,
                              progress_callbacks=[_modelscope_progress(progress)] if progress else None,
                              endpoint=endpoint)
        else:
            from huggingface_hub import snapshot_download
            snapshot_download(repo, local_dir=folder, allow_patterns=patterns, endpoint=endpoint,
                              tqdm_class=_hf_progress(progress) if progress else None)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # every hub/network failure becomes one message that says what to do
        raise DownloadError(
            f"downloading {repo} from {source} failed: {type(error).__name__}: {error}. Needed files: "
            f"{', '.join(patterns)}. Partial files stay in {folder}; run again to resume, or try "
            f"source={'huggingface' if source == 'modelscope' else 'modelscope'}.") from error
    return folder


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
