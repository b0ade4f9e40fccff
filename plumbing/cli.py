"""Command-line plumbing: a config dataclass becomes the CLI, bad input becomes one line and exit 2, progress bars."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

import torch.distributed as dist


def arg(default: Any, doc: str) -> Any:
    """A config field with its one line of documentation (shown by --help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": doc})
    return dataclasses.field(default=default, metadata={"help": doc})


def parse_config(cls: type, argv: list[str] | None = None):
    """Build an argparse CLI from a config dataclass: every field becomes --name."""
    doc = sys.modules[cls.__module__].__doc__ or ""
    description = " ".join(doc.strip().split("\n\n")[0].split()).replace("%", "%%")  # its first paragraph, whole
    parser = argparse.ArgumentParser(allow_abbrev=False, description=description)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = f.type if isinstance(f.type, type) else eval(f.type, {})  # annotations are strings
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")  # argparse formats %
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, default=default, help=help_text, metavar="BOOL")
        elif default is None:
            parser.add_argument(f"--{f.name}", type=str, default=None, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class InputError(Exception):
    """Bad input from the user (a file, a field, a path): reported as one line, exit status 2."""


def run(main: Callable[[], Any]) -> None:
    """Call main(); turn an InputError into one clear line on stderr and a non-zero exit."""
    try:
        main()
    except InputError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)  # one line, whatever it wraps
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal. When stderr goes to a file there is none (the scripts print their own lines of
    progress and results): a redrawn or stacked bar leaves carriage returns and cursor moves in a log."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
