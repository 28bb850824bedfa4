"""The ``studyq`` command line: a thin shell over the Python API.

``main(argv) -> int`` builds one parser whose subcommands live in small modules (one per
family of commands); each registers itself with :func:`register` and returns an exit code.
A bad study file, URL or flag prints one message per problem (file, field, fix) to stderr
and exits with :data:`EXIT_USAGE`; nothing is written anywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import pydantic

from orchestrator.contracts.errors import (
    BrokerUnavailableError,
    StoreUnavailableError,
    StoreURLError,
    StudyConflictError,
    StudyError,
    StudyqError,
    StudyValidationError,
)

__all__ = [
    "EXIT_CONNECT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_FAILED = 1  # the command worked, but some runs failed
EXIT_USAGE = 2  # bad study file, reference, URL or flag; nothing was changed
EXIT_CONNECT = 3  # the broker or the database could not be reached
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """Usage errors print the subcommand's full help, then exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_help(sys.stderr)
        self.exit(EXIT_USAGE, f"\n{self.prog}: error: {message}\n")


def add_command(
    subparsers: argparse._SubParsersAction[_Parser],
    name: str,
    *,
    help: str,
    example: str,
    handler: Handler,
) -> _Parser:
    """A subcommand whose ``--help`` ends with a runnable example."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected more than 0, got {value}")
    return value


def build_parser() -> _Parser:
    from orchestrator.cli import study_commands

    parser = _Parser(
        prog="studyq",
        description="studyq runs research study sweeps: every condition x agent x problem x "
        "replicate of a design-research-experiments study file, on a laptop or on a cluster "
        "of Celery workers, with every result in one database.",
        epilog="example:\n  studyq run examples/quickstart/study.yaml\n\n"
        "`studyq COMMAND --help` shows each command's options and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    study_commands.register(subparsers)
    for module_name in (
        "run_commands",
        "cluster_commands",
        "inspect_commands",
        "manage_commands",
        "worker_commands",
        "report_commands",
        "dashboard_commands",
        "llm_commands",
    ):
        try:
            module = __import__(f"orchestrator.cli.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"orchestrator.cli.{module_name}":
                raise
            continue
        module.register(subparsers)
    return parser


def report_study_error(error: StudyError) -> int:
    """Print every problem, one per line, and return the usage exit code."""
    print(str(error), file=sys.stderr)
    if isinstance(error, StudyValidationError) and len(error.problems) > 1:
        print(f"{len(error.problems)} problems found; nothing was changed.", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except pydantic.ValidationError as exc:  # settings from the environment
        problems = "; ".join(
            f"STUDYQ_{'_'.join(str(part) for part in error['loc']).upper() or 'SETTINGS'}: "
            f"{error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        print(f"studyq: invalid settings: {problems}", file=sys.stderr)
        return EXIT_USAGE
    except StudyError as exc:
        return report_study_error(exc)
    except (BrokerUnavailableError, StoreUnavailableError) as exc:
        print(f"studyq: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    except (StudyConflictError, StoreURLError) as exc:  # a changed study, a wrong --db URL
        print(f"studyq: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StudyqError as exc:
        print(f"studyq: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nstudyq: interrupted; finished results are kept.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
