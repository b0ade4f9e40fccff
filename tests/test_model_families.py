"""Stage B packs each state with its candidates into one row (plumbing.shared_prefix). For every model family
that must give what each (state, action) pair run alone gives, or the guard must find out in one line: tiny random
models of Llama, Qwen2 with sliding layers, Mistral, Gemma 3 (windows of 4 tokens, shorter than the rows) are exact
in log pi(a|s), its gradient and the critic's V(s . a); a hybrid (LFM2: convolution layers), an ALiBi model
(Bloom), a state-space model (Mamba) and a longrope Phi-3 past its original length run one row per pair instead
(refused with --packing on), in the functions and through dapo.py (LFM2 also under torchrun with two ranks, equal
to one process); a dynamic RoPE past its length is refused."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM

import critic as C
import dapo
from conftest import run_script
from plumbing.cli import InputError
from plumbing.shared_prefix import check_packing, checked_rows, PACKING, rope_limit, shared_prefix_rows

VOCAB = 64
WINDOW = 4  # every row below is longer than this
ORIGINAL = 16  # the length up to which a longrope or dynamic RoPE keeps its frequencies
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SIZES),
    # layer 0 full attention, layer 1 sliding: the model takes a mask per layer type
    "qwen2": lambda: transformers.Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=WINDOW,
                                              max_window_layers=1),
    "mistral": lambda: transformers.MistralConfig(**SIZES, sliding_window=WINDOW),  # one window for every layer
    "gemma3": lambda: transformers.Gemma3TextConfig(**SIZES, head_dim=8, sliding_window=WINDOW,
                                                    sliding_window_pattern=2),
    "lfm2": lambda: transformers.Lfm2Config(**SIZES, full_attn_idxs=[1]),  # a convolution layer, then attention
    "bloom": lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0,
                                              bos_token_id=1, eos_token_id=2),  # ALiBi
    "mamba": lambda: transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4,
                                              pad_token_id=0, bos_token_id=1, eos_token_id=2),  # state-space layers
    # Phi-3.5's longrope with an original length of 16: every position takes the long frequencies in a pass
    # that reaches position 16 (weights large enough for positions to matter: std 0.02 moves log pi by 4e-4)
    "phi3_longrope": lambda: transformers.Phi3Config(**SIZES, initializer_range=0.2,
                                                     original_max_position_embeddings=ORIGINAL,
                                                     rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.5, 2.0, 3.0],
        long_factor=[4.0, 8.0, 16.0, 64.0], factor=8.0, original_max_position_embeddings=ORIGINAL)),
    # dynamic NTK past max_position_embeddings 16
    "llama_dynamic": lambda: transformers.LlamaConfig(**{**SIZES, "max_position_embeddings": ORIGINAL},
                                                      rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                                           factor=4.0)),
}
EXACT = ["llama", "qwen2", "mistral", "gemma3"]
WINDOWED = ["qwen2", "mistral", "gemma3"]
REFUSED = {"lfm2": "its layer types conv take no block attention mask", "bloom": "its forward fails on shared-prefix"}

pytestmark = pytest.mark.usefixtures("one_thread")


def attn(family: str) -> str:
    return "eager" if family in ("bloom", "mamba") else "sdpa"  # Bloom has no sdpa attention, Mamba no attention


def policy(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=attn(family)).eval()


def critic(family: str, seed: int = 0) -> C.Critic:
    torch.manual_seed(seed)
    model = C.Critic(AutoModel.from_config(FAMILIES[family](), attn_implementation=attn(family))).eval()
    torch.nn.init.normal_(model.value_head.weight, std=0.5)  # a zero head would say 0.5 everywhere
    return model


def random_states(seed: int = 0, count: int = 5):
    """States of 5 to 12 tokens with 2 to 4 candidates of 2 to 7 tokens: every row longer than WINDOW, rows of
    different lengths (left padding)."""
    g = torch.Generator().manual_seed(seed)
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    tokens = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    states = [tokens(randint(5, 12)) for _ in range(count)]
    return states, [[tokens(randint(2, 7)) for _ in range(randint(2, 4))] for _ in states]


def flat(nested) -> list:
    return [x for xs in nested for x in xs]


def logps_alone(model, states, actions) -> torch.Tensor:
    return torch.tensor([dapo.action_logp(model, s, a) for s, acts in zip(states, actions) for a in acts])  # [N]


def values_alone(model, states, actions) -> torch.Tensor:
    return torch.tensor([C.value_alone(model, s, a) for s, acts in zip(states, actions) for a in acts])  # [N]


# ============================================================================= in process
@pytest.mark.parametrize("family", EXACT)
def test_logps_and_values_equal_each_pair_alone(family):
    states, actions = random_states()
    model, value_model = policy(family), critic(family)
    with torch.no_grad():
        shared, alone = dapo.action_logps(model, states, actions), logps_alone(model, states, actions)  # [N]
        shared_v = torch.tensor(flat(C.action_values(value_model, list(zip(states, actions)), batch_actions=5)))
        alone_v = values_alone(value_model, states, actions)  # [N]
    assert alone.std() > 0.1 and alone_v.std() > 1e-2  # distinct numbers, so equality means something
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_v, alone_v, rtol=1e-5, atol=1e-6)
    check_packing(model, dapo.action_logps, dapo.action_logp, list(zip(states, actions)), "log pi(a|s)")  # passes
    C.check_action_values(value_model, list(zip(states, actions)))


@pytest.mark.parametrize("family", WINDOWED)
def test_the_window_matters_premise(family):
    """Without the window in the mask the windowed families are off: the rows above do test the window."""
    states, actions = random_states()
    model = policy(family)
    rows = shared_prefix_rows(states, actions, "cpu")
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids, attention_mask=rows.allowed, position_ids=rows.position_ids).logits
    token_logp = torch.log_softmax(logits[rows.token_row, rows.token_from], -1).gather(
        -1, rows.input_ids[rows.token_row, rows.token_col][:, None]).squeeze(-1)  # [T]
    unwindowed = torch.zeros(rows.num_actions).index_add(0, rows.token_action, token_logp)  # [N]
    with torch.no_grad():
        assert (unwindowed - logps_alone(model, states, actions)).abs().max() > 1e-3


def test_a_vision_language_gemma3_gets_the_windows_of_its_language_model():
    """Gemma3ForConditionalGeneration, what AutoModelForCausalLM makes of a Gemma 3 checkpoint: its own config
    has no layer types, its text_config has them."""
    text = dict(SIZES, vocab_size=300, head_dim=8, sliding_window=WINDOW, sliding_window_pattern=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                                       boi_token_index=297, eoi_token_index=298, image_token_index=299)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    states, actions = random_states()
    with torch.no_grad():
        torch.testing.assert_close(dapo.action_logps(model, states, actions), logps_alone(model, states, actions),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_gradients_of_windowed_families_equal_each_pair_alone(family):
    states, actions = random_states(seed=1)
    model = policy(family).train()  # no dropout in these configs
    weights = torch.randn(len(flat(actions)), generator=torch.Generator().manual_seed(2))  # [N]
    (weights * dapo.action_logps(model, states, actions)).sum().backward()
    shared = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    alone = []
    for s, acts in zip(states, actions):
        for a in acts:
            ids = torch.tensor([s + a])  # [1, L]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(s) - 1:-1], -1)  # [|a|, V]
            alone.append(logp.gather(-1, ids[0, len(s):, None]).sum())
    (weights * torch.stack(alone)).sum().backward()
    alone_grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert (shared - alone_grad).norm() <= 1e-5 * alone_grad.norm()


@pytest.mark.parametrize("family", list(REFUSED))
def test_families_that_cannot_be_packed_are_refused_with_one_line(family):
    states, actions = random_states()
    asked = list(zip(states, actions))
    with pytest.raises(InputError, match=REFUSED[family]) as e:
        check_packing(policy(family), dapo.action_logps, dapo.action_logp, asked, "log pi(a|s)")
    assert f"model family {family}" in str(e.value) and "docs/pipeline.md" in str(e.value)
    with pytest.raises(InputError, match=REFUSED[family]):
        C.check_action_values(critic(family), asked)


def test_a_mask_the_model_does_not_honour_is_caught_by_the_numbers(monkeypatch):
    """The guard's numeric half, whatever the family: with the window left out of the masks (as before),
    Mistral's rows are off by more than the tolerance, and the guard says by how much."""
    monkeypatch.setattr("plumbing.shared_prefix.SharedPrefixRows.within_window", lambda self, window: self.allowed)
    states, actions = random_states()
    with pytest.raises(InputError, match=r"model family mistral .*log pi\(a\|s\) up to [\d.e-]+ away from each"):
        check_packing(policy("mistral"), dapo.action_logps, dapo.action_logp, list(zip(states, actions)), "log pi(a|s)")
    with pytest.raises(InputError, match="the critic's V"):
        C.check_action_values(critic("mistral"), list(zip(states, actions)))


def test_checked_rows_reach_furthest_pad_and_hold_the_shortest_and_longest_actions():
    asked = [([1] * 3, [[5] * 2, [6] * 2]), ([1] * 9, [[7] * 8]), ([1] * 2, [[8]]), ([1] * 6, [[5], [6], [7], [8, 9]]),
             ([1] * 4, [])]
    rows = checked_rows(asked, per_state=2)
    assert [len(s) for s, _ in rows] == [6, 9, 2]  # the two that reach furthest (8 and 17), then the shortest
    assert [len(acts) for _, acts in rows] == [3, 2, 2]  # a single candidate gets a second one from the others
    assert rows[1][1][0] == [7] * 8  # the longest actions (stable order) after the shortest:
    assert rows[0][1] == [[5], [7], [8, 9]]


# ============================================================================= through dapo.py
def save_family(family: str, tmp_path) -> tuple[str, str]:
    """A policy directory and a critic directory (random value head) of the family, with a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", bos_token="t1", eos_token="t2")
    policy_dir, critic_dir = str(tmp_path / "policy"), str(tmp_path / "critic")
    policy(family).save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    C.save_critic(critic(family, seed=1), tok, critic_dir)
    return policy_dir, critic_dir


def write_rollout(tmp_path, grow: int = 0) -> tuple[str, list[dict]]:
    """states.jsonl: the random states (`grow` tokens longer), their first candidate terminal (reward 1 or 0), the
    rest not."""
    states, actions = random_states(seed=3, count=4)
    states = [list(range(3, 3 + grow)) + s for s in states]
    records = [{"qid": str(i), "state_ids": s, "mc_value": 0.5,
                "actions": [{"ids": a, "terminal": j == 0, "reward": float(i % 2), "completion_reward": float(j % 2)}
                            for j, a in enumerate(acts)]} for i, (s, acts) in enumerate(zip(states, actions))]
    rollout = tmp_path / "rollout"
    rollout.mkdir()
    (rollout / "states.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(rollout), records


def run_dapo(policy_dir, critic_dir, rollout, out_dir, *extra, check=True, launcher=(), timeout=600):
    return run_script(*launcher, "dapo.py", "--policy", policy_dir, "--critic", critic_dir, "--rollout_dir", rollout,
                      "--out_dir", out_dir, "--min_gap", "0", "--beta", "0.3", "--lr", "1e-4",
                      "--global_batch_actions", "16", "--micro_batch_actions", "16", *extra, check=check,
                      env={"OMP_NUM_THREADS": "1"}, timeout=timeout)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_dapo_on_a_windowed_family_gives_each_pairs_q_and_log_pi_ref(family, tmp_path):
    policy_dir, critic_dir = save_family(family, tmp_path)
    rollout, records = write_rollout(tmp_path)
    out = str(tmp_path / "actor")
    run_dapo(policy_dir, critic_dir, rollout, out)
    prepared = torch.load(out + ".work/prepared.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    value_model = C.load_critic(critic_dir, "cpu").eval()
    with torch.no_grad():
        q_alone = [[a["reward"] if a["terminal"] else C.value_alone(value_model, r["state_ids"], a["ids"])
                    for a in r["actions"]] for r in records]
        ref_alone = [logps_alone(model, [s["state_ids"]], [s["actions"]]).tolist() for s in prepared["train"]]
    assert len(prepared["train"]) == len(records)
    torch.testing.assert_close(torch.tensor(flat(prepared["q_values"])), torch.tensor(flat(q_alone)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(flat(s["ref_logp"] for s in prepared["train"])),
                               torch.tensor(flat(ref_alone)), rtol=1e-5, atol=1e-5)
    assert os.path.isfile(os.path.join(out, "train_summary.json"))


@pytest.mark.parametrize("family,q_source", [("lfm2", "critic"), ("bloom", "rollout")])
def test_dapo_refuses_a_family_it_cannot_pack_with_one_line_and_writes_nothing(family, q_source, tmp_path):
    """--packing on: the critic's check refuses before any Q value (q_source critic), the policy's before
    log pi_ref."""
    policy_dir, critic_dir = save_family(family, tmp_path)
    rollout, _ = write_rollout(tmp_path)
    out = str(tmp_path / "actor")
    proc = run_dapo(policy_dir, critic_dir, rollout, out, "--q_source", q_source, "--packing", "on", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: model family {family}") and REFUSED[family] in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert ("kept (advantage gap" in proc.stdout) == (q_source == "rollout")  # printed once the Q values exist
    assert not os.path.exists(out) and not os.path.exists(out + ".work")  # nothing written: no settings, Q or log pi


@pytest.mark.parametrize("family,q_source", [("lfm2", "critic"), ("bloom", "rollout"), ("phi3_longrope", "critic"),
                                             ("mamba", "critic")])
def test_dapo_trains_a_family_it_cannot_pack_one_row_per_pair(family, q_source, tmp_path):
    """--packing auto (the default): a hybrid (LFM2), ALiBi (Bloom), state-space (Mamba) and a longrope past its
    original length train on one row per (state, candidate), saying so; Q, log pi_ref and log(pi / pi_ref) after
    training are each pair's plain forward."""
    policy_dir, critic_dir = save_family(family, tmp_path)
    rollout, records = write_rollout(tmp_path, grow=6)
    assert max(len(r["state_ids"]) + len(a["ids"]) for r in records for a in r["actions"]) > ORIGINAL
    out = str(tmp_path / "actor")
    proc = run_dapo(policy_dir, critic_dir, rollout, out, "--q_source", q_source, "--epochs", "4")
    said = [line for line in proc.stdout.splitlines() if "stage B runs one row per (state, action)" in line]
    kind = FAMILIES[family]().model_type
    assert len(said) == (2 if q_source == "critic" else 1) and all(f"model family {kind}" in x for x in said)
    prepared = torch.load(out + ".work/prepared.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    actor = AutoModelForCausalLM.from_pretrained(out).eval()
    train = prepared["train"]
    with torch.no_grad():
        ref = torch.tensor(flat(logps_alone(model, [s["state_ids"]], [s["actions"]]).tolist() for s in train))
        after = torch.tensor(flat(logps_alone(actor, [s["state_ids"]], [s["actions"]]).tolist() for s in train))
        if q_source == "critic":
            value_model = C.load_critic(critic_dir, "cpu").eval()
            q_alone = [[a["reward"] if a["terminal"] else C.value_alone(value_model, r["state_ids"], a["ids"])
                        for a in r["actions"]] for r in records]
            torch.testing.assert_close(torch.tensor(flat(prepared["q_values"])), torch.tensor(flat(q_alone)),
                                       rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(flat(s["ref_logp"] for s in train)), ref, rtol=0, atol=1e-4)
    fit = [json.loads(line) for line in open(os.path.join(out, "fit.jsonl"))]
    log_ratios = torch.tensor(flat(f["log_ratios"] for f in fit))
    torch.testing.assert_close(log_ratios, after - ref, rtol=0, atol=1e-4)
    assert log_ratios.abs().max() > 1e-2  # the actor did move


def test_dapo_on_a_hybrid_family_under_torchrun_equals_one_process(tmp_path):
    """LFM2 (a convolution layer, then attention) on one row per (state, action) under `torchrun
    --nproc_per_node=2` (DDP over gloo): the ranks hold different pairs, so different numbers of passes, and the
    actor equals the one-process run's, step for step, within the tolerance of tests/test_dapo.py's DDP check."""
    policy_dir, critic_dir = save_family("lfm2", tmp_path)
    rollout, _ = write_rollout(tmp_path, grow=6)
    flags = ["--q_source", "critic", "--epochs", "2", "--global_batch_actions", "6", "--micro_batch_actions", "3",
             "--lr", "1e-3"]  # batches of two states: one per rank, whose pairs need 2 or 3 passes (lengths differ)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_dapo(policy_dir, critic_dir, rollout, one, *flags)
    # ranks whose passes got out of step would wait on each other's collectives: a hang, failed in 4 minutes
    proc = run_dapo(policy_dir, critic_dir, rollout, two, *flags, launcher=("torchrun", "--nproc_per_node=2"),
                    timeout=240)
    said = [line for line in proc.stdout.splitlines() if "stage B runs one row per (state, action)" in line]
    assert len(said) == 2 and all("model family lfm2" in x for x in said)  # the critic's pass and the actor's, once
    init = AutoModelForCausalLM.from_pretrained(policy_dir).state_dict()
    a, b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (one, two))
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # the actor did move (4 steps)
    for k in a:  # float sums in another order, through Adam: a small fraction of one step
        torch.testing.assert_close(b[k], a[k], atol=3e-5, rtol=0, msg=k)
    log_one, log_two = ([json.loads(line) for line in open(os.path.join(d, "train_log.jsonl"))] for d in (one, two))
    assert len(log_one) == len(log_two) >= 3
    for x, y in zip(log_one, log_two):  # Adam hides a gradient off by a factor; the logged norm does not
        for key in ("lr", "loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-5), key


# ========================================================================= RoPE whose frequencies depend on the batch
def pairs_of_lengths(state_lengths: list[int], action_lengths: list[list[int]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [tokens(n) for n in state_lengths], [[tokens(m) for m in ms] for ms in action_lengths]


WITHIN = pairs_of_lengths([5, 12, 9], [[2, 4], [3, 4], [1, 7]])  # pairs of 6 to 16 tokens: at most ORIGINAL
PAST = pairs_of_lengths([14, 20, 15], [[1, 2], [3, 4], [1, 5]])  # the states, pairs of 15 to 24 tokens


def test_rope_limit_reads_the_rope_of_every_layer_type():
    """longrope and dynamic have a limit, the smallest over the layer types; the other rope types have none, but
    in PhiMoE."""
    class Config(SimpleNamespace):  # rope_parameters as a config holds them, unvalidated
        def get_text_config(self, decoder=False):
            return self

    def config(**rope):
        return Config(max_position_embeddings=64, rope_parameters=rope)

    longrope = dict(rope_type="longrope", original_max_position_embeddings=32)
    assert rope_limit(config(**longrope)) == ("longrope", 32)
    assert rope_limit(config(full_attention=longrope, sliding_attention=dict(rope_type="dynamic"))) == ("longrope", 32)
    assert rope_limit(config(full_attention=dict(rope_type="default"), sliding_attention=dict(rope_type="dynamic"))
                      ) == ("dynamic", 64)
    for kind in ("default", "linear", "yarn", "llama3", "proportional"):
        assert rope_limit(config(rope_type=kind)) is None
    assert rope_limit(transformers.BloomConfig()) is None  # no rope at all
    phimoe = Config(model_type="phimoe", max_position_embeddings=64,  # its scale switches past the original length
                    rope_parameters=dict(rope_type="yarn", original_max_position_embeddings=32))
    assert rope_limit(phimoe) == ("yarn", 32)


@pytest.mark.parametrize("family", ["phi3_longrope", "llama_dynamic"])
def test_batch_dependent_rope_packs_exactly_within_its_length(family):
    """Pairs of at most ORIGINAL tokens: the same numbers in one batch, one state per batch, and alone."""
    states, actions = WITHIN
    model, value_model = policy(family), critic(family)
    asked = list(zip(states, actions))
    with torch.no_grad():
        together = dapo.action_logps(model, states, actions)  # [N]
        apart = torch.cat([dapo.action_logps(model, [s], [a]) for s, a in asked])  # [N]
        alone = logps_alone(model, states, actions)  # [N]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apart, alone, rtol=1e-5, atol=1e-5)
    assert check_packing(model, dapo.action_logps, dapo.action_logp, asked, "log pi(a|s)", mode="on")
    assert C.check_action_values(value_model, asked, "on")


def test_longrope_past_its_original_length_is_not_packed(capsys):
    """States of 14, 20 and 15 tokens: a short pair beside a longer one would get the long frequencies. Refused
    in one line with --packing on, one row per pair with auto (each pair's own numbers), before any number."""
    states, actions = PAST
    model, value_model = policy("phi3_longrope"), critic("phi3_longrope")
    asked = list(zip(states, actions))
    with torch.no_grad():
        packed, alone = dapo.action_logps(model, states, actions), logps_alone(model, states, actions)  # [N]
        assert (packed - alone).abs().max() > 0.1  # the premise: packing would be wrong
        torch.testing.assert_close(dapo.pair_logps(model, states, actions), alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="its longrope RoPE switches every position .* more than 16 tokens"):
        check_packing(model, dapo.action_logps, dapo.action_logp, asked, "log pi(a|s)", mode="on")
    with pytest.raises(InputError, match="longrope"):
        C.check_action_values(value_model, asked, "on")
    capsys.readouterr()
    assert not check_packing(model, dapo.action_logps, dapo.action_logp, asked, "log pi(a|s)", mode="auto")
    assert not C.check_action_values(value_model, asked, "auto")
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 2 and all("phi3" in x and "one row per (state, action)" in x for x in said)


@pytest.mark.parametrize("mode", PACKING)
def test_dynamic_rope_past_its_length_is_refused_in_one_line(mode):
    """Dynamic NTK rescales past max_position_embeddings and remembers the longest pass: no forward is a
    pair's own, packed or alone, so every --packing refuses."""
    states, actions = PAST
    with pytest.raises(InputError, match="model family llama: its dynamic RoPE rescales .* up to 24 tokens"):
        check_packing(policy("llama_dynamic"), dapo.action_logps, dapo.action_logp, list(zip(states, actions)),
                      "log pi(a|s)", mode=mode)


@pytest.mark.parametrize("family", ["lfm2", "bloom", "phi3_longrope", "mamba"])
def test_one_row_per_pair_is_each_pair_alone(family):
    states, actions = random_states()
    model, value_model = policy(family), critic(family)
    asked = list(zip(states, actions))
    with torch.no_grad():
        torch.testing.assert_close(dapo.pair_logps(model, states, actions), logps_alone(model, states, actions),
                                   rtol=1e-5, atol=1e-5)
        values = torch.tensor(flat(C.action_values(value_model, asked, batch_actions=5, packed=False)))  # [N]
        torch.testing.assert_close(values, values_alone(value_model, states, actions), rtol=1e-5, atol=1e-6)
