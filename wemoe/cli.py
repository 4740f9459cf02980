"""The ``wemoe`` command line: merge, eval, heads, inspect, routes, export.

A thin layer over the library: ``merge`` builds the same typed configuration as
``wemoe.merge`` and runs it. Its ``--method`` choices and method flags are
generated from the method registry each time the CLI is built, so a registered
method appears without touching this file.

Errors the user can fix are one line on stderr with a non-zero exit (2 for
usage errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from wemoe.commands.options import GREEDY_OPTIONS, device_option, expand_greedy, split_option, verbosity_options
from wemoe.core.memory import return_freed_memory_to_os
from wemoe.core.runtime import DTYPES
from wemoe.errors import ReportedElsewhere, UsageError, WemoeError

MERGE_COMMON = (
    "config_path",
    "base",
    "tasks",
    "method",
    "out",
    "arch",
    "dtype",
    "shard_size",
    "seed",
    "force",
    "dry_run",
    "heads",
    "data",
    "device",
    "quiet",
    "verbose",
)


def _method_options() -> list[click.Option]:
    """One flag per parameter key of any registered method; help says which methods (and kinds) take it."""
    from wemoe.methods import all_params, method_names

    every = set(method_names())
    options = []
    for key, owners in all_params().items():
        info = owners[0][1]
        defaults = "; ".join(f"{m}: {i.default}" for m, i in owners)
        scope = "" if {m for m, _ in owners} == every else f" ({', '.join(m for m, _ in owners)})"
        if info.component is not None:  # a kind's option: say which kinds take it
            scope += f" (--{info.component.replace('_', '-')} {', '.join(info.kinds)})"
        help_text = f"{info.help}{scope} [{defaults}]"
        if info.type is bool:
            options.append(click.Option([f"{info.flag}/--no-{info.flag[2:]}", key], default=None, help=help_text))
        else:
            choices = info.choices
            metavar = "|".join(choices) if choices else None
            options.append(click.Option([info.flag, key], type=info.type, default=None, metavar=metavar, help=help_text))
    return options


def _merge_command() -> click.Command:
    from wemoe.methods import method_names

    @click.pass_context
    def callback(ctx: click.Context, **opts: Any) -> None:
        from wemoe.adaptation import distributed
        from wemoe.merging.config import merge_config
        from wemoe.merging.job import run_merge

        given = {k: (v if v != () else None) for k, v in opts.items()}
        config_path = given.pop("config_path")
        try:
            with distributed.session(given.get("device") or "auto") as world:  # under torchrun: join the ranks, agree on the options
                run_merge(world.agree(lambda: merge_config(config_path, **given)))
        except UsageError as exc:
            raise click.UsageError(str(exc), ctx=ctx) from None

    names = method_names()
    params: list[click.Parameter] = [
        click.Option(["--config", "config_path"], type=click.Path(dir_okay=False), help="YAML file naming base, tasks and parameters; flags override it."),
        click.Option(["--base"], help="Pretrained checkpoint (file or directory)."),
        click.Option(["--tasks"], multiple=True, metavar="[NAME=]PATH ...", help="Fine-tuned checkpoints or PEFT LoRA adapter folders, one or more."),
        click.Option(["--method"], type=click.Choice(names), default=None, help="Merge method [default: task-arithmetic]."),
        click.Option(["--out"], type=click.Path(), help="Output directory."),
        click.Option(
            ["--heads"],
            multiple=True,
            metavar="[NAME=]PATH ...",
            help="Classification head per task (stored with the output; needed to adapt): a head file, or clip:CLIP for a zero-shot head "
            "from that full CLIP checkpoint and the class names of the task's --data (clip:CLIP without NAME= serves every task).",
        ),
        click.Option(["--data"], multiple=True, metavar="[NAME=]PATH ...", help="Unlabeled images per task, for methods that adapt."),
        click.Option(["--arch"], help="Architecture name (e.g. ViT-B-32-quickgelu) or JSON file; overrides what files say."),
        click.Option(["--dtype"], type=click.Choice(list(DTYPES)), default=None, help="Output dtype [the base's; wemoe: float32]."),
        click.Option(["--shard-size"], default=None, help="Split model files past this size [4GB]."),
        click.Option(["--seed"], type=int, default=None, help="Random seed [0]."),
        click.Option(["--force"], is_flag=True, help="Replace an existing output directory."),
        click.Option(["--dry-run"], is_flag=True, help="Validate the inputs and print the plan; write nothing."),
        *_method_options(),
    ]
    cmd = click.Command(
        "merge",
        callback=callback,
        params=params,
        help="Merge a base and task checkpoints into one model directory.\n\nMethods: " + "; ".join(f"{n}" for n in names) + ".",
    )
    return verbosity_options(device_option(cmd))


@click.command(name="eval")
@click.argument("model", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file naming model and tasks; flags override it.")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    metavar="NAME=HEAD:DATA ...",
    help="Task to evaluate (repeatable); HEAD may be empty for outputs that store heads, or clip:CLIP (NAME=clip:CLIP:DATA) "
    "for a zero-shot head from that full CLIP checkpoint and the data's class names.",
)
@split_option
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per forward pass [64].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N images per task.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results as JSON.")
@click.option("--arch", help="Architecture name or JSON file for a plain checkpoint.")
@click.option("--card", is_flag=True, help="Record the accuracies in the output directory's model card (README.md).")
@click.option(
    "--task-agnostic",
    is_flag=True,
    help="Also score without naming the task: the model's task posterior picks each image's head (task identification and joint accuracy).",
)
@device_option
@verbosity_options
def eval_cmd(**opts: Any) -> None:
    """Per-task accuracy of a checkpoint or merge output, each task with its own head."""
    from wemoe.commands.evaluate import run_eval
    from wemoe.merging.config import eval_options_from_yaml

    path = opts.pop("config_path", None)
    if path:
        opts = eval_options_from_yaml(opts, path)
    run_eval(opts)


@click.command()
@click.argument("path")
@click.option("--arch", help="Architecture name or JSON file.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw record (an output's config.json / wemoe.json) as JSON instead of text.")
def inspect(path: str, arch: str | None, as_json: bool) -> None:
    """Show what a checkpoint or wemoe output is: scheme, architecture, size against a plain model, experts, routing, adaptation."""
    from wemoe.commands.inspect import run_inspect

    run_inspect(path, arch, as_json)


@click.command()
@click.argument("model")
@click.option("--task", "tasks", multiple=True, metavar="NAME=DATA ...", help="Task data to route (repeatable).")
@split_option
@click.option("--limit", type=click.IntRange(min=1), default=256, show_default=True, help="At most N images per task (the first N).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per forward pass.")
@click.option("--png", type=click.Path(dir_okay=False), help="Write a heatmap PNG (its path is printed).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write mean routing weights as JSON.")
@device_option
@verbosity_options
def routes(**opts: Any) -> None:
    """Mean routing weight per MoE block and expert for each task's data."""
    from wemoe.commands.routes import run_routes

    run_routes(opts)


@click.command()
@click.argument("model")
@click.option("--task", "task", required=True, help="Task whose mean routing weights to bake in.")
@click.option("--data", help="Images of the task (defaults to the data recorded at merge time).")
@split_option
@click.option("--limit", type=click.IntRange(min=1), default=256, show_default=True, help="Images whose mean routing is baked in (the first N).")
@click.option("--out", required=True, type=click.Path(), help="Output directory (a plain checkpoint in the base's key scheme).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@device_option
@verbosity_options
def export(**opts: Any) -> None:
    """Write a plain (non-MoE) checkpoint for one task, in the base's key scheme."""
    from wemoe.commands.export import run_export

    run_export(opts)


@click.command(name="heads")
@click.option("--clip", "clip", required=True, help="Full CLIP checkpoint with its text tower: an open_clip file or a Hugging Face CLIPModel folder.")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    metavar="NAME=CLASSES ...",
    help="Class names of a task: a text file (one per line), an image folder (its class folders) or an .npz with 'classes'.",
)
@click.option("--templates", default="auto", show_default=True, help="Prompt templates: auto (the task's published set, else openai), a set's name, or a file.")
@click.option("--out", required=True, type=click.Path(), help="Directory for the head files (NAME.safetensors).")
@click.option("--arch", help="Architecture name or JSON file (its activation is the text tower's too).")
@click.option("--split", default="test", show_default=True, help="Split sub-folder of image folders given as CLASSES.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Prompts per forward pass.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@device_option
@verbosity_options
def heads_cmd(**opts: Any) -> None:
    """Zero-shot heads from a CLIP text tower, class names and prompt templates."""
    from wemoe.commands.heads import run_heads

    run_heads(opts)


def build_cli() -> click.Group:
    """The command group, with ``merge`` generated from the method registry as it is now."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
    @click.version_option(package_name="wemoe", message="wemoe %(version)s")
    def cli(debug: bool) -> None:
        """Merge task-finetuned vision transformers into one model (WEMoE and static baselines)."""

    cli.add_command(_merge_command())
    for command in (eval_cmd, heads_cmd, inspect, routes, export):
        cli.add_command(command)
    return cli


def _later_rank() -> bool:
    from wemoe.adaptation.distributed import launched

    try:
        world = launched()
    except WemoeError:
        return False
    return world is not None and not world.main


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except SystemExit as exc:
        if _left_a_failed_rank_group():
            _exit_without_teardown(exc.code)
        raise


def _left_a_failed_rank_group() -> bool:
    """Whether this process ends a torchrun run that failed (its own error, or a lost peer)."""
    distributed = sys.modules.get("wemoe.adaptation.distributed")  # never imported (nor torch) by a plain run's exit
    return distributed is not None and distributed.session_failed()


def _exit_without_teardown(code: object) -> None:
    """Exit once the one-line error is out, skipping C++ teardown.

    A process-group backend whose peer died can abort in its exit-time destructors
    ("terminate called without an active exception", exit 134) after the error was
    printed; temporary outputs were already removed while the error unwound.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def _main(argv: list[str] | None) -> None:
    return_freed_memory_to_os()
    args = expand_greedy(list(sys.argv[1:] if argv is None else argv), GREEDY_OPTIONS)
    debug = "--debug" in args
    try:
        build_cli().main(args=args, prog_name="wemoe", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        if debug:
            raise
        if _later_rank():  # every torchrun rank parsed the same arguments: rank 0 reports
            sys.exit(exc.exit_code)
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
    except ReportedElsewhere as exc:  # a torchrun rank whose error rank 0 prints
        sys.exit(exc.exit_code)
    except UsageError as exc:
        if debug:
            raise
        click.echo(f"wemoe: error: {exc}", err=True)
        sys.exit(2)
    except WemoeError as exc:
        if debug:
            raise
        click.echo(f"wemoe: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("wemoe: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"wemoe: internal error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
