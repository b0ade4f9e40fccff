"""Run files: validated JSONL reading (and hub data sets), crash-safe shards, atomic writes, the rerun rule and input
fingerprints."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
from typing import Any, Callable, Iterable


from plumbing.cli import InputError
from plumbing.distributed import barrier, check_shared_dir, rank0_decides


def read_jsonl(path: str, required: Iterable[str] = (), allow_empty: bool = False,
               flags: dict[str, str] | None = None) -> list[dict]:
    """Read and validate every line before anything is computed, so bad input fails fast and
    names the file and line. `flags` maps a required field to the flag that names it, for the message."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                named_by = [flags[k] for k in missing if flags and k in flags]
                raise InputError(f"{path} line {line_no}: missing field(s) {', '.join(missing)}"
                                 + (f" (other field names: {', '.join(named_by)})" if named_by else ""))
            record["_line"] = line_no
            records.append(record)
    if not records and not allow_empty:
        raise InputError(f"{path}: the file is empty")
    return records


def read_table(path: str, config: str = "", split: str = "", required: Iterable[str] = (),
               flags: dict[str, str] | None = None) -> list[dict]:
    """Questions from a JSONL file (read_jsonl, needs nothing: a path ending in .jsonl, or any file but a .parquet
    or .csv) or, through the optional package datasets, from a hub data set name (with its config and split), a
    .parquet or .csv file or a save_to_disk directory. Rows are records as read_jsonl's, `_line` their row number."""
    local_format = {".parquet": "parquet", ".csv": "csv"}.get(os.path.splitext(path)[1])
    if path.endswith(".jsonl") or (os.path.isfile(path) and not local_format):
        return read_jsonl(path, required, flags=flags)
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path}: not a JSONL file, so read as a hub data set, which needs the package datasets: "
                         "pip install datasets (or -r requirements-optional.txt)") from None
    try:
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                       ("dataset_info.json", "dataset_dict.json", "state.json")):
            table = datasets.load_from_disk(path)  # a save_to_disk directory: a Dataset or a DatasetDict
        elif local_format and os.path.isfile(path):
            table = datasets.load_dataset(local_format, data_files=path)
        else:
            table = datasets.load_dataset(path, config or None, split=split or None)  # a hub name
    except Exception as e:  # the hub's errors are many: not found, gated, offline, a bad config
        raise InputError(f"{path}: cannot load it as a data set ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})") from None
    if isinstance(table, datasets.DatasetDict):
        splits = list(table)
        if not split and len(splits) > 1:
            raise InputError(f"{path}: the data set has splits {', '.join(splits)}: choose one with --data_split")
        if split and split not in table:
            raise InputError(f"{path}: no split {split!r} (--data_split); it has {', '.join(splits)}")
        table = table[split or splits[0]]
    missing = [k for k in required if k not in table.column_names]
    if missing:
        named_by = [flags[k] for k in missing if flags and k in flags]
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (it has {', '.join(table.column_names)})"
                         + (f" (other field names: {', '.join(named_by)})" if named_by else ""))
    if len(table) == 0:
        raise InputError(f"{path}: the data set is empty")
    return [{**row, "_line": i} for i, row in enumerate(table, start=1)]


def read_shard(path: str) -> list[dict]:
    """Records of a shard that this program appended itself. A line cut short by a kill is dropped
    (and truncated away) so that the rerun appends after the last complete record."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    keep = data[: data.rfind(b"\n") + 1]  # everything up to the last complete line
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode("utf-8").splitlines() if line.strip()]


def read_shards(out_dir: str) -> list[dict]:
    """The records of every rank's shard-RANK.jsonl in out_dir (a rerun may use another number of ranks)."""
    return [r for path in sorted(glob.glob(os.path.join(out_dir, "shard-*.jsonl"))) for r in read_shard(path)]


def append_jsonl(f, record: dict) -> None:
    """One line per finished unit of work, flushed to disk before the next begins (resume after a kill)."""
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    """Write to a temporary file and rename: readers see the old file or the whole new one, never half."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def check_rerun(cfg, out_dir: str, done: str, settings: str, work: list[str], ignore: tuple[str, ...], is_main: bool,
                covers: Callable[[dict], bool] = lambda record: True, write_settings: bool = True) -> bool:
    """The one rule of the four scripts for a run over earlier output; call it before anything is written.
      - --overwrite true: out_dir, the settings file and the work paths are removed first; the run starts afresh.
      - Finished output (`done`, the JSON file a run writes last, with its settings under "config"): made with
        these settings, it is complete: say so and return True (the caller exits 0; nothing is redone or
        rewritten). Made with other settings: stop, naming them.
      - Unfinished work (the existing `work` paths: shards, a checkpoint), whose run recorded its settings in
        `settings`: resumed only with the same settings, else stop, naming those that differ.
    `ignore` names the settings a rerun may change (where output goes, speed, logging, how many questions): none
    alters a saved result. `covers(done record)` says whether finished output holds all this command asks for
    (more questions than it holds: resumed from the work, or refused when there is none). The settings of this run
    are written to `settings` unless write_settings is False (the caller writes them with its first piece of work)."""
    if cfg.overwrite:
        barrier()  # every rank has looked at the old output before rank 0 removes it
        if is_main:
            for path in [out_dir, settings, *work]:
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        barrier()
    ours = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore}

    # Rank 0's reading of the disk decides for every rank (which collectives follow depends on it).
    if rank0_decides(lambda: finished_output(cfg, ours, out_dir, done, settings, work, covers),
                     f"{out_dir}: whether it holds finished output or unfinished work"):
        if is_main:
            print(f"{out_dir}: complete, made with these settings; nothing to do (--overwrite true redoes it)")
        return True
    barrier()  # every rank has compared before rank 0 rewrites the file
    if is_main and write_settings:
        os.makedirs(os.path.dirname(settings) or ".", exist_ok=True)
        write_json_atomic(settings, ours)
    check_shared_dir(os.path.dirname(settings) or ".")  # where the work and the settings go (several nodes)
    return False


def finished_output(cfg, ours: dict, out_dir: str, done: str, settings: str, work: list[str],
                    covers: Callable[[dict], bool]) -> bool:
    """check_rerun's reading of the disk: True when out_dir holds the finished output of these settings (`ours`),
    False when the run goes on (afresh or resuming its work); an InputError when the rerun is refused."""
    retry = "rerun with those settings, add --overwrite true to replace it, or use another --out_dir"
    unfinished = [p for p in work if os.path.exists(p)]
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            record = json.load(f)
        theirs = record.get("config", {})
        if _changed(ours, theirs):
            raise InputError(f"{done}: {out_dir} holds the finished output of a run with other settings "
                             f"({_changed(ours, theirs)}); {retry}")
        if covers(record):
            return True
        if not unfinished:  # it would be replaced by a run that holds other questions
            everything = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "overwrite")}
            raise InputError(f"{done}: {out_dir} holds the finished output of a run over other questions "
                             f"({_changed(everything, theirs)}); {retry}")
    if unfinished and os.path.exists(settings):
        with open(settings, encoding="utf-8") as f:
            theirs = json.load(f)
        if _changed(ours, theirs):
            raise InputError(f"{settings}: {out_dir} holds unfinished work of a run with other settings "
                             f"({_changed(ours, theirs)}); {retry}")
    return False



def _changed(ours: dict, theirs: dict) -> str:
    """The settings that differ, as '--name old -> new, ...' ('' when none does)."""
    return ", ".join(f"--{k} {theirs[k]!r} -> {ours[k]!r}" for k in ours if k in theirs and theirs[k] != ours[k])


def warn_useless_data(labels: list[float] = (), cut: int = 0, responses: int = 0, after: str = "") -> bool:
    """One warning line (stderr) when the data cannot teach anything: every MC label is the same (the critic can
    only learn a constant, and DAPO's advantages are then the critic's errors), or most responses were cut by the
    token limit (they count as wrong). `after` says what follows from it for the script. True when it warned."""
    reasons = []
    if labels and len(set(labels)) == 1:
        reasons.append(f"every MC label is {labels[0]:g} ({len(labels)} states){after}")
    if responses and cut > responses / 2:
        reasons.append(f"{cut} of {responses} responses were cut by the token limit (they count as wrong): "
                       "raise --max_new_tokens")
    if reasons:
        print("warning: " + "; ".join(reasons), file=sys.stderr, flush=True)
    return bool(reasons)


@contextlib.contextmanager
def atomic_dir(out_dir: str):
    """A directory written whole or not at all (a model directory, by one process): the block writes into the
    path it is given, beside out_dir, which then replaces out_dir. A kill or an error inside the block leaves
    out_dir as it was, so a half-saved model never looks finished."""
    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):  # left by a run killed while saving
        shutil.rmtree(tmp)
    yield tmp
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def fingerprint(*paths: str, extra: str = "") -> str:
    """Changes whenever an input changes: names, sizes and modification times of the files under each path."""
    entries = [extra]
    for path in paths:
        files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "**"), recursive=True))
        entries += [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns)
                    for f in files if os.path.isfile(f)]
        if not files:  # a hub name: the name is all we know
            entries.append(path)
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]
