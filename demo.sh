#!/usr/bin/env bash
# The whole DAPO pipeline on the embedded toy task, two iterations, on a CPU:
#   build task + warm start -> eval -> [rollout -> critic -> dapo -> eval] x 2 -> table + summary.json + demo.png
# Iteration 1 also trains an actor without a critic on the same rollout (dapo.py --q_source rollout: Q from
# one graded completion per candidate), the ablation that shows what the critic is for.
#
#   bash demo.sh                 # the full demo in runs/toy (about 6 minutes on an idle 2-core CPU)
#   DEMO_SMOKE=1 bash demo.sh    # every stage shrunk, in runs/toy-smoke: a 1-2 minute check that it runs
#   DEMO_SEED=1 bash demo.sh     # another seed of the toy task and warm start, in runs/toy-seed1
#   DEMO_TOY=varied bash demo.sh # the varied toy (every step ends with a free two-word remark), in runs/varied
#   DEMO_M=4 bash demo.sh        # M = 4 completions per state instead of 16, in runs/toy-M4
#   DEMO_CRITIC=strong bash demo.sh  # the critic on a stronger backbone with its own tokenizer (prepare.py
#                                # --strong_critic true; docs/toy.md), not the policy's, in runs/toy-strong
#   DEMO_CORES=4 bash demo.sh    # threads / rollout ranks of a stage that runs alone (default 2, as measured)
#   OUT=runs/other bash demo.sh  # another output folder
#   DEMO_REPORT_TO=tensorboard bash demo.sh  # every stage also reports to TensorBoard (OUT/**/*.tensorboard/)
#
# Each stage is skipped when its output is already complete, so rerunning after a kill resumes. A smoke run
# never passes for the demo: OUT/demo_kind says which kind of run made the folder, and the other kind refuses it.
# The same scripts run a real model: see "Your own model" in the README.
set -euo pipefail
cd "$(dirname "$0")"

SEED=${DEMO_SEED:-0}
TOY=${DEMO_TOY:-toy}
case "$TOY" in toy|varied) ;; *) echo "error: DEMO_TOY must be toy or varied, got '$TOY'" >&2; exit 2 ;; esac
CRITIC_KIND=${DEMO_CRITIC:-policy}
case "$CRITIC_KIND" in policy|strong) ;; *) echo "error: DEMO_CRITIC must be policy or strong, got '$CRITIC_KIND'" >&2; exit 2 ;; esac
# runs/toy, runs/toy-seed1, runs/toy-smoke-seed1, runs/varied-seed2-M4, ...
SUFFIX=$([ "$SEED" = 0 ] && echo "" || echo "-seed$SEED")$([ -z "${DEMO_M:-}" ] && echo "" || echo "-M$DEMO_M")
SUFFIX=$SUFFIX$([ "$CRITIC_KIND" = strong ] && echo "-strong" || echo "")
PY=${PYTHON:-python}
# Two cores. A stage that runs alone uses both: the warm start, critic and DAPO as two threads (their time is the
# matrix products of the tiny model), the rollout as two ranks under torchrun (its time is many small decoding steps,
# which a second thread speeds up less than a second process does). A stage beside another (below) has one thread.
CORES=${DEMO_CORES:-2}  # the demo's figures are measured with 2; another value gives other draws in the rollout
case "$CORES" in ''|*[!0-9]*|0*) echo "error: DEMO_CORES must be a positive whole number, got '$CORES'" >&2; exit 2 ;; esac
export OMP_NUM_THREADS=1
ALONE="env OMP_NUM_THREADS=$CORES $PY"
RANKS="$PY -m torch.distributed.run --standalone --nproc_per_node $CORES"

if [ "${DEMO_SMOKE:-0}" = "1" ]; then
  KIND=smoke
  OUT=${OUT:-runs/$TOY-smoke$SUFFIX}
  PREPARE="--num_train 24 --num_test 16 --sft_examples 2048"
  STRONG="--strong_examples 2048"
  M=${DEMO_M:-4}
  ROLLOUT="--max_questions 12 --n1 4 --n_keep 2 --M $M"
  CRITIC="--epochs 1 --batch_size 16 --micro_batch_size 16 --lr 1e-3 --heldout_fraction 0.25"
  DAPO="--epochs 1 --global_batch_actions 64 --micro_batch_actions 64 --beta 0.3 --lr 1e-4 --min_gap 0.05"
  EVAL="--k 2"
else
  KIND=full
  OUT=${OUT:-runs/$TOY$SUFFIX}
  PREPARE=""
  STRONG=""
  M=${DEMO_M:-16}
  ROLLOUT="--max_questions 512 --n1 8 --n_keep 4 --M $M --batch_size 256"
  CRITIC="--epochs 8 --batch_size 16 --micro_batch_size 16 --lr 1e-3 --heldout_fraction 0.1"
  DAPO="--epochs 4 --global_batch_actions 64 --micro_batch_actions 64 --beta 0.3 --lr 1e-4"
  EVAL="--k 4"
fi
TOKENS="--max_new_tokens 40"  # toy solutions are at most 4 steps of about 7 tokens
if [ "$TOY" = varied ]; then
  PREPARE="$PREPARE --varied true"
  TOKENS="--max_new_tokens 48"  # each step is 2 tokens longer (its remark)
fi
REPORT=()  # DEMO_REPORT_TO=tensorboard (or wandb): every stage reports its metrics (docs/pipeline.md, "Logs")
[ -z "${DEMO_REPORT_TO:-}" ] || REPORT=(--report_to "$DEMO_REPORT_TO")
KIND_LINE="$KIND$([ "$TOY" = toy ] || echo " $TOY")$([ -z "${DEMO_M:-}" ] || echo " M=$DEMO_M")"  # OUT/demo_kind
KIND_LINE="$KIND_LINE$([ "$CRITIC_KIND" = policy ] || echo " critic=strong")"

if [ -e "$OUT/demo_kind" ] && [ "$(cat "$OUT/demo_kind")" != "$KIND_LINE" ]; then
  echo "error: $OUT holds a $(cat "$OUT/demo_kind") run of demo.sh, not a $KIND_LINE one: set OUT to another folder or remove it" >&2
  exit 2
elif [ ! -e "$OUT/demo_kind" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: $OUT is not empty but has no demo_kind file (an older demo.sh, perhaps a smoke run, or other work):" \
       "set OUT to another folder or remove it" >&2
  exit 2
fi
mkdir -p "$OUT"
echo "$KIND_LINE" > "$OUT/demo_kind"
TIMES="$OUT/stage_ms.tsv"
stage() {  # stage NAME DONE_MARKER COMMAND...: run COMMAND unless DONE_MARKER exists; record its wall time
  local name=$1 marker=$2; shift 2
  if [ -e "$marker" ]; then echo "== $name: done already ($marker)"; return; fi
  echo "== $name"
  local t0; t0=$(date +%s%N)
  "$@"
  printf '%s\t%s\n' "$name" "$(( ($(date +%s%N) - t0) / 1000000 ))" >> "$TIMES"  # milliseconds
}
# An eval, which nothing waits for, runs beside the next stages with one thread; its output goes to OUT/logs/NAME.log.
# (Beside a stage of two threads, a third thread only slows both: the ablation's DAPO runs alone.)
BESIDE=()
beside() {  # beside NAME DONE_MARKER COMMAND...: stage in the background
  local name=$1 marker=$2
  if [ -e "$marker" ]; then echo "== $name: done already ($marker)"; return; fi
  mkdir -p "$OUT/logs"
  echo "== $name: beside the next stages (output: $OUT/logs/$name.log)"
  stage "$@" > "$OUT/logs/$name.log" 2>&1 &
  BESIDE+=("$!:$name")
}
wait_beside() {  # the background stages have finished, or the demo stops with the failed one's log
  local job
  for job in "${BESIDE[@]}"; do
    wait "${job%%:*}" || { echo "error: ${job#*:} failed: $OUT/logs/${job#*:}.log" >&2; tail -20 "$OUT/logs/${job#*:}.log" >&2; exit 1; }
  done
  BESIDE=()
}
WALL0=$(date +%s%N)

stage prepare "$OUT/sft" $ALONE data/toy/prepare.py --out_dir "$OUT" --seed "$SEED" $PREPARE
CRITIC_INIT=()  # the critic's backbone: the policy's (the default), or the strong one with its own tokenizer
if [ "$CRITIC_KIND" = strong ]; then
  stage prepare-strong "$OUT/strong" $ALONE data/toy/prepare.py --out_dir "$OUT" --seed "$SEED" $PREPARE $STRONG \
    --strong_critic true
  CRITIC_INIT=(--init "$OUT/strong")
fi
beside eval-base "$OUT/base/eval/summary.json" \
  $PY eval.py --model "$OUT/sft" --data "$OUT/test.jsonl" --out_dir "$OUT/base/eval" $EVAL $TOKENS "${REPORT[@]}"

POLICY="$OUT/sft"
PREV_CRITIC=()
for IT in 1 2; do
  D="$OUT/iter$IT"
  # Stage A: data from the current policy (pi_ref = pi_gen), then the critic on its MC labels.
  stage "iter$IT-rollout" "$D/rollout/summary.json" \
    $RANKS rollout.py --model "$POLICY" --data "$OUT/train.jsonl" --out_dir "$D/rollout" $ROLLOUT $TOKENS "${REPORT[@]}"
  if [ "$IT" = 1 ]; then  # the ablation: the same rollout and settings, Q from one completion instead of the critic
    stage iter1-no-critic-dapo "$D/no-critic/actor" \
      $ALONE dapo.py --policy "$POLICY" --q_source rollout --rollout_dir "$D/rollout" --out_dir "$D/no-critic/actor" $DAPO "${REPORT[@]}"
  fi
  stage "iter$IT-critic" "$D/critic" \
    $ALONE critic.py --rollout_dir "$D/rollout" --init "$POLICY" "${CRITIC_INIT[@]}" "${PREV_CRITIC[@]}" --out_dir "$D/critic" $CRITIC "${REPORT[@]}"
  # Stage B: advantages from the critic, the DAPO loss, a new actor that is the next iteration's policy.
  stage "iter$IT-dapo" "$D/actor" \
    $ALONE dapo.py --policy "$POLICY" --critic "$D/critic" --rollout_dir "$D/rollout" --out_dir "$D/actor" $DAPO "${REPORT[@]}"
  wait_beside  # the last evals have finished
  beside "iter$IT-eval" "$D/eval/summary.json" \
    $PY eval.py --model "$D/actor" --data "$OUT/test.jsonl" --out_dir "$D/eval" $EVAL $TOKENS "${REPORT[@]}"
  if [ "$IT" = 1 ]; then
    beside iter1-no-critic-eval "$D/no-critic/eval/summary.json" \
      $PY eval.py --model "$D/no-critic/actor" --data "$OUT/test.jsonl" --out_dir "$D/no-critic/eval" $EVAL $TOKENS "${REPORT[@]}"
  fi
  POLICY="$D/actor"
  PREV_CRITIC=(--init_critic "$D/critic")  # iterative DAPO warm-starts the critic from the previous one
done
wait_beside
printf 'wall\t%s\n' "$(( ($(date +%s%N) - WALL0) / 1000000 ))" >> "$OUT/wall_ms.tsv"  # this run, stages side by side

$PY - "$OUT" "$KIND" "$TOY" "$M" "$CRITIC_KIND" <<'EOF'
import json, os, platform, sys
out, kind, toy, m, critic = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
load = lambda *p: json.load(open(os.path.join(out, *p)))
seconds = {}
for line in open(os.path.join(out, "stage_ms.tsv")):
    name, ms = line.split("\t")
    seconds[name] = seconds.get(name, 0.0) + int(ms) / 1000
wall = sum(int(line.split("\t")[1]) / 1000 for line in open(os.path.join(out, "wall_ms.tsv")))  # all runs into OUT
summary = {"kind": kind, "toy": toy, "M": m, "critic_backbone": critic, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"}
rows = []
policies = {"base": ("warm start (SFT)", "base"), "iter1": ("DAPO iteration 1", "iter1"),
            "iter1_no_critic": ("DAPO iteration 1, Q from one rollout (no critic)", "iter1/no-critic"),
            "iter2": ("DAPO iteration 2", "iter2")}
for name, (policy, folder) in policies.items():
    e = load(folder, "eval", "summary.json")
    summary[name] = {"greedy_acc": e["greedy_acc"], "sampled_acc": e["sampled_acc"]}
    row = {"policy": policy, "greedy": e["greedy_acc"], "sampled": e["sampled_acc"], "r": "", "kept": "", "s": 0.0}
    if name != "base":
        d = load(folder, "actor", "train_summary.json")
        summary[name].update(states_kept=d["states_kept"], actions_kept=d["actions_kept"])
        row["kept"] = f"{d['states_kept']} / {d['actions_kept']}"
    if name in ("iter1", "iter2"):
        c = load(folder, "critic", "metrics.json")
        summary[name]["critic_pearson_r"] = c["heldout"]["pearson_r"]
        row["r"] = f"{c['heldout']['pearson_r']:.3f}"
        row["s"] = sum(v for k, v in seconds.items()
                       if k.startswith(name + "-") and k != f"{name}-eval" and "no-critic" not in k)
    elif name == "iter1_no_critic":  # iteration 1's rollout, which it shares, and its own DAPO run: no critic
        row["s"] = seconds.get("iter1-rollout", 0.0) + seconds.get("iter1-no-critic-dapo", 0.0)
    rows.append(row)
summary["critic_pearson_r"] = summary["iter1"]["critic_pearson_r"]
summary["stage_seconds"] = seconds
summary["wall_seconds"] = wall  # less than the sum of the stages: some ran side by side
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print("\nSMOKE RUN (DEMO_SMOKE=1): every stage shrunk to check that the pipeline runs; these numbers are not the demo's"
      if kind == "smoke" else f"\nThe full demo (bash demo.sh), the {'varied ' if toy == 'varied' else ''}toy, M = {m}"
      + (", the strong critic:" if critic == "strong" else ":"))
print(f"| policy | greedy acc | sampled acc (T=1) | critic held-out r | states / actions kept | train s |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['policy']} | {r['greedy']:.3f} | {r['sampled']:.3f} | {r['r']} | {r['kept']} | {r['s']:.0f} |")
print(f"\nwall time {summary['wall_seconds']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in seconds.items())})")
print(f"machine: {summary['machine']}; written {os.path.join(out, 'summary.json')}")
EOF

# The figure: accuracies, the critic's calibration, the actor's fit of eq. 12 and its loss, from the files above.
if $PY -c "import matplotlib" 2>/dev/null; then
  $PY data/toy/plot.py --run_dir "$OUT"
else
  echo "no figure: matplotlib is missing (pip install matplotlib, or pip install -r requirements-optional.txt)"
fi
