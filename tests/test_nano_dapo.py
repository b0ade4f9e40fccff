"""nano_dapo.py (the book) and the stage scripts (the engine) are the same algorithm: the same inputs give the same
numbers, equation by equation (MC label, steps, balanced selection, reward, critic loss, Q, advantages, training set,
log pi(a|s), the DAPO loss). A change to any equation in either place fails here. Last, nano_dapo.py runs end to end."""
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import critic as critic_script
import dapo
import grading
import nano_dapo as nano
import rollout
from conftest import run_script, tiny_random_llama


def test_mc_value():
    rng = random.Random(0)
    for m in (1, 4, 16):
        correct = [rng.random() < 0.4 for _ in range(m)]
        assert nano.mc_value(correct) == rollout.mc_value(correct)


def test_split_steps():
    rng = random.Random(1)
    is_delim = [t % 7 == 3 for t in range(40)]  # a few tokens whose text holds the delimiter
    eos = 2
    for _ in range(200):
        ids = [rng.randrange(40) for _ in range(rng.randrange(0, 25))]
        assert nano.split_steps(ids, is_delim, eos) == rollout.split_steps(ids, torch.tensor(is_delim), {eos})


def test_select_balanced():
    rng = random.Random(2)
    for _ in range(200):
        samples = [([rng.randrange(3) for _ in range(rng.randrange(1, 3))], rng.random() < 0.5)
                   for _ in range(rng.randrange(1, 10))]
        samples = [(ids, ok) for ids, ok in {tuple(i): (i, ok) for i, ok in samples}.values()]  # a text, one verdict
        n = rng.randrange(1, 7)
        assert nano.select_balanced(samples, n) == rollout.select_balanced(samples, n)


def test_grade():
    for response, answer in [("Add: 3+2=5\nSubtract: 5-1=\\boxed{4}", "4"), ("... \\boxed{4}", "5"),
                             ("no box, 4", "4"), ("\\boxed{3} then \\boxed{4}", "4"), ("\\boxed{ 7 }", "7")]:
        assert nano.grade(response, answer) == grading.is_correct(response, answer), response


def test_prompt(toy_dir):
    from transformers import AutoTokenizer

    from plumbing.models import build_prompt_ids
    from plumbing.runfiles import read_jsonl

    tok = AutoTokenizer.from_pretrained(toy_dir / "sft")
    questions = nano.read_questions(str(toy_dir / "test.jsonl"), tok)
    rows = read_jsonl(str(toy_dir / "test.jsonl"), required=("question",))
    assert [q["prompt"] for q in questions] == [build_prompt_ids(tok, r["question"]) for r in rows]


# ============================================================================= the critic
def two_critics(seed: int = 0):
    """The scripts' critic and nano_dapo's, with the same random weights (value head included)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    script = critic_script.Critic(LlamaModel(config)).eval()
    torch.nn.init.normal_(script.value_head.weight, std=0.5)
    torch.nn.init.normal_(script.value_head.bias, std=0.5)
    book = nano.Critic(LlamaModel(config)).eval()
    book.load_state_dict(script.state_dict())
    return script, book


def question_solutions(rng: random.Random, qid: str) -> list[dict]:
    """Solutions of one question in the scripts' form: they share the prompt and sometimes their first steps,
    and a state has one MC label in every solution that contains it."""
    prompt = [rng.randrange(4, 40) for _ in range(5)]
    label: dict[tuple, float] = {}
    solutions = []
    for _ in range(4):
        steps = [[rng.randrange(4, 6) for _ in range(2)] for _ in range(rng.randrange(1, 4))]
        ids = prompt + [t for s in steps for t in s]
        ends = [len(prompt) + sum(map(len, steps[:t])) for t in range(len(steps))]
        labels = [label.setdefault(tuple(ids[:e]), rng.randrange(5) / 4) for e in ends]
        solutions.append({"qid": qid, "ids": ids[: max(ends)], "value_positions": [e - 1 for e in ends],
                          "mc_values": labels})
    return solutions


def test_critic_loss_is_the_mean_over_distinct_states():
    """critic.py weights each state of a solution by 1 / (solutions of its question holding it): over one batch of
    every solution, its loss and gradient are nano_dapo's mean over the distinct states."""
    rng = random.Random(3)
    script, book = two_critics()
    solutions = [s for q in range(3) for s in question_solutions(rng, f"q{q}")]
    critic_script.state_weights(solutions)
    ids, mask, rows, cols, labels, weights = critic_script.collate(solutions, torch.device("cpu"))
    logits = script(ids, mask, return_logits=True)  # [B, T]
    weighted = weights * critic_script.critic_loss(logits[rows, cols], labels, "mse")  # [N]
    script_loss = weighted.sum() / weights.sum()
    script_loss.backward()

    distinct = {(s["qid"], tuple(s["ids"][: p + 1])): v for s in solutions
                for p, v in zip(s["value_positions"], s["mc_values"])}
    assert len(distinct) < len(labels)  # shared prefixes: the weighting matters
    book_loss = nano.critic_loss(book([list(k[1]) for k in distinct]), torch.tensor(list(distinct.values())))
    book_loss.backward()
    assert book_loss.item() == pytest.approx(script_loss.item(), rel=1e-5)
    for (name, a), b in zip(script.named_parameters(), book.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def random_states(rng: random.Random, n: int, m: int = 6) -> list[dict]:
    """states.jsonl records: duplicate candidates, terminal ones with a reward, an empty one now and then."""
    states = []
    for _ in range(n):
        state = [rng.randrange(4, 40) for _ in range(rng.randrange(3, 9))]
        pool = [[rng.randrange(4, 40) for _ in range(rng.randrange(1, 5))] for _ in range(3)] + [[]]
        actions = []
        for _ in range(m):
            ids = rng.choice(pool)
            terminal = bool(ids) and ids[-1] % 3 == 0  # the same candidate always gets the same flag and reward
            actions.append({"ids": ids, "terminal": terminal, "reward": float(ids[0] % 2) if terminal else None})
        states.append({"state_ids": state, "actions": actions})
    return states


def test_q_values():
    """Q(s, a) = r for a terminal candidate, V(s . a) else: dapo.q_values over the critic's packed rows and
    nano_dapo.q_value over plain sequences."""
    rng = random.Random(4)
    script, book = two_critics(1)
    states = random_states(rng, 8)
    assert any(a["terminal"] for s in states for a in s["actions"]) and any(
        not a["terminal"] for s in states for a in s["actions"])
    want = dapo.q_values(states, lambda asked: critic_script.action_values(script, asked))
    got = [nano.q_value(book, s["state_ids"], s["actions"]).tolist() for s in states]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=2e-6)
    values = {v for q in want for v in q}
    assert len(values) > 4 and not values <= {0.0, 1.0}  # critic values, not only rewards


def test_advantages():
    q = torch.rand(5, 16, dtype=torch.float64)  # [S, M]
    torch.testing.assert_close(nano.compute_advantages(q), dapo.compute_advantages(q), rtol=0, atol=0)


def test_training_set():
    """The gap filter (>= min_gap, the boundary included), unique candidates with their copies' mean advantage,
    empty candidates dropped."""
    rng = random.Random(5)
    states = random_states(rng, 30)
    q = [[rng.choice((0.0, 0.5, 1.0, rng.random())) for _ in s["actions"]] for s in states]
    q[0] = [0.0, 0.5] * 3  # advantages -0.25 / +0.25: a gap of exactly 0.5
    for min_gap in (0.0, 0.1, 0.5):
        want = dapo.training_set(states, q, min_gap)
        got = nano.training_set(states, [torch.tensor(q_s, dtype=torch.float64) for q_s in q], min_gap)
        assert [s["state_ids"] for s in got] == [s["state_ids"] for s in want]
        assert [s["actions"] for s in got] == [s["actions"] for s in want]
        for g, w in zip(got, want):
            assert g["advantages"] == pytest.approx(w["advantages"], abs=1e-12)
    assert states[0]["state_ids"] in [s["state_ids"] for s in dapo.training_set(states, q, 0.5)]


# ============================================================================= the actor
def test_action_logp():
    """log pi(a|s), the sum of the action's token log-probs: dapo.action_logps (each state read once, its
    candidates packed after it) and nano_dapo.action_logp (one plain sequence s . a per pair)."""
    rng = random.Random(6)
    model = tiny_random_llama(vocab=40)
    states = [s for s in random_states(rng, 6) if any(a["ids"] for a in s["actions"])]
    actions = [list(dict.fromkeys(tuple(a["ids"]) for a in s["actions"] if a["ids"])) for s in states]
    actions = [[list(a) for a in acts] for acts in actions]
    with torch.no_grad():
        want = dapo.action_logps(model, [s["state_ids"] for s in states], actions)  # [N]
        got = nano.action_logp(model, [s["state_ids"] for s, acts in zip(states, actions) for _ in acts],
                               [a for acts in actions for a in acts])  # [N]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert want.max() < 0 and want.min() < -10  # sums over several tokens of a random model, not near 0


def test_dapo_loss():
    torch.manual_seed(7)
    logp, ref_logp, advantages = -5 * torch.rand(32), -5 * torch.rand(32), torch.rand(32) - 0.5  # [N] each
    for beta in (0.01, 0.3):
        a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        book, script = nano.dapo_loss(a, ref_logp, advantages, beta), dapo.dapo_loss(b, ref_logp, advantages, beta)
        book.backward()
        script.backward()
        torch.testing.assert_close(book, script, rtol=1e-6, atol=0)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    # and it is eq. 12 itself: 1/2 mean (A / beta - (log pi - log pi_ref))^2
    assert nano.dapo_loss(logp, ref_logp, advantages, 0.3).item() == pytest.approx(
        0.5 * ((advantages / 0.3 - logp + ref_logp) ** 2).mean().item(), rel=1e-6)


# ============================================================================= the book runs
def test_nano_dapo_runs_end_to_end(toy_dir):
    """Tiny settings on the tests' toy task: every stage runs, and the report has its lines."""
    proc = run_script("nano_dapo.py", "--toy_dir", str(toy_dir), "--questions", "6", "--n1", "4", "--n_keep", "2",
                      "--M", "4", "--critic_epochs", "1", "--actor_epochs", "1", "--iterations", "2",
                      "--min_gap", "0.0")
    out = proc.stdout
    assert "greedy accuracy before DAPO" in out
    for iteration in (1, 2):
        for stage in ("rollout:", "critic: MSE", "actor:", "greedy accuracy after"):
            assert f"[{iteration}] {stage}" in out, out
