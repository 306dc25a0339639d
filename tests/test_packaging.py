"""The wheel: what `pip install .` ships, and that an installed copy runs stage 1 outside any checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.packaging

REPO_ROOT = Path(__file__).resolve().parent.parent
SEEDS = REPO_ROOT / "meta_instructions" / "seeds.yaml"
PACKAGED_SEEDS = "instraug/meta_instructions/seeds.yaml"

#: What a fresh clone does not hold: the build must not depend on it (nor copy a venv around).
NOT_SOURCE = (".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
NOT_SOURCE += (".hypothesis", ".instraug", "runs")


def run(command: list[Any], cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("INSTRAUG_")}
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tail(text: str, lines: int = 15) -> str:
    kept = [line for line in text.splitlines() if "is ignored" not in line]  # pip's notes on absent indexes
    return "\n".join(kept[-lines:])


@dataclass
class Built:
    source: Path
    wheel: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The wheel of a copy of this checkout, built the way `pip install .` builds it."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    dist = work / "dist"
    result = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, source])
    if result.returncode != 0:
        message = f"pip wheel exited {result.returncode}:\n{tail(result.stderr + result.stdout)}"
        # Without an index holding setuptools the build backend cannot be installed: that is the
        # machine, not the package; CI always has one, so there it is a failure.
        if "install build dependencies" in result.stderr and not os.environ.get("CI"):
            pytest.skip(f"cannot build a wheel here (no index with setuptools for the build): {message}")
        pytest.fail(message)
    (wheel,) = dist.glob("instraug-*.whl")
    return Built(source, wheel)


def test_wheel_holds_the_package_and_the_seed_meta_prompts(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        names = wheel.namelist()
        assert PACKAGED_SEEDS in names
        assert wheel.read(PACKAGED_SEEDS) == SEEDS.read_bytes()
    dist_info = "-".join(built.wheel.name.split("-")[:2]) + ".dist-info"  # instraug-0.1.0.dist-info
    assert {name.split("/")[0] for name in names} == {"instraug", dist_info}
    modules = {p.relative_to(built.source).as_posix() for p in (built.source / "instraug").rglob("*.py")}
    assert {name for name in names if name.endswith(".py")} == modules
    assert f"{dist_info}/entry_points.txt" in names


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel; its dependencies come from this environment (no download)."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    result = run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", built.wheel]
    )
    assert result.returncode == 0, tail(result.stderr)
    # A path line in a .pth file only appends that folder to sys.path: this environment's .pth files
    # (among them the editable install of the checkout) are not run, so `instraug` is the wheel's.
    probe = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(run([python, "-c", probe]).stdout.strip())
    here = sysconfig.get_paths()
    (site_packages / "instraug_test_dependencies.pth").write_text(
        "\n".join(dict.fromkeys([here["purelib"], here["platlib"]])) + "\n"
    )
    where = run([python, "-c", "import instraug; print(instraug.__file__)"], cwd=env_dir)
    assert Path(where.stdout.strip()).resolve().is_relative_to(env_dir.resolve()), where.stdout + where.stderr
    return bin_dir


def meta_prompts(bin_dir: Path, workdir: Path, **settings: Any) -> list[dict[str, Any]]:
    """`instraug meta-prompts` of the installed copy, run from `workdir` with no LLM reachable."""
    workdir.mkdir()
    config = {
        "llm": {"backend": "openai", "model": "none", "base_url": "http://127.0.0.1:9/v1"},
        "meta_prompts": {"merge": "curated", "bootstrap": False, "count": 4, **settings},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = run([bin_dir / "instraug", "meta-prompts", "-c", "config.yaml", "-o", "out.jsonl"], cwd=workdir)
    assert result.returncode == 0, result.stderr
    lines = (workdir / "out.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_installed_wheel_runs_stage_1_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    seeds = yaml.safe_load(SEEDS.read_text(encoding="utf-8"))
    assert meta_prompts(installed, tmp_path / "elsewhere") == [
        {"id": "direct", "text": seeds["direct"], "origin": "direct"},
        *[{"id": s["id"], "text": s["text"], "origin": "curated"} for s in seeds["strategies"][:3]],
    ]


def test_installed_wheel_prefers_meta_prompts_directory(installed: Path, tmp_path: Path) -> None:
    mine = tmp_path / "my_meta"
    mine.mkdir()
    seeds = {
        "direct": "Say the same thing in other words.",
        "bootstrap": "List {n} ways.",
        "keep_tokens": "Keep {tokens}.",
        "suffix": "Reply with the instruction only.",
        "strategies": [{"id": "formal", "text": "Make it formal."}],
    }
    (mine / "seeds.yaml").write_text(yaml.safe_dump(seeds))
    assert meta_prompts(installed, tmp_path / "elsewhere", directory=str(mine)) == [
        {"id": "direct", "text": "Say the same thing in other words.", "origin": "direct"},
        {"id": "formal", "text": "Make it formal.", "origin": "curated"},
    ]
