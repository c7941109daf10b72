"""The per-document tables: each document's id (``doc_names.bin`` + ``doc_name_offsets.npy``), token offset
(``doc_offsets.npy``), UTF-8 bytes and MinHash signature. Tokenizing appends a document at a time to files
whose length is known only at the end, and readers take a block or a row at a time: no table is ever
whole in RAM."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from .manifest import load_npy, read_rows

NAMES, NAME_OFFSETS = "doc_names.bin", "doc_name_offsets.npy"
HEADER_BYTES = 128  # of a .npy header written before its shape is known (a shape of any length fits)


def npy_header(dtype, shape: tuple) -> bytes:
    """A .npy (version 1.0) header of exactly HEADER_BYTES bytes."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    body = text.ljust(HEADER_BYTES - 11) + "\n"  # after the magic string, the version and the length
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class NpyAppender:
    """A .npy file of rows of ``dtype`` and ``row_shape``, appended a block at a time, its header written
    when it is closed."""

    def __init__(self, f, dtype, row_shape: tuple = ()):
        self.f, self.dtype, self.row_shape, self.rows = f, np.dtype(dtype), tuple(row_shape), 0
        f.write(b"\0" * HEADER_BYTES)

    def append(self, rows) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1, *self.row_shape)
        self.f.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        self.f.seek(0)
        self.f.write(npy_header(self.dtype, (self.rows, *self.row_shape)))


class DocumentTable:
    """What tokenizing learns of each document, written to ``root`` as it goes (atomically: the files appear
    when the ``with`` block ends without an error). The pieces of a long document (``continued``) extend the
    document before them, so only the last document is held."""

    def __init__(self, root, num_perm: int):
        self.root, self.num_perm = Path(root), num_perm
        self.num_docs = self.num_tokens = self.num_bytes = self.empty_docs = 0
        self.last = None  # [name, tokens, bytes, signature] of the document still open

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        files = {name: self._stack.enter_context(open(self._stack.enter_context(atomic_file(self.root / name)), "wb"))
                 for name in ("doc_offsets.npy", "doc_bytes.npy", "doc_signatures.npy", NAME_OFFSETS, NAMES)}
        self.names, self.name_end = files[NAMES], 0
        self.tables = {"offsets": NpyAppender(files["doc_offsets.npy"], np.int64),
                       "bytes": NpyAppender(files["doc_bytes.npy"], np.int64),
                       "signatures": NpyAppender(files["doc_signatures.npy"], np.uint64, (self.num_perm,)),
                       "name_offsets": NpyAppender(files[NAME_OFFSETS], np.int64)}
        self.tables["offsets"].append([0])
        self.tables["name_offsets"].append([0])
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self._write_last()
            for table in self.tables.values():
                table.close()
        return self._stack.__exit__(*exc)

    def add(self, doc, num_tokens: int, size: int, signature: np.ndarray) -> int:
        """Record a piece of ``num_tokens`` tokens; returns 1 for a new document, 0 for a continued one."""
        new = not doc.continued or self.last is None
        if new:
            self._write_last()  # at the offset where this document starts
            self.last, self.num_docs = [doc.doc_id, 0, 0, signature], self.num_docs + 1
        self.last[1] += num_tokens
        self.last[2] += size
        self.last[3] = np.minimum(self.last[3], signature)
        self.num_tokens += num_tokens
        self.num_bytes += size
        return int(new)

    def _write_last(self) -> None:
        if self.last is None:
            return
        name, tokens, size, signature = self.last
        encoded = name.encode("utf-8", errors="surrogatepass")
        self.names.write(encoded)
        self.name_end += len(encoded)
        self.tables["name_offsets"].append([self.name_end])
        self.tables["offsets"].append([self.num_tokens])
        self.tables["bytes"].append([size])
        self.tables["signatures"].append(signature[None])
        self.empty_docs += tokens == 0
        self.last = None


class DocNames:
    """The documents' ids, read from ``root`` one (``names[i]``) or a block at a time (iterating)."""

    def __init__(self, root):
        self.path, self.offsets = Path(root) / NAMES, load_npy(Path(root) / NAME_OFFSETS)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, doc: int) -> str:
        if not -len(self) <= doc < len(self):
            raise IndexError(f"document {doc} is not one of the {len(self)} documents")
        lo, hi = read_rows(self.offsets, [doc % len(self), doc % len(self) + 1])
        return self._read(int(lo), int(hi)).decode("utf-8", errors="surrogatepass")

    def __iter__(self):
        for start in range(0, len(self), 65536):
            ends = read_rows(self.offsets, np.arange(start, min(start + 65536, len(self)) + 1))
            data = self._read(int(ends[0]), int(ends[-1]))
            for a, b in zip(ends[:-1] - ends[0], ends[1:] - ends[0]):
                yield data[a:b].decode("utf-8", errors="surrogatepass")

    def _read(self, lo: int, hi: int) -> bytes:
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), hi - lo, lo)
        if len(data) != hi - lo:
            raise OSError(f"{self.path}: bytes {lo}..{hi} could not be read whole")
        return data
