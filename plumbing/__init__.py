"""The machinery a learner may skip: the stage scripts at the top (rollout.py, critic.py, dapo.py, eval.py) and
grading.py read as the algorithm; what they need to run at scale lives here, one module per concern.

    cli            config dataclass (+ --config file) -> command line, InputError -> one line + exit 2, progress bars
    tracking       --report_to none|tensorboard|wandb: every step's metrics, the settings, tables (rank 0)
    distributed    DDP and FSDP2: process group, sharding, gradient sync, clipping
    runfiles       JSONL reading and shards, atomic writes, the rerun rule, input fingerprints
    models         tokenizers, causal LMs, GGUF files, chat prompts, autocast
    checkpoints    resumable training state (torch.distributed.checkpoint), full weights for saving
    trainer        the rules critic.py and dapo.py share: work files, resume, the lr schedule, saving a model
    shared_prefix  one row per state and all its candidate actions (stage B reads each state once), and the
                   check that a model gives in them what each (state, action) alone gives
    generation     the batched KV-cache sampling engine of rollout.py and eval.py
    vllm_engine    --engine hf|vllm: vLLM's offline engine behind generation's contract (optional install)
    harness        what runs inside a code check: the program's process and the verifier's (stdlib only)
    sandbox        starts untrusted programs and their verifiers for grading.py's code rewards

Imports form a ladder (each module imports only modules above it in this list): cli, tracking, distributed, runfiles,
models, checkpoints, trainer, shared_prefix, generation, vllm_engine, harness, sandbox. Nothing here imports a
stage script.
"""
