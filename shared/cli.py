"""`fedmoe`: one console script, subcommands registered by each package.

Errors a user can cause (FedmoeError) print as one line and exit 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fedmoe.shared.errors import FedmoeError

# Each package registers its commands through the `fedmoe.commands` entry point group
# (pyproject.toml), so this module imports no package above `fedmoe.shared`; another
# installed package can add commands the same way. ORDER is the order in --help.
ENTRY_POINT_GROUP = "fedmoe.commands"
ORDER = ("shared", "client", "simulations", "server")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import entry_points

    parser = argparse.ArgumentParser(
        prog="fedmoe",
        description="Federated LoRA fine-tuning on Flower, with a mixture-of-experts coordinator.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    found = sorted(entry_points(group=ENTRY_POINT_GROUP),
                   key=lambda ep: (ORDER.index(ep.name) if ep.name in ORDER else len(ORDER), ep.name))
    if not found:
        raise SystemExit("fedmoe: error: no commands registered: install the package (pip install -e .)")
    for ep in found:
        ep.load()(sub)
    return parser


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")


def add_short_round_flags(p) -> None:
    """--min-replies, --short-round, --max-retries: `fedmoe simulate` and `fedmoe coordinator start`."""
    p.add_argument("--min-replies", type=int, default=1,
                   help="accepted replies each expert needs per round, at most its sampled sites (default 1)")
    p.add_argument("--short-round", default="proceed", choices=["proceed", "retry", "fail"],
                   help="a round short of --min-replies at its deadline: proceed with what arrived (default), "
                        "retry = re-send to the missing sites then proceed, fail = re-send then stop the run")
    p.add_argument("--max-retries", type=int, default=1, help="retry/fail: re-sends per round before giving up (default 1)")


def add_schedule_flags(p) -> None:
    """--lr-schedule, --eval-every: `fedmoe simulate` and `fedmoe coordinator start`."""
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"],
                   help="sites' learning rate across the whole federation: cosine = 10%% linear warm-up, then cosine "
                        "decay over rounds x local steps (default); constant = --lr every step")
    p.add_argument("--eval-every", type=int, default=1,
                   help="sites evaluate each expert on their own eval split every k-th round, for the accuracy "
                        "curves (default 1; 0: never)")


def check_short_round_flags(args) -> None:
    if args.min_replies < 1:
        raise FedmoeError(f"--min-replies must be >= 1, got {args.min_replies}")
    if args.max_retries < 0:
        raise FedmoeError(f"--max-retries must be >= 0, got {args.max_retries}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except FedmoeError as exc:
        if args.debug:
            raise
        print(f"fedmoe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmoe: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # bitsandbytes warns on CPU that an optional hub kernel is missing; it falls back to its own
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported before us (e.g. in-process callers): the env vars came too late
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
