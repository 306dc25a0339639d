"""The YAML config: defaults, bounds, unknown keys, and errors that point at the line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from instraug.config import HELD_OUT_TASKS, Config, dump_config, load_config
from instraug.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))

#: The tasks MultiInstruct holds out for evaluation (its README): never augmented.
MULTIINSTRUCT_HELD_OUT = {
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
}


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def error_text(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value).removeprefix(f"{tmp_path / 'c.yaml'}")


def test_no_path_empty_file_and_comment_only_mean_defaults(tmp_path: Path) -> None:
    assert load_config(None) == Config()
    assert load_text(tmp_path, "") == Config()
    assert load_text(tmp_path, "# nothing yet\n") == Config()


def test_default_held_out_tasks_are_multiinstructs() -> None:
    assert set(HELD_OUT_TASKS) == MULTIINSTRUCT_HELD_OUT
    assert set(Config().assembly.held_out_tasks) == MULTIINSTRUCT_HELD_OUT


def test_values_are_read(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "sampling:\n  temperatures: [0.2, 1.4]\n"
        "assembly:\n  epsilon: 0.35\n  seed: 9\n  held_out_tasks: [extra_task]\n",
    )
    assert config.sampling.temperatures == [0.2, 1.4]
    assert config.assembly.epsilon == 0.35
    assert config.assembly.seed == 9
    assert config.assembly.held_out_tasks == ["extra_task"]
    assert config.expansion == Config().expansion


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "llm:\n  backend: local\nexpansion:\n  iterations: 2\n  factor: 0\n",
            ":5: expansion.factor: must be ≥ 1",
        ),
        ("assembly:\n  epsilon: -0.1\n", ":2: assembly.epsilon: must be ≥ 0.0"),
        ("assembly:\n  epsilon: 1.01\n", ":2: assembly.epsilon: must be ≤ 1.0"),
        ("llm:\n  max_concurrency: 0\n", ":2: llm.max_concurrency: must be ≥ 1"),
        ("sampling:\n  top_p: 0\n", ":2: sampling.top_p: must be > 0.0"),
        (
            "sampling:\n  temperatures: [0.5, 3]\n",
            ":2: sampling.temperatures: must be between 0 and 2, got 3.0",
        ),
        (
            "sampling:\n  top_p: 0.5\n  temperatures:\n    - 0.5\n    - hot\n",
            ":5: sampling.temperatures.1: must be a number, got a string ('hot')",
        ),
        ("assembly:\n  split: dev\n", ":2: assembly.split: must be 'train' or 'test'"),
        ("expansion: 5\n", ":1: expansion: must be a valid dictionary or instance of ExpansionConfig"),
        ("- llm\n", ":1: the config must be a mapping of sections (llm:, sampling:, ...)"),
        ("expansion: [1\n", ":2: YAML syntax error: expected ',' or ']', but got '<stream end>'"),
    ],
)
def test_error_names_line_key_and_reason(tmp_path: Path, text: str, message: str) -> None:
    assert error_text(tmp_path, text) == message


@pytest.mark.parametrize("section", list(Config.model_fields))
def test_unknown_key_in_any_section(tmp_path: Path, section: str) -> None:
    known = ", ".join(Config.model_fields[section].annotation.model_fields)  # type: ignore[union-attr]
    message = error_text(tmp_path, f"# comment\n{section}:\n  zzz_unknown: 1\n")
    assert message == f":3: {section}.zzz_unknown: unknown key; known keys: {known}"


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    message = error_text(tmp_path, "assembly:\n  epsilom: 0.1\n")
    assert message.startswith(":2: assembly.epsilom: unknown key (did you mean 'epsilon'?); known keys: ")


@given(st.floats(min_value=0, max_value=1))
def test_any_epsilon_in_range_is_accepted(epsilon: float) -> None:
    assert Config.model_validate({"assembly": {"epsilon": epsilon}}).assembly.epsilon == epsilon


@given(st.one_of(st.floats(max_value=0, exclude_max=True), st.floats(min_value=1, exclude_min=True)))
def test_any_epsilon_out_of_range_is_refused(epsilon: float) -> None:
    with pytest.raises(ValueError):
        Config.model_validate({"assembly": {"epsilon": epsilon}})


def test_dump_is_complete_and_loads_back(tmp_path: Path) -> None:
    config = load_text(tmp_path, "assembly:\n  epsilon: 0.5\nsampling:\n  stop: ['\\n', '###']\n")
    text = dump_config(config)
    data = yaml.safe_load(text)
    assert list(data) == list(Config.model_fields)
    assert load_text(tmp_path, text) == config


def test_assignment_is_validated() -> None:
    config = Config()
    with pytest.raises(ValueError):
        config.assembly.epsilon = 3


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_is_valid(path: Path) -> None:
    """Every config in configs/ loads, and none lets a held-out task into training data."""
    config = load_config(path)
    assert set(config.assembly.held_out_tasks) >= MULTIINSTRUCT_HELD_OUT


def test_the_default_config_file_shows_every_key() -> None:
    """configs/default.yaml says it shows every key: a key added to the models must appear there."""
    shown = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "default.yaml").read_text())

    def missing(have: dict, want: dict, path: str = "") -> list[str]:
        out = []
        for key, value in want.items():
            if key not in have:
                out.append(path + key)
            elif isinstance(value, dict) and isinstance(have[key], dict):
                out += missing(have[key], value, f"{path}{key}.")
        return out

    assert missing(shown, Config().model_dump(mode="json")) == []
