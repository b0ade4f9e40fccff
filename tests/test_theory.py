"""The theory of DAPO (docs/algorithm.md, "Why it works") checked exactly on small tabular step-level MDPs.

A tree MDP: each state has a few actions; an action either leads to a child state or ends the solution
with a reward. Values are computed exactly by backward induction, so the advantages are exact, and the
policy is a softmax over one logit per (state, action).
  - Lemma 3.1: grad_theta I_s(pi_theta, pi_ref) = -beta grad_theta H_s(theta) at theta = theta_k.
  - Theorem 3.2: the minimiser pi+ of eq. 12 (dapo.dapo_loss) under full coverage satisfies
    V_beta^{pi+} >= V_beta^{pi_ref} and V^{pi+} >= V^{pi_ref} at every state, strictly where pi_ref is not
    optimal, and pi+ = pi_ref when it is.
"""
import random

import pytest
import torch

import dapo



@pytest.fixture(autouse=True)
def float64():
    """Exact arithmetic matters here; the default dtype is restored for the other test files."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def random_tree(rng: random.Random, depth: int = 3, max_actions: int = 3) -> list[list[tuple]]:
    """mdp[s] = the actions of state s: ("next", child) or ("end", reward). State 0 is the question;
    children have larger indices than their parents, so backward induction runs from the last state."""
    mdp = [[]]
    frontier = [(0, 0)]
    while frontier:
        s, d = frontier.pop(0)
        for _ in range(rng.randint(2, max_actions)):
            if d + 1 < depth and rng.random() < 0.6:
                mdp.append([])
                mdp[s].append(("next", len(mdp) - 1))
                frontier.append((len(mdp) - 1, d + 1))
            else:
                mdp[s].append(("end", float(rng.random() < 0.5) if rng.random() < 0.5 else rng.random()))
    return mdp


def values(mdp, log_pi: list[torch.Tensor], log_ref: list[torch.Tensor], beta: float):
    """Exact V and Q of the policy by backward induction. With beta > 0, the regularised ones:
    V_beta(s) = E_{a~pi}[Q_beta(s, a) - beta log(pi(a|s) / pi_ref(a|s))], Q_beta(s, a) = r or V_beta(s . a)."""
    V, Q = [None] * len(mdp), [None] * len(mdp)
    for s in reversed(range(len(mdp))):
        Q[s] = torch.stack([torch.tensor(x) if kind == "end" else V[x] for kind, x in mdp[s]])  # [A_s]
        pi = log_pi[s].exp()  # [A_s]
        V[s] = (pi * (Q[s] - beta * (log_pi[s] - log_ref[s]))).sum()
    return V, Q


def minimise_dapo_loss(mdp, log_ref, advantages, beta, counts) -> list[torch.Tensor]:
    """pi+ = argmin of eq. 12 over softmax policies; the sampling distribution nu(s, a) is proportional to
    counts[s][a] >= 1 (full coverage), realised by repeating each (s, a) pair counts[s][a] times."""
    theta = [lr.clone().requires_grad_(True) for lr in log_ref]  # start at pi_ref
    index = [(s, a) for s in range(len(mdp)) for a in range(len(mdp[s])) for _ in range(counts[s][a])]
    ref = torch.stack([log_ref[s][a] for s, a in index])  # [N]
    adv = torch.stack([advantages[s][a] for s, a in index])  # [N]
    opt = torch.optim.LBFGS(theta, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        log_pi = [torch.log_softmax(t, -1) for t in theta]
        loss = dapo.dapo_loss(torch.stack([log_pi[s][a] for s, a in index]), ref, adv, beta)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    closure()
    assert max(t.grad.abs().max().item() for t in theta) < 1e-6, "the minimiser of eq. 12 was not reached"
    return [torch.log_softmax(t.detach(), -1) for t in theta]


def random_policy(mdp, g: torch.Generator) -> list[torch.Tensor]:
    return [torch.log_softmax(torch.randn(len(acts), generator=g), -1) for acts in mdp]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_theorem_3_2_monotonic_improvement(seed, beta):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    mdp = random_tree(rng)
    log_ref = random_policy(mdp, g)
    V_ref, Q_ref = values(mdp, log_ref, log_ref, beta=0.0)
    advantages = [Q_ref[s] - V_ref[s] for s in range(len(mdp))]  # exact A^{pi_ref}
    counts = [[rng.randint(1, 3) for _ in acts] for acts in mdp]
    log_plus = minimise_dapo_loss(mdp, log_ref, advantages, beta, counts)

    V_beta_plus, _ = values(mdp, log_plus, log_ref, beta)
    V_plus, _ = values(mdp, log_plus, log_ref, 0.0)
    # pi_ref's regularised value is its plain value: KL(pi_ref || pi_ref) = 0.
    for s in range(len(mdp)):
        assert V_beta_plus[s] >= V_ref[s] - 1e-9, f"state {s}: regularised value went down"
        assert V_plus[s] >= V_ref[s] - 1e-9, f"state {s}: value went down"
        if advantages[s].abs().max() > 1e-6:  # pi_ref is not optimal here: the improvement is strict
            assert V_beta_plus[s] > V_ref[s] + 1e-6 and V_plus[s] > V_ref[s] + 1e-6, f"state {s}: no strict improvement"


def test_theorem_3_2_optimal_reference_is_kept():
    """Every action equally good: all advantages 0, pi_ref is optimal, and the minimiser is pi_ref itself."""
    g = torch.Generator().manual_seed(0)
    mdp = [[("next", 1), ("end", 0.7), ("next", 2)], [("end", 0.7), ("end", 0.7)], [("end", 0.7)] * 3]
    log_ref = random_policy(mdp, g)
    V_ref, Q_ref = values(mdp, log_ref, log_ref, 0.0)
    advantages = [Q_ref[s] - V_ref[s] for s in range(len(mdp))]
    assert all(a.abs().max() < 1e-12 for a in advantages)
    log_plus = minimise_dapo_loss(mdp, log_ref, advantages, 0.1, [[1] * len(a) for a in mdp])
    for lp, lr in zip(log_plus, log_ref):
        torch.testing.assert_close(lp, lr)
    assert values(mdp, log_plus, log_ref, 0.1)[0][0].item() == pytest.approx(V_ref[0].item())


def test_advantage_with_exact_q_is_compute_advantages_under_uniform_reference():
    """Eq. 13's mean over candidates is the sample estimate of V(s) = E_{a~pi_ref} Q(s, a): with pi_ref uniform
    and every action drawn once it is exact."""
    mdp = [[("end", 1.0), ("next", 1), ("end", 0.0)], [("end", 1.0), ("end", 0.0)]]
    uniform = [torch.log_softmax(torch.zeros(len(a)), -1) for a in mdp]
    V, Q = values(mdp, uniform, uniform, 0.0)
    for s in range(len(mdp)):
        torch.testing.assert_close(dapo.compute_advantages(Q[s]), Q[s] - V[s])


@pytest.mark.parametrize("seed", range(5))
def test_lemma_3_1_gradient_identity(seed):
    """At theta = theta_k: grad I_s = -beta grad H_s, where
    I_s(theta) = E_{a~pi_theta}[A(s, a) - beta log(pi_theta / pi_ref)] and
    H_s(theta) = 1/2 E_{a~pi_theta_k}[(A / beta - log(pi_theta / pi_ref))^2] (eq. 12 sampled from pi_theta_k)."""
    g = torch.Generator().manual_seed(seed)
    n, beta = 5, 0.3
    log_ref = torch.log_softmax(torch.randn(n, generator=g), -1)
    A = torch.randn(n, generator=g)
    theta_k = torch.randn(n, generator=g)
    pi_k = torch.softmax(theta_k, -1).detach()  # the sampling distribution is fixed at theta_k

    def grads(theta_at):
        theta = theta_at.clone().requires_grad_(True)
        log_pi = torch.log_softmax(theta, -1)
        improvement = (log_pi.exp() * (A - beta * (log_pi - log_ref))).sum()
        H = 0.5 * (pi_k * (A / beta - (log_pi - log_ref)) ** 2).sum()
        return torch.autograd.grad(improvement, theta, retain_graph=True)[0], torch.autograd.grad(H, theta)[0]

    grad_I, grad_H = grads(theta_k)
    torch.testing.assert_close(grad_I, -beta * grad_H)
    # The identity is a statement about theta_k only: elsewhere the two gradients differ.
    grad_I, grad_H = grads(theta_k + torch.randn(n, generator=g))
    assert (grad_I + beta * grad_H).abs().max() > 1e-3
    # With nu uniform instead of pi_theta_k, H_s is exactly dapo.dapo_loss.
    log_pi = torch.log_softmax(theta_k, -1)
    H_uniform = 0.5 * ((A / beta - (log_pi - log_ref)) ** 2).mean()
    torch.testing.assert_close(dapo.dapo_loss(log_pi, log_ref, A, beta), H_uniform)
