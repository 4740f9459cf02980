"""The ``wemoe`` command line: merge, eval, inspect, routes, export.

Errors the user can fix are one line on stderr with a non-zero exit (2 for
usage errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from wemoe.errors import WemoeError
from wemoe.memory import return_freed_memory_to_os
from wemoe.options import GREEDY_OPTIONS, apply_config, device_option, expand_greedy, verbosity_options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="wemoe", message="wemoe %(version)s")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Merge task-finetuned vision transformers into one model (WEMoE and static baselines)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file naming base, tasks and parameters; flags override it.")
@click.option("--base", help="Pretrained checkpoint (file or directory).")
@click.option("--tasks", multiple=True, metavar="[NAME=]PATH ...", help="Fine-tuned checkpoints, one or more after the flag.")
@click.option("--method", type=click.Choice(["average", "task-arithmetic", "ties", "wemoe"]), default=None, help="Merge method [default: task-arithmetic].")
@click.option("--out", type=click.Path(), help="Output directory.")
@click.option("--lambda", "lam", type=float, default=None, help="Scaling of task vectors [0.3; ties: 1.0].")
@click.option("--ties-k", type=float, default=None, help="TIES: percent of task-vector entries kept per tensor [20].")
@click.option("--arch", help="Architecture name (e.g. ViT-B-32-quickgelu) or JSON file; overrides what files say.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Output dtype [the base's].")
@click.option("--shard-size", default="4GB", show_default=True, help="Split model files past this size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--dry-run", is_flag=True, help="Validate the inputs and print the plan; write nothing.")
@click.option("--heads", multiple=True, metavar="[NAME=]PATH ...", help="wemoe: classification head per task.")
@click.option("--data", multiple=True, metavar="[NAME=]PATH ...", help="wemoe: unlabeled images per task for router adaptation.")
@click.option("--steps", type=int, default=None, help="wemoe: adaptation steps [1000].")
@click.option("--lr", type=float, default=None, help="wemoe: router learning rate [1e-4].")
@click.option("--batch-size", type=int, default=None, help="wemoe: images per task per step [16].")
@click.option("--cosine/--no-cosine", default=None, help="wemoe: cosine learning-rate decay [off].")
@click.option("--moe-blocks", default=None, help="wemoe: blocks whose MLP becomes MoE: all, last:N, or 0,3,5 [all].")
@click.option("--router-layers", type=click.IntRange(0, 2), default=None, help="wemoe: router depth 0, 1 or 2 [2].")
@click.option("--coef-range", default=None, help="wemoe: clamp routing coefficients to LO,HI, or 'none' [0,1: guards against entropy collapse, see benchmarks/results].")
@click.option("--split", default=None, help="wemoe: split of --data used for adaptation [test].")
@device_option
@verbosity_options
def merge(**opts) -> None:
    """Merge a base and task checkpoints into one model directory."""
    opts = apply_config(opts, "merge")
    from wemoe.commands.merge import run_merge

    run_merge(opts)


@cli.command(name="eval")
@click.argument("model", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file naming model and tasks; flags override it.")
@click.option("--task", "tasks", multiple=True, metavar="NAME=HEAD:DATA ...", help="Task to evaluate (repeatable); HEAD may be empty for merge outputs that store heads.")
@click.option("--split", default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N images per task.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results as JSON.")
@click.option("--arch", help="Architecture name or JSON file for a plain checkpoint.")
@device_option
@verbosity_options
def eval_cmd(**opts) -> None:
    """Per-task accuracy of a checkpoint or merge output, each task with its own head."""
    opts = apply_config(opts, "eval")
    from wemoe.commands.evaluate import run_eval

    run_eval(opts)


@cli.command()
@click.argument("path")
@click.option("--arch", help="Architecture name or JSON file.")
def inspect(path: str, arch: str | None) -> None:
    """Show a checkpoint's key scheme, architecture and parameter counts."""
    from wemoe.commands.inspect import run_inspect

    run_inspect(path, arch)


@cli.command()
@click.argument("model")
@click.option("--task", "tasks", multiple=True, metavar="NAME=DATA ...", help="Task data to route (repeatable).")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--png", type=click.Path(dir_okay=False), help="Write a heatmap PNG.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write mean routing weights as JSON.")
@device_option
@verbosity_options
def routes(**opts) -> None:
    """Mean routing weight per MoE block and expert for each task's data."""
    from wemoe.commands.routes import run_routes

    run_routes(opts)


@cli.command()
@click.argument("model")
@click.option("--task", "task", required=True, help="Task whose mean routing weights to bake in.")
@click.option("--data", help="Images of the task (defaults to the data recorded at merge time).")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--out", required=True, type=click.Path())
@click.option("--force", is_flag=True)
@device_option
@verbosity_options
def export(**opts) -> None:
    """Write a plain (non-MoE) checkpoint for one task, in the base's key scheme."""
    from wemoe.commands.export import run_export

    run_export(opts)


def main(argv: list[str] | None = None) -> None:
    return_freed_memory_to_os()
    args = expand_greedy(list(sys.argv[1:] if argv is None else argv), GREEDY_OPTIONS)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="wemoe", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        if debug:
            raise
        command = exc.ctx.command_path if exc.ctx is not None else "wemoe"
        click.echo(f"wemoe: error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if debug:
            raise
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("wemoe: interrupted", err=True)
        sys.exit(130)
    except WemoeError as exc:
        if debug:
            raise
        click.echo(f"wemoe: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("wemoe: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with --debug
        if debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"wemoe: internal error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
