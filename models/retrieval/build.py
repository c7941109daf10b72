"""Building a retrieval database in resumable stages (``manifest.STAGES``, each a function in `STAGE_STEPS`);
its files are listed in docs/retrieval.md. Documents start on chunk boundaries in the streams, so a stream
chunk of a retrieval document is exactly a database chunk: its key is reused, never embedded twice."""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import outdir
from ..runtime import progress_bar
from . import build_index, build_text
from . import engine as engine_mod
from . import corpus as corpus_mod
from .config import DEFAULT_RUNTIME, check_value, config_differences, make_config
from .embed import embedding_dim
from .manifest import (MANIFEST_NAME, PART_FILE, STAGES, DatabaseError, Manifest, database_file_patterns,
                       expected_files, load_npy, sha256_file, temporary_patterns)
from .tokenizer import load_tokenizer

# What each stage of manifest.STAGES runs: a function of the Builder, returning what the manifest records.
STAGE_STEPS = {
    "tokenizer": build_text.train_or_copy_tokenizer,
    "tokenize": build_text.tokenize_corpus,
    "split": build_text.hold_out_documents,
    "chunk": build_text.cut_chunks_and_streams,
    "embed": build_index.db_embed,
    "train_index": build_index.db_train_index,
    "add": build_index.db_add,
    "query": build_index.db_query,
}


class Builder:
    """One build of a database: its folder, configuration, runtime options (engine included) and manifest."""

    def __init__(self, out: str | os.PathLike, config: dict[str, Any], runtime: dict[str, Any],
                 tokenizer_path: str | None, log: Callable[[str], None]):
        self.root = Path(out)
        self.config = config
        self.runtime = runtime
        self.tokenizer_path = tokenizer_path
        self.log = log
        self.corpus_path = None if config["corpus"] == corpus_mod.DEFAULT_CORPUS else config["corpus"]
        self.exclude = [self.root]  # a database inside its own corpus folder never reads itself
        self.manifest: Manifest | None = None

    # --- what the stages read ------------------------------------------------------
    def corpus(self, **kw):
        return corpus_mod.iter_corpus(self.corpus_path, exclude=self.exclude, **kw)

    @property
    def m(self) -> int:
        return self.config["chunk_size"]

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.root / "tokenizer.json")

    def npy(self, name: str) -> np.ndarray:
        return load_npy(self.root / name)

    @property
    def engine(self) -> dict:
        """The keyword arguments that run a stage's units on the build's engine."""
        return {"engine": self.runtime["engine"], "workers": self.runtime["workers"]}

    def progress(self, **kw):
        return progress_bar(enabled=self.runtime["progress"], **kw)

    # --- the manifest --------------------------------------------------------------
    def open_or_create(self, overwrite: bool, inputs: dict) -> None:
        """Resume the database in ``root``, or start one (``root`` is claimed and locked by the caller).

        ``inputs``: the corpus fingerprint now. A database built with another
        configuration or from a corpus that has changed since is refused, or
        with ``overwrite`` rebuilt: only the files a database names are deleted.
        """
        manifest, problem = self._existing(inputs)
        if manifest is not None:
            self.manifest = manifest
            return
        if problem is not None and not overwrite:
            raise DatabaseError(problem if "--overwrite" in problem else f"{problem}; pass --overwrite to rebuild it")
        removed = outdir.remove_temporaries(self.root, database_file_patterns(), inside=[PART_FILE])
        if removed:
            self.log(f"overwrite: removed the old database's {len(removed)} files (and nothing else)")
        self.manifest = Manifest.new(self.root, self.config, inputs)
        self.manifest.save()

    def _existing(self, inputs: dict) -> tuple[Manifest | None, str | None]:
        """(the manifest of the database in ``root`` that this build resumes, None) or (None, why there is
        none to resume: None for an empty folder)."""
        root = self.root
        if not (root / MANIFEST_NAME).is_file():
            if any(p.fullmatch(e) for e in outdir.user_entries(root) for p in database_file_patterns()):
                return None, (f"{str(root)!r} is not empty, and is not a retrieval database: it holds a database's "
                              f"files but no {MANIFEST_NAME}")
            return None, None
        try:
            manifest = Manifest.load(root)
        except DatabaseError as e:
            return None, str(e)
        diff = config_differences(manifest.config, self.config)
        if diff:
            return None, (f"{str(root)!r} holds a database built with a different configuration:\n  "
                          + "\n  ".join(diff) + "\nuse another --out directory, or --overwrite to rebuild it")
        changes = corpus_mod.fingerprint_changes(manifest.inputs, inputs)
        if changes:
            return None, (f"the corpus {self.config['corpus']!r} changed since the database in {str(root)!r} was "
                          f"built ({'; '.join(changes)}); rebuild it with --overwrite, or build into another --out")
        return manifest, None

    def stages_to_run(self, stop_after: str | None) -> list[str]:
        """From the first stage that did not finish (or whose files changed since) to ``stop_after``;
        those stages are forgotten by the manifest."""
        start = self._first_unfinished()
        if start is None:
            self.log(f"{str(self.root)!r}: every stage already finished; nothing to do")
            return []
        self.manifest.forget_from(start)
        last = STAGES.index(stop_after) if stop_after is not None else len(STAGES) - 1
        return list(STAGES[STAGES.index(start):last + 1])

    def _first_unfinished(self) -> str | None:
        for stage in STAGES:
            if not self.manifest.finished(stage):
                return stage
            problems = self.manifest.check_stage(stage, full=False)
            if problems:
                self.log(f"stage {stage}: files changed since it finished ({'; '.join(problems)}); redoing it")
                return stage
        return None

    def run_stage(self, stage: str) -> None:
        """Run ``stage`` and record it (its files' checksums, its info, its seconds) in the manifest."""
        t0 = time.perf_counter()
        info = dict(STAGE_STEPS[stage](self) or {})
        info["seconds"] = round(time.perf_counter() - t0, 3)
        self.manifest.record(stage, expected_files(stage, self.config["index_type"]), info)
        self.log(f"stage {stage} finished in {info['seconds']:.1f}s")


def build_database(
    out: str | os.PathLike,
    corpus: str | os.PathLike | None = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    stop_after: str | None = None,
    log: Callable[[str], None] | None = None,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    runtime: dict[str, Any] | None = None,
    **config_overrides,
) -> Path:
    """Build (or resume building) a retrieval database in ``out``; returns its path.

    ``corpus``: a text file, folder or JSONL file; None for Python's documentation.
    ``tokenizer``: a tokenizer.json to use instead of training one.
    ``engine``: "local" (this process) or "ray" (the heavy stages as Ray work, at most ``workers``
    units at a time, on the cluster at ``ray_address`` / RAY_ADDRESS, else a local one); both make the
    same database.
    ``config_overrides``: keys of ``DEFAULT_CONFIG`` (vocab_size, chunk_size, index_type, k, embeddings, ...).
    ``runtime``: keys of ``DEFAULT_RUNTIME`` (embed_batch_size, embed_part_size, device, progress).
    ``stop_after``: finish this stage, then return (the rest is done by a later call).
    """
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after: expected one of {STAGES}, got {stop_after!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if tokenizer is not None:
        load_tokenizer(tokenizer)
    engine_mod.check_engine(engine)
    check_value("workers", workers)
    config = make_config(corpus=corpus_mod.DEFAULT_CORPUS if corpus is None else str(Path(corpus).resolve()),
                         tokenizer=None if tokenizer is None else sha256_file(tokenizer), **config_overrides)
    if config["embeddings"] is not None:
        config["embeddings"] = str(Path(config["embeddings"]).resolve())
        build_index.check_embeddings(config["embeddings"], embedding_dim(config["embedder"]))
    runtime = {**DEFAULT_RUNTIME, **(runtime or {}), "engine": engine, "workers": workers}
    for name in ("embed_batch_size", "embed_part_size"):
        check_value(name, runtime[name])
    builder = Builder(out, config, runtime, None if tokenizer is None else str(tokenizer), log)
    # the folder is the build's: new, empty or a database's; locked
    outdir.check_folder(out, "retrieval-db")
    inputs = corpus_mod.fingerprint(builder.corpus_path, builder.exclude)
    if engine == "ray":
        engine_mod.connect(ray_address)
    with outdir.claimed(out, "retrieval-db", temporaries=temporary_patterns()):
        builder.open_or_create(overwrite, inputs)
        for stage in builder.stages_to_run(stop_after):
            builder.run_stage(stage)
    return Path(out)
