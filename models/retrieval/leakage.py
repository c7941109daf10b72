"""Leakage filter (RETRO, section 2.6 / appendix A.2): MinHash signatures over word 13-gram shingles
(``h_i(x) = (a_i x + b_i) mod (2^61 - 1)``); LSH banding finds candidate pairs (so the cost grows with
the number of documents, not its square), each checked on the full signature; training documents whose
estimated Jaccard with an evaluation document is >= the threshold are removed."""
from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

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


def find_leaked(
    signatures: np.ndarray, is_eval: np.ndarray, threshold: float = THRESHOLD
) -> tuple[np.ndarray, dict[int, tuple[int, float]]]:
    """Which non-evaluation documents are near-duplicates of an evaluation document.

    signatures: (D, num_perm) uint64; is_eval: (D,) bool.
    Returns a (D,) bool mask of leaked documents and, for each, (the eval doc, Jaccard estimate).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a Jaccard similarity in (0, 1], got {threshold}")
    num_docs, num_perm = signatures.shape
    rows = num_perm // BANDS
    empty = np.all(signatures == _EMPTY, axis=1)
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(BANDS)]
    for doc in np.flatnonzero(is_eval & ~empty):
        for band in range(BANDS):
            buckets[band][signatures[doc, band * rows:(band + 1) * rows].tobytes()].append(int(doc))
    leaked = np.zeros(num_docs, dtype=bool)
    matches: dict[int, tuple[int, float]] = {}
    for doc in np.flatnonzero(~is_eval & ~empty):
        candidates = set()
        for band in range(BANDS):
            candidates.update(buckets[band].get(signatures[doc, band * rows:(band + 1) * rows].tobytes(), ()))
        best = max(((other, float(np.mean(signatures[doc] == signatures[other]))) for other in candidates),
                   key=lambda match: match[1], default=(-1, 0.0))
        if best[1] >= threshold:
            leaked[doc] = True
            matches[int(doc)] = best
    return leaked, matches
