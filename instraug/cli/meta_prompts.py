"""instraug meta-prompts"""

from __future__ import annotations

from instraug.cli._common import (
    CacheOption,
    ConfigOption,
    OfflineOption,
    OutputOption,
    QuietOption,
    info,
    refuse_output_over_inputs,
    reports_errors,
)


@reports_errors
def meta_prompts(
    config: ConfigOption = None,
    output: OutputOption = "-",
    cache: CacheOption = None,
    offline: OfflineOption = False,
    quiet: QuietOption = False,
) -> None:
    """Stage 1: the direct prompt plus bootstrapped and/or curated rewriting strategies."""
    import contextlib
    from pathlib import Path

    from instraug.config import load_config
    from instraug.jsonl import write_jsonl
    from instraug.rundir import cache_path as resolve_cache_path
    from instraug.stages.s1_meta_prompts import SEEDS_FILE, build_meta_prompts, default_directory, load_seeds

    settings = load_config(config)
    cache_path = resolve_cache_path(cache, settings.llm.cache_path)
    seeds_file = Path(settings.meta_prompts.directory or default_directory()) / SEEDS_FILE
    refuse_output_over_inputs(output, [config, cache_path, seeds_file])
    seeds = load_seeds(settings.meta_prompts.directory)
    with contextlib.ExitStack() as stack:
        llm = None
        if settings.meta_prompts.bootstrap and settings.meta_prompts.merge != "curated":
            from instraug.llm import open_llm

            llm = stack.enter_context(
                open_llm(settings.llm, cache_path=cache_path, offline=offline, quiet=quiet)
            )
        result = build_meta_prompts(seeds, settings.meta_prompts, settings.sampling, llm)
        unreachable = llm.unreachable_error() if llm is not None else None
        if unreachable is not None:  # exit 3, and no file that looks bootstrapped but is not
            raise unreachable
    write_jsonl(output, (p.model_dump() for p in result.prompts))
    info(f"{len(result.prompts)} meta-prompts ({result.bootstrapped} bootstrapped) -> {output}", quiet)
