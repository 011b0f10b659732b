#!/usr/bin/env bash
# Reproduce the MinorSFT paper's sweep (arXiv 2408.10642 §4): train every method at every grid point with
# llamafactory-cli, evaluate each result and the base model on ceval, FinanceIQ and fineval with
# `minorsft eval`, and build the report with `minorsft report`. Run `bash reproduce.sh --help`.
set -uo pipefail
# The braces make bash read the whole script before running it, so editing or updating it (git pull)
# while a sweep runs cannot change the running sweep.
{

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

usage() {
  cat <<'EOF'
Usage: bash reproduce.sh [--demo] [--dry-run] [OPTIONS]

Trains every method at every grid point with `llamafactory-cli train`, evaluates the base model and each
run with `minorsft eval` on each benchmark, then writes the report (results.md, results.csv,
deviation.png, accuracy.png) with `minorsft report` into OUTPUT_ROOT/report.

Layout: OUTPUT_ROOT/base/eval/<task>/ for the base model; OUTPUT_ROOT/<method>_lr<lr>[_beta<β>]/ for a run,
holding its exact train.yaml, train.log, LLaMA-Factory's outputs and eval/<task>/.

Runs with precompute_ref_logps (all the recipes) share one cache of reference log-probs,
OUTPUT_ROOT/ref_logps/ (--set ref_logps_cache_dir=DIR for another): the runs on one reference model and
data make one reference pass between them. The report and the sweep's last lines count the passes.

Before any training it checks that each benchmark's data can be read (`minorsft eval --check_data`). Data
that cannot be reached (no --eval_data_dir and no network access to the Hub) is said once, up front; the
runs are then trained and reported without that accuracy, and a later re-run with the data adds it.
A wrong --eval_data_dir stops the sweep before any work.

Re-running skips finished trainings (trainer_state.json and saved weights present) and finished
evaluations (results.json present), and resumes an unfinished training from its last complete
checkpoint-N. A failed training or evaluation is reported and the sweep goes on; the exit status is 1
if anything failed.

Modes:
  --demo                 the same pipeline on 2 CPU cores in under 30 minutes: SmolLM2-135M-Instruct
                         (prepared with `minorsft demo-model` if missing), examples/demo/ recipes on the
                         demo finance Q&A set, one grid point per method, 30 questions per benchmark
  --dry-run              print every command (and what would be skipped) without running anything

Options (each also read from the environment variable in brackets; a flag wins):
  --output_root DIR      where runs, evaluations and the report go
                         [OUTPUT_ROOT; default saves/sweep, demo: saves/demo]
  --methods LIST         methods to train, from sft, sft_dpo, minorsft [METHODS; default all three]
  --sft_lrs LIST         SFT learning rates [SFT_LRS; default 5e-6 1e-5 2e-5 3e-5;
                         with --lora 5e-5 1e-4 2e-4 3e-4; demo: the recipe's]
  --lrs LIST             MinorSFT and SFT-using-DPO learning rates [LRS; default 1e-5 2e-5 3e-5;
                         with --lora 1e-4 2e-4 3e-4; demo: the recipe's]
  --betas LIST           β (pref_beta) of MinorSFT and SFT using DPO [BETAS; default 0.02 0.04 0.08;
                         demo: the recipe's]
  --recipes PATTERN      recipe per method, {method} is replaced [RECIPES; default
                         examples/{method}_qwen2.yaml, with --lora examples/{method}_qwen2_lora.yaml,
                         demo: examples/demo/{method}_smollm2.yaml]
  --lora                 use the single-GPU LoRA recipes and grid [LORA=1]
  --model PATH_OR_ID     base model, instead of the recipes' [MODEL]
  --template NAME        LLaMA-Factory template, instead of the recipes' [TEMPLATE]
  --dataset NAMES        training dataset(s) from dataset_info.json [DATASET; default the recipes':
                         domain_corpus, your corpus (see data/README.md); demo: finance_qa_demo]
  --dataset_dir DIR      folder of dataset_info.json [DATASET_DIR; default data/]
  --set KEY=VALUE        any other training key for every run, e.g. --set cutoff_len=4096 (repeatable)
                         [TRAIN_SET: space-separated KEY=VALUE items]
  --gpus LIST            GPU ids, e.g. 0,1,2,3; more than one runs torchrun through llamafactory-cli
                         [GPUS; default all visible GPUs, or the CPU when there is none]
  --global_batch N       keep per-device batch × gradient accumulation × GPUs = N by setting the
                         accumulation steps [GLOBAL_BATCH; default 64 as in the paper, demo: the recipe's]
  --tasks LIST           benchmarks, from ceval, financeiq, fineval [TASKS; default all three]
  --eval_data_dir DIR    folder holding ceval-exam/, FinanceIQ/, fineval/ as CSV files [EVAL_DATA_DIR;
                         default $MINORSFT_EVAL_DATA_DIR if set, else the Hub copies]
  --eval_max_samples N   questions per benchmark, stratified over subjects [EVAL_MAX_SAMPLES;
                         default all, demo: 30]
  --eval_seed N          seed of that draw, the same questions for every model [EVAL_SEED; default 42]
  --eval_batch_size N    [EVAL_BATCH_SIZE; default minorsft eval's]
  --eval_args "ARGS"     more `minorsft eval` arguments, e.g. "--dtype bfloat16" [EVAL_ARGS]
  -h, --help             this text

LIST: values separated by spaces or commas, e.g. --lrs "1e-5,2e-5".

Examples:
  bash reproduce.sh --demo
  bash reproduce.sh --dry-run
  bash reproduce.sh --dataset my_corpus --gpus 0,1,2,3 --output_root saves/qwen2-sweep
  bash reproduce.sh --lora --methods minorsft --lrs 2e-4 --betas "0.02 0.04" --gpus 0
EOF
}

die() { echo "reproduce.sh: $*" >&2; exit 2; }

DEMO="${DEMO:-0}"; DRY_RUN="${DRY_RUN:-0}"; LORA="${LORA:-0}"
OUTPUT_ROOT="${OUTPUT_ROOT:-}"; METHODS="${METHODS:-sft sft_dpo minorsft}"
SFT_LRS="${SFT_LRS-__default__}"; LRS="${LRS-__default__}"; BETAS="${BETAS-__default__}"
RECIPES="${RECIPES:-}"; MODEL="${MODEL:-}"; TEMPLATE="${TEMPLATE:-}"
DATASET="${DATASET:-}"; DATASET_DIR="${DATASET_DIR:-}"
read -r -a TRAIN_SET <<<"${TRAIN_SET:-}"
GPUS="${GPUS:-}"; GLOBAL_BATCH="${GLOBAL_BATCH-__default__}"
TASKS="${TASKS:-ceval financeiq fineval}"
EVAL_DATA_DIR="${EVAL_DATA_DIR:-}"; EVAL_MAX_SAMPLES="${EVAL_MAX_SAMPLES-__default__}"
EVAL_DATA_FROM="--eval_data_dir"
EVAL_SEED="${EVAL_SEED:-42}"; EVAL_BATCH_SIZE="${EVAL_BATCH_SIZE:-}"; EVAL_ARGS="${EVAL_ARGS:-}"

needs_value() { [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --demo) DEMO=1; shift ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    --lora) LORA=1; shift ;;
    --set) needs_value "$@"; TRAIN_SET+=("$2"); shift 2 ;;
    --output_root|--methods|--sft_lrs|--lrs|--betas|--recipes|--model|--template|--dataset|--dataset_dir|\
    --gpus|--global_batch|--tasks|--eval_data_dir|--eval_max_samples|--eval_seed|--eval_batch_size|--eval_args)
      needs_value "$@"; name="${1#--}"; printf -v "${name^^}" '%s' "$2"; shift 2 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

# --- defaults of the mode ---------------------------------------------------------------------------------
if [[ "$DEMO" == 1 ]]; then
  OUTPUT_ROOT="${OUTPUT_ROOT:-saves/demo}"
  DEMO_MODEL_DIR="$REPO_ROOT/models/SmolLM2-135M-Instruct"
  # The demo recipes train the model that `minorsft demo-model` prepares; other recipes keep their own.
  [[ -z "$RECIPES" && -z "$MODEL" ]] && MODEL="$DEMO_MODEL_DIR"
  RECIPES="${RECIPES:-examples/demo/{method\}_smollm2.yaml}"
  [[ "$SFT_LRS" == __default__ ]] && SFT_LRS=""
  [[ "$LRS" == __default__ ]] && LRS=""
  [[ "$BETAS" == __default__ ]] && BETAS=""
  [[ "$GLOBAL_BATCH" == __default__ ]] && GLOBAL_BATCH=""
  [[ "$EVAL_MAX_SAMPLES" == __default__ ]] && EVAL_MAX_SAMPLES=30
else
  OUTPUT_ROOT="${OUTPUT_ROOT:-saves/sweep}"
  if [[ "$LORA" == 1 ]]; then
    RECIPES="${RECIPES:-examples/{method\}_qwen2_lora.yaml}"
    [[ "$SFT_LRS" == __default__ ]] && SFT_LRS="5e-5 1e-4 2e-4 3e-4"
    [[ "$LRS" == __default__ ]] && LRS="1e-4 2e-4 3e-4"
  else
    RECIPES="${RECIPES:-examples/{method\}_qwen2.yaml}"
    [[ "$SFT_LRS" == __default__ ]] && SFT_LRS="5e-6 1e-5 2e-5 3e-5"
    [[ "$LRS" == __default__ ]] && LRS="1e-5 2e-5 3e-5"
  fi
  [[ "$BETAS" == __default__ ]] && BETAS="0.02 0.04 0.08"
  [[ "$GLOBAL_BATCH" == __default__ ]] && GLOBAL_BATCH=64
  [[ "$EVAL_MAX_SAMPLES" == __default__ ]] && EVAL_MAX_SAMPLES=""
fi
if [[ -z "$EVAL_DATA_DIR" && -n "${MINORSFT_EVAL_DATA_DIR:-}" ]]; then
  EVAL_DATA_DIR="$MINORSFT_EVAL_DATA_DIR"; EVAL_DATA_FROM="MINORSFT_EVAL_DATA_DIR"
fi

# Paths given relative to the current directory stay valid in every run's train.yaml.
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
# A model that is not a local path is a Hub id and stays as it is.
[[ -n "$MODEL" && -e "$MODEL" ]] && MODEL="$(absolute "$MODEL")"
[[ -n "$DATASET_DIR" ]] && DATASET_DIR="$(absolute "$DATASET_DIR")"
[[ -n "$EVAL_DATA_DIR" ]] && EVAL_DATA_DIR="$(absolute "$EVAL_DATA_DIR")"
OUTPUT_ROOT="$(absolute "$OUTPUT_ROOT")"

# GPUs: their count sets the gradient accumulation for the global batch. LAUNCH prefixes every command.
if [[ -n "$GPUS" ]]; then
  [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus $GPUS is not a comma-separated list of GPU ids"
  NUM_GPUS=$(tr ',' '\n' <<<"$GPUS" | wc -l)
  LAUNCH=(env CUDA_VISIBLE_DEVICES="$GPUS")
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  NUM_GPUS=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  LAUNCH=()
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NUM_GPUS=$(nvidia-smi -L | grep -c '^GPU')
  LAUNCH=()
else
  NUM_GPUS=1  # the CPU: one process
  LAUNCH=()
fi
[[ -z "$GLOBAL_BATCH" || "$GLOBAL_BATCH" =~ ^[1-9][0-9]*$ ]] || die "--global_batch $GLOBAL_BATCH is not a positive integer"
[[ -z "$EVAL_MAX_SAMPLES" || "$EVAL_MAX_SAMPLES" =~ ^[1-9][0-9]*$ ]] || die "--eval_max_samples $EVAL_MAX_SAMPLES is not a positive integer"

declare -A TASK_SPLIT=([ceval]=val [financeiq]=test [fineval]=val)
declare -A TASK_FOLDER=([ceval]=ceval-exam [financeiq]=FinanceIQ [fineval]=fineval)
read -r -a TASK_LIST <<<"${TASKS//,/ }"
for task in "${TASK_LIST[@]}"; do
  [[ -n "${TASK_SPLIT[$task]:-}" ]] || die "--tasks: unknown benchmark $task (valid: ceval financeiq fineval)"
  if [[ -n "$EVAL_DATA_DIR" && ! -d "$EVAL_DATA_DIR/${TASK_FOLDER[$task]}" ]]; then
    die "$EVAL_DATA_FROM $EVAL_DATA_DIR has no ${TASK_FOLDER[$task]}/ folder for $task"
  fi
done

# --- the plan: every run's train.yaml, checked before any work ----------------------------------------------
STAGING="$(mktemp -d "${TMPDIR:-/tmp}/reproduce-plan.XXXXXX")"
trap 'rm -rf "$STAGING"' EXIT
plan_args=(--repo_root "$REPO_ROOT" --output_root "$OUTPUT_ROOT" --staging_dir "$STAGING" --recipes "$RECIPES"
           --methods "$METHODS" --sft_lrs "$SFT_LRS" --lrs "$LRS" --betas "$BETAS" --num_gpus "$NUM_GPUS"
           --model "$MODEL" --template "$TEMPLATE" --dataset "$DATASET" --dataset_dir "$DATASET_DIR")
[[ -n "$GLOBAL_BATCH" ]] && plan_args+=(--global_batch "$GLOBAL_BATCH")
[[ "$DRY_RUN" == 1 ]] && plan_args+=(--dry_run)
for item in "${TRAIN_SET[@]}"; do plan_args+=(--set "$item"); done
PLAN="$("$PYTHON" -m llamafactory_minorsft.sweep "${plan_args[@]}")" || exit 2

BASE_MODEL=""; BASE_TEMPLATE=""; RUN_NAMES=(); REF_LOGPS_DIRS=(); declare -A RUN_TYPE RUN_SUMMARY
while IFS=$'\t' read -r kind a b c d; do
  if [[ "$kind" == base ]]; then BASE_MODEL="$a"; BASE_TEMPLATE="$b"; fi
  if [[ "$kind" == run ]]; then RUN_NAMES+=("$a"); RUN_TYPE[$a]="$c"; RUN_SUMMARY[$a]="$d"; fi
  if [[ "$kind" == ref_logps ]]; then REF_LOGPS_DIRS+=("$a"); fi
done <<<"$PLAN"

# --- helpers ----------------------------------------------------------------------------------------------
FAILED=()

# Print a command so that it can be pasted back into a shell; plain words stay unquoted.
show() {
  local arg words=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[][A-Za-z0-9_./,=:@%+{}-]+$ ]]; then words+=("$arg"); else words+=("$(printf '%q' "$arg")"); fi
  done
  echo "${words[*]}"
}

# Run a command, or only print it with --dry-run. The log file gets a header and the command's output.
execute() {
  local log="$1"; shift
  show "$@"
  [[ "$DRY_RUN" == 1 ]] && return 0
  mkdir -p "$(dirname "$log")"
  { echo "=== $(date '+%F %T') $(show "$@")"; } >>"$log"
  "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

training_finished() {
  [[ -f "$1/trainer_state.json" ]] && { compgen -G "$1/*.safetensors" >/dev/null || compgen -G "$1/*.bin" >/dev/null; }
}

# The newest checkpoint-N whose trainer_state.json was written (the Trainer writes it last).
last_complete_checkpoint() {
  local step
  for step in $(find "$1" -maxdepth 1 -name 'checkpoint-*' -type d 2>/dev/null | sed 's/.*checkpoint-//' | grep -E '^[0-9]+$' | sort -rn); do
    if [[ -f "$1/checkpoint-$step/trainer_state.json" ]]; then echo "$1/checkpoint-$step"; return; fi
  done
}

train_run() {
  local name="$1" run_dir="$OUTPUT_ROOT/$1"
  echo
  echo "# train $name: ${RUN_SUMMARY[$name]}"
  if training_finished "$run_dir"; then echo "# skip training $name: finished ($run_dir/trainer_state.json)"; return 0; fi
  local extra=() checkpoint
  checkpoint="$(last_complete_checkpoint "$run_dir")"
  if [[ -n "$checkpoint" ]]; then
    echo "# resume $name from $checkpoint"
    extra=(resume_from_checkpoint="$checkpoint")
  elif [[ -d "$run_dir" ]]; then
    extra=(overwrite_output_dir=true)  # leftovers of a launch that saved no checkpoint: start afresh
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# write $run_dir/train.yaml"
  else
    mkdir -p "$run_dir"
    cp "$STAGING/$name.yaml" "$run_dir/train.yaml"
    # A checkpoint without trainer_state.json was cut off while saving; it cannot be resumed.
    find "$run_dir" -maxdepth 1 -name 'checkpoint-*' -type d ! -exec test -e '{}/trainer_state.json' ';' -exec rm -rf '{}' +
  fi
  if ! execute "$run_dir/train.log" "${LAUNCH[@]}" llamafactory-cli train "$run_dir/train.yaml" "${extra[@]}"; then
    FAILED+=("training $name (log: $run_dir/train.log)")
    return 1
  fi
}

evaluate() {  # evaluate NAME DIR MODEL ADAPTER TEMPLATE
  local name="$1" dir="$2" model="$3" adapter="$4" template="$5" task
  for task in "${TASK_LIST[@]}"; do
    local out="$dir/eval/$task"
    if [[ -n "${UNREACHABLE[$task]+set}" && ! -f "$out/results.json" ]]; then
      # Said once, up front; the file tells the report why this benchmark has no accuracy.
      [[ "$DRY_RUN" == 0 ]] && { mkdir -p "$dir/eval"; printf '%s\n' "${UNREACHABLE[$task]}" >"$dir/eval/$task.skipped"; }
      continue
    fi
    echo "# evaluate $name on $task"
    if [[ -f "$out/results.json" ]]; then echo "# skip evaluation of $name on $task: finished ($out/results.json)"; continue; fi
    [[ "$DRY_RUN" == 0 ]] && rm -f "$dir/eval/$task.skipped"
    local cmd=(minorsft eval --task "$task" --split "${TASK_SPLIT[$task]}" --model_name_or_path "$model"
               --output_dir "$out" --seed "$EVAL_SEED" --mode logits)
    [[ -n "$EVAL_DATA_DIR" ]] && cmd+=(--data_dir "$EVAL_DATA_DIR/${TASK_FOLDER[$task]}")
    [[ -n "$adapter" ]] && cmd+=(--adapter_name_or_path "$adapter")
    [[ -n "$template" && "$template" != None ]] && cmd+=(--template "$template")
    [[ -n "$EVAL_MAX_SAMPLES" ]] && cmd+=(--max_samples "$EVAL_MAX_SAMPLES")
    [[ -n "$EVAL_BATCH_SIZE" ]] && cmd+=(--batch_size "$EVAL_BATCH_SIZE")
    [[ -n "$EVAL_ARGS" ]] && { read -r -a more <<<"$EVAL_ARGS"; cmd+=("${more[@]}"); }
    [[ -d "$out" ]] && cmd+=(--overwrite)  # leftovers of an interrupted evaluation
    execute "$dir/eval/$task.log" "${LAUNCH[@]}" "${cmd[@]}" || FAILED+=("evaluation of $name on $task (log: $dir/eval/$task.log)")
  done
}

# --- the sweep --------------------------------------------------------------------------------------------
echo "# reproduce.sh: ${#RUN_NAMES[@]} run(s) into $OUTPUT_ROOT, base model $BASE_MODEL, benchmarks: ${TASK_LIST[*]}"
data_source="the Hugging Face Hub"; [[ -n "$EVAL_DATA_DIR" ]] && data_source="$EVAL_DATA_DIR (from $EVAL_DATA_FROM)"
echo "# evaluation data: $data_source${EVAL_MAX_SAMPLES:+, $EVAL_MAX_SAMPLES questions per benchmark (seed $EVAL_SEED)}"
# The benchmark data: can each benchmark be read? Found out before any training.
# `minorsft eval --check_data` exits 0 (usable), 3 (cannot be reached: no local copy and no Hub) or 2
# (malformed data, bad arguments). Unreachable Hub data is an expected condition: the sweep trains and
# reports without that accuracy. A local folder that fails the check is the user's mistake: stop here.
declare -A UNREACHABLE=()  # task -> the check's one-line reason
for task in "${TASK_LIST[@]}"; do
  check=(minorsft eval --task "$task" --split "${TASK_SPLIT[$task]}" --check_data)
  [[ -n "$EVAL_DATA_DIR" ]] && check+=(--data_dir "$EVAL_DATA_DIR/${TASK_FOLDER[$task]}")
  if [[ "$DRY_RUN" == 1 ]]; then show "${check[@]}"; continue; fi
  answer="$("${check[@]}" 2>&1)"; status=$?
  reason="$(grep -v '^[[:space:]]*$' <<<"$answer" | tail -n 1)"
  reason="${reason#minorsft eval: }"; reason="${reason%%; *}"  # what failed; the ways out are said below, once
  if [[ $status == 3 && -z "$EVAL_DATA_DIR" ]]; then
    UNREACHABLE[$task]="$reason"
  elif [[ $status != 0 ]]; then
    die "the $task benchmark data cannot be used: ${reason:-no message} (\`$(show "${check[@]}")\` exited $status)"
  fi
done

for cache_dir in "${REF_LOGPS_DIRS[@]}"; do
  echo "# reference log-probs: cached in $cache_dir, one pass per reference model and data, shared by the runs"
done
if [[ ${#UNREACHABLE[@]} -gt 0 ]]; then
  unreachable_tasks=(); for task in "${TASK_LIST[@]}"; do [[ -n "${UNREACHABLE[$task]+set}" ]] && unreachable_tasks+=("$task"); done
  echo "#"
  echo "# Accuracy will NOT be measured on ${unreachable_tasks[*]}: the benchmark data cannot be reached."
  for task in "${unreachable_tasks[@]}"; do echo "#   $task: ${UNREACHABLE[$task]}"; done
  echo "# The runs are trained and reported without it. To measure it, re-run the same command (finished"
  echo "# trainings are kept) with the data reachable, in either of two ways:"
  echo "#   --eval_data_dir DIR or MINORSFT_EVAL_DATA_DIR=DIR, a folder holding ceval-exam/, FinanceIQ/, fineval/"
  echo "#   network access to the Hugging Face Hub (HF_HUB_OFFLINE unset)"
  echo "#"
fi
if [[ "$DEMO" == 1 && "$BASE_MODEL" == "$DEMO_MODEL_DIR" ]]; then
  echo
  echo "# prepare the demo model"
  execute "$OUTPUT_ROOT/prepare.log" minorsft demo-model --output_dir "$DEMO_MODEL_DIR" || die "could not prepare $DEMO_MODEL_DIR"
fi

if [[ "$DRY_RUN" == 0 ]]; then
  mkdir -p "$OUTPUT_ROOT/base"
  printf 'model_name_or_path: %s\ntemplate: %s\n' "$BASE_MODEL" "$BASE_TEMPLATE" >"$OUTPUT_ROOT/base/model.yaml"
fi
echo
evaluate base "$OUTPUT_ROOT/base" "$BASE_MODEL" "" "$BASE_TEMPLATE"

for name in "${RUN_NAMES[@]}"; do
  train_run "$name" || continue
  run_dir="$OUTPUT_ROOT/$name"
  if [[ "${RUN_TYPE[$name]}" == lora ]]; then
    evaluate "$name" "$run_dir" "$BASE_MODEL" "$run_dir" "$BASE_TEMPLATE"
  else
    evaluate "$name" "$run_dir" "$run_dir" "" "$BASE_TEMPLATE"
  fi
done

echo
echo "# report"
report_dirs=("$OUTPUT_ROOT/base")
for name in "${RUN_NAMES[@]}"; do report_dirs+=("$OUTPUT_ROOT/$name"); done
if execute "$OUTPUT_ROOT/report.log" minorsft report "${report_dirs[@]}" --output_dir "$OUTPUT_ROOT/report" --overwrite; then
  # The reference passes of the whole sweep, as the report counted them from the runs' train.log.
  reference="$(grep -m 1 '^- Reference log-probs' "$OUTPUT_ROOT/report/results.md" 2>/dev/null)"
  [[ "$DRY_RUN" == 0 && -n "$reference" ]] && echo "# ${reference#- }"
else
  FAILED+=("report (log: $OUTPUT_ROOT/report.log)")
fi

echo
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "# reproduce.sh: ${#FAILED[@]} step(s) failed; re-run the same command to retry them:"
  printf '#   %s\n' "${FAILED[@]}"
  exit 1
fi
[[ "$DRY_RUN" == 1 ]] && echo "# dry run: nothing was run" || echo "# done: $OUTPUT_ROOT/report/results.md"
exit
}
