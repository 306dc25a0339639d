"""Stage 3, text side: strip chat around an LLM rewrite, and tell an instruction from an answer.

Both are pure functions over text. Every pattern is anchored or bounded, so each runs in time
linear in the reply (no nested quantifiers, no unbounded backtracking).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# --------------------------------------------------------------------------------------------
# Cleanup of chatty replies

_SPECIAL = re.compile(r"<\|[A-Za-z_]{1,30}\|>|</?s>")
_FENCE = re.compile(r"^\s{0,3}(?:```|~~~)")
_MARKER = re.compile(r"^[^\S\n]{0,8}(?:[-*•+]|\(?\d{1,3}[.)])[^\S\n]+")
_MARKUP = re.compile(r"\*\*|__")
_HEADING = re.compile(r"^[^\S\n]{0,3}(?:#{1,6}|>)[^\S\n]*")
_TOKEN = re.compile(r"(?<!\{)\{[^{}\n]{1,200}\}(?!\})")
_INTERJECTION = re.compile(
    r"^(?:sure|certainly|of course|absolutely|okay|ok|alright|all right|no problem|gladly)"
    r"(?:[^\S\n]*[!.,:;-]+|[^\S\n]+(?=here\b|below\b|i\b|this\b|the following\b)|[^\S\n]*$)[^\S\n]*",
    re.IGNORECASE,
)
_HERE = re.compile(
    r"^(?:here(?:'s|’s|[^\S\n]+is|[^\S\n]+are)|below[^\S\n]+(?:is|are)|the following[^\S\n]+(?:is|are))"
    r"\b([^:\n]{0,160}):[^\S\n]*",
    re.IGNORECASE,
)
_ABOUT_REWRITE = re.compile(
    r"\b(?:instruction|version|rewrit|rephras|paraphras|prompt|output|attempt|option|sentence"
    r"|alternative|variation|suggestion|revision|result)",
    re.IGNORECASE,
)
_ADJECTIVE = (
    r"(?:rewritten|rephrased|paraphrased|revised|new|modified|alternative|alternate|improved"
    r"|updated|reworded|final|possible|suggested|simplified|simpler|shorter|clearer|concise)"
)
_NOUN = r"(?:instruction|version|prompt|rewrite|rephrasing|paraphrase|output|result|response)"
_LABEL = re.compile(
    rf"^(?:(?:the |a |my )?{_ADJECTIVE}(?:[^\S\n]{{1,3}}{_NOUN}s?)?|{_NOUN}s?|option)"
    r"[^\S\n]{0,3}(?:#?\d{1,3})?[^\S\n]{0,3}(?:(?:is|would be|could be)[^\S\n]{0,3})?:[^\S\n]*",
    re.IGNORECASE,
)
_ECHO = re.compile(
    r"^(?:original|input|given|source)(?: instruction| sentence| text)?[^\S\n]{0,3}:", re.IGNORECASE
)
_LEAD_SENTENCE = re.compile(
    r"^(?:sure|certainly|of course|absolutely|okay|ok|alright|no problem|gladly|happy to help"
    r"|i(?:'d|’d| would) be (?:happy|glad)|i can help|here(?:'s|’s| is| are)|below (?:is|are))\b",
    re.IGNORECASE,
)
_TRAIL = re.compile(
    r"^\(?(?:"
    r"(?:note|explanation|changes?|reasoning|rationale|justification)\b[^\S\n]*[:-]"
    r"|(?:this|the|my|that) (?:new |revised |rewritten |rephrased |paraphrased |updated )?"
    r"(?:version|rewrite|rephrasing|paraphrase|wording|phrasing|variation|alternative|revision"
    r"|rewritten|rephrased|instruction (?:is|keeps|maintains|preserves|retains|uses|now))\b"
    r"|(?:this|it) (?:is (?:a |more |shorter|clearer|simpler)|keeps|maintains|preserves|retains|makes"
    r"|conveys|captures|removes|changes|simplifies|clarifies|emphasi[sz]es|rephrases|rewords|uses)\b"
    r"|(?:i|we) (?:have |'ve |’ve )?(?:kept|changed|replaced|rephrased|rewrote|rewritten|reworded|used"
    r"|made|preserved|maintained|hope|removed|simplified|added)\b"
    r"|(?:i|we)(?:'ve|’ve)\b"
    r"|hope this helps|let me know|feel free|in this version"
    r"|(?:the |all )?(?:placeholders?|mask(?:ed)? tokens?|tokens? \{)\b"
    r")",
    re.IGNORECASE,
)
_PIECES = re.compile(r"((?<=[.!?])[^\S\n]+|\n+)")
_MAX_QUOTES = 12
_TAIL_START = re.compile(r"\s+")
_WORDS = re.compile(r"[^\W\d_]+")
_QUOTES = {'"': '"', "“": "”", "‘": "’", "«": "»", "„": "“", "'": "'", "`": "`"}


def clean_response(raw: str, shown: str | None = None) -> str:
    """The rewrite inside a chatty LLM reply: prefixes, quotes, markup, lists and explanations go.

    `shown` is the text the LLM was asked to rewrite; its {X} tokens pick the right line of a
    multi-line reply, and a multi-line `shown` keeps a multi-line rewrite whole.
    """
    tokens = list(dict.fromkeys(_TOKEN.findall(shown or "")))
    multiline = shown is not None and "\n" in shown.strip()
    text = _SPECIAL.sub("", raw).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_HEADING.sub("", _MARKUP.sub("", line)).rstrip() for line in text.split("\n")]
    lines = _trim_chatter_lines([line for line in lines if not _FENCE.match(line)])
    items = _items(lines, tokens, multiline)
    if not items:
        return ""
    best = max(enumerate(items), key=lambda item: (sum(t in item[1] for t in tokens), -item[0]))[1]
    starts_quoted = (shown or "").lstrip()[:1] in _QUOTES
    cleaned = _clean_item(best, starts_quoted)
    if not (shown or "").rstrip().endswith(":"):
        cleaned = _drop_trailing_lead_in(cleaned)
    return cleaned


def _strip_prefixes(text: str) -> str:
    """Remove interjections ("Sure!"), "Here is the rewrite:" and labels ("Rephrased:") at the start."""
    for _ in range(4):
        before = text
        text = _INTERJECTION.sub("", text, count=1)
        here = _HERE.match(text)
        if here and (_ABOUT_REWRITE.search(here.group(1)) or here.group(1).strip() in ("", "it", "you go")):
            text = text[here.end() :]
        text = _LABEL.sub("", text, count=1)
        if text == before:
            break
    return text


def _is_chatter_line(line: str) -> bool:
    """A line of pure chat: "Sure!", "Here are three versions:", "I can help with that."."""
    rest = _strip_prefixes(_MARKER.sub("", line).strip())
    if not rest.strip(" \t.,:;!-*\"'`"):
        return True
    return "{" not in rest and bool(_LEAD_SENTENCE.match(rest))


def _trim_chatter_lines(lines: list[str]) -> list[str]:
    """Drop lead-in lines ("Sure! Here are some options:") and everything from an explanation on."""
    content = [i for i, line in enumerate(lines) if line.strip()]
    start = 0
    for i in content[:-1]:  # a lone line is never dropped whole: its prefix is stripped later
        if not _is_chatter_line(lines[i]):
            break
        start = i + 1
    body = lines[start:]
    echoes = {i for i, line in enumerate(body) if _ECHO.match(_MARKER.sub("", line).strip())}
    if echoes and len(echoes) < sum(1 for line in body if line.strip()):
        body = [line for i, line in enumerate(body) if i not in echoes]  # "Original: ..." echoes the input
    for i in range(1, len(body)):
        if _TRAIL.match(_MARKER.sub("", body[i]).strip()):
            body = body[:i]
            break
    while body and not body[-1].strip():
        body.pop()
    return body


def _items(lines: list[str], tokens: Sequence[str], multiline: bool) -> list[str]:
    """The candidate rewrites of a reply: list entries, alternative lines, or the whole block."""
    marked = [i for i, line in enumerate(lines) if _MARKER.match(line)]
    if len(marked) >= 2:
        items = []
        for n, i in enumerate(marked):
            end = marked[n + 1] if n + 1 < len(marked) else len(lines)
            block = lines[i:end] if multiline else lines[i : i + 1]
            items.append("\n".join(block).strip())
        return [item for item in items if item]
    content = [line.strip() for line in lines if line.strip()]
    block = ["\n".join(lines).strip()] if content else []
    if multiline or len(content) < 2:
        return block
    opening = _strip_prefixes(content[0])[:1]
    if opening in _QUOTES and content[-1].endswith(_QUOTES[opening]):
        return block  # one quoted rewrite over several lines
    # lines with every token and some words of their own are alternatives; a line like
    # "Region: {A}" is a fragment of a rewrite spread over lines, so the block stays whole
    standalone = [
        line
        for line in content
        if all(t in line for t in tokens) and len(_WORDS.findall(_TOKEN.sub(" ", line))) >= 3
    ]
    return standalone or block


def _clean_item(text: str, starts_quoted: bool) -> str:
    text = "\n".join(_MARKER.sub("", line, count=1) for line in text.split("\n")).strip()
    for _ in range(4):
        before = text
        text = _strip_prefixes(text).strip()
        text = _unquote(text, starts_quoted)
        text = _drop_chatter_sentences(text)
        if text == before:
            break
    return text


def _unquote(text: str, starts_quoted: bool) -> str:
    """A rewrite wrapped in quotes, backticks or emphasis, possibly followed by an explanation."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "*_" and text[1] != text[0]:
        return text[1:-1].strip()
    close = _QUOTES.get(text[:1])
    if close is None or (starts_quoted and text[1:2] not in _QUOTES):
        return text  # the instruction itself opens with a quote, as its parent does
    end = len(text.rstrip())
    pos = text.find(close, 1)
    for seen in range(_MAX_QUOTES):  # a bounded number of tries keeps this linear
        if pos == -1:
            break
        balanced = text[0] != '"' or seen % 2 == 0  # every earlier '"' lies inside
        if balanced and any(c.isalpha() for c in _TOKEN.sub("", text[1:pos])):
            if pos + 1 >= end:
                return text[1:pos].strip()
            tail = _TAIL_START.match(text, pos + 1)
            after = tail.end() if tail else pos + 1
            ends_sentence = text[1:pos].rstrip()[-1:] in (".", "?", "!")
            if text[0] not in "'`" and (_TRAIL.match(text[after:end]) or ends_sentence):
                return text[1:pos].strip()
        pos = text.find(close, pos + 1)
    return text


def _drop_trailing_lead_in(text: str) -> str:
    """A last sentence that announces a rewrite and ends in a colon ("So this instruction will be:")
    introduces text that is not there; it goes (a lone sentence stays, for the rules to judge)."""
    if not text.endswith(":"):
        return text
    pieces = _PIECES.split(text)
    if len(pieces) < 3 or not _ABOUT_REWRITE.search(pieces[-1]):
        return text
    return "".join(pieces[:-2]).strip()


def _drop_chatter_sentences(text: str) -> str:
    """Leading "Sure, I can help." and trailing "This version is shorter." sentences go."""
    pieces = _PIECES.split(text)  # sentence, separator, sentence, ...
    sentences = pieces[0::2]
    first, last = 0, len(sentences)
    while last - first > 1 and _TRAIL.match(sentences[last - 1].strip()):
        last -= 1
    while last - first > 1 and "{" not in sentences[first] and _LEAD_SENTENCE.match(sentences[first]):
        first += 1
    if (first, last) == (0, len(sentences)):
        return text
    return "".join(pieces[2 * first : 2 * last - 1]).strip()


# --------------------------------------------------------------------------------------------
# Instruction or answer?

_HARD_START = re.compile(
    r"^(?:(?:yes|no|yep|nope|yeah|correct|incorrect|true|false)\b(?:[^\S\n]*[,.!:;]|[^\S\n]*$)"
    r"|(?:i|i'm|i've|i'll|i'd|sorry|unfortunately|as an ai)\b(?! (?:want|need|would like|'d like)\b)"
    r"|my (?:answer|guess|best guess)\b"
    r"|(?:the )?(?:correct |right |final )?(?:answer|option|choice) (?:is|would be|should be)\b"
    r"|answer:[^\S\n]*(?:yes|no)\b)"
)
_HARD_ANYWHERE = re.compile(
    r"\b(?:as an ai|language model|i'm sorry|i am sorry|i apologi[sz]e"
    r"|i (?:cannot|can't|can not|am unable to|am not able to|don't have|do not have) "
    r"(?:see|view|access|provide|help|determine|tell|answer|identify|process|browse|know)"
    r"|anything else|hope (?:this|that) helps|let me know|feel free to|(?:can|may) i (?:help|assist))\b"
)
#: Openers of a description or an answer; allowed when the parent itself talks that way.
_SOFT_OPENERS: dict[str, str] = {
    "image_shows": r"(?:the|this|that)\s+(?:given\s+|provided\s+|attached\s+|above\s+)?"
    r"(?:image|picture|photo|photograph|scene|illustration|screenshot|painting)\s+"
    r"(?:shows|depicts|features|contains|displays|portrays|illustrates|presents|has|includes|is|was"
    r"|appears|seems|captures|consists|looks)\b",
    "in_image": r"(?:in|on)\s+(?:the|this)\s+(?:given\s+)?(?:image|picture|photo|photograph|scene)\b",
    "there_is": r"there(?:'s|\s+(?:is|are|was|were|appears?|seems?|exists?))\b",
    "it_is": r"(?:it|they|he|she)(?:'s|\s+(?:is|are|was|were|appears?|seems?|looks?|has|have))\b",
}
_SOFT_START = {name: re.compile("^" + pattern) for name, pattern in _SOFT_OPENERS.items()}
_SOFT_ANYWHERE = {name: re.compile(r"\b" + pattern) for name, pattern in _SOFT_OPENERS.items()}

#: Verbs an instruction starts a clause with ("Describe ...", "Given X, select ...").
VERBS = frozenset(
    """answer analyze analyse assess caption categorize check choose classify come compare complete
    compose consider count create decide define describe detect determine discover distinguish
    draw estimate evaluate examine explain express extract figure fill find focus generate give
    guess highlight identify imagine indicate infer inspect interpret judge label list localize
    localise locate look mark match mention name notice observe offer outline output pick
    pinpoint predict produce provide rank rate read recognize recognise refer reply respond
    return review say see select share show sort specify spot state study suggest summarize
    summarise tell transcribe translate use verify view watch write please kindly""".split()
)
_QUESTION_WORDS = frozenset(
    """what which where who whom whose how why when is are am was were do does did can could
    would will should shall may might has have had""".split()
)
_FILLERS = frozenset(
    "please kindly now then first firstly next finally also just simply and so lastly again".split()
)
_CLAUSES = re.compile(r"[.!?;:,\n]|\band\b|\bthen\b")
_SENTENCES = re.compile(r"[.!?\n]")
_WORD = re.compile(r"[a-z][a-z'’]*")
_SECOND_PERSON = re.compile(
    r"\byou(?:'re| are)? (?:need|must|should|have to|are (?:asked|given|required|expected|supposed"
    r"|shown|provided|presented)|will (?:be|need|look|have)|'ll|'re (?:asked|given|required))\b"
    r"|\byour (?:task|job|goal|answer|response|aim)\b|\b(?:can|could|would|will|do) you\b"
    r"|\b(?:tell|show|give|help) me\b"
)
_TASK_WORDS = re.compile(
    # "The task is {p}" only names the task ("The task is {p} and the steps are {p}." lost its question)
    r"\b(?:this|the|your|in this) (?:task|goal|objective|job|aim)\b(?! (?:is|was) \{p\})"
    r"|\bplease\b|\bkindly\b"
)
_INFINITIVE = re.compile(r"\bto ([a-z]+)")
_DANGLING = re.compile(r"(?:\b(?:is|are|was|were|be|of|as|by|for|to|with|from|about)|[:,])$")
_EDGE = " \t\n\"'“”‘’`()[]-"
_OPTIONS_BLOCK = re.compile(r"\[options\]:(?:[^\S\n]*\{p\})*$")


def instruction_cue(text: str) -> bool:
    """Does `text` (placeholders shown as {P}) read like an instruction: a question, an imperative,
    a request to "you", a task statement, or a prompt to complete ("The object in {P} is",
    "Based on the image, {P}")?"""
    low = text.lower().replace("’", "'")
    if "?" in low or _SECOND_PERSON.search(low) or _TASK_WORDS.search(low):
        return True
    if any(m.group(1) in VERBS for m in _INFINITIVE.finditer(low)):
        return True
    plain = low.replace("{p}", " ")
    if _prompt_to_complete(low):
        return True
    for sentence in _SENTENCES.split(plain):
        words = _WORD.findall(sentence)
        if words and words[0] in _QUESTION_WORDS:
            return True
    return any(_starts_with_verb(clause) for clause in _CLAUSES.split(plain))


def _prompt_to_complete(low: str) -> bool:
    """Ends where the reader is to go on: "The object in {p} is", "Based on the image, {p}",
    "Region: {p}". A copula or preposition right before final placeholders states a fact
    ("The answer is {p}", "The current step is {p}"): the placeholder completes it. A final
    options block ("[Options]: {p}") is set aside first. A colon with nothing after it introduced
    something that is missing ("The main content of {p} is:", "Here's how you can do it:")."""
    text = _OPTIONS_BLOCK.sub("", low.rstrip(_EDGE + ".…")).rstrip(_EDGE + ".…")
    if not text.endswith("{p}"):
        return not text.endswith(":") and bool(_DANGLING.search(text))
    while text.endswith("{p}"):
        text = text[:-3].rstrip(_EDGE)
    return text.endswith((":", ","))


def _starts_with_verb(clause: str) -> bool:
    words = _WORD.findall(clause)
    skipped = 0
    while words and skipped < 2 and (words[0] in _FILLERS or (words[0].endswith("ly") and len(words) > 1)):
        words.pop(0)
        skipped += 1
    return bool(words) and words[0] in VERBS


def answer_like(candidate: str, parent: str, root: str | None = None) -> str | None:
    """Why `candidate` looks like an answer or a description rather than an instruction, or None.

    All three texts show placeholders as {P}. A candidate is answer-like when it opens with
    "Yes,"/"No,", first person or "The answer is"; when it says "As an AI", "I'm sorry", "let me
    know"; when it opens like a description ("The image shows", "In the image,", "There are",
    "It is") and nothing after the opener instructs, unless the parent talks that way too; or
    when it asks a question and answers it; or when it has no instruction cue at all although
    its parent has one.
    """
    low = candidate.lower().replace("’", "'")
    head = _strip_leading_placeholders(low)
    if _HARD_START.match(head):
        return "opens like an answer"
    if _HARD_ANYWHERE.search(low):
        return "talks as an assistant"
    context = " ".join(t.lower().replace("’", "'") for t in (parent, root or "") if t)
    for name, opener in _SOFT_START.items():
        m = opener.match(head)
        if m and not _SOFT_ANYWHERE[name].search(context) and not instruction_cue(head[m.end() :]):
            return f"opens like a description ({name})"
    if _FIRST_PERSON.search(_ASKING_YOU.sub(" ", low)) and not _FIRST_PERSON.search(context):
        return "talks in the first person"
    label = _STRAY_LABEL.match(head)
    if label and not _STRAY_LABEL.match(_strip_leading_placeholders(context)):
        return f"opens with a stray label ({label[1]},)"
    if _answers_own_question(low) and not _answers_own_question(parent.lower()):
        return "answers its own question"
    if not instruction_cue(candidate) and instruction_cue(parent):
        return "no sign of an instruction"
    return None


_STRAY_LABEL = re.compile(r"(question|answer|instruction|output|response|rewrite|task)\s*,")
_ASKING_YOU = re.compile(r"(?<![\w'])i(?: want| would like|'d like| need) you\b")  # an instruction still
_FIRST_PERSON = re.compile(r"(?<![\w'])i(?:'m|'ve|'ll|'d)?(?![\w'])")


def _answers_own_question(text: str) -> bool:
    """Words after the last '?' that neither instruct nor hold a placeholder ("What is it? A dog.")."""
    if "?" not in text:
        return False
    tail = text.rsplit("?", 1)[1]
    return "{p}" not in tail and bool(_WORD.search(tail)) and not instruction_cue(tail)


def _strip_leading_placeholders(text: str) -> str:
    while True:
        stripped = text.lstrip(_EDGE + ".,:;")
        if stripped.startswith("{p}"):
            text = stripped[3:]
            continue
        return stripped
