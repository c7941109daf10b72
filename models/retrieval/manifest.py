"""``manifest.json``, a database's root of trust, and its files' names.

Every stage writes its files atomically, then records itself with each file's sha256 and size; a killed
build resumes after its last finished stage. The manifest is checked before it is trusted (kind, format
version, a sha256 of its content, exactly the files each stage makes); docs/retrieval.md says more.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import TEMP_SUFFIX, atomic_file, write_json_atomic

FORMAT_VERSION = 4  # 2: kind and checksum; 3: one merged on-disk index; 4: document names in a binary table.
# Older databases are rebuilt (--overwrite)
KIND = "retro_kernels/retrieval-db"
MANIFEST_NAME = "manifest.json"

SPLITS = {"train": 0, "eval": 1, "removed": 2}  # doc_split.npy's values
STREAM_SPLITS = ("train", "eval")  # the splits with a token stream (stream_<split>.bin) and a neighbour table

# The build stages, in order (docs/retrieval.md's table). A stage is redone (with every later one) when it
# is missing from the manifest or one of its files fails its check.
STAGES = ("tokenizer", "tokenize", "split", "chunk", "embed", "train_index", "add", "query")


class DatabaseError(ValueError):
    """A retrieval database is missing, incomplete, corrupted, or does not match what was expected."""


SCANN_FOLDER = "scann"
SCANN_FILES = ["ah_codebook.pb", "datapoint_to_token.npy", "dataset.npy", "hashed_dataset.npy", "scann_assets.pbtxt",
               "scann_config.pb", "serialized_partitioner.pb"]


def expected_files(stage: str, index_type: str = "auto") -> list[str]:
    """The files a finished stage makes (ScaNN's: no trained index, a folder for the index)."""
    if index_type == "scann" and stage in ("train_index", "add"):
        return [] if stage == "train_index" else [f"{SCANN_FOLDER}/{f}" for f in SCANN_FILES]
    splits = STREAM_SPLITS
    return {
        "tokenizer": ["tokenizer.json"],
        "tokenize": ["tokens.bin", "doc_offsets.npy", "doc_bytes.npy", "doc_signatures.npy", "doc_names.bin",
                     "doc_name_offsets.npy"],
        "split": ["doc_split.npy"],
        "chunk": ["chunk_doc.npy", "chunk_start.npy"]
                 + [f"stream_{s}{x}" for s in splits for x in (".bin", "_chunk_doc.npy", "_db_chunk.npy")],
        "embed": ["embeddings.npy"],
        "train_index": ["index_trained.faiss"],
        "add": ["index.faiss", "index.ivfdata"],
        "query": [f"neighbours_{s}.npy" for s in splits],
    }[stage]


def _file_names() -> list[str]:
    """Regular expressions of the names of the files a build makes in the database folder."""
    fixed = [MANIFEST_NAME, SCANN_FOLDER] + [f for stage in STAGES for f in expected_files(stage)]
    return [re.escape(f) for f in fixed + ["build_stats.jsonl"]]


PARTS_FOLDER = re.compile(r"(?:embed|add|query)_parts_[0-9a-f]{12}")  # the stages' resumable units
PART_FILE = re.compile(rf"part_\d{{6}}\.(?:npy|faiss)(?:{TEMP_SUFFIX})?")


def database_file_patterns() -> list[re.Pattern]:
    """Every name a build makes in the database folder: its files, their temporaries, the parts folder."""
    return [re.compile(f"(?:{n})(?:{TEMP_SUFFIX})?") for n in _file_names()] + [PARTS_FOLDER]


def temporary_patterns() -> list[re.Pattern]:
    """The temporaries a killed build may leave (of files the database names; never a finished file)."""
    return [re.compile(f"(?:{n}){TEMP_SUFFIX}") for n in _file_names()]


def content_checksum(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for data in iter(lambda: f.read(block), b""):
            h.update(data)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_save_npy(final: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_file(final) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Load a .npy file without ever unpickling (object arrays are refused)."""
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def read_rows(array: np.ndarray, ids) -> np.ndarray:
    """``array[ids]`` (rows of the first axis). From a memory-mapped .npy (`load_npy`) the rows are read with
    positional reads, a run of consecutive rows at a time: a mapped file's touched pages count towards the
    process's resident memory, so indexing the map would keep resident every page ever read."""
    ids = np.asarray(ids, dtype=np.int64)
    if not (isinstance(array.base, mmap.mmap) and array.flags.c_contiguous and ids.size):
        return np.asarray(array[ids])
    rows, back = np.unique(ids, return_inverse=True)
    if rows[0] < 0 or rows[-1] >= array.shape[0]:
        raise IndexError(f"row ids must lie in [0, {array.shape[0]}), got {rows[0]}..{rows[-1]}")
    out = np.empty((rows.size, *array.shape[1:]), array.dtype)
    size, flat = out[:1].nbytes, out.reshape(rows.size, -1).view(np.uint8)
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    with open(array.filename, "rb") as f:
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, rows.size]):
            if os.preadv(f.fileno(), [flat[a:b]], array.offset + int(rows[a]) * size) != (b - a) * size:
                raise OSError(f"{array.filename}: rows {rows[a]}..{rows[b - 1]} could not be read whole")
    return out[back.reshape(ids.shape)]


def release_pages(*arrays: np.ndarray) -> None:
    """Unmap the pages of memory-mapped arrays (`load_npy`) this process has touched; they stay in the page
    cache, written pages included, and are mapped again when next read. Call it between blocks of work that
    index a map, so the process's resident memory holds a block's pages, not every page ever read."""
    for array in arrays:
        if isinstance(getattr(array, "base", None), mmap.mmap):
            array.base.madvise(mmap.MADV_DONTNEED)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "faiss", "tokenizers", "transformers"):
        with contextlib.suppress(Exception):  # an optional library that is not installed
            versions[name] = getattr(__import__(name), "__version__", "unknown")
    return versions


class Manifest:
    """``manifest.json``: format version, build config, library versions, finished stages.

    ``stages[name] = {"files": {relpath: {"sha256", "size"}}, "info": {...}, "finished": time}``.
    """

    def __init__(self, root: str | os.PathLike, data: dict[str, Any]):
        self.root = Path(root)
        self.data = data

    # --- reading -----------------------------------------------------------
    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        path = Path(root) / MANIFEST_NAME
        if not Path(root).is_dir():
            raise DatabaseError(f"retrieval database directory {str(root)!r} does not exist")
        if not path.is_file():
            raise DatabaseError(
                f"{str(root)!r} is not a retrieval database: it has no {MANIFEST_NAME} "
                "(build one with `python -m models build-db --out DIR`)"
            )
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatabaseError(f"{path} is corrupted (not valid JSON: {e})") from None
        if not isinstance(data, dict) or "format_version" not in data or "config" not in data:
            raise DatabaseError(f"{path} is not a retrieval database manifest (no format_version/config)")
        if data["format_version"] != FORMAT_VERSION:
            raise DatabaseError(
                f"{path} has format version {data['format_version']}, this code reads version {FORMAT_VERSION}; "
                "rebuild the database (build-db --overwrite)")
        if data.get("kind") != KIND:
            raise DatabaseError(f"{path} is not a retrieval database manifest (kind {data.get('kind')!r})")
        if data.get("checksum") != content_checksum(data):
            raise DatabaseError(f"{path} is corrupted: its content does not match its checksum (edited by hand, or "
                                "damaged); rebuild the database (build-db --overwrite)")
        if not isinstance(data["config"], dict) or not isinstance(data.get("stages"), dict):
            raise DatabaseError(f"{path} is corrupted (config and stages must be JSON objects)")
        for stage, entry in data["stages"].items():
            if stage not in STAGES or not isinstance(entry, dict) or not isinstance(entry.get("files"), dict) \
                    or not isinstance(entry.get("info", {}), dict):
                raise DatabaseError(f"{path} is corrupted (stage {stage!r} is not a recorded stage)")
        return cls(root, data)

    @classmethod
    def new(cls, root: str | os.PathLike, config: dict[str, Any], inputs: dict[str, Any]) -> "Manifest":
        """``inputs``: the fingerprint of what the database is built from (its corpus)."""
        return cls(root, {"kind": KIND, "format_version": FORMAT_VERSION, "config": config, "inputs": inputs,
                          "versions": library_versions(), "created": _now(), "stages": {}})

    @property
    def config(self) -> dict[str, Any]:
        return self.data["config"]

    @property
    def stages(self) -> dict[str, Any]:
        return self.data["stages"]

    def info(self, stage: str) -> dict[str, Any]:
        return self.stages[stage].get("info", {})

    @property
    def inputs(self) -> dict[str, Any]:
        return self.data.get("inputs", {})

    def tokens(self) -> np.memmap:
        """``tokens.bin``, memory-mapped, as the tokenize stage recorded it."""
        info = self.info("tokenize")
        return np.memmap(self.root / "tokens.bin", dtype=np.dtype(info["dtype"]), mode="r", shape=(info["num_tokens"],))

    def finished(self, stage: str) -> bool:
        return stage in self.stages

    def check_stage(self, stage: str, full: bool) -> list[str]:
        """Problems with a finished stage's files: not the files it makes, missing, wrong size,
        or (``full``) wrong sha256."""
        files = self.stages[stage]["files"]
        expected = expected_files(stage, self.config.get("index_type", "auto"))
        if sorted(files) != sorted(expected):
            return [f"it records the files {sorted(files)}, but the stage makes {sorted(expected)}"]
        problems = []
        for rel, meta in files.items():
            path = self.root / rel
            if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) \
                    or not isinstance(meta.get("sha256"), str):
                problems.append(f"{rel}: no size and sha256 recorded")
            elif not path.is_file():
                problems.append(f"{rel}: missing")
            elif path.stat().st_size != meta["size"]:
                problems.append(f"{rel}: size {path.stat().st_size} != recorded {meta['size']}")
            elif full and sha256_file(path) != meta["sha256"]:
                problems.append(f"{rel}: sha256 differs from the one recorded")
        return problems

    # --- writing -----------------------------------------------------------
    def save(self) -> None:
        self.data["checksum"] = content_checksum(self.data)
        write_json_atomic(self.root / MANIFEST_NAME, self.data)

    def record(self, stage: str, files: list[str], info: dict[str, Any] | None = None) -> None:
        """Record ``stage`` as finished, with checksums of ``files`` (relative paths), and save."""
        entry = {"files": {}, "info": info or {}, "finished": _now()}
        for rel in files:
            path = self.root / rel
            entry["files"][rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        self.stages[stage] = entry
        self.data["versions"] = library_versions()
        self.save()

    def forget_from(self, stage: str) -> None:
        """Drop ``stage`` and every later stage from the manifest (they will be redone)."""
        later = [name for name in STAGES[STAGES.index(stage):] if name in self.stages]
        for name in later:
            del self.stages[name]
        if later:
            self.save()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
