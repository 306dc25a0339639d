"""Stage 3 rule `judge`: an LLM reads the original and the rewrite and answers, yes or no, whether
the rewrite asks for the same task, on the same inputs, with the same expected answer.

Only rewrites that passed every other rule are asked about. The answers of a round are asked for
together (`ask`), cached like every request, and read strictly: `yes` or `no`, nothing else; an
answer that is neither, or a request that failed, rejects the rewrite with a note that says so.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from instraug.config import FilterConfig, JudgeConfig, LLMConfig
    from instraug.llm import LLMSession
    from instraug.llm.base import ChatRequest

JUDGE_PROMPT = (
    "You check rewritten instructions for a dataset. Placeholders such as {{question}} stand for "
    "inputs filled in later.\n\n"
    "Original instruction:\n{original}\n\n"
    "Rewritten instruction:\n{rewrite}\n\n"
    "Does the rewritten instruction ask for the same task as the original, on the same inputs, "
    "with the same expected answer? Reply with one word: yes or no."
)
_ANSWER = re.compile(r"^\W*(yes|no)\W*$", re.IGNORECASE)


def judge_request(original: str, rewrite: str, config: JudgeConfig, tag: object = None) -> ChatRequest:
    """The yes/no question about one rewrite (temperature 0: the same question, the same answer)."""
    from instraug.llm.base import ChatRequest

    prompt = JUDGE_PROMPT.format(original=original, rewrite=rewrite)
    return ChatRequest(
        messages=(("user", prompt),), temperature=0.0, top_p=1.0, max_tokens=config.max_tokens, tag=tag
    )


def parse_answer(text: str | None) -> bool | None:
    """True for yes, False for no, None for anything else (read strictly: one word)."""
    match = _ANSWER.match(text or "")
    return None if match is None else match[1].lower() == "yes"


class Judge:
    """Asks the judge about many rewrites at once and remembers the answers."""

    def __init__(self, config: JudgeConfig, llm: LLMSession) -> None:
        self.config = config
        self.llm = llm
        self._answers: dict[tuple[str, str], str] = {}  # (original, rewrite) -> note, "" for yes

    def ask(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Ask about every (original, rewrite) not asked yet, in one round."""
        todo = list(dict.fromkeys(p for p in pairs if p not in self._answers))
        if not todo:
            return
        requests = [
            judge_request(original, rewrite, self.config, tag) for tag, (original, rewrite) in enumerate(todo)
        ]
        for completion in self.llm.run(requests):
            pair = todo[completion.request.tag]
            if completion.text is None:
                self._answers[pair] = f"no answer from the judge ({completion.error})"
                continue
            verdict = parse_answer(completion.text)
            if verdict is None:
                self._answers[pair] = (
                    f"the judge answered neither yes nor no: {completion.text.strip()[:40]!r}"
                )
            else:
                self._answers[pair] = "" if verdict else "the judge said it is not the same task"

    def check(self, original: str, rewrite: str) -> str | None:
        """The note of a rejection, or None when the judge said yes."""
        if (original, rewrite) not in self._answers:
            self.ask([(original, rewrite)])
        return self._answers[(original, rewrite)] or None


def judge_llm_config(llm: LLMConfig, judge: JudgeConfig) -> LLMConfig | None:
    """The LLM settings of a judge on its own model or endpoint; None: the generation model judges."""
    if judge.model is None and judge.base_url is None and judge.api_key_env is None:
        return None
    changes: dict[str, object] = {"backend": "openai"} if judge.base_url or judge.model else {}
    for key in ("model", "base_url", "api_key_env"):
        value = getattr(judge, key)
        if value is not None:
            changes[key] = value
    return llm.model_copy(update=changes)


def open_judge(
    stack: contextlib.ExitStack,
    filters: FilterConfig,
    llm: LLMConfig,
    generation: Callable[[], LLMSession],
    cache_path: Path,
    *,
    offline: bool = False,
    quiet: bool = False,
) -> Judge | None:
    """The judge of `filters.judge` (None when it is off). The generation model judges through the
    generation session (`generation()` opens it); another model gets a session and a cache of its
    own beside `cache_path` (CACHE-judge.sqlite), closed with `stack`."""
    if not filters.judge.enabled:
        return None
    own = judge_llm_config(llm, filters.judge)
    if own is None:
        return Judge(filters.judge, generation())
    from instraug.llm import open_llm

    judge_cache = cache_path.with_name(f"{cache_path.stem}-judge{cache_path.suffix}")
    session = stack.enter_context(open_llm(own, cache_path=judge_cache, offline=offline, quiet=quiet))
    return Judge(filters.judge, session)
