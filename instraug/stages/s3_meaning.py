"""Stage 3 rules on what a rewrite says, beyond its form: each a small check returning a note
(why it fails) or None.

- `control_token`: a model's control token (`<|im_end|>`, `<start_of_image>`, `[INST]`) in the reply;
- `foreign_text`: letters of a script the original does not use (`衣装`), or, with the `language`
  extra (wordfreq), words that are neither English nor the original's (`mendatang`);
- `example_copy`: a run of words copied from the fixed example turns of the request;
- `meaning_flip`: a contrast word of the original replaced by its opposite (least → highest), or a
  negation added to a task none of whose templates negates;
- `answer_changed`: a yes/no question where the original asks for something else;
- `new_content`: words that neither the original nor any template of the task uses;
- `content_lost`: too few of the words that say what the task is (the content words the task's
  expert-written templates share) are left.

They read words, never embeddings; `max_new_words` and `min_key_words_kept` were chosen on labeled
replies of the embedded model (README, "What the filters keep, read by hand").
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from instraug.config import MeaningConfig

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_CONTROL = re.compile(
    r"<\|[^|<>\s]{1,40}\|>"  # <|im_start|>, <|endoftext|>
    r"|</?(?:s|unk|pad|bos|eos|mask|sep|cls)>"  # <s>, </s>, <unk>
    r"|<(?:start|end)_of_[a-z_]{1,20}>"  # <start_of_image>, <end_of_turn>
    r"|\[/?INST\]|<</?SYS>>",
    re.IGNORECASE,
)

#: Function words: never what a task is about.
STOPWORDS = frozenset(
    """a an the and or but if then than so as of in on at to for from by with without into onto
    about over under between among through within this that these those it its it's is are was
    were be been being am do does did done have has had having can could will would shall should
    may might must not no nor only also just very too more most such any some each every all both
    either neither other another own same which what who whom whose where when why how here there
    you your yours we our us they their them he she his her him i me my mine one ones please
    following given based using use used via per up down out off again further once while during
    before after above below""".split()
) | frozenset(
    # the scaffolding of any instruction, not what a task is about
    """task generate write produce create give provide compose output answer respond reply tell
    look see view read show shown shows say particular specific specified certain""".split()
)

#: Words whose meaning flips to another of the pair (a template saying one must not say the other).
CONTRASTS: tuple[tuple[frozenset[str], frozenset[str]], ...] = tuple(
    (frozenset(a.split()), frozenset(b.split()))
    for a, b in (
        ("least fewest smallest lowest minimum minimal", "most highest largest greatest maximum maximal"),
        ("next following subsequent", "previous preceding prior"),
        ("same identical", "different distinct"),
        ("true correct", "false incorrect wrong"),
        ("before earlier", "after later"),
        ("overlap overlaps overlapping overlapped", "nonoverlapping nonoverlapped non-overlapping"),
        ("first", "last"),
        ("above top", "below bottom"),
        ("left", "right"),
        ("entail entails entailment", "contradict contradicts contradiction"),
        ("match matches matching", "mismatch mismatches mismatching"),
        ("inside within", "outside"),
    )
)


#: Words that name the same thing in instructions (a rewrite may say "picture" for "image");
#: each group counts as one key word for `content_lost`.
SYNONYMS: tuple[str, ...] = (
    "image picture photo photograph pic visual",
    "region area part box patch portion section zone",
    "caption description describe depict explain summarize summary title",
    "question query",
    "option choice candidate alternative",
    "select choose pick",
    "identify find locate determine recognize detect spot",
    "object item thing entity",
    "overlap intersect",
    "decide judge tell",
    "colour color",
    "least fewest smallest lowest minimum minimal",
    "most highest largest greatest maximum maximal",
)


def words(text: str) -> list[str]:
    """Lower-cased words of a text (placeholders, digits and punctuation left out)."""
    out = [w.lower().replace("’", "'") for w in _WORD.findall(text)]
    return [w[:-2] if w.endswith("'s") else w for w in out]


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """A crude English stem, so that region/regions and overlap/overlapping meet."""
    for suffix in ("ies", "ied", "ing", "ed", "es", "s", "ly"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            word = word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
            break
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]
    return word[:-1] + "i" if len(word) > 4 and word.endswith("y") else word


def _synonym_classes() -> dict[str, str]:
    return {stem(w): group.split()[0] for group in SYNONYMS for w in group.split()}


_CLASS = _synonym_classes()


def content_stems(text: str) -> set[str]:
    """The stems of the content words of a text (a synonym's stem as its group's first word)."""
    return {_CLASS.get(s, s) for w in words(text) if w not in STOPWORDS and len(w) > 1 for s in (stem(w),)}


def control_token(reply: str, root: str) -> str | None:
    """A control token in the reply that the original does not show."""
    found = [m for m in _CONTROL.findall(reply) if m not in root]
    return f"control token {found[0]}" if found else None


def _scripts(text: str) -> set[str]:
    """The scripts of a text's letters: the first word of each letter's Unicode name (LATIN, CJK…)."""
    return {unicodedata.name(c, "UNKNOWN").split()[0] for c in text if c.isalpha()}


def foreign_text(reply: str, root: str, english: set[str] | None = None) -> str | None:
    """Letters of a script the original does not use; with `english`, unknown words too.

    `english`: a set of lower-case English words (None: the word check is off); a word of the
    reply that is neither in it nor in the original is foreign.
    """
    extra = _scripts(reply) - _scripts(root) - {"LATIN"}
    if extra:
        return f"letters of another script ({', '.join(sorted(extra))})"
    if english is None:
        return None
    known = set(words(root))
    unknown = [w for w in words(reply) if w not in known and not _is_english(w, english)]
    return f"not English: {', '.join(unknown[:3])}" if unknown else None


def _is_english(word: str, english: set[str]) -> bool:
    if word in english or word.strip("'") in english:
        return True
    return any(part in english for part in word.split("'") if part) or (
        word.endswith("s") and word[:-1] in english
    )


def example_copy(reply: str, root: str, example_grams: set[tuple[str, ...]], n: int = 4) -> str | None:
    """A run of `n` words the reply shares with an example turn and not with the original."""
    found = _grams(words(reply), n) & example_grams
    found -= _grams(words(root), n)
    return f"copies an example: {' '.join(sorted(found)[0])}" if found else None


def example_ngrams(texts: Iterable[str], n: int = 4) -> set[tuple[str, ...]]:
    """The word n-grams of the example turns, for `example_copy`."""
    out: set[tuple[str, ...]] = set()
    for text in texts:
        out |= _grams(words(text), n)
    return out


def _grams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


_NEGATIONS = frozenset(
    "not no never none nothing neither nor don't doesn't isn't aren't can't cannot".split()
)


def meaning_flip(reply: str, root: str, negation_known: bool = False) -> str | None:
    """A contrast word of the original replaced by its opposite, or, when `negation_known` (the
    task's templates are known and none of them negates), a negation the original lacks."""
    have, had = set(words(reply)), set(words(root))
    added = sorted((have & _NEGATIONS) - had)
    if negation_known and added:
        return f"adds a negation ({added[0]})"
    for one, other in CONTRASTS:
        for said, flipped in ((one, other), (other, one)):
            if had & said and not had & flipped and have & flipped and not have & said:
                return f"{sorted(had & said)[0]} became {sorted(have & flipped)[0]}"
    return None


#: Words that open a question to be answered yes or no.
_YES_NO_OPENERS = frozenset(
    "is are was were am can could does do did will would should shall has have had may might must".split()
)


def _yes_no_questions(text: str) -> bool:
    """True when a sentence of `text` is a yes/no question, or the text asks whether/if."""
    for sentence in re.split(r"(?<=[.?!])\s+|\n+", text):
        tokens = words(sentence)
        if tokens and tokens[0] in _YES_NO_OPENERS and sentence.rstrip().endswith("?"):
            return True
    return bool(re.search(r"\b(?:whether|if)\b", text, re.IGNORECASE))


def answer_changed(reply: str, root: str, options: bool = False) -> str | None:
    """The rewrite asks a yes/no question where the original asks for something else: the expected
    answer changes (Find the regions of {text} -> Is there a region with {text}?). A template with
    `options` is not judged."""
    if options or "[options]" in root.lower():
        return None  # the options say what an answer may be, whatever the question's form
    if _yes_no_questions(reply) and not _yes_no_questions(root):
        return "asks a yes/no question; the original asks for something else"
    return None


def task_key_stems(originals: Sequence[str]) -> set[str]:
    """The content stems that say what a task is: those at least half of its expert-written
    templates share. A task with fewer than 3 templates has none (its wording cannot be told
    from its task)."""
    if len(originals) < 3:
        return set()
    counts = Counter(s for text in originals for s in content_stems(text))
    need = (len(originals) + 1) // 2
    return {s for s, n in counts.items() if n >= need}


def task_vocabulary(originals: Sequence[str]) -> set[str] | None:
    """Every content stem the task's expert-written templates use (None for fewer than 3: too few
    to know the words of a task)."""
    if len(originals) < 3:
        return None
    return {s for text in originals for s in content_stems(text)}


def new_content(reply: str, root: str, vocabulary: set[str] | None, max_new: int) -> str | None:
    """More than `max_new` content words that neither the root nor any template of the task uses
    (a synonym of theirs counts as theirs): the rewrite talks about something else. A task whose
    vocabulary is not known (None) is not judged."""
    if vocabulary is None:
        return None
    added = sorted(content_stems(reply) - content_stems(root) - vocabulary)
    if len(added) <= max_new:
        return None
    return f"{len(added)} words the task's templates never use: {', '.join(added[:4])}"


def content_lost(reply: str, root: str, key_stems: set[str], min_kept: float) -> str | None:
    """Fewer than `min_kept` of the task's key stems that the root uses are left in the reply."""
    wanted = content_stems(root) & key_stems
    if not wanted:
        return None
    kept = wanted & content_stems(reply)
    if len(kept) / len(wanted) >= min_kept:
        return None
    lost = ", ".join(sorted(wanted - kept)[:4])
    return f"kept {len(kept)} of {len(wanted)} key words of the task (lost {lost})"


def english_words() -> set[str]:
    """The 100,000 most frequent English words (wordfreq, the `language` extra)."""
    try:
        from wordfreq import top_n_list
    except ImportError:
        from instraug.errors import ConfigError

        raise ConfigError(
            "filters.meaning.english_words needs wordfreq: pip install 'instraug[language]'"
        ) from None
    return set(top_n_list("en", 100_000))


class MeaningRules:
    """The rules above, set up once per run: the task key words and the examples' n-grams."""

    def __init__(
        self, config: MeaningConfig, originals: Mapping[str, Sequence[str]], examples: Iterable[str] = ()
    ) -> None:
        """`originals`: task -> the display text of its expert-written templates; `examples`: the
        texts of the request's example turns."""
        self.config = config
        self._key_stems = {task: task_key_stems(texts) for task, texts in originals.items()}
        self._vocabulary = {task: task_vocabulary(texts) for task, texts in originals.items()}
        self._never_negates = {
            task for task, texts in originals.items() if not any(set(words(t)) & _NEGATIONS for t in texts)
        }
        self._example_grams = example_ngrams(examples)
        self._english = english_words() if config.foreign_text and config.english_words else None
        from instraug.config import MAX_NEW_WORDS_SERVER

        limit = config.max_new_words
        self._max_new = MAX_NEW_WORDS_SERVER if limit == "auto" else limit

    def check(self, task: str, reply: str, display: str, root: str, options: bool = False) -> dict[str, str]:
        """reason -> note for every rule the rewrite fails. `reply`: the cleaned reply; `display`:
        the candidate's text (constants shown, other placeholders as {P}); `root`: the root's; `options`:
        the root shows answer options."""
        config, found = self.config, {}
        checks = (
            ("control_token", config.control_token, lambda: control_token(reply, root)),
            ("foreign_text", config.foreign_text, lambda: foreign_text(display, root, self._english)),
            ("example_copy", config.example_copy, lambda: example_copy(display, root, self._example_grams)),
            (
                "meaning_flip",
                config.meaning_flip,
                lambda: meaning_flip(display, root, task in self._never_negates),
            ),
            ("answer_changed", config.answer_changed, lambda: answer_changed(display, root, options)),
            (
                "new_content",
                config.new_content,
                lambda: new_content(display, root, self._vocabulary.get(task), self._max_new),
            ),
            (
                "content_lost",
                config.content_lost,
                lambda: content_lost(
                    display, root, self._key_stems.get(task, set()), config.min_key_words_kept
                ),
            ),
        )
        for reason, enabled, rule in checks:
            if enabled and (note := rule()):
                found[reason] = note
        return found
