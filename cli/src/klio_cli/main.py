"""The ``klio`` command: a thin dispatcher that answers ``wal-restore`` before importing much."""

from __future__ import annotations

import sys
from collections.abc import Sequence

TYPE_CHECKING = False  # not typing's: importing typing costs every restore_command ~2 ms
if TYPE_CHECKING:
    import argparse

_GLOBAL_OPTIONS = ("--config", "--cluster")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``klio`` command.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    depth, plain = prefetch_option(args)
    fast = fast_wal_restore(plain)
    if fast is not None:
        # PostgreSQL runs restore_command once per segment: a prefetched segment is a rename
        # (the spool module uses os only); else skip argparse and modules wal-restore does not
        # need (NATS, psycopg, S3).
        from klio_restore import spool

        depth = spool.DEFAULT_DEPTH if depth is None else depth
        if spool.serve(fast[2], fast[3], config=fast[0], cluster=fast[1], depth=depth):
            return 0
        from klio_cli.wal import wal_restore

        status = wal_restore(*fast)
        if status == 0:
            spool.follow(fast[2], fast[3], config=fast[0], cluster=fast[1], depth=depth)
        return status
    return _dispatch(args)


def prefetch_option(args: list[str]) -> tuple[int | None, list[str]]:
    """Take ``--prefetch K`` (or ``--prefetch=K``) from right after ``wal-restore``.

    Returns:
        (K or None when absent, the other arguments). A malformed value is left in place for
        argparse to report.
    """
    at = args.index("wal-restore") + 1 if "wal-restore" in args else len(args)
    key, eq, value = args[at].partition("=") if at < len(args) else ("", "", "")
    if key != "--prefetch":
        return None, args
    width = 1 if eq else 2
    if not eq:
        value = args[at + 1] if at + 1 < len(args) else ""
    if not (value.isascii() and value.isdigit()):
        return None, args
    return int(value), args[:at] + args[at + width :]


def fast_wal_restore(args: list[str]) -> tuple[str | None, str | None, str, str] | None:
    """Recognise ``[--config F] [--cluster C] wal-restore NAME DEST`` without argparse.

    Returns:
        (config, cluster, name, dest), or None for anything else (argparse then handles it,
        including errors and ``--help``).
    """
    options: dict[str, str] = {}
    i = 0
    while i < len(args) and args[i].startswith("--"):
        key, eq, value = args[i].partition("=")
        if key not in _GLOBAL_OPTIONS or key in options:
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            i += 1
            value = args[i]
        options[key] = value
        i += 1
    rest = args[i:]
    if len(rest) != 3 or rest[0] != "wal-restore" or any(a.startswith("-") for a in rest[1:]):
        return None
    return options.get("--config"), options.get("--cluster"), rest[1], rest[2]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: only commands that work are listed."""
    import argparse

    from klio_cli import backup, check, events, restore, retention, verify, wal

    parser = argparse.ArgumentParser(
        prog="klio",
        description="Backup and recovery for PostgreSQL on Kubernetes.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="configuration file (default: $KLIO_CONFIG)"
    )
    parser.add_argument(
        "--cluster", metavar="NAME", help="cluster to act on (optional with one cluster)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check.register(commands)
    wal.register(commands)
    backup.register(commands)
    restore.register(commands)
    verify.register(commands)
    events.register(commands)
    retention.register(commands)
    return parser


def _dispatch(args: list[str]) -> int:
    from klio_cli import output
    from klio_common.errors import KlioError

    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        result: int = ns.func(ns)
    except KlioError as exc:
        output.klio_error(exc)
        return 1
    except OSError as exc:
        output.os_error(exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":  # pragma: no cover - run as `python -m klio_cli.main`
    sys.exit(main())
