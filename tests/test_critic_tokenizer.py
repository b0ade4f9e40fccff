"""A critic with its own tokenizer (plumbing/retokenize.py): through critic.py's training data and dapo.py's Q pass
it gives the critic's V on the re-tokenized text of each state (and of each s . a); a step boundary inside a
critic token gets a row of its own; a pair that cannot be mapped is refused; the same tokenizer keeps the ids."""
import json
import os

import pytest
import torch

import critic as C
import dapo
from plumbing.cli import InputError, parse_config
from plumbing.distributed import Dist
from plumbing.models import load_tokenizer
from plumbing.retokenize import critic_tokens, same_tokenizer
from conftest import run_script, tiny_random_llama

POLICY_PIECES = r"[A-Za-z]+: | ?[A-Za-z]+|[\s\S]"  # the toy's kind: words, operation names, single characters
CRITIC_PIECES = r"[A-Za-z]+|=\d|\n\n|[\s\S]"  # another: "=5" and "\n\n" are single tokens
STEPS = [["Add: 3+2=5\n", "Multiply: 5*3=5\n", "Subtract: 5-1=4"],
         ["Add: 1+1=2\n\n", "Add: 2+2=4\n", "Multiply: 4*2=8"],
         ["Subtract: 9-1=8\n", "Add: 8+1=9"]]
PROMPT = "Start with 3. Add 2. Multiply by 3. Subtract 1.\n"


def word_tokenizer(pieces: str, chars: str | None = None):
    """A word-level fast tokenizer on the given pieces (every printable character and newline its own token
    otherwise; only `chars` when given, anything else <unk>), decoding back to the text."""
    import re

    from tokenizers import decoders, models, pre_tokenizers, Regex, Tokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [PROMPT, "\n\n", *(f"={d}" for d in range(10))] + [s for steps in STEPS for s in steps]
    chars = list(chars) if chars is not None else [chr(c) for c in range(32, 127)] + ["\n"]
    found = sorted({m for text in corpus for m in re.findall(pieces, text)} - set(chars))
    if chars != [chr(c) for c in range(32, 127)] + ["\n"]:
        found = [p for p in found if all(c in chars for c in p)]
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + chars + found
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(pieces), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_model(tok, path, seed):
    model = tiny_random_llama(vocab=len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A policy and a critic backbone with different tokenizers, and a hand-made rollout of the policy (its
    token ids; step_ends at each step's end and, in one solution, also after an '=' inside a critic token '=5')."""
    root = tmp_path_factory.mktemp("tokenizers")
    policy_tok, critic_tok = word_tokenizer(POLICY_PIECES), word_tokenizer(CRITIC_PIECES)
    policy = save_model(policy_tok, root / "policy", 0)
    backbone = save_model(critic_tok, root / "backbone", 1)
    rollout = root / "rollout"
    rollout.mkdir()
    prompt = policy_tok(PROMPT).input_ids
    solutions, states = [], []
    for q, steps in enumerate(STEPS):
        ids, ends = list(prompt), []
        for step in steps:
            ends.append(len(ids))
            ids += policy_tok(step).input_ids
        if q == 0:  # a state that ends after "Multiply: 5*3=" (the critic's token is "=5")
            ends.append(len(prompt) + len(policy_tok(steps[0] + "Multiply: 5*3=").input_ids))
            ends.sort()
        text = policy_tok.decode(ids[len(prompt):], skip_special_tokens=True)
        solutions.append({"qid": f"q{q}", "prompt_len": len(prompt), "ids": ids, "text": text, "correct": True,
                          "step_ends": ends, "mc_values": [0.2 + 0.1 * t for t in range(len(ends))]})
        for t, end in enumerate(ends):
            nxt = ends[t + 1] if t + 1 < len(ends) else len(ids)
            states.append({"qid": f"q{q}", "t": t, "prompt_len": len(prompt), "state_ids": ids[:end],
                           "mc_value": 0.5, "actions": [
                               {"ids": ids[end:nxt], "terminal": False, "reward": None},
                               {"ids": policy_tok("Add: 7+1=8\n").input_ids, "terminal": False, "reward": None},
                               {"ids": policy_tok("\nAdd: 1").input_ids, "terminal": False, "reward": None},
                               {"ids": [5], "terminal": True, "reward": 1.0}]})
    for name, rows in (("solutions.jsonl", solutions), ("states.jsonl", states)):
        with open(rollout / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(rollout / "summary.json", "w") as f:
        json.dump({"config": {"model": policy}}, f)
    return {"policy": policy, "backbone": backbone, "rollout": str(rollout), "root": root}


def random_critic(path):
    critic = C.Critic.from_backbone(path, "cpu").eval()
    torch.nn.init.normal_(critic.value_head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    return critic


def alone(critic, tok, text):
    """The critic run directly on the text, in its own tokens: V at the last token."""
    return C.value_alone(critic, tok(text, add_special_tokens=False).input_ids, [])


def critic_config(dirs, out, *extra):
    return parse_config(C.Config, ["--rollout_dir", dirs["rollout"], "--init", dirs["backbone"], "--out_dir", str(out),
                                   "--batch_size", "1", "--micro_batch_size", "1", "--heldout_fraction", "0", *extra])


def test_the_toy_tokenizers_differ_and_the_same_one_is_the_same(dirs):
    policy_tok, critic_tok = load_tokenizer(dirs["policy"]), load_tokenizer(dirs["backbone"])
    assert not same_tokenizer(policy_tok, critic_tok)
    assert same_tokenizer(policy_tok, load_tokenizer(dirs["policy"]))
    assert critic_tokens(policy_tok, load_tokenizer(dirs["policy"]), "x") is None


def test_training_data_reads_the_value_of_each_state_text(dirs, tmp_path):
    """critic.py's training path (read_inputs: the ids and positions it trains on) gives, at every state, the
    critic's V on the state's text tokenized alone; the state whose boundary falls inside the critic token '=5'
    is a row of its own, read at its token '='."""
    policy_tok, critic_tok = load_tokenizer(dirs["policy"]), load_tokenizer(dirs["backbone"])
    train, heldout, tokens = C.read_inputs(critic_config(dirs, tmp_path / "c"), 1)
    assert not heldout and tokens["critic_reads"].startswith("its own tokens")
    critic = random_critic(dirs["backbone"])
    got = C.values_at(critic, [s["ids"] for s in train], [s["value_positions"] for s in train])
    by_label = {(s["qid"], label): v for s, vs in zip(train, got) for label, v in zip(s["mc_values"], vs)}
    checked, own_rows = 0, 0
    for line in open(os.path.join(dirs["rollout"], "solutions.jsonl")):
        r = json.loads(line)
        for end, label in zip(r["step_ends"], r["mc_values"]):
            text = policy_tok.decode(r["ids"][:end])
            want = alone(critic, critic_tok, text)
            assert abs(by_label[(r["qid"], label)] - want) <= 1e-6, (text, by_label[(r["qid"], label)], want)
            checked += 1
            if text.endswith("="):  # the boundary inside '=5': its own row, ending with the token '='
                row = next(s for s in train if s["qid"] == r["qid"] and s["mc_values"] == [label])
                assert critic_tok.convert_ids_to_tokens(row["ids"][-1]) == "=" and len(row["value_positions"]) == 1
                own_rows += 1
    assert checked == sum(len(json.loads(line)["step_ends"]) for line in open(os.path.join(dirs["rollout"],
                                                                                           "solutions.jsonl")))
    assert own_rows == 1 and len({s["qid"] for s in train}) == 3
    # The one-pass rows hold several states: the reading at the boundary is the saving, not a row per state.
    assert max(len(s["value_positions"]) for s in train) >= 3
    assert all(w > 0 for s in train for w in s["weights"])


def test_a_boundary_merged_by_the_critic_gets_its_own_row(dirs):
    """'...=2\\n' | '\\nAdd...' in the policy's steps is '\\n\\n', one critic token: the state is read on its own
    text, whose last critic token is '\\n', not at the solution's '\\n\\n'."""
    policy_tok, critic_tok = load_tokenizer(dirs["policy"]), load_tokenizer(dirs["backbone"])
    tokens = critic_tokens(policy_tok, critic_tok, "solutions.jsonl")
    ids = policy_tok(PROMPT + "Add: 1+1=2\n\nAdd: 2+2=4").input_ids
    end = len(policy_tok(PROMPT + "Add: 1+1=2\n").input_ids)
    rows = tokens.solutions([{"qid": "a", "ids": ids, "value_positions": [end - 1, len(ids) - 1],
                              "mc_values": [0.25, 0.75]}])
    own = next(r for r in rows if r["mc_values"] == [0.25])
    assert critic_tok.convert_ids_to_tokens(own["ids"][-1]) == "\n"
    assert own["ids"] == critic_tok(PROMPT + "Add: 1+1=2\n", add_special_tokens=False).input_ids


def test_q_pass_reads_the_text_of_each_state_and_action(dirs, tmp_path):
    """dapo.py's Q pass (critic_q_values: the check, the packing, the translation) with a critic directory of
    another tokenizer gives r for a terminal action and the critic on the text of s . a, tokenized alone."""
    policy_tok, critic_tok = load_tokenizer(dirs["policy"]), load_tokenizer(dirs["backbone"])
    critic = random_critic(dirs["backbone"])
    C.save_critic(critic, critic_tok, str(tmp_path / "critic"))
    states = dapo.read_states(os.path.join(dirs["rollout"], "states.jsonl"), completion_rewards=False)
    for packing in ("auto", "off"):
        cfg = parse_config(dapo.Config, ["--policy", dirs["policy"], "--critic", str(tmp_path / "critic"),
                                         "--rollout_dir", dirs["rollout"], "--packing", packing,
                                         "--critic_batch_size", "4"])
        q = dapo.critic_q_values(cfg, Dist(0, 1, 0, torch.device("cpu")), states)
        shared = 0
        for s, q_s in zip(states, q, strict=True):
            for a, value in zip(s["actions"], q_s, strict=True):
                if a["terminal"]:
                    assert value == a["reward"]
                    continue
                want = alone(critic, critic_tok, policy_tok.decode(s["state_ids"] + a["ids"]))
                assert abs(value - want) <= 1e-6, (policy_tok.decode(s["state_ids"] + a["ids"]), value, want)
        asked = [(s["state_ids"], [a["ids"] for a in s["actions"] if not a["terminal"]]) for s in states]
        critic_asked, back = critic_tokens(policy_tok, critic_tok, "x").asked(asked)
        shared = sum(len(acts) for _, acts in critic_asked if acts != [[]])
        assert 0 < shared < sum(len(acts) for _, acts in asked)  # some packed after their state, some alone
    assert len(q) == len(states)


def test_critic_py_and_dapo_py_run_with_the_critic_of_another_tokenizer(dirs, tmp_path):
    """End to end: critic.py trains the critic of another tokenizer on the text (metrics.json says so) and its
    held-out numbers are the critic on each state's text; dapo.py's Q values are that critic on each text."""
    out = tmp_path / "critic"
    run_script("critic.py", "--rollout_dir", dirs["rollout"], "--init", dirs["backbone"], "--out_dir", str(out),
               "--batch_size", "2", "--micro_batch_size", "1", "--epochs", "2", "--lr", "1e-2",
               "--heldout_fraction", "0.3", "--log_every", "1")
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["tokens"]["policy"] == dirs["policy"]
    assert metrics["tokens"]["critic_reads"].startswith("its own tokens")
    assert metrics["tokens"]["policy_vocabulary"] != metrics["tokens"]["critic_vocabulary"]
    critic, critic_tok = C.load_critic(str(out), "cpu").eval(), load_tokenizer(str(out))
    policy_tok = load_tokenizer(dirs["policy"])
    states = dapo.read_states(os.path.join(dirs["rollout"], "states.jsonl"), completion_rewards=False)
    cfg = parse_config(dapo.Config, ["--policy", dirs["policy"], "--critic", str(out), "--rollout_dir",
                                     dirs["rollout"]])
    q = dapo.critic_q_values(cfg, Dist(0, 1, 0, torch.device("cpu")), states)
    s, a = states[1], states[1]["actions"][1]
    want = alone(critic, critic_tok, policy_tok.decode(s["state_ids"] + a["ids"]))
    assert abs(q[1][1] - want) <= 1e-6


def test_same_tokenizer_keeps_the_policy_ids(dirs, tmp_path):
    """A critic on the policy's own tokenizer trains on the policy's ids and positions, unchanged."""
    cfg = critic_config(dirs, tmp_path / "c", "--init", dirs["policy"])
    train, _, tokens = C.read_inputs(cfg, 1)
    plain = C.load_solutions(os.path.join(dirs["rollout"], "solutions.jsonl"))
    assert tokens["critic_reads"] == "the policy's token ids"
    assert sorted((s["qid"], s["ids"], s["value_positions"]) for s in train) == \
        sorted((s["qid"], s["ids"], s["value_positions"]) for s in plain)


def test_another_vocabulary_of_the_same_size_is_not_read_as_the_policys(dirs, tmp_path):
    """The same tokens with other ids (a vocabulary of the same size, every id in range): not the same
    tokenizer, so the critic reads the text, never the policy's ids."""
    policy_tok = load_tokenizer(dirs["policy"])
    vocab = policy_tok.get_vocab()
    permuted = dict(zip(sorted(vocab), sorted(vocab.values(), reverse=True)))
    from tokenizers import decoders, models, pre_tokenizers, Regex, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(permuted, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(POLICY_PIECES), behavior="isolated")
    tk.decoder = decoders.Fuse()
    other = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>")
    assert len(other) == len(policy_tok)
    backbone = save_model(other, tmp_path / "other", 2)
    train, _, tokens = C.read_inputs(critic_config(dirs, tmp_path / "c", "--init", backbone), 1)
    assert tokens["critic_reads"].startswith("its own tokens")
    plain = C.load_solutions(os.path.join(dirs["rollout"], "solutions.jsonl"))
    for p in plain:  # each solution, as text in the critic's tokens; never the policy's ids
        full = other(policy_tok.decode(p["ids"]), add_special_tokens=False).input_ids
        assert full != p["ids"] and full in [s["ids"] for s in train] and p["ids"] not in [s["ids"] for s in train]


def test_a_pair_that_cannot_be_mapped_is_refused(dirs, tmp_path):
    """A critic tokenizer that cannot write the policy's text (no digits: <unk>) is refused in one line naming
    the file, by critic.py and by dapo.py's Q pass."""
    lossy = word_tokenizer(CRITIC_PIECES, chars=[chr(c) for c in range(32, 127) if not chr(c).isdigit()] + ["\n"])
    backbone = save_model(lossy, tmp_path / "lossy", 3)
    with pytest.raises(InputError, match=r"solutions.jsonl: the critic's tokenizer does not give back the text"):
        C.read_inputs(critic_config(dirs, tmp_path / "c", "--init", backbone), 1)
    C.save_critic(random_critic(backbone), load_tokenizer(backbone), str(tmp_path / "critic"))
    cfg = parse_config(dapo.Config, ["--policy", dirs["policy"], "--critic", str(tmp_path / "critic"),
                                     "--rollout_dir", dirs["rollout"]])
    states = dapo.read_states(os.path.join(dirs["rollout"], "states.jsonl"), completion_rewards=False)
    with pytest.raises(InputError, match=r"states.jsonl: the critic's tokenizer does not give back the text"):
        dapo.critic_q_values(cfg, Dist(0, 1, 0, torch.device("cpu")), states)
    proc = run_script("critic.py", "--rollout_dir", dirs["rollout"], "--init", backbone, "--out_dir",
                      str(tmp_path / "c2"), "--batch_size", "1", "--micro_batch_size", "1", check=False)
    assert proc.returncode != 0 and "does not give back the text" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_rollout_in_another_tokenizer_than_the_assumed_policy_is_refused(dirs, tmp_path):
    """Without summary.json or --policy the policy is assumed to be --init: a rollout whose ids are not its
    text in that tokenizer is refused (whatever the vocabulary sizes), and --policy names the right one."""
    rollout = tmp_path / "rollout"
    rollout.mkdir()
    (rollout / "solutions.jsonl").write_text(open(os.path.join(dirs["rollout"], "solutions.jsonl")).read())
    cfg = parse_config(C.Config, ["--rollout_dir", str(rollout), "--init", dirs["backbone"], "--batch_size", "1",
                                  "--micro_batch_size", "1", "--heldout_fraction", "0"])
    with pytest.raises(InputError, match="token ids are not its text in the tokenizer of .*--policy"):
        C.read_inputs(cfg, 1)
    cfg.policy = dirs["policy"]
    train, _, tokens = C.read_inputs(cfg, 1)
    assert tokens["critic_reads"].startswith("its own tokens") and train


def test_advantage_quality_asks_a_critic_of_another_tokenizer_as_dapo_does(dirs, tmp_path):
    """data/toy/advantage_quality.py --strong_critic: the Q values of a critic with its own tokenizer are
    dapo.py's (the text of s . a in the critic's tokens)."""
    import importlib.util
    import sys

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("toy_advantage_quality",
                                                  os.path.join(ROOT, "data", "toy", "advantage_quality.py"))
    aq = sys.modules["toy_advantage_quality"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aq)
    critic_tok = load_tokenizer(dirs["backbone"])
    C.save_critic(random_critic(dirs["backbone"]), critic_tok, str(tmp_path / "critic"))
    where = os.path.join(dirs["rollout"], "states.jsonl")
    states = dapo.read_states(where, completion_rewards=False)
    got = aq.critic_q_values(str(tmp_path / "critic"), load_tokenizer(dirs["policy"]), states, where)
    cfg = parse_config(dapo.Config, ["--policy", dirs["policy"], "--critic", str(tmp_path / "critic"),
                                     "--rollout_dir", dirs["rollout"]])
    want = dapo.critic_q_values(cfg, Dist(0, 1, 0, torch.device("cpu")), states)
    assert torch.tensor([v for q in got for v in q]).std() > 1e-3
    torch.testing.assert_close(torch.tensor([v for q in got for v in q]), torch.tensor([v for q in want for v in q]),
                               rtol=0, atol=1e-6)
