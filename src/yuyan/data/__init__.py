"""Data: corpus specs (files, folders, globs, JSONL, the embedded stdlib corpus), token shards, tasks."""

from yuyan.data.corpus import CorpusStats, Document, corpus_fingerprint, iter_documents, stdlib_root

__all__ = ["CorpusStats", "Document", "corpus_fingerprint", "iter_documents", "stdlib_root"]
