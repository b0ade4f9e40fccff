"""Shared-prefix rows: one row per state holding the state once and then every candidate action after it."""
from __future__ import annotations

import dataclasses
import functools

import torch

from plumbing.cli import InputError


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

    def attention_mask(self, config) -> torch.Tensor:
        """`allowed` in the form a transformers model takes as a custom 4-D mask (passed through unchanged):
        boolean for sdpa, additive (0 or a large negative number) for eager attention, which adds it to the
        scores. Flash-attention and the other kernels take no mask of this shape, hence the refusal."""
        implementation = config._attn_implementation
        if implementation == "sdpa":
            return self.allowed
        if implementation == "eager":
            return torch.zeros(self.allowed.shape, device=self.allowed.device).masked_fill(
                ~self.allowed, torch.finfo(torch.float32).min)  # [B, 1, W, W]
        raise InputError(f"attn_implementation={implementation!r}: shared-prefix rows need a custom 4-D attention "
                         "mask, which only 'sdpa' and 'eager' take; load the model with attn_implementation='sdpa'")


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
