"""The command group: error handling for every command, logging set-up and the consoles.

Every command runs inside ``Commands.invoke``: a ``UserError`` raised anywhere below becomes
one line on stderr and exit status 2, so commands do not catch it themselves. Commands print
results to ``out`` (stdout) and warnings to ``console`` (stderr).
"""

from __future__ import annotations

import errno
import logging
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from inat_finetune.errors import (
    NO_SPACE,
    UserError,
    describe_write_failure,
    one_line,
    write_failure,
)

# --help, usage errors and Ctrl+C: Typer reports these itself. (Typer >= 0.20 vendors its own
# Click, whose exceptions derive from TyperException; older Typer raises Click's.)
_TYPER_EXITS = (
    typer.Exit,
    typer.Abort,
    getattr(typer, "TyperException", typer.Exit),
    click.exceptions.Exit,
    click.ClickException,
    click.Abort,
)


console = Console(stderr=True)


out = Console()


class Commands(typer.core.TyperGroup):
    """Runs every command so that no error reaches the user as a raw traceback.

    A UserError becomes one line (exit 2), and so does a full disk or a read-only one wherever
    it happens (naming the file when the system says which). Anything unexpected becomes one line naming the
    exception and a hint (exit 1); ``--verbose`` shows the full traceback instead.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _TYPER_EXITS:
            raise
        except UserError as exc:
            fail(str(exc))
        except Exception as exc:
            out_of_space = _out_of_space(exc)
            if out_of_space is not None:
                fail(out_of_space)
            if ctx.params.get("verbose"):
                raise
            console.print(
                f"[bold red]error:[/] unexpected {type(exc).__name__}: {escape(one_line(str(exc)))} "
                "(this is a bug or an unhandled case; rerun with -v for the full traceback)",
                highlight=False,
                soft_wrap=True,
                markup=True,
            )
            raise typer.Exit(code=1) from None


def _out_of_space(exc: BaseException) -> str | None:
    """The one-line message for a write that a full or read-only disk refused, else None."""
    failure = write_failure(exc)
    if failure is None or failure.errno not in NO_SPACE | {errno.EROFS}:
        return None  # permission and I/O errors may come from reading: not called writes here
    return describe_write_failure(failure.filename or "a file being written", failure)


def fail(message: str) -> None:
    """Print ``error: <message>`` on one line and exit with status 2 (a usage problem).

    The message is text, not markup: ``pip install 'inat-finetune[serve]'`` keeps its brackets.
    """
    console.print(
        f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(code=2)


app = typer.Typer(
    cls=Commands,
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune ImageNet-pretrained CNNs on iNaturalist nature_12K or any folder of classes.",
)


def _setup_logging(verbose: bool) -> None:
    from inat_finetune.runtime.distributed import is_global_zero

    # Under DDP every process runs the command; only rank 0 tells the user what happens.
    quiet = not verbose and not is_global_zero()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    # Lightning installs its own INFO handler when imported (GPU available..., tips); import it
    # now so its messages go through ours instead, and only when they matter.
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        logger.handlers.clear()
        logger.propagate = True


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    _setup_logging(verbose)
