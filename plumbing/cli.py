"""Command-line plumbing: a config dataclass (and a config file) becomes the CLI, bad input becomes one line and exit 2,
progress bars."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from typing import Any, Callable

import torch.distributed as dist


def arg(default: Any, doc: str) -> Any:
    """A config field with its one line of documentation (shown by --help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": doc})
    return dataclasses.field(default=default, metadata={"help": doc})


def parse_config(cls: type, argv: list[str] | None = None):
    """The CLI of a config dataclass (transformers' HfArgumentParser: every field is --name, help from its doc),
    plus --config FILE.yaml (or .json): the file's settings first, the flags given beside it override them."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    doc = sys.modules[cls.__module__].__doc__ or ""
    description = " ".join(doc.strip().split("\n\n")[0].split()).replace("%", "%%")  # its first paragraph, whole
    parser = HfArgumentParser(cls, allow_abbrev=False, description=description)
    parser.add_argument("--config", default=None, help="a YAML or JSON file of these settings (configs/ holds the "
                        "toy's, the README's and the paper's); flags given beside it override it")
    for action in parser._actions:  # argparse formats a help text with %: the docs' percentages must stay literal
        action.help = action.help.replace("%", "%%") if action.help and "%%" not in action.help else action.help
    config_file = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_file.add_argument("--config", default=None)
    path = config_file.parse_known_args(argv)[0].config
    if path is not None:  # HfArgumentParser.parse_yaml_file reads a file alone; here it gives defaults flags override
        parser.set_defaults(**read_config_file(path, parser))
    settings = vars(parser.parse_args(argv))
    settings.pop("config")
    return cls(**settings)


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """A config file's settings, each checked as its flag would be: an unknown key or a bad value is one line."""
    import yaml  # a dependency of transformers

    try:
        with open(path) as f:
            settings = yaml.safe_load(f)  # JSON is YAML too
    except OSError as e:
        raise InputError(f"{path}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise InputError(f"{path}: a config file holds settings, name: value, one a line")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    checked = {}
    for key, value in settings.items():
        if key not in actions:
            raise InputError(f"{path}: unknown setting {key!r} (python SCRIPT --help lists the settings)")
        if value is None or actions[key].type is None:
            checked[key] = value
            continue
        try:  # as the flag would read it: YAML reads 1e-4 as a string, true as a bool
            checked[key] = actions[key].type(str(value).lower() if isinstance(value, bool) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            kind = getattr(actions[key].type, "__name__", "value")
            raise InputError(f"{path}: {key}: {value!r} is not a valid {kind} ({e})") from None
    return checked


class InputError(Exception):
    """Bad input from the user (a file, a field, a path): reported as one line, exit status 2."""


def run(main: Callable[[], Any]) -> None:
    """Call main(); turn an InputError into one clear line on stderr and a non-zero exit."""
    from plumbing.trainer import start_memory_trace

    start_memory_trace()  # only with $DAPO_PEAK_MEMORY_FILE set: a diagnostic of the memory a rank needs
    try:
        main()
        # Free what main() left in reference cycles (an FSDP model, its optimizer) while the interpreter is whole: torn
        # down during interpreter exit instead, their process-group threads have aborted a rank after its work was
        # written ("terminate called without an active exception", seen in CI under torchrun --fsdp). Only then the
        # process group goes: its models (a DDP reducer) are freed before it, never after.
        gc.collect()
        from plumbing.distributed import destroy_distributed

        destroy_distributed()
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
