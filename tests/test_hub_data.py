"""--data beyond JSONL, through the optional package datasets: a data set saved in the hub's formats (a parquet
file, a save_to_disk directory with its splits) gives the questions of its JSONL export, and eval.py the same
summary; without datasets, or with an ambiguous split, one line. All offline: nothing is downloaded."""
import json
import re
import sys

import pytest

from plumbing.cli import InputError, parse_config
from plumbing.models import load_tokenizer
from rollout import Config, load_questions
from conftest import run_script


@pytest.fixture(scope="module")
def hub_copies(toy_dir, tmp_path_factory):
    """The toy's test.jsonl as a parquet file and as a save_to_disk DatasetDict (test, plus a train split)."""
    datasets = pytest.importorskip("datasets")
    out = tmp_path_factory.mktemp("hub")
    with open(toy_dir / "test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    test = datasets.Dataset.from_list(rows)
    test.to_parquet(str(out / "test.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]), "test": test}).save_to_disk(str(out / "saved"))
    return out


def questions(data, toy_dir, *flags):
    return load_questions(parse_config(Config, ["--data", str(data), *flags]), load_tokenizer(str(toy_dir / "sft")))


def test_hub_formats_give_the_questions_of_the_jsonl(toy_dir, hub_copies):
    jsonl = questions(toy_dir / "test.jsonl", toy_dir)
    assert questions(hub_copies / "test.parquet", toy_dir) == jsonl
    assert questions(hub_copies / "saved", toy_dir, "--data_split", "test") == jsonl
    assert questions(hub_copies / "saved", toy_dir, "--data_split", "train") == jsonl[:3]
    with pytest.raises(InputError, match=re.escape(f"{hub_copies / 'saved'}: the data set has splits train, test: "
                                                   "choose one with --data_split")):
        questions(hub_copies / "saved", toy_dir)
    with pytest.raises(InputError, match="no split 'dev' \\(--data_split\\); it has train, test"):
        questions(hub_copies / "saved", toy_dir, "--data_split", "dev")
    with pytest.raises(InputError, match="missing column\\(s\\) problem .*--question_field"):
        questions(hub_copies / "test.parquet", toy_dir, "--question_field", "problem")


def test_eval_on_a_parquet_copy_gives_the_summary_of_the_jsonl(toy_dir, hub_copies, tmp_path):
    summaries = []
    for data in (toy_dir / "test.jsonl", hub_copies / "test.parquet"):
        out = tmp_path / data.name
        run_script("eval.py", "--model", str(toy_dir / "sft"), "--data", str(data), "--out_dir", str(out),
                   "--k", "2", "--max_new_tokens", "40", env={"OMP_NUM_THREADS": "1"})
        with open(out / "summary.json") as f:
            summaries.append({k: v for k, v in json.load(f).items() if k not in ("data", "seconds", "config")})
    assert summaries[0] == summaries[1] and summaries[0]["num_questions"] == 24


def test_without_datasets_a_hub_name_is_one_line_and_jsonl_needs_nothing(toy_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails, as when it is not installed
    with pytest.raises(InputError, match=r"^openai/gsm8k: not a JSONL file, so read as a hub data set, which needs "
                                         r"the package datasets: pip install datasets"):
        questions("openai/gsm8k", toy_dir, "--data_config", "main", "--data_split", "test")
    assert len(questions(toy_dir / "test.jsonl", toy_dir)) == 24
