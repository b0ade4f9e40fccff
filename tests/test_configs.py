"""configs/ and --config: every file reads with no other flag, the toy's files are demo.sh's flags, flags given
beside a file override it, a bad file is one line, and the toy's critic and actor train from their files alone."""
import glob
import importlib
import os
import re

import pytest
import yaml

from plumbing.cli import InputError, parse_config
from conftest import ROOT, run_script

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml")))
PATHS = {"model", "data", "out_dir", "init", "policy", "critic", "rollout_dir"}  # where a run reads and writes


def demo_flags() -> dict[str, list[str]]:
    """demo.sh's flags of each stage in the full demo (not the smoke run), as the toy's config files hold them."""
    with open(os.path.join(ROOT, "demo.sh")) as f:
        text = f.read()
    full = text[text.index("KIND=full"):]
    var = {name: re.search(rf'^  {name}="(.*)"', full, re.M).group(1).replace("$M", "16")
           for name in ("ROLLOUT", "CRITIC", "DAPO", "EVAL")}
    tokens = re.search(r'^TOKENS="(.*)"', text, re.M).group(1)
    return {"rollout": (var["ROLLOUT"] + " " + tokens).split(), "critic": var["CRITIC"].split(),
            "dapo": var["DAPO"].split(), "eval": (var["EVAL"] + " " + tokens).split()}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_every_config_file_reads_with_no_other_flag(path):
    stage = os.path.splitext(os.path.basename(path))[0]
    cfg = parse_config(importlib.import_module(stage).Config, ["--config", path])
    with open(path) as f:
        settings = yaml.safe_load(f)
    assert PATHS & set(settings) and all(getattr(cfg, key) is not None for key in settings)


@pytest.mark.parametrize("stage", ["rollout", "critic", "dapo", "eval"])
def test_the_toy_configs_are_demo_sh_flags(stage):
    """demo.sh keeps its flags (its figures were measured with them): the toy's files cannot drift from them."""
    Config = importlib.import_module(stage).Config
    path = os.path.join(ROOT, "configs", "toy", f"{stage}.yaml")
    flags = demo_flags()[stage]
    with open(path) as f:
        named = set(yaml.safe_load(f))
    assert named - PATHS == {flag[2:] for flag in flags[::2]}  # the same settings, beside the paths
    from_file, from_flags = parse_config(Config, ["--config", path]), parse_config(Config, flags)
    assert all(getattr(from_file, key) == getattr(from_flags, key) for key in named - PATHS)


def test_flags_beside_a_config_file_override_it(tmp_path):
    import critic
    import dapo

    path = os.path.join(ROOT, "configs", "toy", "dapo.yaml")
    cfg = parse_config(dapo.Config, ["--lr", "2e-4", "--config", path, "--fsdp", "true"])
    assert (cfg.lr, cfg.beta, cfg.epochs, cfg.fsdp, cfg.policy) == (2e-4, 0.3, 4, True, "runs/toy/sft")
    default = parse_config(dapo.Config, [])
    assert (default.lr, default.beta) == (5e-7, 0.01)  # without a file, the paper's settings
    bools = tmp_path / "bools.yaml"
    bools.write_text("fsdp: true\ngradient_checkpointing: yes\nlr: 1e-5\n")
    cfg = parse_config(critic.Config, ["--config", str(bools), "--gradient_checkpointing", "false"])
    assert (cfg.fsdp, cfg.gradient_checkpointing, cfg.lr) == (True, False, 1e-5)


@pytest.mark.parametrize("text, message", [
    ("lr: 1e-3\nlearning_rate: 1e-3\n", "unknown setting 'learning_rate'"),
    ("epochs: many\n", "epochs: 'many' is not a valid int"),
    ("fsdp: maybe\n", "fsdp: 'maybe' is not a valid"),
    ("- lr\n- 1e-3\n", "a config file holds settings, name: value"),
    ("lr: [1e-3\n", "not valid YAML")])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, text, message):
    import dapo

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        parse_config(dapo.Config, ["--config", str(path)])
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'none.yaml'}: cannot read the config file")):
        parse_config(dapo.Config, ["--config", str(tmp_path / "none.yaml")])


def test_a_script_given_a_bad_config_file_says_one_line_and_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("beta: 0.3\nbogus: 1\n")
    proc = run_script("dapo.py", "--config", str(path), check=False)
    assert proc.returncode == 2 and proc.stderr == f"error: {path}: unknown setting 'bogus' " \
        "(python SCRIPT --help lists the settings)\n", proc.stderr


def test_the_toy_critic_and_actor_train_from_their_config_files_alone(toy_dir, toy_rollout, tmp_path):
    """python critic.py --config configs/toy/critic.yaml, then dapo.py likewise, in a folder laid out as runs/toy."""
    (tmp_path / "runs" / "toy" / "iter1").mkdir(parents=True)
    os.symlink(toy_dir / "sft", tmp_path / "runs" / "toy" / "sft")
    os.symlink(toy_rollout, tmp_path / "runs" / "toy" / "iter1" / "rollout")
    env = {"OMP_NUM_THREADS": "1"}
    for stage in ("critic", "dapo"):
        run_script(os.path.join(ROOT, f"{stage}.py"), "--config", os.path.join(ROOT, "configs", "toy", f"{stage}.yaml"),
                   cwd=tmp_path, env=env)
    assert (tmp_path / "runs" / "toy" / "iter1" / "actor" / "config.json").exists()
