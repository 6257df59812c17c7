"""Read-only access to .safetensors files: single tensors, or a group in few reads.

Only the JSON headers are parsed up front. Tensors are read with ``os.preadv`` into memory
the caller owns (pageable or pinned), so the file is never mapped: resident RAM grows by what
is read, not by the file size, and the files are opened read-only and never written. A group
of tensors is read with one ``preadv`` per run of adjacent byte ranges in a file, scattered
straight into the caller's buffers. Closing a file waits for the reads in flight on it.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .casting import SCALE_SUFFIX

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):
    _IOV_MAX = 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a file."""

    file: "SafetensorsFile"
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One .safetensors file: its header, and reads of single tensors by key."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"weights file not found: {self.path}")
        self._fd: int | None = None
        self._fd_lock = threading.Lock()
        self._idle = threading.Condition(self._fd_lock)
        self._reading = 0  # reads in flight: close() waits for them
        self.tensors = self._read_header()

    def _read_header(self) -> dict[str, TensorInfo]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise ValueError(f"{self.path}: corrupt safetensors header (length {header_len}, file {size} bytes)")
            try:
                header = json.loads(handle.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{self.path}: corrupt safetensors header ({error})") from None
        data_start = 8 + header_len
        tensors = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                begin, end = entry["data_offsets"]
                shape = tuple(int(d) for d in entry["shape"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: corrupt or unsupported header entry for {key!r}: {entry!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize:
                raise ValueError(f"{self.path}: tensor {key!r} has {end - begin} bytes for shape {shape} {dtype}")
            if data_start + end > size:
                raise ValueError(f"{self.path}: truncated; tensor {key!r} ends at byte {data_start + end} "
                                 f"but the file has {size}")
            tensors[key] = TensorInfo(self, key, dtype, shape, data_start + begin, end - begin)
        return tensors

    def read(self, key: str, *, pin_memory: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key`` as a CPU tensor in its file dtype: new (pinned if asked), or a
        view into ``out``, a uint8 buffer of at least its size that the caller reuses."""
        info = self.tensors[key]
        if out is not None:
            buffer = out[:info.nbytes]
        else:
            buffer = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        if info.nbytes:
            self.read_run([memoryview(buffer.numpy())], info.offset, info.nbytes, info.key)
        return buffer.view(info.dtype).reshape(info.shape)

    def read_run(self, views: list[memoryview], offset: int, want: int, what: str) -> int:
        """Fill ``views`` (byte buffers, ``want`` bytes in all) from the file's bytes starting
        at ``offset``, in as few ``preadv`` calls as the system allows; returns how many."""
        with self._fd_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            fd = self._fd
            self._reading += 1
        calls = 0
        try:
            if len(views) > _IOV_MAX:
                want = -1  # more buffers than one call takes: count bytes chunk by chunk
            start = 0
            while start < len(views):
                chunk = views[start:start + _IOV_MAX]
                if want < 0 or start:
                    want = sum([v.nbytes for v in chunk])
                got = os.preadv(fd, chunk, offset)
                calls += 1
                if got <= 0:
                    raise ValueError(f"{self.path}: unexpected end of file while reading {what!r}")
                offset += got
                if got == want:
                    start += len(chunk)
                    want = -1
                    continue
                # A short read: skip what arrived and go on from the first unfilled byte.
                for index, view in enumerate(chunk):
                    if got < view.nbytes:
                        views = views[:start + index] + [view[got:]] + views[start + index + 1:]
                        start += index
                        break
                    got -= view.nbytes
                want = -1
        finally:
            with self._fd_lock:
                self._reading -= 1
                if not self._reading:
                    self._idle.notify_all()
        return calls

    def close(self) -> None:
        """Close the descriptor once no read is in flight on it (a later read reopens it)."""
        with self._fd_lock:
            while self._reading:
                self._idle.wait()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class WeightSource:
    """A model's weights as a read-only key -> tensor map over one or more .safetensors files.

    ``weights`` may be a file, a list of files, or a folder; a folder with a
    ``*.safetensors.index.json`` uses the files the index names, otherwise every
    ``*.safetensors`` file in it. Keys must match the model's state_dict.

    A scaled fp8 checkpoint (``python -m pipelines.convert``) stores beside each fp8 tensor
    ``key`` a float32 scalar ``key + ".fp8_scale"``: those are not the model's tensors, and
    ``scales()`` gives them as numbers.
    """

    def __init__(self, weights: str | os.PathLike | Sequence[str | os.PathLike]):
        self.files = [SafetensorsFile(p) for p in _resolve(weights)]
        self.tensors: dict[str, TensorInfo] = {}
        self.scale_infos: dict[str, TensorInfo] = {}  # weight key -> its scale's tensor
        for file in self.files:
            for key, info in file.tensors.items():
                scale = key.endswith(SCALE_SUFFIX)
                name = key[:-len(SCALE_SUFFIX)] if scale else key
                table = self.scale_infos if scale else self.tensors
                if name in table:
                    raise ValueError(f"key {key!r} is in both {table[name].file.path} and {file.path}")
                if scale and (info.shape not in ((), (1,)) or info.dtype != torch.float32):
                    raise ValueError(f"{file.path}: {key!r} should be a float32 scalar, is {info.dtype} "
                                     f"of shape {info.shape}")
                table[name] = info
        for name, info in self.scale_infos.items():
            weight = self.tensors.get(name)
            if weight is None or weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise ValueError(f"{info.file.path}: {info.key!r} scales "
                                 + ("no tensor" if weight is None else f"a {weight.dtype} tensor, not an fp8 one"))
        self._scales: dict[str, float] | None = None
        self.bytes_read = 0
        self.preadv_calls = 0
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def read(self, key: str, *, pin_memory: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor the model calls ``key`` (see ``SafetensorsFile.read``)."""
        return self.read_info(self.tensors[key], pin_memory=pin_memory, out=out)

    def read_info(self, info: TensorInfo, *, pin_memory: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = info.file.read(info.key, pin_memory=pin_memory, out=out)
        with self._lock:
            self.bytes_read += info.nbytes
            self.preadv_calls += 1 if info.nbytes else 0
        return tensor

    def read_into(self, targets: Sequence[tuple[TensorInfo, torch.Tensor]]) -> int:
        """Read many tensors straight into the caller's buffers (uint8 CPU tensors of each
        tensor's size): one ``preadv`` per run of tensors adjacent in a file. Returns the
        number of ``preadv`` calls."""
        for info, buffer in targets:
            if buffer.nbytes != info.nbytes:
                raise ValueError(f"read buffer for {info.key!r} has {buffer.nbytes} bytes, the tensor {info.nbytes}")
        views = [memoryview(buffer.numpy()) for _, buffer in targets]
        return self.read_runs([(file, offset, nbytes, [views[i] for i in indices], key)
                               for file, offset, nbytes, indices, key in plan_runs([info for info, _ in targets])])

    def read_runs(self, runs: Sequence[tuple["SafetensorsFile", int, int, list[memoryview], str]]) -> int:
        """Read planned runs: (file, offset, bytes, buffers, name for errors) each. Returns the
        number of ``preadv`` calls."""
        calls = total = 0
        for file, offset, nbytes, views, what in runs:
            calls += file.read_run(views, offset, nbytes, what)
            total += nbytes
        with self._lock:
            self.bytes_read += total
            self.preadv_calls += calls
        return calls

    def scales(self) -> dict[str, float]:
        """Each scaled fp8 tensor's scale, by the model's key (read once, one ``preadv`` per
        run of adjacent scales: a converted file keeps them together)."""
        if self._scales is None:
            keys = list(self.scale_infos)
            buffers = [torch.empty(self.scale_infos[k].nbytes, dtype=torch.uint8) for k in keys]
            if keys:
                self.read_into([(self.scale_infos[k], b) for k, b in zip(keys, buffers)])
            self._scales = {k: float(b.view(torch.float32)[0]) for k, b in zip(keys, buffers)}
        return self._scales

    def rename_keys(self, rename: Callable[[str], str]) -> None:
        """Address tensors by the model's names: ``rename(file_key)`` gives the key the model
        uses (checkpoints saved by an older library version name some modules differently).
        The files are untouched; two file keys that map to one name are an error."""
        renamed: dict[str, TensorInfo] = {}
        for key, info in self.tensors.items():
            new_key = rename(key)
            if new_key in renamed:
                raise ValueError(f"{renamed[new_key].key!r} and {key!r} in {self.describe()} both map to {new_key!r}")
            renamed[new_key] = info
        self.tensors = renamed
        self.scale_infos = {rename(key): info for key, info in self.scale_infos.items()}
        self._scales = None

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def describe(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0].path)
        return f"{len(self.files)} files in {self.files[0].path.parent}"

    def close(self) -> None:
        for file in self.files:
            file.close()


def plan_runs(infos: Sequence[TensorInfo]) -> list[tuple["SafetensorsFile", int, int, list[int], str]]:
    """(file, offset, bytes, indices into ``infos``, first key) per run of tensors whose byte
    ranges are adjacent in one file: what one ``preadv`` can read."""
    order = sorted((i for i, info in enumerate(infos) if info.nbytes), key=lambda i: (id(infos[i].file), infos[i].offset))
    runs: list = []
    end = None
    for i in order:
        info = infos[i]
        if runs and runs[-1][0] is info.file and end == info.offset:
            runs[-1][2] += info.nbytes
            runs[-1][3].append(i)
        else:
            runs.append([info.file, info.offset, info.nbytes, [i], info.key])
        end = info.offset + info.nbytes
    return [tuple(run) for run in runs]


def _resolve(weights) -> list[Path]:
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if path.is_dir():
            return _files_in_folder(path)
        if not path.exists():
            raise FileNotFoundError(f"weights not found: {path}")
        return [_check_format(path)]
    if isinstance(weights, Iterable):
        paths = [Path(p) for p in weights]
        if not paths:
            raise ValueError("weights: empty list of files")
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"weights file not found: {path}")
            _check_format(path)
        return paths
    raise ValueError(f"weights must be a path, a list of paths or a folder, got {type(weights).__name__}")


def _check_format(path: Path) -> Path:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors weights are read (pickle formats such as "
                         f".bin/.pt/.ckpt can run code when loaded)")
    return path


def _files_in_folder(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{folder}: more than one *.safetensors.index.json: {[p.name for p in indexes]}")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"{indexes[0]}: not a valid index file ({error})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{indexes[0]} names shard(s) that are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    return files
