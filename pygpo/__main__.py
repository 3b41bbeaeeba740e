"""Command line: ``python -m pygpo <command>`` (also installed as ``pygpo``).

Commands:
    losses    print the loss registry table (docs/losses.md); ``--write PATH`` writes it instead,
              ``--names`` lists the keys only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _cmd_losses(args: argparse.Namespace) -> int:
    from pygpo.losses import markdown_table, names

    if args.names:
        print("\n".join(names()))
        return 0
    text = markdown_table()
    if args.write:
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {args.write}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pygpo", description="pygpo command line")
    sub = parser.add_subparsers(dest="command", required=True)
    losses = sub.add_parser("losses", help="print the loss registry table (markdown)")
    losses.add_argument("--write", metavar="PATH", help="write the table to PATH instead of printing it")
    losses.add_argument("--names", action="store_true", help="list the registry keys only")
    losses.set_defaults(func=_cmd_losses)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
