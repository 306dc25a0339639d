"""Config and pool mistakes end in exit 2 with path:line and a reason: never a traceback, never silent."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import pool_row, read_jsonl, write_jsonl
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import Result

from instraug.config import BUILTIN_BACKENDS, Config, load_config
from instraug.errors import ConfigError, TemplateError
from instraug.placeholders import RenderError
from instraug.variants import MAX_CONDITION_DEPTH, MAX_CONDITION_LENGTH, VariantSelector

Cli = Callable[..., Result]

#: A task of two variants chosen by a condition; its instances carry no derived fields.
TASK = "chat_task"


def chat(i: int, history: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "unique_id": f"c{i}",
        "task_name": TASK,
        "question": f"q{i}",
        "history": history,
        "target_txt": "t",
        **extra,
    }


def variant_pool(condition: str) -> list[dict[str, Any]]:
    return [
        pool_row("image_caption", 0, "Describe the image."),
        pool_row(TASK, 0, "With history: {question}", variant=f"if: {condition}"),
        pool_row(TASK, 1, "Without history: {question}", variant=f"else: {condition}"),
    ]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with a pool and instances; paths in messages are relative to it."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "pool.jsonl", variant_pool("len(history) > 0"))
    write_jsonl(tmp_path / "train.jsonl", [chat(0, ["hi"]), chat(1, [])])
    return tmp_path


def error_of(result: Result) -> str:
    """The one line a failed command prints; nothing on stdout, no traceback."""
    assert result.stdout == ""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr.rstrip("\n")


def assemble(cli: Cli, *extra: str) -> Result:
    return cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl", *extra)


# --------------------------------------------------------------------------------------------
# The config: `config check` and every command that loads it say the same


CONFIG_MISTAKES = [
    pytest.param(
        "expansion:\n  factor: 3\n  iterations: 1\n  factor: 30\n",
        "4: expansion.factor: repeated key (first at line 2)",
        id="repeated-key",
    ),
    pytest.param(
        "llm:\n  backend: local\nassembly:\n  seed: 1\nllm:\n  timeout: 3\n",
        "5: llm: repeated key (first at line 1)",
        id="repeated-section",
    ),
    pytest.param(
        "filters:\n  semantic:\n    min_similarity: 0.4\n    max_similarity: 0.9\n    min_similarity: 0.6\n",
        "5: filters.semantic.min_similarity: repeated key (first at line 3)",
        id="repeated-nested-key",
    ),
    pytest.param(
        "assembly:\n  held_out_tasks:\n    - a\n    - {x: 1, x: 2}\n",
        "4: assembly.held_out_tasks.1.x: repeated key (first at line 4)",
        id="repeated-key-in-a-list",
    ),
    pytest.param(
        "llm:\n  timeout: 30\n  backend: opneai\n",
        "3: llm.backend: unknown backend 'opneai' (did you mean 'openai'?); known backends: local, openai",
        id="unknown-backend",
    ),
    pytest.param(
        "llm:\n  backend: vllm\n",
        "2: llm.backend: unknown backend 'vllm'; known backends: local, openai",
        id="unknown-backend-no-close-match",
    ),
    pytest.param(
        "llm:\n  backend: openai\n  base_url: http://127.0.0.1:9/v1\n",
        "2: llm.model: is required when backend is openai",
        id="openai-without-model",
    ),
    pytest.param(
        "filters:\n  semantic:\n    enabled: true\n    backend: openai\n",
        "4: filters.semantic.model: is required when backend is openai",
        id="semantic-openai-without-model",
    ),
    pytest.param(
        "expansion:\n  factor: true\n",
        "2: expansion.factor: must be an integer, got a boolean (true)",
        id="bool-int",
    ),
    pytest.param(
        "assembly:\n  epsilon: yes\n",
        "2: assembly.epsilon: must be a number, got a boolean (yes)",
        id="bool-float",
    ),
    pytest.param(
        "expansion:\n  factor: '3'\n",
        "2: expansion.factor: must be an integer, got a string ('3')",
        id="str-int",
    ),
    pytest.param(
        "expansion:\n  factor: 2.5\n", "2: expansion.factor: must be an integer, got 2.5", id="float-int"
    ),
    pytest.param(
        "filters:\n  check_render: 1\n",
        "2: filters.check_render: must be true or false, got 1",
        id="int-bool",
    ),
    pytest.param(
        "assembly:\n  epsilon: .nan\n", "2: assembly.epsilon: must be a finite number, got NaN", id="nan"
    ),
    pytest.param("llm:\n  timeout: .inf\n", "2: llm.timeout: must be a finite number, got inf", id="inf"),
    pytest.param(
        "budget:\n  max_usd: -.inf\n", "2: budget.max_usd: must be a finite number, got -inf", id="minus-inf"
    ),
    pytest.param(
        "sampling:\n  temperatures:\n    - 0.5\n    - .NaN\n",
        "4: sampling.temperatures.1: must be a finite number, got NaN",
        id="nan-in-a-list",
    ),
]


@pytest.mark.parametrize(("text", "message"), CONFIG_MISTAKES)
def test_config_check_names_file_line_key_and_reason(cli: Cli, work: Path, text: str, message: str) -> None:
    (work / "x.yaml").write_text(text, encoding="utf-8")
    result = cli("config", "check", "x.yaml")
    assert result.exit_code == 2
    assert error_of(result) == f"Error: x.yaml:{message}"


@pytest.mark.parametrize(("text", "message"), CONFIG_MISTAKES)
def test_a_command_loading_the_config_stops_before_reading_anything(
    cli: Cli, work: Path, text: str, message: str
) -> None:
    (work / "x.yaml").write_text(text, encoding="utf-8")
    result = assemble(cli, "-c", "x.yaml")
    assert result.exit_code == 2
    assert error_of(result) == f"Error: x.yaml:{message}"
    assert not (work / "out.jsonl").exists()


def test_the_same_configs_without_the_mistake_load(tmp_path: Path) -> None:
    """Controls: each value the cases above refuse, written as meant, is read."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "llm:\n  backend: openai\n  model: m\n  timeout: 5\n"
        "expansion:\n  factor: 30\n"
        "assembly:\n  epsilon: 1\n"
        "filters:\n  check_render: false\n  semantic: {<<: {min_similarity: 0.3}, min_similarity: 0.4}\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert (config.llm.backend, config.llm.model, config.llm.timeout) == ("openai", "m", 5.0)
    assert type(config.llm.timeout) is float
    assert config.expansion.factor == 30
    assert config.assembly.epsilon == 1.0
    assert config.filters.check_render is False
    # a key written beside a YAML merge overrides the merged one: that is no repetition
    assert config.filters.semantic.min_similarity == 0.4


def test_deeply_nested_yaml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("expansion: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: YAML syntax error: nested too deeply"


def test_builtin_backends_are_the_registered_ones() -> None:
    """config.py knows the names without importing the LLM clients; they must stay the registry's."""
    from instraug.llm import BACKENDS

    builtin = {name for name, cls in BACKENDS.items() if cls.__module__.startswith("instraug.")}
    assert set(BUILTIN_BACKENDS) == builtin


def test_a_backend_registered_at_run_time_is_accepted(tmp_path: Path) -> None:
    from instraug.llm.base import BACKENDS, Backend, register_backend

    path = tmp_path / "c.yaml"
    path.write_text("llm:\n  backend: extra-backend\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown backend 'extra-backend'"):
        load_config(path)
    register_backend("extra-backend")(type("ExtraBackend", (Backend,), {}))
    try:
        assert load_config(path).llm.backend == "extra-backend"
    finally:
        BACKENDS.pop("extra-backend")


def _bare(annotation: Any) -> Any:
    """The type under Annotated[...] and Optional[...]."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _bare(typing.get_args(annotation)[0])
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(members) == 1:
        return _bare(members[0])
    return annotation


def _numeric_fields(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str]]:
    """(key path, 'float' | 'int' | 'float-list') of every numeric field of the config."""
    for name, field in model.model_fields.items():
        annotation = _bare(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _numeric_fields(annotation, (*prefix, name))
        elif annotation in (float, int):
            yield (*prefix, name), annotation.__name__
        elif typing.get_origin(annotation) is list and _bare(typing.get_args(annotation)[0]) is float:
            yield (*prefix, name), "float-list"


NUMERIC_FIELDS = list(_numeric_fields(Config))


def test_the_sweep_finds_every_kind_of_numeric_field() -> None:
    found = {".".join(path): kind for path, kind in NUMERIC_FIELDS}
    assert found["assembly.epsilon"] == "float"
    assert found["llm.requests_per_minute"] == "float"
    assert found["filters.semantic.min_similarity"] == "float"
    assert found["expansion.factor"] == "int"
    assert found["budget.max_requests"] == "int"
    assert found["sampling.temperatures"] == "float-list"
    assert len(found) >= 30


def _yaml_at(path: tuple[str, ...], value: str) -> str:
    lines = [f"{'  ' * depth}{key}:" for depth, key in enumerate(path)]
    return "\n".join(lines) + f" {value}\n"


@pytest.mark.parametrize(("path", "kind"), NUMERIC_FIELDS, ids=[".".join(p) for p, _ in NUMERIC_FIELDS])
def test_every_numeric_field_refuses_booleans_nan_and_infinity(
    tmp_path: Path, path: tuple[str, ...], kind: str
) -> None:
    file = tmp_path / "c.yaml"
    line = len(path)
    key = ".".join(path) + (".0" if kind == "float-list" else "")
    wrap = "[{}]" if kind == "float-list" else "{}"
    cases = [("true", f"must be {'an integer' if kind == 'int' else 'a number'}, got a boolean (true)")]
    if kind != "int":
        cases += [(".nan", "must be a finite number, got NaN"), (".inf", "must be a finite number, got inf")]
    for value, reason in cases:
        file.write_text(_yaml_at(path, wrap.format(value)), encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            load_config(file)
        assert str(info.value) == f"{file}:{line}: {key}: {reason}"


# --------------------------------------------------------------------------------------------
# Pool variant conditions: refused at the pool row when unreadable, at the instance row when they
# cannot be evaluated on it


def write_pool(work: Path, condition: str) -> None:
    write_jsonl(work / "pool.jsonl", variant_pool(condition))


@pytest.mark.parametrize("nots", [5_000, 200_000], ids=["5k-nots", "200k-nots"])
def test_a_huge_condition_is_refused_before_parsing(cli: Cli, work: Path, nots: int) -> None:
    condition = "not " * nots + "len(history) > 0"
    write_pool(work, condition)
    result = assemble(cli)
    assert result.exit_code == 2
    assert error_of(result) == (
        f"Error: pool.jsonl:2: variant: condition is {len(condition)} characters long; "
        f"at most {MAX_CONDITION_LENGTH} are read"
    )


def test_a_deep_condition_within_the_length_is_refused(cli: Cli, work: Path) -> None:
    condition = "not " * (MAX_CONDITION_DEPTH + 5) + "x"
    assert len(condition) <= MAX_CONDITION_LENGTH
    write_pool(work, condition)
    result = assemble(cli)
    assert result.exit_code == 2
    assert error_of(result) == (
        f"Error: pool.jsonl:2: variant: condition is nested more than {MAX_CONDITION_DEPTH} levels deep"
    )


def test_a_condition_within_the_limits_still_works(cli: Cli, work: Path) -> None:
    # 45 nots: an odd number, so the `if` set now goes to instances without history
    write_pool(work, "not " * 45 + "len(history) > 0")
    result = assemble(cli, "--quiet")
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(work / "out.jsonl")
    assert [row["prompt"] for row in rows] == ["Without history: q0", "With history: q1"]


@pytest.mark.parametrize(
    ("condition", "reason"),
    [
        ("len(target_txt) > 'a'", "condition len(target_txt) > 'a' orders a number against a string"),
        ("'a' <= 3", "condition 'a' <= 3 orders a number against a string"),
        ("len(7) > 0", "condition len(7) takes the length of a number"),
        ("len(history) >", "cannot read condition 'len(history) >'"),
        ("__import__('os').getcwd()", "unsupported condition __import__('os').getcwd()"),
        ("(" * 240 + "1" + ")" * 240, "cannot read condition '" + "(" * 77 + "...'"),
    ],
)
def test_an_unusable_condition_names_the_pool_row(cli: Cli, work: Path, condition: str, reason: str) -> None:
    write_pool(work, condition)
    result = assemble(cli)
    assert result.exit_code == 2
    assert error_of(result) == f"Error: pool.jsonl:2: variant: {reason}"


@pytest.mark.parametrize(
    ("condition", "instance", "reason"),
    [
        (
            "len(unique_id) > 0",
            chat(2, [], unique_id=7),
            "variant condition len(unique_id) > 0: unique_id is a number (7), which has no length",
        ),
        (
            "score > 3",
            chat(2, [], score="high"),
            "variant condition score > 3: cannot compare a string ('high') with a number (3)",
        ),
        (
            "len(history) > len(options)",
            chat(2, []),
            "variant condition len(history) > len(options): missing field 'options'",
        ),
    ],
)
def test_a_condition_that_fails_on_an_instance_names_the_instance_row(
    cli: Cli, work: Path, condition: str, instance: dict[str, Any], reason: str
) -> None:
    write_pool(work, condition)
    write_jsonl(
        work / "train.jsonl",
        [chat(0, ["hi"], options=["a"], score=1), chat(1, [], options=[], score=5), instance],
    )
    result = assemble(cli)
    assert result.exit_code == 2
    assert error_of(result) == f"Error: train.jsonl:3: task {TASK}: {reason}"


# Conditions built from the grammar the interpreter reads, over any JSON values: a selector is
# refused with a TemplateError, or it answers True/False, or it raises a RenderError. Nothing else.
NAMES = st.sampled_from(["a", "b", "missing"])
LITERALS = st.one_of(
    st.integers(-5, 5).map(str),
    st.sampled_from(["'x'", "''", "True", "False", "1.5"]),
)
COMPARISONS = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        inner.map(lambda x: f"len({x})"),
        inner.map(lambda x: f"not {x}"),
        st.tuples(inner, COMPARISONS, inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    )


CONDITIONS = st.recursive(st.one_of(NAMES, LITERALS), _extend, max_leaves=8)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=5,
)


@given(CONDITIONS, st.fixed_dictionaries({"a": JSON_VALUES, "b": JSON_VALUES}))
def test_a_condition_answers_or_says_what_is_wrong(condition: str, fields: dict[str, Any]) -> None:
    try:
        selector = VariantSelector(f"if: {condition}", TASK)
    except TemplateError:
        return
    try:
        assert selector.matches(fields) in (True, False)
    except RenderError as exc:
        assert str(exc).startswith(f"variant condition {condition}: ")
