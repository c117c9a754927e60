#!/usr/bin/env bash
# Results on one GPU in one sitting: train the generators on the shared Pokémon data with the project's own trainer
# (the default flow generator of config/train_config.yaml, the CPU preset's, the earlier pixel-space diffusion UNet
# and the decoder), evaluate them, and benchmark the training step. Everything it needs travels in
# .gpu/ (prepared dataset, MiniLM in fp16, wheels the GPU image lacks):
#   prepare:  trimmed transformers 5.24 (models/bert, auto, align, encoder_decoder) as .gpu/transformers-5.24-trimmed.tgz,
#             MiniLM saved in fp16 as .gpu/minilm, wheels of datasets/dill/multiprocess/evaluate/fsspec in .gpu/whl,
#             python prepare_dataset.py --csv ../shared/pokemon/pokemon.csv --images ../shared/pokemon/small_images --output .gpu/pokesprite
#   run:      bash scripts/gpu_results.sh   (writes results under $OUT)
set -uo pipefail
OUT=${OUT:-outputs/gpu}
RUN=/tmp/runs
# sizes; a CPU dry run of this script shrinks them through the environment
DECODER_STEPS=${DECODER_STEPS:-2500} DECODER_BATCH=${DECODER_BATCH:-64} DECODER_BUDGET=${DECODER_BUDGET:-150}
DIFFUSION_STEPS=${DIFFUSION_STEPS:-2000} DIFFUSION_BATCH=${DIFFUSION_BATCH:-128} DIFFUSION_BUDGET=${DIFFUSION_BUDGET:-270}
FLOW_STEPS=${FLOW_STEPS:-3750} FLOW_BATCH=${FLOW_BATCH:-128} FLOW_BUDGET=${FLOW_BUDGET:-270}
EVAL_PROMPTS=${EVAL_PROMPTS:-128} PRECISION=${PRECISION:-bf16} BENCH_STEPS=${BENCH_STEPS:-30}
mkdir -p "$OUT" "$RUN"
if ! python3 -c "import datasets, evaluate" 2>/dev/null; then  # the GPU image lacks them
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
fi
# the GPU image's transformers (5.17) predates SubConfigSpec: carry 5.24, trimmed to the bert/auto models (2 MB)
if ! python3 -c "from transformers.configuration_utils import SubConfigSpec" 2>/dev/null; then
  mkdir -p /tmp/site && tar xzf .gpu/transformers-5.24-trimmed.tgz -C /tmp/site || exit 1
  # the image's peft imports model classes the trimmed copy leaves out; nothing here uses peft
  sed -i 's/    return _is_package_available("peft")\[0\]/    return False/' /tmp/site/transformers/utils/import_utils.py
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
nvidia-smi -L | tee "$OUT/log.txt"
python3 -c "import torch, transformers, accelerate, datasets, pyarrow; print(torch.__version__, transformers.__version__, accelerate.__version__, datasets.__version__, pyarrow.__version__)" 2>&1 | tee -a "$OUT/log.txt"

train() {  # name steps batch budget_s extra flags...
  local name=$1 steps=$2 batch=$3 budget=$4; shift 4
  local start=$SECONDS
  # SIGTERM makes the trainer checkpoint and stop cleanly; a second call with --max_train_steps at or below the
  # step reached only writes the final model from that checkpoint
  timeout -s TERM "$budget" accelerate launch --config_file accelerate_config.yaml train_accelerate.py \
    --config config/train_config.yaml --dataset .gpu/pokesprite --text_encoder .gpu/minilm \
    --output_dir "$RUN/$name" --max_train_steps "$steps" --train_batch_size "$batch" --report_to tensorboard \
    --mixed_precision "$PRECISION" \
    --checkpointing_steps 200 --validation_steps 500 --checkpoints_total_limit 1 "$@" 2>&1 | grep -v "Loading weights" | tail -n 25
  if [ ! -f "$RUN/$name/model.safetensors" ]; then
    accelerate launch --config_file accelerate_config.yaml train_accelerate.py --config config/train_config.yaml \
      --dataset .gpu/pokesprite --text_encoder .gpu/minilm --output_dir "$RUN/$name" --max_train_steps 1 \
      --report_to none --resume latest "$@" 2>&1 | tail -n 3
  fi
  echo "$name: $((SECONDS - start)) s wall" | tee -a "$OUT/log.txt"
  pack
}

pack() {  # results travel as one archive, refreshed after every stage, so a run cut short still returns its part
  tar czf /tmp/results.tgz -C "$OUT" --exclude results.tgz . && cp /tmp/results.tgz "$OUT/results.tgz"
}

train decoder "$DECODER_STEPS" "$DECODER_BATCH" "$DECODER_BUDGET" --generator_type decoder --ema_decay 0 --lr_warmup_steps 100 2>&1 | tee -a "$OUT/log.txt"
# the pixel-space UNet that was the default before the flow generator
train diffusion "$DIFFUSION_STEPS" "$DIFFUSION_BATCH" "$DIFFUSION_BUDGET" --generator_type diffusion --ema_decay 0.995 --learning_rate 3e-4 \
  --unet_patch_size 1 --unet_channels 64 128 256 256 --unet_layers_per_block 1 --unet_symmetric false \
  --unet_attention_resolutions 16 8 --num_inference_steps 25 --guidance_scale 3 2>&1 | tee -a "$OUT/log.txt"
train flow "$FLOW_STEPS" "$FLOW_BATCH" "$FLOW_BUDGET" 2>&1 | tee -a "$OUT/log.txt"
# the CPU preset's flow generator, at a GPU's batch size (the later --config wins)
train flow-cpu "$FLOW_STEPS" "$FLOW_BATCH" "$FLOW_BUDGET" --config config/cpu.yaml 2>&1 | tee -a "$OUT/log.txt"

evaluate() {  # run name, results name, sampling flags...
  local name=$1 result=$2; shift 2
  python3 evaluate_model.py --model "$RUN/$name" --dataset .gpu/pokesprite --out "$OUT/$result" --num_prompts "$EVAL_PROMPTS" \
    --new_descriptions docs/new_descriptions.txt "$@" 2>&1 | grep -v "Loading weights" | tail -n 30 | tee -a "$OUT/log.txt"
  pack
}
evaluate decoder decoder
evaluate diffusion diffusion
evaluate flow flow
evaluate flow-cpu flow-cpu
# the sampler's variety knob: eta 1 adds fresh noise at every step (DDPM-like) instead of deterministic DDIM
evaluate diffusion diffusion-eta1 --eta 1.0
for name in decoder diffusion flow flow-cpu; do
  cp "$RUN/$name/README.md" "$OUT/$name/model_card.md" 2>/dev/null
  cp -r "$RUN/$name/logs" "$RUN/$name/samples" "$OUT/$name/" 2>/dev/null
done

[ "${BENCH:-1}" = 1 ] && timeout 150 python3 benchmarks/bench_train.py --text_encoder .gpu/minilm --steps "$BENCH_STEPS" ${BENCH_FLAGS:-} \
  --out "$OUT/bench_train.json" 2>&1 | tail -n 30 | tee -a "$OUT/log.txt"

pack
ls -la "$OUT"
