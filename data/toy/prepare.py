"""The embedded toy task: synthetic multi-step arithmetic, a tiny Llama, and an imperfect warm start.

Everything a DAPO run needs, built locally in a few minutes on 2 CPU cores, and saved exactly as a real
Hugging Face model is (save_pretrained), so every script loads it with AutoTokenizer / AutoModelForCausalLM.

  python data/toy/prepare.py --out_dir runs/toy

writes out_dir/train.jsonl and out_dir/test.jsonl ({"id", "question", "answer"}: different seeds, no test
question appears in train) and out_dir/sft/ (tokenizer + warm-started policy).

The task. "Start with 3. Add 2. Multiply by 3. Subtract 1. Keep only the last digit after each step."
Solution, one step per line, each step naming the operation it carries out, the last step boxing the answer:
    Add: 3+2=5
    Multiply: 5*3=5
    Subtract: 5-1=\\boxed{4}

Why the warm start is imperfect. Its supervised data contains a SYSTEMATIC mistake: a subtraction is done
as an addition ("Subtract: 5+2=7" where the question says "Subtract 2."). It is made with probability
`trap_error` > 1/2, so the warm start prefers the wrong step and greedy decoding cannot hide it; later steps
continue from the wrong value, as a student's would. DAPO has to find, from rewards alone, that the other
step is better.

The varied toy (--varied true). With a real model two sampled steps are rarely the same text; on this toy they
often are (a state's 16 candidates hold 1-2 distinct steps on average), so one graded completion per candidate is
really a mean over many. With --varied true every step of the warm start's data ends with a remark of two free
words drawn at random ("Add: 3+2=5 calm river"), which does not change its value: sampled steps are then nearly
all distinct, while the planted mistake stays. The default toy is unchanged by the option (same seed, same files).

The strong critic (--strong_critic true) writes only out_dir/strong/: the backbone of a critic better at the task
than the policy, trained like the warm start on correct solutions only (no planted mistake), wider and deeper,
with a tokenizer of its own (STRONG_PRETOKENIZE), so that critic.py and dapo.py give it the policy's text in its
own tokens (plumbing/retokenize.py), as the paper's Qwen2.5-Math critic reads a Llama policy's. docs/toy.md, "A
critic stronger than the policy", measures what it buys.

Why each step names its operation. The critic must see, at every state, whether an earlier step went wrong.
With the name in the step, a sign mistake is visible inside the step itself ("Subtract: 5+2"); without it, a
3-layer critic has to line step i up with the i-th operation of the question, which it learns less well from
a few thousand states (held-out Pearson r 0.87 with bare steps like "5+2=7", 0.93 with names; see docs/toy.md).
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import sys
import time

import torch
from transformers import set_seed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from plumbing.cli import arg, parse_config, progress, run  # noqa: E402
from plumbing.models import build_prompt_ids, DEFAULT_INSTRUCTION  # noqa: E402
from plumbing.runfiles import atomic_dir, write_jsonl_atomic  # noqa: E402
from plumbing.trainer import lr_at  # noqa: E402

OPS = {"+": "Add {k}.", "-": "Subtract {k}.", "*": "Multiply by {k}."}
NAMES = {"+": "Add: ", "-": "Subtract: ", "*": "Multiply: "}  # each step starts by naming the question's operation
# Small operands keep the digit tables small (80 facts): a 0.5M-parameter model learns them in two minutes.
# Words get their own tokens (with a leading space), so do a step's operation name ("Subtract: ") and \boxed{;
# anything else is one character.
PRETOKENIZE = r"\\boxed\{|[A-Za-z]+: | ?[A-Za-z]+|[\s\S]"
# The strong critic's backbone (--strong_critic true) has a tokenizer of its own, a BPE over characters whose merges
# make every word of the task (without its space) and every number below 100 one token; any other text is spelled
# in smaller pieces, so it encodes whatever the policy writes. Its ids mean nothing to the policy's tokenizer.
STRONG_PRETOKENIZE = r"\\boxed\{|[A-Za-z]+|\d+|[\s\S]"
# The varied toy (--varied true): every step ends with a remark of two free words, drawn uniformly from 16 x 16 = 256,
# that says nothing about the step's value. Two sampled steps are then rarely the same text, as with a real model.
REMARK_WORDS = (("calm", "bold", "quick", "plain", "neat", "brief", "fair", "keen",
                 "warm", "dry", "soft", "late", "wide", "odd", "lucky", "quiet"),
                ("river", "stone", "cloud", "lamp", "fox", "tree", "bell", "road",
                 "coin", "leaf", "moon", "door", "wave", "seed", "hill", "kite"))


@dataclasses.dataclass
class Config:
    out_dir: str = arg("runs/toy", "where train.jsonl, test.jsonl and sft/ are written")
    num_train: int = arg(2000, "training questions for rollout / DAPO")
    num_test: int = arg(300, "held-out test questions (another seed, none equal to a training question)")
    min_ops: int = arg(3, "fewest operations in a problem")
    max_ops: int = arg(4, "most operations in a problem")
    trap_error: float = arg(0.75, "probability that the warm-start data adds where it should subtract")
    varied: bool = arg(False, "end every step of the warm-start data with a random two-word remark that does not "
                              "change its value, so that sampled steps are nearly all distinct text")
    sft_examples: int = arg(32000, "supervised (warm start) examples, drawn fresh with the mistakes above")
    sft_batch_size: int = arg(64, "warm start batch size")
    sft_lr: float = arg(2e-3, "warm start peak learning rate (2e-3 leaves few random slips at temperature 1)")
    sft_bf16: bool = arg(False, "warm start in bf16 autocast where the CPU has bf16 instructions (AVX512-BF16, AMX): "
                                "1.5x faster, but a worse warm start (docs/toy.md); the saved model is float32")
    hidden_size: int = arg(128, "tiny Llama width")
    num_layers: int = arg(3, "tiny Llama depth")
    num_heads: int = arg(4, "tiny Llama attention heads")
    instruction: str = arg(DEFAULT_INSTRUCTION, "instruction appended to every question (as for a real model)")
    seed: int = arg(0, "seed of the warm start; the train / test problems use seed+1 / seed+2")
    strong_critic: bool = arg(False, "build only out_dir/strong/, the backbone of a critic stronger than the policy "
                                     "(docs/toy.md): correct solutions only, --strong_* sizes, its own tokenizer "
                                     "(whole words and numbers); train.jsonl, test.jsonl and sft/ are left as they are")
    strong_hidden_size: int = arg(160, "--strong_critic: width of its Llama")
    strong_layers: int = arg(4, "--strong_critic: depth of its Llama")
    strong_examples: int = arg(24000, "--strong_critic: its correct worked solutions (language-model training)")


# ----------------------------------------------------------------------------- problems
def make_problem(rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
    num_ops = rng.randint(CFG.min_ops, CFG.max_ops)
    ops = []
    for _ in range(num_ops):
        op = rng.choices("+-*", weights=(2, 1, 2))[0]
        ops.append((op, rng.randint(2, 3) if op == "*" else rng.randint(1, 3)))
    return rng.randint(0, 9), ops


def question_text(start: int, ops: list[tuple[str, int]]) -> str:
    return (f"Start with {start}. " + " ".join(OPS[op].format(k=k) for op, k in ops)
            + " Keep only the last digit after each step.")


def apply(op: str, a: int, k: int) -> int:
    return (a + k) % 10 if op == "+" else (a - k) % 10 if op == "-" else (a * k) % 10


def is_trap(op: str) -> bool:
    return op == "-"


def mistake(op: str) -> str:
    return "+"  # the sign mixed up: adds where the question says subtract


def solution_steps(start: int, ops: list[tuple[str, int]], rng: random.Random | None = None,
                   trap_error: float = 0.0, remarks: bool = False) -> list[str]:
    """The worked solution; with rng, each trap step is done wrong with probability trap_error, and with
    remarks each step ends with a random remark (REMARK_WORDS) before its line end."""
    steps, value = [], start
    for i, (op, k) in enumerate(ops):
        name = NAMES[op]  # the step names the operation the question asks for, even when it then does another
        if rng is not None and is_trap(op) and rng.random() < trap_error:
            op = mistake(op)
        new = apply(op, value, k)
        last = i == len(ops) - 1
        remark = "".join(f" {rng.choice(words)}" for words in REMARK_WORDS) if remarks else ""
        steps.append(f"{name}{value}{op}{k}=" + (f"\\boxed{{{new}}}{remark}" if last else f"{new}{remark}\n"))
        value = new
    return steps


def make_split(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    rng, records, seen = random.Random(seed), [], set(exclude)
    while len(records) < n:
        start, ops = make_problem(rng)
        q = question_text(start, ops)
        if q in seen:
            continue
        seen.add(q)
        answer = int(re.search(r"boxed\{(\d)\}", solution_steps(start, ops)[-1]).group(1))
        records.append({"id": f"toy-{seed}-{len(records)}", "question": q, "answer": str(answer)})
    return records


# ----------------------------------------------------------------------------- tokenizer and model
def build_tokenizer(corpus: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    pieces = {m for text in corpus for m in re.findall(PRETOKENIZE, text)}
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = specials + chars + sorted(pieces - set(chars))
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated")
    tk.decoder = decoders.Fuse()  # concatenate the pieces back: decode(encode(x)) == x
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_strong_tokenizer(corpus: list[str]):
    """The strong critic's tokenizer (STRONG_PRETOKENIZE): a BPE trained on the corpus and the numbers 0-99 until
    every piece is one token, over every printable character and the line end, so decode(encode(x)) == x for any
    text the policy can write."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(STRONG_PRETOKENIZE), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, special_tokens=specials, initial_alphabet=chars,
                                  show_progress=False)
    tk.train_from_iterator(corpus + [str(n) for n in range(100)], trainer)
    tk.decoder = decoders.Fuse()  # concatenate the pieces back: decode(encode(x)) == x
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=CFG.hidden_size, intermediate_size=2 * CFG.hidden_size,
        num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.num_heads,
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- warm start
def sft_batch(tok, rng: random.Random, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of (prompt, flawed solution) pairs; the loss is on the solution tokens only."""
    seqs, masks = [], []
    for _ in range(batch_size):
        start, ops = make_problem(rng)
        prompt = build_prompt_ids(tok, question_text(start, ops), CFG.instruction)
        steps = solution_steps(start, ops, rng, CFG.trap_error, remarks=CFG.varied)
        response = tok("".join(steps)).input_ids + [tok.eos_token_id]
        seqs.append(prompt + response)
        masks.append([0] * len(prompt) + [1] * len(response))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])  # [B, T] right-padded
    loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])  # [B, T]
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # [B, T]
    return ids, attn, loss_mask


def warm_start(model, tok) -> None:
    rng = random.Random(CFG.seed + 100)
    steps = CFG.sft_examples // CFG.sft_batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=CFG.sft_lr, weight_decay=0.0)
    # Speed: the warm start is most of prepare's time, and its time is matrix products of a 128-wide model. Where
    # the CPU multiplies bf16 natively they run 3.5x faster under autocast (weights and AdamW stay float32); the
    # attention is then the eager one, as the CPU's bf16 flash-attention backward is slower than the float32 one.
    bf16 = CFG.sft_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if bf16:
        model.set_attn_implementation("eager")
    model.train()
    bar = progress(range(steps), desc="warm start (SFT)" + (", bf16" if bf16 else ""))
    for step in bar:
        ids, attn, loss_mask = sft_batch(tok, rng, CFG.sft_batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [B, T-1, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
        mask = loss_mask[:, 1:].float()  # [B, T-1]: predict solution tokens only
        loss = (nll * mask).sum() / mask.sum()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, steps // 20, CFG.sft_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"warm start: {steps} steps, last loss {loss.item():.3f}")
    model.set_attn_implementation("sdpa")  # what the other scripts load it with
    model.eval()


def strong_critic_backbone(corpus: list[str], t0: float) -> None:
    """--strong_critic: out_dir/strong/, a backbone better at the task than the policy, for critic.py --init. The
    same warm start, but on correct worked solutions only (no planted mistake: trap_error 0; the varied toy's
    remarks kept), wider, deeper and longer, with its own tokenizer, so that the critic reads the policy's text
    (plumbing/retokenize.py), as the paper's Qwen2.5-Math critic reads a Llama policy's."""
    global CFG
    CFG = dataclasses.replace(CFG, trap_error=0.0, hidden_size=CFG.strong_hidden_size, num_layers=CFG.strong_layers,
                              sft_examples=CFG.strong_examples, seed=CFG.seed + 7)
    tok = build_strong_tokenizer(corpus)
    model = build_model(tok)
    print(f"strong critic backbone: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab "
          f"{len(tok)} (its own tokenizer), correct solutions only")
    warm_start(model, tok)
    with atomic_dir(os.path.join(CFG.out_dir, "strong")) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"wrote the strong critic's backbone to {os.path.join(CFG.out_dir, 'strong')} in {time.time() - t0:.0f}s")


def vocabulary_corpus() -> list[str]:
    """Every word the task and the instruction can use."""
    rng = random.Random(0)
    corpus = [CFG.instruction, "\\boxed{}", *(question_text(*make_problem(rng)) for _ in range(200))]
    corpus += [f"Start with 0. {OPS[op].format(k=1)}" for op in OPS] + list(NAMES.values())
    if CFG.varied:
        corpus += [f" {w}" for words in REMARK_WORDS for w in words]
    return corpus


def main() -> None:
    global CFG
    CFG = parse_config(Config)
    t0 = time.time()
    set_seed(CFG.seed)
    os.makedirs(CFG.out_dir, exist_ok=True)
    if CFG.strong_critic:
        strong_critic_backbone(vocabulary_corpus(), t0)
        return
    train = make_split(CFG.num_train, CFG.seed + 1)
    test = make_split(CFG.num_test, CFG.seed + 2, exclude={r["question"] for r in train})
    write_jsonl_atomic(os.path.join(CFG.out_dir, "train.jsonl"), train)
    write_jsonl_atomic(os.path.join(CFG.out_dir, "test.jsonl"), test)

    tok = build_tokenizer(vocabulary_corpus())  # the vocabulary covers every word the task and instruction can use
    model = build_model(tok)
    print(f"tiny Llama: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tok)}")
    warm_start(model, tok)

    with atomic_dir(os.path.join(CFG.out_dir, "sft")) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"wrote {len(train)} train / {len(test)} test questions and the warm start to {CFG.out_dir} "
          f"in {time.time() - t0:.0f}s")


CFG = Config()
if __name__ == "__main__":
    run(main)
