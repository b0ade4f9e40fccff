"""Shared-prefix rows: one row per state holding the state once and then every candidate action after it, and
the guard (check_packing) that finds a model family whose rows do not give what each pair alone gives (stage B
then runs one row per pair, or refuses)."""
from __future__ import annotations

import dataclasses
import functools

import torch

from plumbing.cli import InputError
from plumbing.models import compute_dtype


@dataclasses.dataclass
class SharedPrefixRows:
    """A batch of states with their candidate actions, one row per state: the state's tokens once, then every
    action after it, with a block attention mask in which each action sees the state and itself only, and
    position ids that restart after the state. Every action token therefore gets the hidden state it would
    get in the sequence state . action on its own, while the state is read once instead of once per action.
    Rows are left-padded, so the actions of every row end at the last column."""

    input_ids: torch.Tensor  # [B, W]
    position_ids: torch.Tensor  # [B, W]
    allowed: torch.Tensor  # [B, 1, W, W] True where a query token (dim 2) may attend to a key token (dim 3)
    # Per action token (T of them, actions in order): row, column, column of the token that predicts it
    # (the previous action token, or the state's last token for an action's first token) and action index.
    token_row: torch.Tensor  # [T]
    token_col: torch.Tensor  # [T]
    token_from: torch.Tensor  # [T]
    token_action: torch.Tensor  # [T]
    # Per action (N): row and column of its last token; an empty action ends at the state's last token.
    last_row: torch.Tensor  # [N]
    last_col: torch.Tensor  # [N]

    @property
    def num_actions(self) -> int:
        return len(self.last_row)

    def attention_mask(self, config) -> torch.Tensor | dict[str, torch.Tensor]:
        """`allowed` in the form a transformers model takes as a custom 4-D mask, which transformers 5 passes
        to every layer unchanged: boolean for sdpa, additive (0 or a large negative number) for eager attention,
        which adds it to the scores. A sliding-window layer therefore needs its window in the mask itself,
        counted in the restarted positions (a key more than `sliding_window` - 1 positions back is out of
        sight, as transformers' own sliding mask has it): one mask for the model when the config has a
        single `sliding_window` (Mistral, Phi-3), else a dict keyed by layer type, which models with
        `layer_types` take as their per-type masks (Qwen2, Gemma 2/3, gpt-oss: their `causal_mask_mapping`).
        Flash-attention and the other kernels take no mask of this shape, hence the refusal; so are layer
        types that no mask describes (linear attention, convolution, state-space layers of hybrid models)."""
        config = config.get_text_config(decoder=True)  # a vision-language model's language part holds the layers
        implementation = config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise InputError(f"attn_implementation={implementation!r}: shared-prefix rows need a custom 4-D attention "
                             "mask, which only 'sdpa' and 'eager' take; load the model with attn_implementation='sdpa'")
        window = getattr(config, "sliding_window", None)
        kinds = set(getattr(config, "layer_types", None) or [])
        unknown = kinds - {"full_attention", "sliding_attention"}
        if unknown:
            raise InputError(f"model family {config.model_type}: its layer types {', '.join(sorted(unknown))} take no "
                             f"block attention mask, so its states and candidates cannot share rows (docs/pipeline.md, "
                             f"'Stage B reads each state once')")
        as_mask = functools.partial(self._as_mask, eager=implementation == "eager")
        if not kinds:
            return as_mask(self.within_window(window) if window else self.allowed)
        if kinds == {"full_attention"}:
            return as_mask(self.allowed)
        return {"full_attention": as_mask(self.allowed), "sliding_attention": as_mask(self.within_window(window))}

    def within_window(self, window: int) -> torch.Tensor:
        """`allowed` for a layer that sees the last `window` positions only (the query's own included)."""
        behind = self.position_ids[:, :, None] - self.position_ids[:, None, :]  # [B, W, W] query minus key position
        return self.allowed & (behind < window)[:, None]  # [B, 1, W, W]

    @staticmethod
    def _as_mask(allowed: torch.Tensor, eager: bool) -> torch.Tensor:
        if not eager:
            return allowed
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)  # [B, 1, W, W]


def shared_prefix_rows(states: list[list[int]], actions: list[list[list[int]]], device) -> SharedPrefixRows:
    """Pack each state with its actions (actions[i] are the candidates of states[i]) into one row."""
    if any(not s for s in states):
        raise ValueError("shared_prefix_rows: a state needs at least one token (its prompt)")
    lengths = [len(s) + sum(map(len, a)) for s, a in zip(states, actions)]
    width = max(lengths)
    ids, positions, segments = [], [], []
    token_row, token_col, token_from, token_action, last_row, last_col = [], [], [], [], [], []
    for row, (state, acts, n) in enumerate(zip(states, actions, lengths)):
        pad = width - n
        ids.append([0] * pad + state + [t for a in acts for t in a])  # the padding's ids are never attended to
        positions.append([0] * pad + list(range(len(state))) + [len(state) + k for a in acts for k in range(len(a))])
        # Segment -1: padding, 0: the state, j + 1: action j. A token attends to earlier tokens of the state and
        # of its own segment; padding (on the left) only to padding, so no query row is fully masked.
        segments.append([-1] * pad + [0] * len(state) + [j + 1 for j, a in enumerate(acts) for _ in a])
        state_end = pad + len(state) - 1  # column of the state's last token
        col = state_end + 1
        for a in acts:
            for k in range(len(a)):
                token_row.append(row)
                token_col.append(col + k)
                token_from.append(col + k - 1 if k else state_end)
                token_action.append(len(last_row))
            last_row.append(row)
            last_col.append(col + len(a) - 1 if a else state_end)
            col += len(a)
    tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    segment = tensor(segments)  # [B, W]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()  # [W, W]
    same_or_state = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)  # [B, W, W]
    return SharedPrefixRows(tensor(ids), tensor(positions), (causal & same_or_state)[:, None],
                            tensor(token_row), tensor(token_col), tensor(token_from), tensor(token_action),
                            tensor(last_row), tensor(last_col))


def pack(indices: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive states packed into groups of at most `limit` actions (a state larger than the limit forms
    its own group)."""
    groups, current, count = [], [], 0
    for i in indices:
        if current and count + sizes[i] > limit:
            groups.append(current)
            current, count = [], 0
        current.append(i)
        count += sizes[i]
    return groups + [current] if current else groups


# =================================================================== the guard: rows equal pairs, or one row per pair
# Largest |shared row - pair alone| accepted, per unit of the compared number: rounding of the parameters' dtype
# (the check runs without autocast), far below what a mask that a layer ignores gives (whole nats, tenths of V).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
UNPACKABLE = ("layers that ignore the attention mask (linear attention, convolution, state-space: hybrid and SSM "
              "models) or positions that are not position ids (ALiBi)")


def checked_rows(asked: list[tuple[list[int], list[list[int]]]], per_state: int = 4) -> list[tuple]:
    """A few real (state, actions) of a run that make every way of going wrong show: the two that reach the
    furthest position (a window), and the shortest (left padding beside them); each with its longest
    actions and its shortest (beside longer rows: a position scheme that depends on the batch), at least two
    (a candidate must not see the one before it), borrowed from the others if need be."""
    asked = [(s, acts) for s, acts in asked if acts]
    reach = lambda i: len(asked[i][0]) + max(map(len, asked[i][1]))  # noqa: E731
    order = sorted(range(len(asked)), key=reach)
    chosen = list(dict.fromkeys(order[-2:] + order[:1]))
    spare = [a for i in chosen for a in asked[i][1]]
    rows = []
    for i in chosen:
        state, actions = asked[i]
        by_length = sorted(map(list, dict.fromkeys(map(tuple, actions))), key=len)
        actions = by_length[:1] + by_length[1:][-per_state:]
        actions += [a for a in spare if a not in actions][:max(0, 2 - len(actions))]
        rows.append((state, actions))
    return rows


def rope_limit(config) -> tuple[str, int] | None:
    """(rope type, L) when the model's rotary frequencies depend on the longest sequence of a forward pass,
    L the longest sequence whose frequencies never change; None when they never depend on it. Of transformers'
    rope types (modeling_rope_utils.dynamic_rope_update) two do: longrope (Phi-3-128k, Phi-3.5, Phi-4-mini)
    switches every position of the pass to its long frequencies once a position reaches
    original_max_position_embeddings, and dynamic rescales them past max_position_embeddings and remembers the
    longest sequence it has seen. default, linear, yarn, llama3 and proportional are fixed at load time, but
    PhiMoE's own rotary class switches its scale past original_max_position_embeddings for any rope type but
    default. A config with one rope setting per layer type gives the smallest L of its layers."""
    config = config.get_text_config(decoder=True)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    settings = [params] if "rope_type" in params or "type" in params else [
        p for p in params.values() if isinstance(p, dict)]  # one per layer type
    limits = []
    for p in settings:
        kind = p.get("rope_type", p.get("type", "default"))
        if kind == "longrope" or (kind != "default" and getattr(config, "model_type", None) == "phimoe"):
            original = p.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None)
            limits += [(kind, original)] if original else []
        elif "dynamic" in kind:
            limits.append((kind, config.max_position_embeddings))
    return min(limits, key=lambda limit: limit[1]) if limits else None


def packing_problem(model, packed, alone, asked: list[tuple[list[int], list[list[int]]]], what: str,
                    per_token: bool = True) -> str | None:
    """Why shared-prefix rows do not give what each (state, action) run alone gives, on this run (None: they
    do): a rope type whose frequencies depend on the batch, with pairs of the run past the length where they
    stay fixed (rope_limit), or a difference on a few real states of the run (checked_rows):
    packed(model, states, actions) -> [N] from rows, alone(model, state, action) -> the number from the plain
    sequence s . a. Both run in the parameters' dtype without autocast, so a difference is a different
    computation, not rounding: a model family that the rows cannot hold (UNPACKABLE) is found before any number
    of it is used, named or not, including one whose forward fails on the rows' 4-D mask. `model` is a
    transformers model or holds one as .backbone (the critic); per_token: the tolerance grows with the
    action's length (a sum of log-probs)."""
    config = getattr(model, "backbone", model).config
    family = f"model family {config.model_type} ({type(getattr(model, 'backbone', model)).__name__})"
    asked = [(s, acts) for s, acts in asked if acts]
    if not asked:
        return None
    rope, longest = rope_limit(config), max(len(s) + max(map(len, acts)) for s, acts in asked)
    if rope and longest > rope[1]:
        return (f"{family}: its {rope[0]} RoPE switches every position to other frequencies once a forward pass "
                f"holds more than {rope[1]} tokens, and this run has (state, action) pairs of up to {longest}: "
                f"in a shared row a short pair would get the frequencies of the longest pair beside it")
    rows = checked_rows(asked)
    states, actions = [s for s, _ in rows], [acts for _, acts in rows]
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(parameter.device.type, enabled=False):
            got = packed(model, states, actions).float().cpu()  # [N]
            want = torch.tensor([alone(model, s, a) for s, acts in rows for a in acts])  # [N]
    except torch.OutOfMemoryError:
        raise
    except InputError as e:  # the rows' mask refused: an attention kernel or layer types that take no such mask
        return str(e)
    except Exception as e:  # any other failure of a model on the rows is its family's, and says so
        return (f"{family}: its forward fails on shared-prefix rows for {what} ({type(e).__name__}: "
                f"{str(e)[:200]}), as for {UNPACKABLE}")
    finally:
        model.train(was_training)
    dtype = compute_dtype(model)  # an FSDP unit may compute in bf16 from fp32 shards
    unit = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    tolerance = torch.tensor([unit * (10 + (len(a) if per_token else 0)) for acts in actions for a in acts])  # [N]
    gap = (got - want).abs()  # [N]
    if not bool((gap <= tolerance).all()):
        return (f"{family}: shared-prefix rows give {what} up to {gap.max().item():.3g} away from each "
                f"(state, action) run alone (tolerance {tolerance.max().item():.2g} in {dtype}, "
                f"{len(gap)} actions of {len(rows)} states of this run), as for {UNPACKABLE}")
    return None


PACKING = ("auto", "on", "off")  # the choices of --packing


def refuse_remembered_rope(config, asked: list[tuple[list[int], list[list[int]]]]) -> None:
    """Stop with one line when a pair of the run is longer than a dynamic RoPE's max_position_embeddings: such
    a model rescales every position of a longer pass and remembers the longest pass it has seen, so no forward,
    packed or alone, gives the pair's own numbers (each depends on what the model read before)."""
    rope = rope_limit(config)
    longest = max((len(s) + max(map(len, acts)) for s, acts in asked if acts), default=0)
    if rope and "dynamic" in rope[0] and longest > rope[1]:
        raise InputError(f"model family {config.model_type}: its {rope[0]} RoPE rescales every position once a "
                         f"forward pass holds more than {rope[1]} tokens and remembers the longest pass it has seen, "
                         f"and this run has (state, action) pairs of up to {longest} tokens: no forward gives such a "
                         f"pair its own numbers; keep every state and its steps within {rope[1]} tokens")


def check_packing(model, packed, alone, asked: list[tuple[list[int], list[list[int]]]], what: str,
                  per_token: bool = True, mode: str = "on", quiet: bool = False) -> bool:
    """Whether stage B packs this model's (state, action) pairs into shared-prefix rows (True) or runs one row
    per pair, the plain forward of s . a (False: exact for any model family, slower). mode on: pack, or stop
    with one line (InputError) naming the family and why, before any number of it is used (packing_problem);
    auto: pack where that is exact, else say so in one line (unless quiet) and run one row per pair; off: one
    row per pair, unchecked."""
    refuse_remembered_rope(getattr(model, "backbone", model).config, asked)
    if mode == "off":
        return False
    problem = packing_problem(model, packed, alone, asked, what, per_token)
    if problem is None:
        return True
    if mode == "on":
        raise InputError(f"{problem}: stage B cannot pack this model; use --packing auto (one row per (state, "
                         "action): exact, slower) or a model family checked in docs/pipeline.md ('Stage B reads "
                         "each state once')")
    if not quiet:
        print(f"{problem}: so stage B runs one row per (state, action) for {what} (the plain forward: exact, "
              "slower)")
    return False
