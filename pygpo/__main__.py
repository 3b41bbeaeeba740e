"""Command line: ``python -m pygpo <command>`` (also installed as ``pygpo``).

Commands:
    train     train a causal LM with any registry loss (``pygpo train [config.yaml] [--key value ...]``);
              with no arguments, the CPU demo. ``pygpo train --help`` lists the options.
    losses    print the loss registry table (docs/losses.md); ``--write PATH`` writes it instead,
              ``--names`` lists the keys only.
    check-model  will prefix sharing and the fused lm_head work for a model? Checked on a tiny random copy
              built from its config only (``pygpo check-model MODEL_DIR|config.json|model_type [--layers N]
              [--json] [--backend torch|triton]``; :mod:`pygpo.integrations.model_check`).

``pygpo train`` exits 0 when done, 130 when Ctrl-C stopped it (a checkpoint is saved), and 2 on the user's
mistakes (a bad option, path, row or checkpoint), printed as one line ``pygpo train: <message>``;
any other error keeps its traceback (``PYGPO_TRACEBACK=1`` shows one for every error).
``pygpo check-model`` exits 0 when every check passed or was refused with a message, 1 when one FAILED
(a pygpo bug), and 2 on bad input (an unknown model_type, an unreadable directory), printed as one line
``pygpo check-model: <message>``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
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


def _cmd_check_model(args: argparse.Namespace) -> int:
    import importlib.util
    import json

    if importlib.util.find_spec("transformers") is None:
        print("pygpo check-model: needs transformers, which this environment lacks: pip install transformers",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # config validation chatter is not the report
    from pygpo.integrations.model_check import ModelSpecError, check_model

    try:
        report = check_model(args.model, layers=args.layers, backend=args.backend)
    except ModelSpecError as exc:
        print(f"pygpo check-model: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    return report.exit_code


def _cmd_train(args: argparse.Namespace) -> int:
    return train_main(args.rest)


#: What ``pygpo train`` imports beyond pygpo's own dependencies (the ``train`` extra).
TRAIN_PACKAGES = ("transformers", "matplotlib")


def missing_train_packages() -> list[str]:
    """The packages of :data:`TRAIN_PACKAGES` that cannot be imported here."""
    import importlib.util

    return [name for name in TRAIN_PACKAGES if importlib.util.find_spec(name) is None]


def train_main(rest: Sequence[str]) -> int:
    """``pygpo train [config.yaml] [--key value ...]`` (options are the trainer's, not argparse's)."""
    from pygpo.trainer import ConfigError, config_help, load_config

    rest = list(rest)
    if any(a in ("-h", "--help") for a in rest):
        print("usage: pygpo train [config.yaml] [--key value ...]\n")
        print(config_help())
        return 0
    missing = missing_train_packages()
    if missing:
        print(f"pygpo train: needs {' and '.join(missing)}, which this environment lacks: "
              "pip install 'pygpo[train]'", file=sys.stderr)
        return 2
    path = rest.pop(0) if rest and not rest[0].startswith("--") else None
    try:
        cfg = load_config(path, rest)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"pygpo train: {exc}", file=sys.stderr)
        return 2
    from pygpo.trainer.loop import train

    try:
        summary = train(cfg)
    except Exception as exc:  # noqa: BLE001 - only pygpo's own user-facing errors are caught, see below
        if not is_user_error(exc):
            raise
        print(f"pygpo train: {exc}", file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


def is_user_error(exc: BaseException) -> bool:
    """An error about the user's input that pygpo raised itself (a bad path, row, checkpoint, option, a
    backend that cannot run here): a ``ValueError``, ``FileNotFoundError``, ``BackendUnavailableError`` (or
    the eager-gradients refusal) whose innermost frame is
    pygpo's code. The same types raised inside torch or transformers are bugs and keep their traceback,
    as does everything with ``PYGPO_TRACEBACK=1``."""
    from pygpo.fused.eager import NotSeparableError
    from pygpo.ops.dispatch import BackendUnavailableError

    user_types = (ValueError, FileNotFoundError, NotSeparableError, BackendUnavailableError)
    if os.environ.get("PYGPO_TRACEBACK") == "1" or not isinstance(exc, user_types):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


_PACKAGE = Path(__file__).resolve().parent


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
    check = sub.add_parser("check-model", help="check prefix sharing and the fused lm_head on a tiny random copy "
                           "of a model, built from its config only")
    check.add_argument("model", help="a local model directory, a config.json, or a transformers model_type (llama)")
    check.add_argument("--layers", type=int, default=2, help="layers of the tiny copy (default 2; more when the "
                       "model has more kinds of layers)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--backend", choices=("torch", "triton"), default="torch",
                       help="prefix attention and lm_head backend (triton runs in its CPU interpreter)")
    check.set_defaults(func=_cmd_check_model)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:
            return train_main(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except BrokenPipeError:
        # the reader of the output went away (`pygpo train --help | head -1`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
