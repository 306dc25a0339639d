"""Stage 1: seed meta-prompts -> the meta-prompts generation uses (direct + bootstrapped/curated).

Also the words of a rephrasing request around a meta-prompt (the rules, the user turn) and the
example turns of meta_instructions/examples.yaml that stage 2 shows before each request.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from instraug.config import MetaPromptConfig, SamplingConfig
from instraug.errors import ConfigError, validation_reason
from instraug.records import MetaPrompt

if TYPE_CHECKING:
    from instraug.llm import LLMSession

SEEDS_FILE = "seeds.yaml"
EXAMPLES_FILE = "examples.yaml"
#: The user turn when seeds.yaml does not say: the rules, then the instruction and a label to complete.
DEFAULT_USER_TURN = "{rules}\n\nInstruction: {instruction}\nRewritten instruction:"
_MASK_TOKEN = re.compile(r"\{[A-Z]{1,2}\}")


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    text: str = Field(min_length=1)


class Example(BaseModel):
    """One example turn: an instruction (mask tokens {A}, {B} ...) and a faithful rewrite of it."""

    model_config = ConfigDict(extra="forbid")
    instruction: str = Field(min_length=1)
    rewrite: str = Field(min_length=1)

    @model_validator(mode="after")
    def _rewrite_keeps_the_tokens(self) -> Example:
        if sorted(_MASK_TOKEN.findall(self.rewrite)) != sorted(_MASK_TOKEN.findall(self.instruction)):
            raise ValueError("the rewrite must keep every {A}, {B} ... token of the instruction, as often")
        return self


class Examples(BaseModel):
    """meta_instructions/examples.yaml."""

    model_config = ConfigDict(extra="forbid")
    examples: list[Example] = Field(min_length=1)


class Seeds(BaseModel):
    """meta_instructions/seeds.yaml, with the example turns of examples.yaml beside it."""

    model_config = ConfigDict(extra="forbid")
    direct: str = Field(min_length=1)
    bootstrap: str = Field(min_length=1)
    keep_tokens: str = Field(min_length=1)
    suffix: str = Field(min_length=1)
    strategies: list[Strategy] = Field(default_factory=list)
    #: The user turn of the request shapes user_turn and core: {rules} and {instruction} are filled in.
    user_turn: str = DEFAULT_USER_TURN
    #: From examples.yaml (load_seeds reads it), never from seeds.yaml.
    examples: list[Example] = Field(default_factory=list)

    @field_validator("user_turn")
    @classmethod
    def _user_turn_shows_the_instruction(cls, value: str) -> str:
        if "{instruction}" not in value:
            raise ValueError("must contain {instruction}, where the instruction to rephrase goes")
        return value


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
    """seeds.yaml of `directory` (meta_prompts.directory), else of default_directory(); with the
    example turns of load_examples(directory)."""
    path = Path(directory or default_directory()) / SEEDS_FILE
    data = _read_yaml(path, "seed meta-prompts")
    if isinstance(data, dict) and "examples" in data:
        raise ConfigError(f"examples: the example turns belong in {EXAMPLES_FILE}, beside {SEEDS_FILE}", path)
    try:
        seeds = Seeds.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_reason(exc), path) from None
    seeds.examples = load_examples(directory)
    return seeds


def load_examples(directory: str | Path | None = None) -> list[Example]:
    """The example turns: examples.yaml of `directory` when it has one, else of default_directory()."""
    path = Path(directory or default_directory()) / EXAMPLES_FILE
    if directory is not None and not path.is_file():
        path = default_directory() / EXAMPLES_FILE
    data = _read_yaml(path, "example turns")
    try:
        return Examples.model_validate(data).examples
    except ValidationError as exc:
        raise ConfigError(validation_reason(exc), path) from None


def example_texts(directory: str | Path | None = None) -> list[str]:
    """Every text of the example turns (instructions and rewrites, mask tokens as written), so a
    rule can tell a reply copied from them."""
    return [text for example in load_examples(directory) for text in (example.instruction, example.rewrite)]


def _read_yaml(path: Path, what: str) -> object:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what}: {exc.strerror or exc} (set meta_prompts.directory)", path
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"YAML syntax error: {exc}", path, mark.line + 1 if mark else None) from None


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
    """The rules of a rephrasing request: the meta-prompt, keep these tokens, reply with the rewrite
    only (the system message of the paper's request shape)."""
    parts = [meta_prompt.strip()]
    if tokens:
        parts.append(seeds.keep_tokens.strip().replace("{tokens}", ", ".join(tokens)))
    parts.append(seeds.suffix.strip())
    return " ".join(parts)


def user_prompt(seeds: Seeds, meta_prompt: str, tokens: list[str], instruction: str) -> str:
    """The user turn holding the rules and the instruction (`user_turn` of seeds.yaml)."""
    fill = {"{rules}": system_prompt(seeds, meta_prompt, tokens), "{instruction}": instruction}
    return re.sub(r"\{rules\}|\{instruction\}", lambda m: fill[m.group()], seeds.user_turn)
