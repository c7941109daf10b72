"""RETRO's retrieval database: from raw text to neighbour tokens.

Build (command line; resumable, re-run the same command after an interruption):

    python -m models build-db --out db/                    # Python's own docs, no download
    python -m models build-db --corpus texts/ --out db/ --index-type ivfpq
    python -m models build-db --engine ray ...            # every heavy stage as Ray work
    python -m models query --db db/ "how do I sort a list"

Build (Python):

    from models.retrieval import build_database
    build_database("db", corpus=None, eval_fraction=0.05, chunk_size=64, k=4)

Use (the API the model uses):

    from models.retrieval import RetrievalDatabase
    db = RetrievalDatabase.open("db", expect_config={"chunk_size": 64})  # validated: DatabaseError if not
    db.tokenizer            # tokenizers.Tokenizer (byte-level BPE); db.vocab_size, db.eos_id, db.pad_id
    db.chunk_size           # m;  db.neighbour_len == R == 2m
    db.fingerprint          # store it in checkpoints; compare on load
    db.encode(text) -> (n,) int64;  db.decode(ids) -> str

    # Training / evaluation data, with precomputed neighbours (built by the "query" stage):
    train = db.stream("train")   # TokenStream; same-document neighbours excluded
    evals = db.stream("eval")    # held-out documents (not in the index unless --index-eval-docs)
    n = train.num_sequences(seq_len)             # seq_len: a multiple of m
    item = train.sequence(i, seq_len, k=None)    # dict of numpy arrays (train.batch(indices, ...) stacks them):
    #   tokens (seq_len+1,) int64   inputs tokens[:-1], targets tokens[1:]; pad_id = ignore
    #   neighbours (L, K, R) int64, neighbour_mask (L, K, R) bool  (L = seq_len // m)
    #   chunk_doc (L,) document index of each chunk
    evals.num_bytes              # UTF-8 bytes of the eval documents (bits per byte)

    # On the fly (generation, new text):
    ids, mask = db.neighbours_for_tokens(token_ids, k, exclude_doc=None)   # (L, K, R) each
    table = db.precompute_neighbours(tokens, doc_ids, k, out="n.npy")   # (ceil(T/m), K) memmap
    ids, mask = db.chunk_values(table[rows])                            # (..., K, R) each
    dist, chunk_ids = db.search(vectors, k, exclude_docs=None)          # the index (re-ranked if compressed)

    # Document splits:
    db.documents("train" | "eval" | "removed") -> document indices; db.doc_names[i]; db.doc_tokens(i)
    split_documents(doc_ids, eval_fraction, seed) -> bool mask of held-out documents (stable hash)

A RETRO demo: build ``db_heldout`` (eval documents not retrievable) and
``db_leaky`` with ``--index-eval-docs --tokenizer db_heldout/tokenizer.json``
(same split, same tokenizer); train on ``db_heldout.stream("train")``;
evaluate on ``.stream("eval")`` of each: without and with the eval documents in
the database. See docs/retrieval.md.
"""
from .build import build_database
from .config import DEFAULT_CONFIG, held_out, split_documents
from .corpus import Document, iter_corpus, python_docs_corpus
from .manifest import DatabaseError
from .query import RetrievalDatabase, TokenStream

__all__ = [
    "RetrievalDatabase", "TokenStream", "DatabaseError", "build_database", "DEFAULT_CONFIG",
    "split_documents", "held_out", "iter_corpus", "python_docs_corpus", "Document",
]
