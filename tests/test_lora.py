"""LoRA (--lora_r, plumbing.lora) in critic.py and dapo.py: pi_ref is the base with the adapters disabled, the saved
actor and critic are plain directories (adapters merged) with the trained model's numbers, a killed LoRA run resumes
to the same result in one process, under DDP and under FSDP, 2-rank FSDP equals one process, the first step's
log(pi / pi_ref) is 0 in fp32 and under bf16 autocast, and LoRA without peft is one line."""
import importlib.util
import json
import sys

import pytest
import torch

import critic as C
import dapo
from plumbing import cli, lora
from plumbing.checkpoints import training_meta
from plumbing.cli import InputError, parse_config
from plumbing.models import load_causal_lm
from conftest import run_script

pytestmark = pytest.mark.usefixtures("one_thread")
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (requirements-optional)")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
LORA = ["--lora_r", "4", "--lora_alpha", "8"]
# Q from the rollout (no critic needed): 2 epochs of a few steps, micro-batches smaller than a step.
DAPO = ["--q_source", "rollout", "--beta", "0.1", "--lr", "3e-3", "--epochs", "2", "--global_batch_actions", "28",
        "--micro_batch_actions", "12", "--min_gap", "0.1", "--log_every", "1"]
CRITIC = ["--batch_size", "8", "--micro_batch_size", "2", "--epochs", "2", "--lr", "3e-3", "--warmup_fraction", "0",
          "--heldout_fraction", "0.2", "--log_every", "1"]
FSDP = ["--fsdp", "true", "--gradient_checkpointing", "true"]


def settings(**kw):
    base = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules="all", base_dtype="float32")
    return type("Settings", (), {**base, **kw})()


def dapo_args(toy_dir, toy_rollout, out, *extra):
    return ["dapo.py", "--policy", str(toy_dir / "sft"), "--rollout_dir", str(toy_rollout), "--out_dir", str(out),
            *DAPO, *LORA, *extra]


def critic_args(toy_dir, toy_rollout, out, *extra):
    return ["critic.py", "--rollout_dir", str(toy_rollout), "--init", str(toy_dir / "sft"), "--out_dir", str(out),
            *CRITIC, *LORA, *extra]


def params(path):
    return load_causal_lm(str(path), torch.device("cpu")).state_dict()


def read_log(out):
    return [json.loads(line) for line in open(out / "train_log.jsonl")]


def assert_close_params(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"parameters differ by up to {worst}"


# ============================================================================= pi_ref, the adapters, the merge
@needs_peft
def test_reference_mode_is_the_base_model_and_the_merge_is_the_adapted_model(toy_dir, tmp_path, monkeypatch):
    states, actions = [[1, 5, 6, 7, 8], [1, 9, 10]], [[[3, 4], [5]], [[6, 7, 8]]]
    base = load_causal_lm(str(toy_dir / "sft"), torch.device("cpu")).eval()
    model = lora.add_lora(load_causal_lm(str(toy_dir / "sft"), torch.device("cpu")), settings(), critic=False).eval()
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert not any("lm_head" in n or "embed" in n for n in adapters)  # only the blocks' Linear layers
    assert {p.dtype for p in lora.trainable(model)} == {torch.float32}
    with torch.no_grad():
        ref = dapo.action_logps(base, states, actions)  # [3]
        at_init = dapo.action_logps(model, states, actions)
        for name, p in model.named_parameters():  # adapters that change the model
            if ".lora_B." in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        adapted = dapo.action_logps(model, states, actions)
        with lora.reference_mode(model):
            disabled = dapo.action_logps(model, states, actions)
    torch.testing.assert_close(at_init, ref, atol=1e-6, rtol=0)  # B = 0: pi = pi_ref at the start
    torch.testing.assert_close(disabled, ref, atol=1e-6, rtol=0)  # adapters off: the base, pi_ref
    assert (adapted - ref).abs().min() > 1e-2  # the premise: the adapters do change the log-probs
    # Saved merged, the directory is a plain model: no adapter files, loads without peft, the adapted numbers.
    lora.plain_model(model).save_pretrained(tmp_path / "merged", state_dict=lora.merged_state_dict(model, None))
    assert not list(tmp_path.glob("merged/adapter*"))
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    plain = load_causal_lm(str(tmp_path / "merged"), torch.device("cpu")).eval()
    with torch.no_grad():
        torch.testing.assert_close(dapo.action_logps(plain, states, actions), adapted, atol=1e-4, rtol=0)


@needs_peft
def test_critic_adapters_leave_the_value_head_in_full(toy_dir):
    critic = lora.add_lora(C.Critic.from_backbone(str(toy_dir / "sft"), "cpu"), settings(), critic=True)
    names = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert {"value_head.weight", "value_head.bias"} <= set(names)
    assert all(n.startswith("value_head.") or ".lora_" in n for n in names)
    merged = lora.merged_state_dict(critic, None)
    assert merged.keys() == C.Critic.from_backbone(str(toy_dir / "sft"), "cpu").state_dict().keys()


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "4", "--lora_dropout", "0.1"], "--lora_dropout must be 0"),
    (["--lora_r", "-1"], "--lora_r must be 0"),
    (["--base_dtype", "bfloat16"], "needs --lora_r > 0"),
    (["--lora_r", "4", "--base_dtype", "float16"], "--base_dtype must be float32 or bfloat16"),
])
def test_bad_lora_settings_are_one_line(flags, message, monkeypatch):
    for script in (C, dapo):
        with pytest.raises(InputError, match=message):
            parse_config(script.Config, flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a bf16 base is for GPUs (bf16 autocast)
    with pytest.raises(InputError, match="--base_dtype bfloat16 needs a GPU"):
        parse_config(dapo.Config, ["--lora_r", "4", "--base_dtype", "bfloat16"])


def test_lora_without_peft_is_one_line(toy_dir, toy_rollout, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    monkeypatch.setattr(sys, "argv", dapo_args(toy_dir, toy_rollout, tmp_path / "actor"))
    with pytest.raises(SystemExit) as stop:
        cli.run(dapo.main)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --lora_r 4 needs the package peft, which is not installed: pip install -r "
                   "requirements-optional.txt (or pip install 'peft>=0.13')"]
    assert not list(tmp_path.iterdir())  # refused before anything was written
    assert parse_config(C.Config, []).lora_r == 0  # full fine-tuning needs no peft


# ============================================================================= the actor, trained with LoRA
@pytest.fixture(scope="module")
def lora_actor(toy_dir, toy_rollout, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "actor"
    run_script(*dapo_args(toy_dir, toy_rollout, out), env=ONE_THREAD)
    return out


@needs_peft
def test_lora_actor_is_a_plain_directory_with_the_trained_log_probs(lora_actor, toy_dir, monkeypatch):
    out = lora_actor
    assert not list(out.glob("adapter*"))
    log = read_log(out)
    assert len(log) >= 4 and log[0]["abs_log_ratio"] < 1e-6 and log[-1]["abs_log_ratio"] > 1e-2
    monkeypatch.setitem(sys.modules, "peft", None)
    trained, init = params(out), params(toy_dir / "sft")
    for k in trained:  # the base is frozen: only the adapted Linear layers of the blocks change (merged)
        moved = (trained[k] - init[k]).abs().max().item()
        assert moved > 1e-4 if "layers." in k and k.endswith("proj.weight") else moved == 0, k
    # fit.jsonl holds log(pi_theta / pi_ref) of the trained adapted model: the merged directory gives the same.
    prepared = torch.load(str(out) + ".work/" + dapo.CACHE, map_location="cpu", weights_only=False)
    model = load_causal_lm(str(out), torch.device("cpu"))
    logp = [x for s in dapo.reference_logps(model, prepared["train"], 64, desc=None) for x in s]
    ref = [r for t in prepared["train"] for r in t["ref_logp"]]
    fit = [r for line in open(out / "fit.jsonl") for r in json.loads(line)["log_ratios"]]
    assert max(abs(r) for r in fit) > 0.1
    assert fit == pytest.approx([lp - r for lp, r in zip(logp, ref)], abs=1e-4)
    # log pi_ref (adapters disabled) is the base model's.
    base = load_causal_lm(str(toy_dir / "sft"), torch.device("cpu"))
    assert ref == pytest.approx([x for s in dapo.reference_logps(base, prepared["train"], 64, desc=None) for x in s],
                                abs=1e-6)


@needs_peft
def test_lora_actor_resumes_after_a_kill(lora_actor, toy_dir, toy_rollout, tmp_path):
    out = tmp_path / "actor"
    proc = run_script(*dapo_args(toy_dir, toy_rollout, out, "--stop_after", "2"), env=ONE_THREAD)
    assert "stopped after step 2" in proc.stdout and training_meta(str(tmp_path / "actor.work/checkpoint"))["step"] == 2
    proc = run_script(*dapo_args(toy_dir, toy_rollout, out), env=ONE_THREAD)
    assert "resuming from step 2" in proc.stdout
    assert_close_params(params(out), params(lora_actor), atol=1e-6)
    assert [x["loss"] for x in read_log(out)] == pytest.approx([x["loss"] for x in read_log(lora_actor)], abs=1e-6)


@needs_peft
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_lora_actor_on_two_ranks_resumed_equals_one_process(lora_actor, toy_dir, toy_rollout, tmp_path, sharding):
    out, extra = tmp_path / "actor", FSDP if sharding == "fsdp" else []
    two = ["torchrun", "--nproc_per_node=2"]
    proc = run_script(*two, *dapo_args(toy_dir, toy_rollout, out, *extra, "--stop_after", "2"))
    assert "stopped after step 2" in proc.stdout
    proc = run_script(*two, *dapo_args(toy_dir, toy_rollout, out, *extra))
    assert "resuming from step 2" in proc.stdout
    assert_close_params(params(out), params(lora_actor), atol=3e-5)
    for a, b in zip(read_log(lora_actor), read_log(out), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-5)


@needs_peft
def test_first_step_log_ratio_is_zero_in_fp32_and_under_bf16_autocast(toy_dir, toy_rollout, tmp_path, monkeypatch):
    """The first step's mean |log pi / pi_ref| (measured before its update) with LoRA: log pi_ref is the base with
    the adapters disabled, log pi the adapted model at B = 0, in the same precision regime."""
    measured = {}
    for regime in ("fp32", "bf16"):
        if regime == "bf16":  # the GPU's regime, emulated on the CPU
            monkeypatch.setattr(dapo, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
        out = tmp_path / regime
        monkeypatch.setattr(sys, "argv", dapo_args(toy_dir, toy_rollout, out, "--epochs", "1"))
        dapo.main()
        measured[regime] = read_log(out)[0]["abs_log_ratio"]
    ref = {r: [x for t in torch.load(str(tmp_path / r) + ".work/" + dapo.CACHE, weights_only=False)["train"]
               for x in t["ref_logp"]] for r in measured}
    mixed = sum(abs(a - b) for a, b in zip(ref["fp32"], ref["bf16"], strict=True)) / len(ref["fp32"])
    print(f"first step's mean |log pi/pi_ref| with LoRA: fp32 {measured['fp32']:.3g}, CPU bf16 autocast "
          f"{measured['bf16']:.3g}; log pi_ref in fp32 against bf16: {mixed:.3g} on average")
    # Measured 6.8e-8 and 6.6e-5 (bf16: the rounding of other batch shapes than log pi_ref's), while a log pi_ref
    # from the other regime would be off by the last number (1e-2 here).
    assert measured["fp32"] < 1e-6 and measured["bf16"] < 1e-3 < mixed


# ============================================================================= the critic, trained with LoRA
@pytest.fixture(scope="module")
def lora_critic(toy_dir, toy_rollout, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "critic"
    run_script(*critic_args(toy_dir, toy_rollout, out), env=ONE_THREAD)
    return out


@needs_peft
def test_lora_critic_is_a_plain_critic_with_the_trained_values(lora_critic, toy_dir, toy_rollout, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    critic = C.load_critic(str(lora_critic), "cpu")
    metrics = json.load(open(lora_critic / "metrics.json"))
    heldout = C.split_by_question(C.load_solutions(str(toy_rollout / "solutions.jsonl")), 0.2)[1]
    again = C.heldout_metrics(critic, heldout, 64)  # the merged critic's held-out MSE is the trained critic's
    assert again["mse"] == pytest.approx(metrics["heldout"]["mse"], abs=1e-6)
    # r over a few held-out states moves with the rounding of the merge more than the MSE does
    assert again["pearson_r"] == pytest.approx(metrics["heldout"]["pearson_r"], abs=1e-4)
    fresh = C.Critic.from_backbone(str(toy_dir / "sft"), "cpu").state_dict()
    trained = critic.state_dict()
    assert trained["value_head.weight"].abs().max() > 1e-3  # the head trained in full
    up = "backbone.layers.0.mlp.up_proj.weight"
    assert (trained[up] - fresh[up]).abs().max() > 1e-5  # the adapters, merged
    assert torch.equal(trained["backbone.embed_tokens.weight"], fresh["backbone.embed_tokens.weight"])  # frozen


@needs_peft
def test_lora_critic_under_fsdp_resumed_equals_one_process(lora_critic, toy_dir, toy_rollout, tmp_path):
    out = tmp_path / "critic"
    run_script("torchrun", "--nproc_per_node=2", *critic_args(toy_dir, toy_rollout, out, *FSDP, "--stop_after", "2"))
    proc = run_script("torchrun", "--nproc_per_node=2", *critic_args(toy_dir, toy_rollout, out, *FSDP))
    assert "resuming from step 2" in proc.stdout
    one, two = (C.load_critic(str(d), "cpu").state_dict() for d in (lora_critic, out))
    assert_close_params(one, two, atol=3e-5)


# ============================================================================= tools/memory.py: LoRA and one GPU
@needs_peft
def test_memory_counts_lora_adapters_exactly_and_says_what_fits_one_gpu(toy_dir):
    sys.path.insert(0, "tools")
    import memory

    config = json.load(open(toy_dir / "sft" / "config.json"))  # the toy's Llama: the adapters peft really makes
    for r, targets in ((4, "all"), (8, "q_proj,v_proj")):
        model = lora.add_lora(load_causal_lm(str(toy_dir / "sft"), torch.device("cpu")),
                              settings(lora_r=r, lora_target_modules=targets), critic=False)
        assert memory.lora_parameters(config, r, targets) == sum(p.numel() for p in lora.trainable(model))
    table = run_script("tools/memory.py", "--models", "Qwen2.5-Math-1.5B,Qwen2.5-Math-7B", "--lora_r", "16").stdout
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| Qwen")}
    full = rows["Qwen2.5-Math-1.5B actor, full, fp32"]  # 16 bytes/param + autocast's bf16 copy: 24.7 + 3.1
    assert float(full[0]) == pytest.approx(16 * 1.5437 + 2 * 1.5437, abs=0.1) and full[2] == "no"
    assert rows["Qwen2.5-Math-1.5B actor, LoRA r16 all, bf16 base"][2].startswith("micro-batch")  # one 24 GB card
    assert rows["Qwen2.5-Math-7B actor, full, fp32"][2:] == ["no", "no", "no"]
    assert rows["Qwen2.5-Math-7B actor, LoRA r16 all, fp32 base"][2] == "no"  # 30 GB of fp32 base
    assert rows["Qwen2.5-Math-7B actor, LoRA r16 all, bf16 base"][2].startswith("micro-batch")
    # FSDP on 8 GPUs with accumulation: the gradient shard never coexists with the unsharded accumulator.
    by_part = rows["Qwen2.5-Math-7B actor"][5].split(" + ")
    assert by_part[1] == "0.0" and float(by_part[4]) == pytest.approx(4 * 7.6155, abs=0.1)
