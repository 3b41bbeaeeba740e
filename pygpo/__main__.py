"""Command line: ``python -m pygpo <command>`` (also installed as ``pygpo``).

Commands:
    train     train a causal LM with any registry loss (``pygpo train [config.yaml] [--key value ...]``);
              with no arguments, the CPU demo. ``pygpo train --help`` lists the options.
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


def _cmd_train(args: argparse.Namespace) -> int:
    return train_main(args.rest)


def train_main(rest: Sequence[str]) -> int:
    """``pygpo train [config.yaml] [--key value ...]`` (options are the trainer's, not argparse's)."""
    from pygpo.trainer import ConfigError, config_help, load_config

    rest = list(rest)
    if any(a in ("-h", "--help") for a in rest):
        print("usage: pygpo train [config.yaml] [--key value ...]\n")
        print(config_help())
        return 0
    path = rest.pop(0) if rest and not rest[0].startswith("--") else None
    try:
        cfg = load_config(path, rest)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"pygpo train: {exc}", file=sys.stderr)
        return 2
    from pygpo.trainer.loop import train

    summary = train(cfg)
    return 130 if summary.get("interrupted") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pygpo", description="pygpo command line")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with any registry loss (no arguments: the CPU demo)", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER, help="[config.yaml] [--key value ...]")
    train.set_defaults(func=_cmd_train)
    losses = sub.add_parser("losses", help="print the loss registry table (markdown)")
    losses.add_argument("--write", metavar="PATH", help="write the table to PATH instead of printing it")
    losses.add_argument("--names", action="store_true", help="list the registry keys only")
    losses.set_defaults(func=_cmd_losses)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
