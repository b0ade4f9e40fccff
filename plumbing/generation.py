"""The batched KV-cache generation engine of rollout.py and eval.py: sampling, prefill once, preallocated cache."""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from transformers.cache_utils import DynamicLayer

from plumbing.cli import progress


def lm_forward(model, input_ids, attention_mask, position_ids=None, cache=None, last_only=False):
    """One causal-LM forward that returns (logits, cache). Transformers 5 renamed `past_key_values` to
    `cache`; this accepts either so the scripts run on both sides of the rename."""
    name = _cache_argument(type(model))
    extra = {"logits_to_keep": 1} if last_only else {}  # skip the [B, L, V] logits of a long prompt
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **{name: cache}, **extra)
    return out.logits, getattr(out, name)


@functools.lru_cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@dataclasses.dataclass
class Generation:
    ids: list[int]  # generated tokens (the EOS included when one ended the sequence)
    finish: str  # "eos" | "length" (cut by the limit)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] next tokens; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, ids = tempered_nucleus(logits, temperature, top_p)  # [B, K] each (ids None: K = V, in vocabulary order)
    pick = draw(probs, generator)  # [B] position in K
    return pick if ids is None else ids.gather(-1, pick[:, None]).squeeze(-1)


def tempered_nucleus(logits: torch.Tensor, temperature: float,
                     top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(logits / T) on the nucleus, the smallest set of most likely tokens whose mass reaches top_p (a token
    is in when the mass before it is below top_p: the token that crosses top_p is in, one after an exact hit is
    not, as in transformers' TopPLogitsWarper and vLLM), the rest 0, not renormalised. Returns (probs [B, V],
    None) when top_p is 1, else (probs [B, K], their token ids [B, K]) for the K most likely tokens of each
    row, most likely first.
    The nucleus is looked for among the top K (64, then x8 until every row's nucleus ends inside them):
    sorting the whole vocabulary (49k for SmolLM2) took longer than the model's own decode step at batch 100."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p >= 1.0:
        return probs, None
    k = min(64, probs.shape[-1])
    while True:
        top, ids = probs.topk(k, dim=-1)  # [B, K] descending
        mass = top.cumsum(-1)  # [B, K]
        if k == probs.shape[-1] or bool((mass[:, -1] >= top_p).all()):  # the token after the top K is outside
            break
        k = min(8 * k, probs.shape[-1])
    return top.masked_fill(mass - top >= top_p, 0), ids  # [B, K] tokens past the nucleus get 0


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[B, K] non-negative weights -> [B] positions drawn with probability weight / row sum, by inverse CDF
    (one uniform per row); torch.multinomial took 20x longer on a CPU (batch 100, 49k tokens: it draws an
    exponential per token). In fp32 (the uniform is a multiple of 2^-24, the running sum rounds) a token's
    probability is off by up to 1.2e-7, a total variation up to 1.5e-3 on a 152k vocabulary (5e-4 on 49k),
    unbiased on average: measured over all 2^24 uniforms (tests/test_rollout.py::test_draw_error_is_bounded).
    A float64 sum and uniform would make it exact, but took 4-5x as long on a CPU with the whole vocabulary
    (26 against 6 ms at batch 100, 49k tokens). A weight of 0 is never drawn."""
    cdf = weights.cumsum(-1)  # [B, K]
    total = cdf[:, -1:]  # [B, 1]
    u = torch.rand(total.shape, generator=generator, device=total.device, dtype=total.dtype) * total  # [B, 1]
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even when rounded up
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # [B] first position whose cdf exceeds u


class PreallocatedLayer(DynamicLayer):
    """A transformers cache layer whose keys and values live in buffers sized for the whole generation.
    DynamicLayer grows by torch.cat, which copies the whole cache at every step (30% of a batch-256 decode
    on CPU); here a step writes one column in place, and attention reads a view of the columns written.
    Made for generate: it appends (update) and keeps or repeats rows (reorder_cache), nothing else (no crop)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.key_buffer = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])  # [B, H, capacity, D]
        self.value_buffer = values.new_empty(*values.shape[:2], capacity, values.shape[3])  # [B, H, capacity, D]
        self.length = 0
        self.update(keys, values)

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length: end] = key_states
        self.value_buffer[:, :, self.length: end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # [B, H, length, D] views
        return self.keys, self.values

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) the batch rows `rows`, copying only the positions written so far."""
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(rows), *old.shape[1:])  # [b, H, capacity, D]
            torch.index_select(old[:, :, : self.length], 0, rows, out=new[:, :, : self.length])  # no temporary
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]

    batch_select_indices = reorder_cache

    def fill_holes(self, holes: torch.Tensor, fillers: torch.Tensor, rows: int) -> None:
        """Keep the first `rows` batch rows after copying rows `fillers` (all >= rows) into rows `holes` (all
        < rows), in place: a compaction copies the rows that move, not every row that stays."""
        for name in ("key_buffer", "value_buffer"):
            buffer = getattr(self, name)
            buffer[holes, :, : self.length] = buffer[fillers, :, : self.length]  # [h, H, length, D]
            setattr(self, name, buffer[:rows])  # a view: the rows past it stay allocated, unused
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def preallocate(cache, capacity: int):
    """Swap every plain DynamicLayer of a filled transformers cache for a PreallocatedLayer that holds
    `capacity` positions. Other layers (sliding window, linear attention, quantized, ...) and caches of
    other kinds (a legacy tuple, a custom model's own) stay as they are: they just take the slower path."""
    for i, layer in enumerate(getattr(cache, "layers", ())):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0 and layer.keys.dim() == 4:
            cache.layers[i] = PreallocatedLayer(layer.keys, layer.values, capacity)
    return cache


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, eos_ids: set[int], pad_id: int, max_new_tokens: int | list[int],
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
             generator: torch.Generator | None = None, desc: str | None = None,
             vocab_size: int | None = None) -> list[Generation]:
    """Continue every prompt (token ids) until any of eos_ids (plumbing.models.eos_token_ids) or the token limit.
    Batched with the KV cache; prompts are left padded.
    max_new_tokens is one limit for all, or one per prompt. vocab_size (the tokenizer's len) bounds the ids
    generated: a model's embedding matrix may have more rows than the tokenizer has tokens (Qwen2.5: 151,936
    rows, 151,665 tokens), and an id without a token cannot be decoded or split into steps.

    Speed: a decode step is many small ops, so whatever is not the model's own compute is worth removing.
    The prefill runs once per distinct prompt of a batch; the KV cache and the attention mask are
    preallocated for the whole generation and written in place (no torch.cat of the cache every step); rows
    that finished leave the batch and the cache at the step they end, live rows from the back of the batch
    taking their places (only those rows are copied; a cache that is not preallocated copies every row, so
    there they leave once a quarter of the batch has finished); sampling draws by inverse CDF and looks for
    the nucleus among the top tokens, not a sort of the vocabulary; a step syncs with the host once, to know
    when to stop (twice more at a step where rows finish)."""
    device = next(model.parameters()).device
    budget = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    results: list[Generation | None] = [None] * len(prompts)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)  # [E]
    reasons = ["length", "eos"]  # finish codes 0, 1
    for start in progress(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = order[start: start + batch_size]
        width, steps = max(len(prompts[i]) for i in batch), max(0, *(budget[i] for i in batch))
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device)  # [B, L]
        # The mask of the prompt and of every step to come; step t passes the view of its first L + t columns.
        attn = torch.zeros(len(batch), width + steps, dtype=torch.long, device=device)  # [B, L+T]
        attn[:, :width] = torch.arange(width, device=device)[None] >= torch.tensor(
            [width - len(prompts[i]) for i in batch], device=device)[:, None]  # 0 on the padding
        position = (attn[:, :width].cumsum(-1) - 1).clamp(min=0)  # [B, L] real tokens count from 0 despite padding
        # Rollouts sample many continuations of one prompt (n1 per question, M per state): the prefill runs
        # once per distinct prompt, and its logits and cache rows are then repeated for the copies.
        rows_of: dict[tuple[int, ...], list[int]] = {}  # distinct prompt -> its batch rows
        for j, i in enumerate(batch):
            rows_of.setdefault(tuple(prompts[i]), []).append(j)
        distinct = [copies[0] for copies in rows_of.values()]  # [U] one batch row per distinct prompt
        logits, cache = lm_forward(model, ids[distinct], attn[distinct, :width], position[distinct], last_only=True)
        cache = preallocate(cache, width + steps)
        can_reorder = callable(getattr(cache, "reorder_cache", None))  # False for a custom model's own cache
        layers = getattr(cache, "layers", None)
        in_place = bool(layers) and all(type(layer) is PreallocatedLayer for layer in layers)  # fill_holes works
        if len(distinct) < len(batch):
            if can_reorder:
                source = torch.empty(len(batch), dtype=torch.long, device=device)  # [B] prefill row of each batch row
                for u, copies in enumerate(rows_of.values()):
                    source[copies] = u
                logits = logits[source]  # [B, 1, V]
                cache.reorder_cache(source)
            else:  # a cache that cannot copy rows (not a transformers Cache, so not preallocated): prefill every row
                logits, cache = lm_forward(model, ids, attn[:, :width], position, last_only=True)
        logits = logits[:, -1]  # [B, V]
        position = position[:, -1:]  # [B, 1]
        # Per batch row: the tokens it generated (pad after its end), how many count, and why it ended.
        out = torch.full((len(batch), max(steps, 1)), pad_id, device=device)  # [B, T]
        length = torch.zeros(len(batch), dtype=torch.long, device=device)  # [B]
        finish = torch.zeros(len(batch), dtype=torch.long, device=device)  # [B] index into reasons
        # Per live row (rows still in the model's batch, finished or not): its batch row, limit, whether it ended.
        rows = torch.arange(len(batch), device=device)  # [b]
        limit = torch.tensor([budget[i] for i in batch], device=device)  # [b]
        done = limit <= 0  # [b]
        for t in range(steps):
            token = sample_next(logits[:, :vocab_size], temperature, top_p, generator)  # [b] ids the tokenizer has
            token = torch.where(done, pad_id, token)  # finished rows still in the batch add nothing
            out[rows, t] = token
            ended_eos = ~done & torch.isin(token, eos)  # [b]
            ended = ended_eos | (~done & (t + 1 >= limit))  # [b] the limit ends a row as "length"
            length[rows] = torch.where(ended, t + 1, length[rows])
            finish[rows] = torch.where(ended, ended_eos.long(), finish[rows])
            done |= ended
            finished = int(done.sum())  # the one host sync of a step
            if finished == len(done):
                break
            if finished and in_place:  # compaction: live rows from the back fill the finished rows' places
                live = len(done) - finished
                holes = done[:live].nonzero().squeeze(1)  # [h] finished rows among the first `live`
                fillers = (~done[live:]).nonzero().squeeze(1) + live  # [h] live rows past them
                for layer in cache.layers:
                    layer.fill_holes(holes, fillers, live)
                keep = torch.arange(live, device=device)  # [b'] where each row of the smaller batch comes from
                keep[holes] = fillers
                rows, limit, done, token = rows[keep], limit[keep], done[keep], token[keep]
                position, attn = position[keep], attn[keep]
            elif can_reorder and finished >= len(done) / 4:  # other caches copy every row: not at every finish
                keep = (~done).nonzero().squeeze(1)  # [b']
                rows, limit, done, token = rows[keep], limit[keep], done[keep], token[keep]
                position, attn = position[keep], attn[keep]
                cache.reorder_cache(keep)
            attn[:, width + t] = (~done).long()  # finished rows attend to nothing new
            position = position + 1  # [b, 1]
            logits, cache = lm_forward(model, token[:, None], attn[:, : width + t + 1], position, cache)
            logits = logits[:, -1]  # [b, V]
        for j, (ids_j, n, code) in enumerate(zip(out.tolist(), length.tolist(), finish.tolist())):
            results[batch[j]] = Generation(ids_j[:n], reasons[code])
    return results
