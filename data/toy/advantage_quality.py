"""How good are the advantages DAPO trains on? Each estimator the pipeline can use, against the truth.

For a rollout of rollout.py, its critic (critic.py) and pi_ref (the policy that generated the rollout):
  1. Sample states with at least two distinct candidate actions (with one, every estimator gives A = 0 exactly).
  2. The true Q(s, a) of every unique candidate: its reward when it ends the solution (exact), else the fraction
     of K completions from s . a, sampled from pi_ref with the rollout's settings and graded as rollout.py does,
     that are correct; standard error sqrt(q (1 - q) / K).
  3. The true advantage, eq. 13 over the state's M candidates with their duplicates (dapo.compute_advantages),
     and its standard error from those of the Q values.
  4. The estimators, as dapo.py computes them:
       critic       Q = V_phi(s . a) (dapo.q_values), eq. 13: what dapo.py trains on
       one rollout  Q = the reward of the candidate's own completion (dapo.rollout_q_values, --q_source rollout)
       MC baseline  Q = V_phi(s . a) as for the critic, minus the state's MC label V_hat(s) instead of the mean Q
       strong critic  (with --strong_critic) as critic, from a second critic directory, e.g. one on the backbone of
                    data/toy/prepare.py --strong_critic true, which reads the policy's text in its own tokens
  5. Per estimator, over the unique candidates (one advantage each, as dapo.training_set keeps them): Pearson r
     with the true advantage, mean squared error, and sign agreement where the true advantage is clearly not
     zero (|A| > 2 SE); the large advantages missed (|true A| > 0.5, estimate within +-0.15 of 0: on the toy
     mostly random slips, a wrong sum or an operand copied wrong); the same split by candidates drawn once and
     drawn more than once; a scatter plot.

    python data/toy/advantage_quality.py --rollout_dir runs/toy/iter1/rollout --critic runs/toy/iter1/critic \\
        --policy runs/toy/sft --out_dir runs/toy/iter1/advantage_quality

Output (out_dir): true_q.jsonl (per sampled state, every unique candidate's true Q, its SE and its count),
summary.json (the figures, the share of unique candidates over the whole rollout, the config), and
advantage_quality.png (needs matplotlib). Each state's true Q is appended when it is done, so rerunning the
same command after a kill resumes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from plumbing.cli import arg, InputError, parse_config, progress, run  # noqa: E402
from plumbing.generation import generate  # noqa: E402
from plumbing.models import eos_token_ids, load_causal_lm, load_tokenizer  # noqa: E402
from plumbing.retokenize import critic_tokens  # noqa: E402
from plumbing.runfiles import append_jsonl, check_rerun, read_shard, write_json_atomic  # noqa: E402
from critic import action_values, load_critic  # noqa: E402
from dapo import compute_advantages, q_values, read_states, rollout_q_values  # noqa: E402
from grading import grade_batch  # noqa: E402
import rollout  # noqa: E402

ESTIMATORS = ("critic", "one rollout", "MC baseline")


@dataclasses.dataclass
class Config:
    rollout_dir: str = arg("runs/toy/iter1/rollout", "rollout.py output directory (states.jsonl, summary.json)")
    critic: str = arg("runs/toy/iter1/critic", "the critic trained on that rollout (critic.py)")
    strong_critic: str = arg("", "a second critic trained on that rollout, measured beside the first (e.g. on the "
                                 "backbone of data/toy/prepare.py --strong_critic true; its own tokenizer is fine)")
    policy: str = arg("runs/toy/sft", "pi_ref: the policy that generated the rollout; it samples the true Q")
    data: str = arg("", "the rollout's question file, when its recorded path (summary.json) does not resolve here")
    out_dir: str = arg("runs/toy/iter1/advantage_quality", "where true_q.jsonl, summary.json and the figure go")
    num_states: int = arg(40, "states sampled (among those with at least two distinct candidates)")
    completions: int = arg(128, "K: completions from s . a per unique non-terminal candidate (the true Q)")
    batch_size: int = arg(256, "sequences per generation batch")
    states_per_chunk: int = arg(4, "states generated together (and saved together)")
    seed: int = arg(0, "seed of the state sample and of the sampling")
    overwrite: bool = arg(False, "remove out_dir first and start afresh")


RESUME_IGNORES = ("out_dir", "overwrite", "batch_size", "states_per_chunk")


# ============================================================================= the truth
def unique_candidates(state: dict) -> dict[tuple, list[int]]:
    """Each distinct candidate of a state (its token ids) -> the indices of its copies among the M."""
    copies: dict[tuple, list[int]] = {}
    for i, a in enumerate(state["actions"]):
        copies.setdefault(tuple(a["ids"]), []).append(i)
    return copies


def true_q_chunk(model, tok, states: list[dict], questions: dict, rcfg, cfg: Config,
                 g: torch.Generator) -> list[dict]:
    """Step 2 for a few states: per state, each unique candidate's true Q, its standard error and its count."""
    asks = []  # (state index in chunk, candidate ids): the non-terminal candidates, K completions each
    records = []
    for si, s in enumerate(states):
        cands = []
        for ids, copies in unique_candidates(s).items():
            a = s["actions"][copies[0]]
            cands.append({"ids": list(ids), "count": len(copies), "terminal": a["terminal"],
                          "true_q": float(a["reward"]) if a["terminal"] else None, "se": 0.0, "k": 0})
            if not a["terminal"]:
                asks.append((si, len(cands) - 1))
        records.append({"line": s["_line"], "qid": s["qid"], "t": s.get("t"), "mc_value": s.get("mc_value"),
                        "candidates": cands})
    K = cfg.completions
    prompts, budgets, prefixes, answers = [], [], [], []
    for si, ci in asks:
        s, ids = states[si], records[si]["candidates"][ci]["ids"]
        prefix = s["state_ids"][s["prompt_len"]:] + ids  # the response so far: the state's steps and the candidate
        prompts += [s["state_ids"] + ids] * K
        budgets += [rcfg.max_new_tokens - len(prefix)] * K  # max_new_tokens limits the whole solution, as in rollout
        prefixes += [prefix] * K
        answers += [questions[s["qid"]]["answer"]] * K
    outs = generate(model, prompts, eos_ids=eos_token_ids(tok, model), pad_id=tok.pad_token_id, max_new_tokens=budgets,
                    temperature=rcfg.temperature, top_p=rcfg.top_p, batch_size=cfg.batch_size, generator=g,
                    vocab_size=len(tok), desc="true Q")
    rewards = grade_batch([tok.decode(p + o.ids, skip_special_tokens=True) if o.finish == "eos" else None
                           for p, o in zip(prefixes, outs)], answers, rcfg.task, rcfg.grader)
    for n, (si, ci) in enumerate(asks):
        q = sum(rewards[n * K: (n + 1) * K]) / K
        records[si]["candidates"][ci].update(true_q=q, se=math.sqrt(q * (1 - q) / K), k=K)
    return records


def true_advantages(state: dict, record: dict) -> tuple[list[float], list[float]]:
    """Step 3: the true advantage of each of the M candidates (eq. 13, duplicates included) and its standard
    error: A_i = sum_u (delta_iu - c_u / M) Q_u over the unique candidates u (c_u copies), whose Q estimates
    are independent, so Var A_i = sum_u (delta_iu - c_u / M)^2 SE_u^2."""
    by_ids = {tuple(c["ids"]): c for c in record["candidates"]}
    q = [by_ids[tuple(a["ids"])]["true_q"] for a in state["actions"]]
    adv = compute_advantages(torch.tensor(q, dtype=torch.float64)).tolist()  # [M]
    M = len(state["actions"])
    se = [math.sqrt(sum(((tuple(a["ids"]) == u) - c["count"] / M) ** 2 * c["se"] ** 2 for u, c in by_ids.items()))
          for a in state["actions"]]
    return adv, se


# ============================================================================= the figures
def critic_q_values(path: str, policy_tok, states: list[dict], where: str) -> list[list[float]]:
    """Q = V_phi(s . a) for the non-terminal candidates (dapo.q_values), from the critic directory at path; a
    critic with its own tokenizer reads the text of s . a (plumbing/retokenize.py), as in dapo.py."""
    critic = load_critic(path, torch.device("cpu"))
    tokens = critic_tokens(policy_tok, load_tokenizer(path), where)
    values = lambda asked: action_values(critic, asked)  # noqa: E731
    return q_values(states, tokens.through(values) if tokens else values)


def estimated_advantages(states: list[dict], critic_q: list[list[float]],
                         strong_q: list[list[float]] | None = None) -> dict[str, list[list[float]]]:
    """Step 4: per estimator, the advantage of each of the M candidates of every state."""
    eq13 = lambda q: [compute_advantages(torch.tensor(qs, dtype=torch.float64)).tolist() for qs in q]  # noqa: E731
    out = {"critic": eq13(critic_q), "one rollout": eq13(rollout_q_values(states)),
           "MC baseline": [[qa - s["mc_value"] for qa in qs] for s, qs in zip(states, critic_q)]}
    if strong_q is not None:
        out["strong critic"] = eq13(strong_q)
    return out


def per_candidate(states: list[dict], values: list[list[float]]) -> list[float]:
    """One value per unique non-empty candidate (the mean over its copies, as dapo.training_set keeps it), in the
    order of unique_candidates, state after state."""
    out = []
    for s, v in zip(states, values):
        for ids, copies in unique_candidates(s).items():
            if ids:  # an empty step is never trained on
                out.append(sum(v[i] for i in copies) / len(copies))
    return out


def agreement(truth: list[float], se: list[float], estimate: list[float]) -> dict:
    """Pearson r, MSE, and where the truth is clearly not zero (|A| > 2 SE) the share of estimates of its sign
    (an estimate of 0 has none: it does not move the actor) and of the opposite sign (it moves the actor wrong);
    of the large true advantages (|A| > 0.5), how many the estimate misses (within +-0.15 of 0)."""
    n = len(truth)
    if n == 0:
        return {"candidates": 0, "large": 0, "large_missed": 0, "pearson_r": None, "mse": None, "sign_agreement": None,
                "opposite_sign": None, "clear": 0}
    mt, me = sum(truth) / n, sum(estimate) / n
    cov = sum((t - mt) * (e - me) for t, e in zip(truth, estimate))
    vt, ve = sum((t - mt) ** 2 for t in truth), sum((e - me) ** 2 for e in estimate)
    clear = [(t, e) for t, s, e in zip(truth, se, estimate) if abs(t) > 2 * s and abs(t) > 1e-9]
    large = [e for t, e in zip(truth, estimate) if abs(t) > 0.5]
    return {"candidates": n, "large": len(large), "large_missed": sum(abs(e) <= 0.15 for e in large),
            "pearson_r": cov / math.sqrt(vt * ve) if vt > 1e-12 and ve > 1e-12 else None,
            "mse": sum((t - e) ** 2 for t, e in zip(truth, estimate)) / n,
            "sign_agreement": sum(t * e > 0 for t, e in clear) / len(clear) if clear else None,
            "opposite_sign": sum(t * e < 0 for t, e in clear) / len(clear) if clear else None, "clear": len(clear)}


def uniqueness(states: list[dict]) -> dict:
    """Over every state of the rollout: distinct candidates / M (the toy's steps repeat; text rarely does)."""
    shares = sorted(len(unique_candidates(s)) / len(s["actions"]) for s in states)
    return {"states": len(shares), "mean_unique_share": sum(shares) / len(shares),
            "median_unique_share": shares[len(shares) // 2],
            "states_at_least_90pct_unique": sum(x >= 0.9 for x in shares) / len(shares)}


def fmt(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}"


def plot(path: str, truth: list[float], se: list[float], estimates: dict[str, list[float]], title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no figure: matplotlib is missing (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(estimates), figsize=(4 * len(estimates), 4), sharex=True, sharey=True)
    lim = max(0.05, *(abs(x) for x in truth), *(abs(x) for v in estimates.values() for x in v)) * 1.05
    for ax, (name, est) in zip(axes, estimates.items()):
        ax.errorbar(truth, est, xerr=[2 * s for s in se], fmt="o", ms=3, alpha=0.4, elinewidth=0.5)
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
        m = agreement(truth, se, est)
        ax.set_title(f"{name}: r {fmt(m['pearson_r'], 2)}, MSE {fmt(m['mse'], 4)}", fontsize=10)
        ax.set_xlabel("true advantage (bars: 2 SE)")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    axes[0].set_ylabel("estimated advantage")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ============================================================================= main
def rollout_config(cfg: Config):
    """The rollout's own settings (summary.json), so the truth is sampled and graded as its labels were."""
    path = os.path.join(cfg.rollout_dir, "summary.json")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not found: --rollout_dir must be a finished rollout.py output directory")
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f)["config"]
    fields = {f.name for f in dataclasses.fields(rollout.Config)} - {"report_to"}  # nothing is reported from here
    rcfg = rollout.Config(**{k: v for k, v in recorded.items() if k in fields})
    if cfg.data:
        rcfg.data = cfg.data
    if not os.path.isfile(rcfg.data):
        raise InputError(f"{path}: its question file {rcfg.data!r} does not exist here: give it with --data")
    return rcfg


def main() -> None:
    cfg = parse_config(Config)
    rcfg = rollout_config(cfg)
    states = read_states(os.path.join(cfg.rollout_dir, "states.jsonl"), completion_rewards=True)
    tok = load_tokenizer(cfg.policy)
    questions = {q["qid"]: q for q in rollout.load_questions(rcfg, tok)}
    done_file, truth_file = os.path.join(cfg.out_dir, "summary.json"), os.path.join(cfg.out_dir, "true_q.jsonl")
    if check_rerun(cfg, cfg.out_dir, done_file, os.path.join(cfg.out_dir, "settings.json"), [truth_file],
                   RESUME_IGNORES, True):
        return
    os.makedirs(cfg.out_dir, exist_ok=True)

    # 1. The sample: states whose candidates differ.
    eligible = [i for i, s in enumerate(states) if len(unique_candidates(s)) >= 2]
    chosen = sorted(random.Random(cfg.seed).sample(eligible, min(cfg.num_states, len(eligible))))
    print(f"{len(states)} states, {len(eligible)} with two or more distinct candidates; {len(chosen)} sampled")

    # 2. The true Q, resumable state by state.
    done = {r["line"]: r for r in read_shard(truth_file)}
    todo = [i for i in chosen if states[i]["_line"] not in done]
    model = load_causal_lm(cfg.policy, torch.device("cpu")).eval()
    g = torch.Generator().manual_seed(cfg.seed + len(done))
    with open(truth_file, "a", encoding="utf-8") as f:
        for start in progress(range(0, len(todo), cfg.states_per_chunk), desc="states"):
            chunk = [states[i] for i in todo[start: start + cfg.states_per_chunk]]
            for record in true_q_chunk(model, tok, chunk, questions, rcfg, cfg, g):
                append_jsonl(f, record)
                done[record["line"]] = record
    model = None

    # 3-5. The true advantage against each estimator.
    sample = [states[i] for i in chosen]
    truth_adv, truth_se = zip(*(true_advantages(s, done[s["_line"]]) for s in sample))
    where = os.path.join(cfg.rollout_dir, "states.jsonl")
    critic_q = critic_q_values(cfg.critic, tok, sample, where)
    strong_q = critic_q_values(cfg.strong_critic, tok, sample, where) if cfg.strong_critic else None
    truth, se = per_candidate(sample, truth_adv), per_candidate(sample, truth_se)
    estimates = {name: per_candidate(sample, adv)
                 for name, adv in estimated_advantages(sample, critic_q, strong_q).items()}
    counts = per_candidate(sample, [[len(unique_candidates(s)[tuple(a["ids"])]) for a in s["actions"]] for s in sample])
    q_se = [c["se"] for s in sample for c in done[s["_line"]]["candidates"] if not c["terminal"]]
    figures = {}
    for name, est in estimates.items():
        once = [i for i, c in enumerate(counts) if c == 1]
        more = [i for i, c in enumerate(counts) if c > 1]
        pick = lambda idx, xs: [xs[i] for i in idx]  # noqa: E731
        figures[name] = {"all": agreement(truth, se, est),
                         "drawn_once": agreement(pick(once, truth), pick(once, se), pick(once, est)),
                         "drawn_more": agreement(pick(more, truth), pick(more, se), pick(more, est))}
    summary = {"states_sampled": len(sample), "unique_candidates": len(truth),
               "completions_per_candidate": cfg.completions,
               "mean_se_true_q": sum(q_se) / max(1, len(q_se)), "max_se_true_q": max(q_se, default=0.0),
               "mean_se_true_advantage": sum(se) / max(1, len(se)),
               "mse_of_zero": sum(t * t for t in truth) / max(1, len(truth)),
               "mean_se2_true_advantage": sum(s * s for s in se) / max(1, len(se)),
               "rollout_uniqueness": uniqueness(states), "estimators": figures, "config": dataclasses.asdict(cfg)}

    u = summary["rollout_uniqueness"]
    print(f"\nrollout: distinct candidates per state {u['mean_unique_share']:.0%} of M on average (median "
          f"{u['median_unique_share']:.0%}); {u['states_at_least_90pct_unique']:.0%} of states have >= 90% distinct")
    print(f"true Q: {cfg.completions} completions per candidate, SE mean {summary['mean_se_true_q']:.3f} (max "
          f"{summary['max_se_true_q']:.3f}); true A: SE mean {summary['mean_se_true_advantage']:.3f}, mean SE^2 "
          f"{summary['mean_se2_true_advantage']:.4f}, MSE of A = 0: {summary['mse_of_zero']:.4f}")
    print(f"{len(sample)} states, {len(truth)} unique candidates ({sum(c == 1 for c in counts)} drawn once)\n")
    print("| estimator | r | MSE | right sign / opposite sign (of n with |A| > 2 SE) | missed (|A| > 0.5, estimate "
          "within 0.15 of 0) | MSE, drawn once | MSE, drawn more |")
    print("|---|---|---|---|---|---|---|")
    for name, f in figures.items():
        a = f["all"]
        print(f"| {name} | {fmt(a['pearson_r'])} | {fmt(a['mse'], 4)} | {fmt(a['sign_agreement'])} / "
              f"{fmt(a['opposite_sign'])} (n {a['clear']}) | {a['large_missed']} of {a['large']} | "
              f"{fmt(f['drawn_once']['mse'], 4)} ({f['drawn_once']['candidates']}) | "
              f"{fmt(f['drawn_more']['mse'], 4)} ({f['drawn_more']['candidates']}) |")
    plot(os.path.join(cfg.out_dir, "advantage_quality.png"), truth, se, estimates,
         f"{cfg.rollout_dir}: {len(sample)} states, {len(truth)} candidates, true Q from {cfg.completions} "
         "completions each")
    write_json_atomic(done_file, summary)
    print(f"wrote {done_file}")


if __name__ == "__main__":
    run(main)
