"""A critic with its own tokenizer (the paper's setting: a Qwen2.5-Math critic for a Llama policy): the rollout's
token ids are the policy's, so such a critic reads the TEXT of every state and every s . a, in its own tokens.

Same tokenizer or not: two tokenizers are the same when their vocabularies (token -> id, added tokens included)
and their special tokens are equal (same_tokenizer); names are not compared. Then the critic reads the policy's
token ids as they are, with no decoding (critic.py and dapo.py do exactly what they did before). Otherwise
critic_tokens gives the translation below, and no token id of the policy ever reaches the critic.

The rule. text(ids) is the policy tokenizer's decoding of the ids (special tokens kept as text, no clean-up of
spaces); the critic's tokens of a text are the special tokens its tokenizer puts before a text (a BOS, for
some) and then its encoding of the text. The critic's value of a state s is V(critic tokens of text(s)), and
dapo.py's V(s . a) is V(critic tokens of text(s . a)): the numbers are those of the critic run on each text
alone, however the texts are packed.
  Training (CriticTokens.solutions): a solution is tokenized once, as the text of its last state, and each
  state is read at the critic token where its text ends, when the critic tokens of the state's text are the
  first tokens of the solution's. When they are not (a step boundary falls inside a critic token, e.g. a critic
  token "=5" across the policy's "...=" | "5...", or a critic merge across the boundary), the state gets a row
  of its own: its text tokenized alone, read at its last token (a token the solution's tokenization does not
  have). Either way the value trained is V(critic tokens of text(s)).
  Stage B (CriticTokens.asked): s . a is packed after s (shared-prefix rows) when the critic tokens of text(s)
  are the first tokens of those of text(s . a), the action being the rest; otherwise s . a is a state of its
  own with one empty action, so its value is read at its own last token.
Refused, in one line naming the file (InputError): a pair whose texts cannot be mapped, i.e. text(s) is not the
start of the text of its solution (or of s . a: the policy's decoding is not the same text piece by piece, e.g.
a character split across steps), or the critic's tokens of a text do not decode back to the text (the critic
would read another text: unknown tokens, a normaliser that lowercases or strips).
"""
from __future__ import annotations

import hashlib
import json

from plumbing.cli import InputError


def vocabulary_id(tok) -> str:
    """What makes token ids mean the same text: a hash of the vocabulary (token -> id, added tokens included)
    and the special tokens."""
    data = json.dumps([sorted(tok.get_vocab().items()), sorted(tok.all_special_tokens)], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def same_tokenizer(policy_tok, critic_tok) -> bool:
    """Whether the critic may read the policy's token ids as its own: equal vocabularies and special tokens."""
    return (policy_tok.get_vocab() == critic_tok.get_vocab()
            and sorted(policy_tok.all_special_tokens) == sorted(critic_tok.all_special_tokens))


def critic_tokens(policy_tok, critic_tok, where: str) -> CriticTokens | None:
    """None when the critic shares the policy's tokenizer (it reads the policy's ids); else the translation of
    the policy's ids into the critic's tokens of the same text, refusing what cannot be mapped with a line that
    names `where` (the file the ids come from)."""
    return None if same_tokenizer(policy_tok, critic_tok) else CriticTokens(policy_tok, critic_tok, where)


def describe(policy: str, policy_tok, critic_tok) -> dict:
    """For the critic directory's metrics.json: which policy tokenizer the rollout's ids are in, and how the
    critic reads them."""
    same = same_tokenizer(policy_tok, critic_tok)
    return {"policy": policy, "policy_vocabulary": vocabulary_id(policy_tok),
            "critic_vocabulary": vocabulary_id(critic_tok),
            "critic_reads": "the policy's token ids" if same else "its own tokens of the text (plumbing/retokenize.py)"}


class CriticTokens:
    """The policy's token ids as the critic's tokens of the same text (the module's docstring gives the rule)."""

    def __init__(self, policy_tok, critic_tok, where: str):
        self.policy_tok, self.critic_tok, self.where = policy_tok, critic_tok, where
        self.lead = leading_special_ids(critic_tok)

    def text(self, ids: list[int]) -> str:
        return self.policy_tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The critic's tokens of each text (its leading special tokens, then the text's), each checked to decode
        back to the text; a text that repeats (the states of a solution, a state's actions) is encoded once."""
        unique = list(dict.fromkeys(texts))
        tokens = {}
        for text, ids in zip(unique, self.critic_tok(unique, add_special_tokens=False)["input_ids"], strict=True):
            back = self.critic_tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if back != text:
                raise InputError(f"{self.where}: the critic's tokenizer does not give back the text {text[-60:]!r} "
                                 f"(decoded: {back[-60:]!r}), so it cannot read the policy's text; use a critic whose "
                                 "tokenizer encodes any text exactly (byte-level BPE) or the policy's tokenizer")
            lead = [] if ids[: len(self.lead)] == self.lead else self.lead  # a text that starts with the BOS has it
            if not lead + ids:
                raise InputError(f"{self.where}: the critic has no token to read for the empty text")
            tokens[text] = lead + ids
        return [tokens[t] for t in texts]

    def solutions(self, solutions: list[dict]) -> list[dict]:
        """critic.py's training data ({qid, ids, value_positions, mc_values} of the policy, value_positions[t]
        the last token of state s_t) in the critic's tokens: per solution one record read where each state's
        text ends, and one record of its own for each state whose critic tokens are not the first tokens of the
        solution's (state_weights must be recomputed on the result)."""
        out = []
        for s in solutions:
            full = self.text(s["ids"][: max(s["value_positions"]) + 1])
            texts = [self.text(s["ids"][: p + 1]) for p in s["value_positions"]]
            for t in texts:
                self.check_prefix(t, full, f"qid {s['qid']}: a state's text is not the start of its solution's")
            full_ids, *state_ids = self.encode([full] + texts)
            positions, labels = [], []
            for ids, label in zip(state_ids, s["mc_values"], strict=True):
                if full_ids[: len(ids)] == ids:
                    positions.append(len(ids) - 1)
                    labels.append(label)
                else:  # the boundary falls inside a critic token, or the critic merges across it: a row of its own
                    out.append({"qid": s["qid"], "ids": ids, "value_positions": [len(ids) - 1], "mc_values": [label]})
            if positions:
                out.append({"qid": s["qid"], "ids": full_ids[: max(positions) + 1], "value_positions": positions,
                            "mc_values": labels})
        return out

    def asked(self, asked: list[tuple[list[int], list[list[int]]]]) -> tuple[list, list[list[tuple[int, int]]]]:
        """dapo.py's question [(state ids, [action ids, ...]), ...] in policy ids -> the same question in critic
        tokens, and where each answer is: back[i][j] = (k, l), V(s_i . a_ij) is the l-th value of entry k."""
        critic_asked, back = [], []
        for state, actions in asked:
            state_text = self.text(state)
            texts = [self.text(state + a) for a in actions]
            for t in texts:
                self.check_prefix(state_text, t, "a state's text is not the start of the text of state . action")
            state_ids, *pair_ids = self.encode([state_text] + texts)
            shared, alone, where = [], [], []  # where[j]: ("shared" or "alone", index among them)
            for ids in pair_ids:
                if len(ids) > len(state_ids) and ids[: len(state_ids)] == state_ids:
                    where.append(("shared", len(shared)))
                    shared.append(ids[len(state_ids):])
                else:  # s . a on its own: a state with an empty action, read at its last token
                    where.append(("alone", len(alone)))
                    alone.append(ids)
            entry = len(critic_asked)
            if shared:
                critic_asked.append((state_ids, shared))
            first_alone = len(critic_asked)
            critic_asked.extend((ids, [[]]) for ids in alone)
            back.append([(entry, j) if kind == "shared" else (first_alone + j, 0) for kind, j in where])
        return critic_asked, back

    def through(self, values_of):
        """values_of (critic tokens: [(state, [action, ...])] -> [[V, ...]]) as a function of the policy's ids."""
        def values(asked):
            critic_asked, back = self.asked(asked)
            vs = values_of(critic_asked)
            return [[vs[k][j] for k, j in b] for b in back]
        return values

    def check_prefix(self, prefix: str, text: str, what: str) -> None:
        if not text.startswith(prefix):
            raise InputError(f"{self.where}: {what} ({prefix[-60:]!r} vs {text[-60:]!r}): the policy's token ids "
                             "cannot be mapped to the critic's tokens")


def leading_special_ids(tok) -> list[int]:
    """The special tokens a tokenizer puts before a text (a BOS, for some; none for others)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k: k + len(plain)] == plain:
            return list(full[:k])
    return []
