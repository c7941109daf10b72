"""Leakage filter (RETRO, section 2.6 / appendix A.2): MinHash signatures over word 13-gram shingles
(``h_i(x) = (a_i x + b_i) mod (2^61 - 1)``); LSH banding finds candidate pairs (so the cost grows with
the number of documents, not its square), each checked on the full signature; training documents whose
estimated Jaccard with an evaluation document is >= the threshold are removed."""
from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from .manifest import read_rows

NGRAM = 13
NUM_PERM = 128
BANDS = 32          # 32 bands of 4 rows: a pair with J = 0.8 becomes a candidate with probability ~1 - 1e-7
THRESHOLD = 0.8
_PRIME = np.uint64((1 << 61) - 1)
_EMPTY = np.uint64((1 << 61) - 1)


def shingle_hashes(text: str, ngram: int = NGRAM) -> np.ndarray:
    """32-bit hashes of the word ``ngram``-grams of ``text`` (one shingle if it is shorter)."""
    words = text.lower().split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    grams = {" ".join(words[i:i + ngram]) for i in range(max(1, len(words) - ngram + 1))}
    # A stable hash (Python's hash() of str changes between processes).
    return np.fromiter((int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") for g in grams),
                       dtype=np.uint64)


class MinHasher:
    def __init__(self, num_perm: int = NUM_PERM, seed: int = 0, ngram: int = NGRAM):
        if num_perm % BANDS:
            raise ValueError(f"num_perm: expected a multiple of {BANDS}, got {num_perm}")
        self.num_perm, self.ngram, rng = num_perm, ngram, np.random.default_rng(seed)
        self.a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint64 MinHash signature; all entries 2^61-1 for a text with no words."""
        x = shingle_hashes(text, self.ngram)
        sig = np.full(self.num_perm, _EMPTY, dtype=np.uint64)
        for start in range(0, x.size, 4096):  # bounded memory for very long documents
            block = x[start:start + 4096, None]
            # a < 2^31 and x < 2^32 so a*x + b < 2^64: no overflow before the modulus.
            sig = np.minimum(sig, ((self.a[None, :] * block + self.b[None, :]) % _PRIME).min(axis=0))
        return sig


def find_leaked(signatures: np.ndarray, eval_docs, threshold: float = THRESHOLD,
                block: int = 4096) -> dict[int, tuple[int, float]]:
    """Which non-evaluation documents are near-duplicates of an evaluation document: {document: (the
    evaluation document, Jaccard estimate)}.

    signatures: (D, num_perm) uint64 (memory-mapped: read a block at a time); eval_docs: the evaluation
    documents' rows, whose bands are the only ones held in RAM."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a Jaccard similarity in (0, 1], got {threshold}")
    num_docs, num_perm = signatures.shape
    rows, eval_docs = num_perm // BANDS, np.unique(np.asarray(eval_docs, dtype=np.int64))
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(BANDS)]
    for lo in range(0, eval_docs.size, block):
        ids = eval_docs[lo:lo + block]
        for doc, sig in zip(ids, read_rows(signatures, ids)):
            if not (sig == _EMPTY).all():
                for bucket, key in zip(buckets, _bands(sig, rows)):
                    bucket[key].append(int(doc))
    matches: dict[int, tuple[int, float]] = {}
    for lo in range(0, num_docs, block):
        docs = np.arange(lo, min(lo + block, num_docs))
        for doc, sig, is_eval in zip(docs, read_rows(signatures, docs), np.isin(docs, eval_docs)):
            if is_eval or (sig == _EMPTY).all():
                continue
            candidates = sorted(set().union(*(bucket.get(key, ()) for bucket, key in zip(buckets, _bands(sig, rows)))))
            scores = np.mean(read_rows(signatures, candidates) == sig, axis=1) if candidates else []
            if len(scores) and scores.max() >= threshold:
                matches[int(doc)] = (candidates[int(np.argmax(scores))], float(scores.max()))
    return matches


def _bands(signature: np.ndarray, rows: int):
    """The LSH keys of a signature: its BANDS bands of ``rows`` values, as bytes."""
    return (signature[band * rows:(band + 1) * rows].tobytes() for band in range(BANDS))
