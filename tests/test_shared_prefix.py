"""Stage B reads each state once (shared_prefix.shared_prefix_rows): log pi(a|s), its gradient and the critic's
V(s . a) from one row per state equal those of every (state, action) pair run alone, with eager and sdpa
attention, with activation checkpointing, under bf16 autocast (loosely); flash-attention is refused."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

import critic as C
import dapo
from plumbing.cli import InputError
from plumbing.models import enable_checkpointing
from plumbing.shared_prefix import shared_prefix_rows

VOCAB = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(attn: str) -> LlamaConfig:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = attn
    return config


def tiny_policy(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(attn))


def tiny_critic(attn: str) -> C.Critic:
    torch.manual_seed(0)
    critic = C.Critic(LlamaModel(tiny_config(attn))).eval()
    torch.nn.init.normal_(critic.value_head.weight, std=0.5)  # a zero head would say 0.5 everywhere
    return critic


def random_states(seed: int = 0) -> tuple[list[list[int]], list[list[list[int]]]]:
    """States of 1 to 12 tokens with 1 to 5 candidates of 1 to 7 tokens (different lengths: padded rows), the
    first state with a single candidate; read_states refuses an empty state, so there is none."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=g))

    def tokens(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    states = [tokens(randint(1, 12)) for _ in range(6)]
    actions = [[tokens(randint(1, 7)) for _ in range(1 if i == 0 else randint(2, 5))] for i in range(len(states))]
    return states, actions


def pair_logp(model, state: list[int], action: list[int]) -> torch.Tensor:
    """log pi(a|s) of one pair alone: the unpadded sequence s . a, every logit computed."""
    ids = torch.tensor([state + action])  # [1, L]
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [L-1, V]
    return logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][-len(action):].sum()


def flat(nested: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for xs in nested for x in xs])


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_rows_hold_the_state_once_and_actions_see_it_and_themselves():
    rows = shared_prefix_rows([[5, 6, 7], [8]], [[[1, 2], [3]], [[4, 4, 4]]], "cpu")
    assert rows.input_ids.tolist() == [[5, 6, 7, 1, 2, 3], [0, 0, 8, 4, 4, 4]]  # left padding
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 0, 0, 1, 2, 3]]  # restart after the state
    allowed = rows.allowed[0, 0].int()  # [W, W]
    assert allowed[5].tolist() == [1, 1, 1, 0, 0, 1]  # the second action sees the state and itself, not the first
    assert allowed[4].tolist() == [1, 1, 1, 1, 1, 0]
    assert rows.allowed[1, 0, 3].int().tolist() == [0, 0, 1, 1, 0, 0]  # never the padding
    assert rows.allowed[1, 0, 0].int().tolist() == [1, 0, 0, 0, 0, 0]  # padding sees itself: no empty softmax
    assert rows.token_from.tolist() == [2, 3, 2, 2, 3, 4]  # an action's first token is predicted by the state's last
    assert rows.last_col.tolist() == [4, 5, 5]
    with pytest.raises(ValueError, match="at least one token"):
        shared_prefix_rows([[]], [[[1]]], "cpu")


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logps_and_gradients_equal_each_pair_alone(attn, checkpointing):
    states, actions = random_states()
    model = tiny_policy(attn)
    if checkpointing:
        enable_checkpointing(model)
    model.train()  # the actor's training pass (the tiny Llama has no dropout)
    weights = torch.randn(sum(map(len, actions)), generator=torch.Generator().manual_seed(1))  # [N]

    shared = dapo.action_logps(model, states, actions)  # [N]
    (weights * shared).sum().backward()
    shared_grad = grads(model)
    model.zero_grad()
    alone = torch.stack([pair_logp(model, s, a) for s, acts in zip(states, actions) for a in acts])  # [N]
    (weights * alone).sum().backward()
    alone_grad = grads(model)

    assert len(set(alone.tolist())) == len(alone)  # distinct values, so equality means something
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=0)
    # The gradient reaches the state's tokens through every action, as it does through each pair.
    assert (alone_grad - shared_grad).norm() <= 1e-5 * alone_grad.norm()
    torch.testing.assert_close(shared_grad, alone_grad, rtol=1e-5, atol=1e-5 * alone_grad.abs().max().item())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_reference_logps_in_batches_of_whole_states_equal_each_pair_alone(attn):
    states, actions = random_states(seed=2)
    model = tiny_policy(attn).eval()
    # 3 actions per pass: several states share a pass, a state of 4 or 5 candidates goes alone.
    batched = dapo.reference_logps(model, [{"state_ids": s, "actions": a} for s, a in zip(states, actions)], 3, None)
    with torch.no_grad():
        alone = [[pair_logp(model, s, a).item() for a in acts] for s, acts in zip(states, actions)]
    assert [len(b) for b in batched] == [len(a) for a in actions]
    torch.testing.assert_close(flat(batched), flat(alone), rtol=1e-5, atol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_critic_values_equal_each_pair_alone(attn):
    states, actions = random_states(seed=3)
    actions[1].append([])  # V(s . empty action) = V(s)
    critic = tiny_critic(attn)
    shared = C.action_values(critic, list(zip(states, actions)), batch_actions=4)
    with torch.no_grad():
        alone = [[critic(torch.tensor([s + a]), torch.ones(1, len(s + a), dtype=torch.long))[0, -1].item()
                  for a in acts] for s, acts in zip(states, actions)]
    assert flat(alone).std() > 1e-3
    torch.testing.assert_close(flat(shared), flat(alone), rtol=1e-5, atol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_action_logps_are_the_plain_action_logp(attn):
    """dapo.action_logps (one row per state) gives the numbers of the plain definition dapo.action_logp (the
    sequence s . a alone), a duplicate candidate and an empty action (log pi = 0) among them."""
    states, actions = random_states(seed=4)
    actions[1].append(list(actions[1][0]))  # drawn twice
    actions[2].append([])
    model = tiny_policy(attn).eval()
    with torch.no_grad():
        packed = dapo.action_logps(model, states, actions)  # [N]
        plain = torch.tensor([dapo.action_logp(model, s, a) for s, acts in zip(states, actions) for a in acts])  # [N]
    assert len(set(plain.tolist())) == len(plain) - 1  # distinct but for the duplicate: equality means something
    assert plain[sum(map(len, actions[:3])) - 1] == 0  # the empty action
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_q_values_are_the_plain_q_value(attn):
    """dapo.q_values with critic.action_values (each state read once) gives the numbers of the plain definition
    dapo.q_value (r for a terminal action, else the critic on s . a alone): with a duplicate candidate, an empty
    action (V(s)), terminal actions, and a state asked twice (another record of the same state)."""
    states, actions = random_states(seed=5)
    records = [{"state_ids": s, "actions": [{"ids": a, "terminal": False, "reward": None} for a in acts]}
               for s, acts in zip(states, actions)]
    records[1]["actions"].append(dict(records[1]["actions"][0]))  # drawn twice
    records[2]["actions"].append({"ids": [], "terminal": False, "reward": None})
    records[3]["actions"].append({"ids": [7, 8], "terminal": True, "reward": 1.0})
    records[4]["actions"][0].update(terminal=True, reward=0.0)
    records.append({"state_ids": states[2], "actions": [{"ids": [9], "terminal": False, "reward": None}]})
    critic = tiny_critic(attn)
    packed = dapo.q_values(records, lambda asked: C.action_values(critic, asked, batch_actions=4))
    with torch.no_grad():
        plain = [[dapo.q_value(critic, r["state_ids"], a["ids"], a["terminal"], a["reward"]) for a in r["actions"]]
                 for r in records]
    assert flat(plain).std() > 1e-3 and plain[3][-1] == 1.0 and plain[4][0] == 0.0
    torch.testing.assert_close(flat(packed), flat(plain), rtol=1e-5, atol=0)


def test_bf16_autocast_stays_close_to_pairs():
    states, actions = random_states(seed=4)
    model = tiny_policy("sdpa").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        shared = dapo.action_logps(model, states, actions)  # [N]
        alone = torch.stack([pair_logp(model, s, a) for s, acts in zip(states, actions) for a in acts])  # [N]
    torch.testing.assert_close(shared, alone, rtol=2e-2, atol=5e-2)  # bf16 rounding, not a different computation


def test_flash_attention_is_refused_with_a_clear_error():
    states, actions = random_states()
    model, critic = tiny_policy("sdpa"), tiny_critic("sdpa")
    model.config._attn_implementation = critic.backbone.config._attn_implementation = "flash_attention_2"
    with pytest.raises(InputError, match="only 'sdpa' and 'eager'"):
        dapo.action_logps(model, states, actions)
    with pytest.raises(InputError, match="only 'sdpa' and 'eager'"):
        C.action_values(critic, list(zip(states, actions)))
