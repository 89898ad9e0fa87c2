"""Command-line entry points that work even where the ``.pth`` start-up hook does not run.

* ``mergekit-sparsegpt-yaml CONFIG OUT [flags]`` is mergekit's own ``mergekit-yaml`` command
  (same click command object, hence exactly the same flags), run after registering our
  methods and wrapping ``run_merge``. Use it under ``python -S``, with
  ``MERGEKIT_SPARSEGPT_DISABLE_AUTOLOAD=1``, or wherever site-packages ``.pth`` files are not
  processed.
* ``mergekit-sparsegpt merge CONFIG OUT [flags]`` is the same command.
* ``mergekit-sparsegpt calibrate CONFIG [flags]`` only fills the statistics cache (the
  Hessian pre-pass), taking mergekit's merge flags; with ``--export DIR`` it also writes each
  calibrated model's statistics to a shareable folder under DIR.

Expected user errors (``ValueError``, which includes pydantic's ``ValidationError``,
``FileNotFoundError``, a statistics cache entry that cannot be written, and a merged model that
does not fit: a full disk or the file-size limit) print one ``Error: ...`` message without a
traceback and exit with status 2; with ``-vv`` the traceback is logged as well.

Importing this module is cheap: mergekit, torch and click are imported only when a command
needs them, so ``mergekit-sparsegpt --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

LOG = logging.getLogger(__name__)

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
USER_ERROR_EXIT_CODE = 2

_COMMAND_SUMMARIES = {
    "merge": "Run a merge: same arguments and flags as mergekit-yaml.",
    "calibrate": "Fill the statistics cache for a merge config without merging.",
}


def _install() -> None:
    """Register our methods and wrap ``run_merge``, with or without the start-up hook."""
    from mergekit_sparsegpt.integration import registration

    registration.install()


def _mergekit_yaml_command() -> Any:
    """mergekit's ``mergekit-yaml`` click command, bound to the wrapped ``run_merge``."""
    _install()
    import mergekit.merge
    import mergekit.scripts.run_yaml as run_yaml

    # ``install`` ran before run_yaml was imported, so its ``from mergekit.merge import
    # run_merge`` bound the wrapper; if run_yaml was imported earlier, rebind it.
    if run_yaml.run_merge is not mergekit.merge.run_merge:
        run_yaml.run_merge = mergekit.merge.run_merge
    return run_yaml.main


def _report_user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected user errors into one message and exit status 2 (no traceback)."""
    import functools

    import click

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Imported only once a command runs (it needs torch anyway): --help stays cheap.
        from mergekit_sparsegpt.statistics.cache_dir import CacheWriteError

        try:
            return func(*args, **kwargs)
        except (*USER_ERRORS, CacheWriteError) as exc:
            message = str(exc) or type(exc).__name__
        LOG.debug("Traceback of the error below", exc_info=True)
        click.echo(f"Error: {message}", err=True)
        sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper


def _with_user_errors(command: Any) -> Any:
    """A copy of a click command whose callback reports user errors (the original is kept)."""
    import copy

    command = copy.copy(command)
    command.callback = _report_user_errors(command.callback)
    return command


def yaml_main(args: Sequence[str] | None = None) -> None:
    """Console script ``mergekit-sparsegpt-yaml``: ``mergekit-yaml`` with our methods loaded."""
    command = _with_user_errors(_mergekit_yaml_command())
    command.main(
        args=None if args is None else list(args),
        prog_name="mergekit-sparsegpt-yaml",
    )


def _calibrate_command() -> Any:
    import click
    from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

    @click.command(
        "calibrate",
        cls=PrettyPrintHelp,
        help=(
            "Compute the calibration statistics a sparsegpt_ties/sparsegpt_dare/regmean/"
            "sparsegpt_regmean merge of CONFIG_FILE needs and store them in the statistics "
            "cache, without merging. "
            "A later merge of the same config reuses them. Started by torchrun, the "
            "processes share each task's calibration windows (docs/gpus-and-distributed.md)."
        ),
    )
    @click.argument("config_file")
    @click.option(
        "--export",
        "export_dir",
        type=click.Path(file_okay=False),
        default=None,
        help=(
            "Also write each calibrated model's statistics to EXPORT/<model folder name>/ "
            "(safetensors and statistics.json), for merges that name it with `statistics:` "
            "(docs/shared-statistics.md). Needs hessian_source finetuned or base."
        ),
    )
    @add_merge_options
    def calibrate(merge_options: MergeOptions, config_file: str, export_dir: str | None) -> None:
        import yaml
        from mergekit.config import MergeConfiguration

        merge_options.apply_global_options()
        _install()

        with open(config_file, encoding="utf-8") as file:
            config_source = file.read()
        merge_config = MergeConfiguration.model_validate(yaml.safe_load(config_source))

        from mergekit_sparsegpt.capture.distributed import launched_ranks, process_group
        from mergekit_sparsegpt.prepass.export_folders import export_statistics
        from mergekit_sparsegpt.prepass.local_paths import spelled_as_local
        from mergekit_sparsegpt.prepass.run import prepare_statistics

        ranks = launched_ranks()

        def say(message: str) -> None:
            if ranks.main and not merge_options.quiet:
                click.echo(message, err=True)

        # Spelled as the merge will spell them, so that the messages name the same paths.
        merge_config = spelled_as_local(merge_config, say)
        with process_group(ranks, ranks.device(merge_options.device)):
            if export_dir is not None:
                folders = export_statistics(merge_config, merge_options, export_dir, ranks)
                say(f"Statistics of {len(folders)} model(s) exported to {export_dir}.")
                return
            context = prepare_statistics(merge_config, merge_options, ranks)
        if context.merged is not None:
            say(f"Solved linears of the merge ready ({len(context.merged.reports)} tensors).")
        else:
            say(f"Calibration statistics ready for {len(context.tasks)} task(s).")

    return _with_user_errors(calibrate)


def _group() -> Any:
    import click

    from mergekit_sparsegpt import __version__

    class _LazyGroup(click.Group):
        """Builds subcommands on demand, so the group's own --help needs no torch import."""

        def list_commands(self, ctx: click.Context) -> list[str]:
            return list(_COMMAND_SUMMARIES)

        def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
            if cmd_name == "merge":
                return _with_user_errors(_mergekit_yaml_command())
            if cmd_name == "calibrate":
                return _calibrate_command()
            return None

        def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
            with formatter.section("Commands"):
                formatter.write_dl(list(_COMMAND_SUMMARIES.items()))

    @click.group(
        "mergekit-sparsegpt",
        cls=_LazyGroup,
        help="SparseGPT-importance TIES/DARE merges for mergekit.",
    )
    @click.version_option(__version__, prog_name="mergekit-sparsegpt")
    def group() -> None:
        pass

    return group


def main(args: Sequence[str] | None = None) -> None:
    """Console script ``mergekit-sparsegpt`` (subcommands ``merge`` and ``calibrate``)."""
    _group().main(args=None if args is None else list(args), prog_name="mergekit-sparsegpt")


if __name__ == "__main__":
    main()
