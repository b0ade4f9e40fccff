"""plumbing.models: dropout off for training (every family's train-mode forward equals its eval-mode one, with
gradient checkpointing still recomputing), the EOS ids a model stops on, and GGUF paths that do not exist."""
import importlib.util
import os
import re

import pytest
import torch

from plumbing import cli, models
from conftest import tiny_random_llama

# Families whose configs carry dropout rates under different names, read in different places: nn.Dropout
# modules (GPT-2), floats on the attention module (Llama, Qwen2: attention_dropout), on the decoder layer (OPT:
# dropout, layerdrop), and from the config at forward time (Persimmon).
FAMILIES = ["gpt2", "opt", "llama", "qwen2", "phi", "gpt_neox", "falcon", "bloom", "persimmon"]


def with_dropout(config, rate: float):
    """Every float of the config (and its sub-configs) named like a dropout rate set to `rate`."""
    from transformers import PretrainedConfig

    for name, value in list(vars(config).items()):
        if "drop" in name and isinstance(value, float):
            setattr(config, name, rate)
        elif isinstance(value, PretrainedConfig):
            with_dropout(value, rate)
    return config


def tiny_model(family: str, rate: float = 0.1, auto_class=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=0)
    torch.manual_seed(0)
    return (auto_class or AutoModelForCausalLM).from_config(with_dropout(config, rate))


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_dropout_makes_the_training_forward_the_eval_forward(family, one_thread):
    model = tiny_model(family)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))  # [B, T]
    with torch.no_grad():
        evaluated = model.eval()(ids).logits  # [B, T, V]
        noisy = model.train()(ids).logits
        assert (noisy - evaluated).abs().max() > 1e-3  # premise: dropout 0.1 is on in train mode
        models.disable_dropout(model)
        assert model.training
        assert torch.allclose(model(ids).logits, evaluated, atol=1e-6)
        assert torch.allclose(model(ids).logits, evaluated, atol=1e-6)  # and stays so: nothing random is left


def test_gradient_checkpointing_still_recomputes_with_dropout_off(one_thread):
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))  # [B, T]
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model("opt")
        if checkpointing:
            models.enable_checkpointing(model)
        model.train()
        models.disable_dropout(model)
        count = []  # calls of a module inside a decoder layer (the layer's own hooks stay outside the checkpoint)
        model.model.decoder.layers[0].self_attn.register_forward_hook(lambda *_: count.append(1))
        model(ids).logits.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        calls.append(len(count))
    assert calls == [1, 2]  # with checkpointing the layer runs again in the backward pass
    assert torch.allclose(grads[0], grads[1], atol=1e-6)  # the recomputation is the same function: no dropout


def test_a_critic_trains_as_it_is_queried(one_thread):
    """critic.py's training forward (train mode) gives the values of its queries (values_at: eval mode)."""
    import critic as critic_lib
    from transformers import AutoModel

    critic = critic_lib.Critic(tiny_model("gpt2", auto_class=AutoModel))
    torch.nn.init.normal_(critic.value_head.weight)  # a fresh head is 0: V = 0.5 whatever dropout does
    ids, mask = torch.randint(1, 64, (3, 10)), torch.ones(3, 10, dtype=torch.long)  # [B, T]
    queried = torch.tensor(critic_lib.values_at(critic, ids.tolist(), [list(range(10))] * 3))  # [B, T]
    critic.train()
    with torch.no_grad():
        assert (critic(ids, mask) - queried).abs().max() > 1e-3  # premise
        models.disable_dropout(critic)
        assert torch.allclose(critic(ids, mask), queried, atol=1e-6)


# ============================================================================= EOS ids
def test_eos_ids_are_the_tokenizers_and_the_generation_configs(tmp_path):
    from transformers import GenerationConfig

    from test_rollout import word_tokenizer

    tok = word_tokenizer(["a", "b", "<|eot|>", "<|end|>"])  # eos "</s>" = 1
    model = tiny_random_llama()
    model.config.eos_token_id = 1
    model.save_pretrained(tmp_path / "plain")  # writes generation_config.json from config.json: EOS 1
    tok.save_pretrained(tmp_path / "plain")
    os.remove(tmp_path / "plain" / "generation_config.json")  # a model without one: config.json's EOS
    assert models.eos_token_ids(tok, models.load_causal_lm(str(tmp_path / "plain"), "cpu")) == {1}
    model.generation_config = GenerationConfig(eos_token_id=[1, 5, 6])  # an instruct model lists several
    model.save_pretrained(tmp_path / "instruct")
    loaded = models.load_causal_lm(str(tmp_path / "instruct"), "cpu")
    assert models.eos_token_ids(tok, loaded) == {1, 5, 6}
    loaded.generation_config.eos_token_id = 5  # one id, not a list, and not the tokenizer's
    assert models.eos_token_ids(tok, loaded) == {1, 5}
    assert models.eos_token_ids(tok, None) == {1}  # not a transformers model: the tokenizer's


# ============================================================================= GGUF paths that do not exist
@pytest.mark.parametrize("packages", ["installed", "missing"])
def test_a_missing_gguf_file_is_named_whichever_packages_are_installed(tmp_path, monkeypatch, packages):
    find_spec = importlib.util.find_spec
    if packages == "missing":
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name in ("gguf", "accelerate") else find_spec(name, *a))
    elif find_spec("gguf") is None or find_spec("accelerate") is None:
        pytest.skip("the optional packages gguf and accelerate are not installed")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # an existing directory: "models/x.gguf" reads like a hub name "org/name"
    for path in ("models/model.Q8_0.gguf", "model.Q8_0.gguf", str(tmp_path / "model.Q8_0.gguf")):
        for load in (lambda p: models.materialize_gguf(p, str(tmp_path / "out")), models.load_tokenizer,
                     lambda p: models.load_causal_lm(p, "cpu"), lambda p: models.load_pretrained(None, p, None)):
            with pytest.raises(cli.InputError, match=f"^{re.escape(path)}: GGUF model file does not exist$"):
                load(path)
    assert sorted(os.listdir(tmp_path)) == ["models"]  # nothing written
