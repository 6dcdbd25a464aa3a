"""The `dd` command line. Each verb lives beside the code it drives and is registered here.

Every user-facing fault ends as ONE stderr line, `dd <verb>: error: <message>` (exit 1; 2 for usage
errors), never a traceback: `DDGroup` turns the project's errors (errors.DDError, the data set's
StoreError, the eval input errors, teachers' checkpoint errors, a missing/unreadable user file, click's
own errors) into that line. DD_DEBUG=1 re-raises them with the traceback.
"""
from __future__ import annotations

import os
import sys

import click

from .errors import DDError


def _user_errors() -> tuple:
    """The exception types that are a fault in the user's input (imported late: the verbs import
    torch; this module must stay cheap for `dd -h`)."""
    from safetensors import SafetensorError

    from teachers.checkpoint import CheckpointFileError, CheckpointMismatchError

    from .adm_npz import InputFileError
    from .shard_store import StoreError
    return (DDError, StoreError, InputFileError, CheckpointMismatchError, CheckpointFileError,
            SafetensorError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def one_line(e: BaseException) -> str:
    """The message of `e` on one line, naming the file for OS errors."""
    if isinstance(e, click.ClickException):
        msg = e.format_message()
    elif isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        msg = f"{e.filename}: {e.strerror or e}"
    else:
        msg = str(e) or e.__class__.__name__
    if e.__class__.__name__ == "SafetensorError" and "safetensors" not in msg:
        msg = f"not a readable safetensors file: {msg}"
    return "; ".join(part.strip() for part in msg.splitlines() if part.strip())


def _verb(group: click.Group, args: list) -> str:
    """`train`, `dataset verify` ...: the leading words of `args` that name (sub)commands."""
    words, node = [], group
    for a in args:
        if not isinstance(node, click.Group) or a not in node.commands:
            break
        words.append(a)
        node = node.commands[a]
    return " ".join(words) or "dd"


class DDGroup(click.Group):
    """The `dd` group: every user-facing error becomes one stderr line (see the module docstring)."""

    def invoke(self, ctx: click.Context):
        # Converted here, inside click's main: click itself turns an EOFError (a truncated pickle)
        # into "Aborted!".
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as e:  # noqa: BLE001 - only the user-error types below are converted
            if os.environ.get("DD_DEBUG") or not isinstance(e, _user_errors()):
                raise
            raise click.ClickException(one_line(e)) from e

    def main(self, args=None, prog_name=None, **extra):
        args = sys.argv[1:] if args is None else list(args)
        verb = _verb(self, args)
        try:
            rv = super().main(args, prog_name=prog_name or "dd", standalone_mode=False, **extra)
        except click.Abort:
            click.echo(f"dd {verb}: aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:
            if e.__class__.__name__ == "NoArgsIsHelpError":     # `dd`, `dd dataset`: the help, as click shows it
                e.show()
                sys.exit(e.exit_code)
            if os.environ.get("DD_DEBUG") and e.__cause__ is not None:
                raise e.__cause__
            name = "dd" if verb == "dd" else f"dd {verb}"
            hint = f" ({name} -h for help)" if isinstance(e, click.UsageError) else ""
            click.echo(f"{name}: error: {one_line(e)}{hint}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=DDGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distilled-decoding")
def main() -> None:
    """Distilled Decoding: distil an image AR model (VAR, LlamaGen) into a 1-2 step generator."""


# Verbs are registered below, one line each (keep it that way: helpers add lines here).
from .evaluate import eval_cmd; main.add_command(eval_cmd)  # noqa: E402,E702  dd eval
from .dataset_cli import build_dataset_command, dataset_group; main.add_command(build_dataset_command); main.add_command(dataset_group)  # noqa: E402,E702  dd build-dataset, dd dataset verify|info
from .sampling import sample_cmd; main.add_command(sample_cmd)  # noqa: E402,E702  dd sample
from .train import train_command; main.add_command(train_command)  # noqa: E402,E702  dd train
from .demo import demo_cmd; main.add_command(demo_cmd)  # noqa: E402,E702  dd demo
from .ard_cli import ard_group; main.add_command(ard_group)  # noqa: E402,E702  dd ard build-dataset|verify|info|train|sample|demo
from .csd_train import csd_group; main.add_command(csd_group)  # noqa: E402,E702  dd csd train
