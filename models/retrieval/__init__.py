"""RETRO's retrieval database: from raw text to neighbour tokens (``python -m models build-db | query |
db-info``; `build_database`, `RetrievalDatabase`). Its files, stages and API: docs/retrieval.md."""
from .build import build_database
from .config import DEFAULT_CONFIG, held_out, split_documents
from .corpus import Document, iter_corpus, python_docs_corpus
from .manifest import DatabaseError
from .query import RetrievalDatabase, TokenStream

__all__ = [
    "RetrievalDatabase", "TokenStream", "DatabaseError", "build_database", "DEFAULT_CONFIG",
    "split_documents", "held_out", "iter_corpus", "python_docs_corpus", "Document",
]
