"""Stage 3, meaning side: similarity of a rewrite to its root original, and near-duplicate rewrites.

`semantic_drift` / `near_copy`: the cosine similarity between the embeddings of a candidate and of
its ROOT original (not its parent, so drift cannot pile up over iterations) must lie in
[min_similarity, max_similarity). Both texts are embedded with every placeholder replaced by its
field name ("{region|join(...)}" -> "region", "{meta_data.method}" -> "method") and each constant
by its value ("{image_token}" -> "image"): the same words on both sides, which say what the slot
holds, so that the model compares the instructions, not brace syntax.

`near_duplicate`: a candidate whose word n-gram Jaccard (or embedding cosine) with an earlier kept
rewrite of the same root reaches the threshold. Only kept rewrites are remembered, so the earlier
one wins and the outcome depends only on the order of the rows.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from instraug.config import FilterConfig
from instraug.derived import CONSTANTS
from instraug.placeholders import Placeholder, parse_template

if TYPE_CHECKING:
    from instraug.embeddings import Embedder, Vector


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two unit vectors (their dot product)."""
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


_WORD = re.compile(r"\w+(?:['’]\w+)*")


def constant_text(placeholder: Placeholder) -> str | None:
    """The text of a MultiInstruct constant ("{options_token}" -> "\\n\\n[Options]:"), else None.

    Constants are literal text in MultiInstruct's f-strings; they are placeholders here only so
    that the LLM cannot reword them."""
    if not placeholder.steps and not placeholder.joins:
        return CONSTANTS.get(placeholder.root)
    return None


def placeholder_words(placeholder: Placeholder) -> str:
    """The words a placeholder stands for in embedded text: a constant's text ("{image_token}" ->
    "image"), else its last field name with underscores as spaces ("{meta_data.method}" -> "method")."""
    constant = constant_text(placeholder)
    if constant is not None:
        return constant
    names = [step for step in placeholder.steps if isinstance(step, str)]
    return (names[-1] if names else placeholder.root).replace("_", " ").strip() or placeholder.root


@functools.lru_cache(maxsize=16384)
def embedding_text(template: str) -> str:
    """A template as plain text for an embedding model: placeholders become their field names."""
    parts = parse_template(template)
    text = "".join(p if isinstance(p, str) else placeholder_words(p) for p in parts)
    return " ".join(text.split())


@functools.lru_cache(maxsize=16384)
def word_tokens(template: str) -> tuple[str, ...]:
    """Lower-cased words of the literal text; each placeholder is one token of its own."""
    tokens: list[str] = []
    for part in parse_template(template):
        if isinstance(part, Placeholder):
            tokens.append(str(part))
        else:
            tokens.extend(_WORD.findall(unicodedata.normalize("NFKC", part).lower()))
    return tuple(tokens)


def shingles(tokens: Sequence[str], n: int) -> frozenset[tuple[str, ...]]:
    """Word n-grams; a text shorter than n is one shingle."""
    if len(tokens) <= n:
        return frozenset([tuple(tokens)])
    return frozenset(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def jaccard(a: frozenset[tuple[str, ...]], b: frozenset[tuple[str, ...]]) -> float:
    """|a & b| / |a | b| (two empty sets: 1)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


@dataclass
class _Kept:
    shingles: list[frozenset[tuple[str, ...]]] = field(default_factory=list)
    vectors: list[Vector] = field(default_factory=list)


class SemanticRules:
    """The three meaning rules of a RuleChain; remembers the kept rewrites of each root.

    `embedder` is needed when `config.semantic.enabled` or `near_duplicate.method: embedding`.
    """

    def __init__(self, config: FilterConfig, embedder: Embedder | None) -> None:
        self.semantic = config.semantic
        self.near = config.near_duplicate
        self.embedder = embedder
        self._kept: dict[str, _Kept] = {}

    @staticmethod
    def needs_embedder(config: FilterConfig) -> bool:
        near = config.near_duplicate
        return config.semantic.enabled or (near.enabled and near.method == "embedding")

    def prefetch(self, templates: Sequence[str]) -> None:
        """Embed many templates in one go (later lookups are memory hits)."""
        if self.embedder is not None and templates:
            self._embed(*dict.fromkeys(templates))

    def _embed(self, *templates: str) -> list[Vector]:
        if self.embedder is None:
            raise RuntimeError("SemanticRules needs an embedder for this configuration")
        return self.embedder.embed([embedding_text(t) for t in templates])

    def check(self, root_id: str, template: str, root_template: str) -> dict[str, str]:
        """reason -> note for every meaning rule the candidate template fails."""
        found: dict[str, str] = {}
        vector = None
        if self.semantic.enabled:
            vector, root = self._embed(template, root_template)
            score = cosine(vector, root)
            low, high = self.semantic.min_similarity, self.semantic.max_similarity
            if score < low:
                found["semantic_drift"] = f"similarity {score:.3f} to the root < {low}"
            elif score >= high:
                found["near_copy"] = f"similarity {score:.3f} to the root >= {high}"
        if self.near.enabled:
            note = self._near_duplicate(root_id, template, vector)
            if note:
                found["near_duplicate"] = note
        return found

    def remember(self, root_id: str, template: str) -> None:
        """Record a kept rewrite: later candidates of the root are compared to it."""
        if not self.near.enabled:
            return
        kept = self._kept.setdefault(root_id, _Kept())
        if self.near.method == "ngram":
            kept.shingles.append(shingles(word_tokens(template), self.near.ngram))
        else:
            kept.vectors.append(self._embed(template)[0])

    def _near_duplicate(self, root_id: str, template: str, vector: Vector | None) -> str | None:
        kept = self._kept.get(root_id)
        if kept is None:
            return None
        if self.near.method == "ngram":
            mine = shingles(word_tokens(template), self.near.ngram)
            for i, earlier in enumerate(kept.shingles):
                score = jaccard(mine, earlier)
                if score >= self.near.max_jaccard:
                    return f"word {self.near.ngram}-gram Jaccard {score:.3f} with kept rewrite #{i + 1}"
            return None
        if vector is None:
            vector = self._embed(template)[0]
        for i, other in enumerate(kept.vectors):
            score = cosine(vector, other)
            if score >= self.near.max_cosine:
                return f"cosine {score:.3f} with kept rewrite #{i + 1}"
        return None
