"""LLM access for the stages: open_llm(config) gives a session that answers chat requests, cached.

The layers, lowest first: `base` (ChatRequest and its cache key, Completion, RunStats, the backend
interface and registry), `cache` (the response cache's storage), `responses` (reading a server's
answers and errors), `openai_backend` (any OpenAI-compatible server), `local` (the embedded
llama.cpp server), `batch_files` (OpenAI's batch file format: export, import), `batch_ledger` (the
batches submitted and not yet collected), `batch` (batch mode: the Files and Batches APIs),
`session` (LLMSession, open_llm, count_cached). This module only re-exports.
"""

from __future__ import annotations

from instraug.errors import EXIT_COMPLETED_WITH_FAILURES
from instraug.llm.base import BACKENDS, ChatRequest, Completion, RunStats
from instraug.llm.batch import BatchRunStats
from instraug.llm.batch_files import BatchExported
from instraug.llm.batch_ledger import ledger_path
from instraug.llm.session import LLMSession, count_cached, open_llm

__all__ = [
    "BACKENDS",
    "EXIT_COMPLETED_WITH_FAILURES",
    "BatchExported",
    "BatchRunStats",
    "ChatRequest",
    "Completion",
    "LLMSession",
    "RunStats",
    "count_cached",
    "ledger_path",
    "open_llm",
]
