"""Stage 1: seed meta-prompts -> the meta-prompts generation uses (direct + bootstrapped/curated)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from instraug.config import MetaPromptConfig, SamplingConfig
from instraug.errors import ConfigError, validation_reason
from instraug.records import MetaPrompt

if TYPE_CHECKING:
    from instraug.llm import LLMSession

SEEDS_FILE = "seeds.yaml"


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    text: str = Field(min_length=1)


class Seeds(BaseModel):
    """meta_instructions/seeds.yaml."""

    model_config = ConfigDict(extra="forbid")
    direct: str = Field(min_length=1)
    bootstrap: str = Field(min_length=1)
    keep_tokens: str = Field(min_length=1)
    suffix: str = Field(min_length=1)
    strategies: list[Strategy] = Field(default_factory=list)


def packaged_directory() -> Path:
    """The seeds installed with instraug (in a checkout, a link to the top-level meta_instructions/)."""
    return Path(__file__).resolve().parents[1] / "meta_instructions"


def default_directory() -> Path:
    """meta_instructions/ of the source checkout instraug runs from, else the installed copy."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "meta_instructions" / SEEDS_FILE).is_file():
        return checkout / "meta_instructions"
    return packaged_directory()


def load_seeds(directory: str | Path | None = None) -> Seeds:
    """seeds.yaml of `directory` (meta_prompts.directory), else of default_directory()."""
    path = Path(directory or default_directory()) / SEEDS_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read seed meta-prompts: {exc.strerror or exc} (set meta_prompts.directory)", path
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"YAML syntax error: {exc}", path, mark.line + 1 if mark else None) from None
    try:
        return Seeds.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_reason(exc), path) from None


_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|[-*•+]|[a-zA-Z][.)])\s+")
_CHATTER = re.compile(r"^(sure|certainly|here (are|is)|of course|okay|ok)\b", re.IGNORECASE)


def parse_list(text: str) -> list[str]:
    """Items of a numbered, bulleted or plain one-per-line list; chatter lines dropped.

    When some lines are numbered or bulleted, only those are items (the rest is chatter).
    """
    marked: list[str] = []
    plain: list[str] = []
    for raw_line in text.splitlines():
        line = raw_line.replace("**", "").replace("__", "")
        bucket = marked if _MARKER.match(line) else plain
        line = _MARKER.sub("", line).strip().strip("\"'`“”*").strip()
        if not line or line.endswith(":") or _CHATTER.match(line):
            continue
        bucket.append(line)
    return marked or plain


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class MetaPromptResult:
    prompts: list[MetaPrompt]
    bootstrapped: int
    requests: int


def build_meta_prompts(
    seeds: Seeds,
    settings: MetaPromptConfig,
    sampling: SamplingConfig,
    llm: LLMSession | None,
) -> MetaPromptResult:
    """The direct prompt, then bootstrapped and/or curated strategies, deduplicated, first K."""
    bootstrapped: list[MetaPrompt] = []
    requests = 0
    if settings.bootstrap and settings.merge != "curated":
        if llm is None:
            raise ValueError("bootstrapping meta-prompts needs an LLM session")
        from instraug.llm.base import ChatRequest

        request = ChatRequest(
            messages=(("user", seeds.bootstrap.replace("{n}", str(settings.bootstrap_count))),),
            temperature=sampling.temperatures[0],
            top_p=sampling.top_p,
            max_tokens=max(256, sampling.max_tokens),
        )
        requests = 1
        for completion in llm.run([request]):
            for item in parse_list(completion.text or ""):
                words = len(item.split())
                if 3 <= words <= 40 and "{" not in item and "}" not in item:
                    digest = hashlib.sha1(_normalized(item).encode()).hexdigest()[:8]
                    bootstrapped.append(MetaPrompt(id=f"bootstrap-{digest}", text=item, origin="bootstrap"))
    curated = [MetaPrompt(id=s.id, text=s.text, origin="curated") for s in seeds.strategies]
    if settings.merge == "replace":
        rest = bootstrapped or curated
    elif settings.merge == "curated":
        rest = curated
    else:
        rest = bootstrapped + curated
    prompts = [MetaPrompt(id="direct", text=seeds.direct, origin="direct")]
    seen = {_normalized(seeds.direct)}
    for prompt in rest:
        key = _normalized(prompt.text)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return MetaPromptResult(prompts[: settings.count], len(bootstrapped), requests)


def system_prompt(seeds: Seeds, meta_prompt: str, tokens: list[str]) -> str:
    """The system message of a rephrasing request."""
    parts = [meta_prompt.strip()]
    if tokens:
        parts.append(seeds.keep_tokens.strip().replace("{tokens}", ", ".join(tokens)))
    parts.append(seeds.suffix.strip())
    return " ".join(parts)
