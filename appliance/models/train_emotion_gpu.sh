#!/usr/bin/env bash
# Train the emotion-model candidates of recipe r3 side by side on one CUDA GPU (build time only).
#
# Each candidate is `train_emotion.py` with its own network size, in its own process on the same GPU
# (small CNNs are launch-bound, so several processes keep the GPU busy), with the same data, split, seed
# and validation part as the CPU recipe. Every process fixes its epoch count from its first epoch so that
# all of them end inside BUDGET seconds, then writes <name>.ckpt.pt + <name>.summary.json. Nothing is
# exported here: the export, parity check and manifest entry run on the build machine with
#   python -m appliance.models.train_emotion --data DATA --from-ckpt <name>.ckpt.pt --out models/emotion
#
# The training set travels as one pack (the original JPEG bytes, `train_emotion.py --pack`), because the
# GPU machine reaches no dataset. Usage on the GPU machine (the `device` tool; OUT is where files come back):
#   OUT=... bash appliance/models/train_emotion_gpu.sh [DATA.npz]
# It runs as a plain script (`python3 appliance/models/train_emotion.py`): the GPU machine's Python has
# PyTorch but not the appliance's own dependencies.
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-.gpu/train/fer2013-train.npz}
: "${OUT:?set OUT to the folder the results go to}"
BUDGET=${BUDGET:-0}  # seconds; 0 = train exactly EPOCHS epochs
EPOCHS=${EPOCHS:-80}  # what emotion_vgg48_ms was trained with (models/emotion/MODEL_CARD_OWN.md)
WORK=${WORK:-/tmp/emotion-r3}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}  # appended to every candidate (a local smoke test: EXTRA="--subset 0.01" DEVICE=cpu)
mkdir -p "$WORK"

# name | arguments (recipe r3 candidates; see models/emotion/MODEL_CARD_OWN.md for what each is for)
CANDIDATES=(
  "emotion_vgg48_m|--arch vgg --widths 32,64,128,256 --stem full --dropout 0.3"
  "emotion_vgg48_ms|--arch vgg --widths 32,64,128,256 --stem full --dropout 0.3 --rotate 15 --scale 0.15 --shift 0.1 --erase 0.5"
  "emotion_vgg48_lf|--arch vgg --widths 48,96,192,384 --stem full --dropout 0.4"
  "emotion_vgg48_xl|--arch vgg --widths 64,128,256,512 --stem full --dropout 0.4"
  "emotion_vgg48_xls|--arch vgg --widths 64,128,256,512 --stem full --dropout 0.4 --rotate 15 --scale 0.15 --shift 0.1 --erase 0.5"
  "emotion_res48_l|--arch res --widths 64,128,256,512 --stem stride --dropout 0.3"
)

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$WORK/machine.txt" 2>&1
cat "$WORK/machine.txt"

pids=()
for c in "${CANDIDATES[@]}"; do
  name=${c%%|*}
  args=${c#*|}
  mkdir -p "$WORK/$name"
  # shellcheck disable=SC2086  # the candidate's arguments are meant to split
  "$PY" appliance/models/train_emotion.py --data "$DATA" --device "$DEVICE" --threads 2 --name "$name" \
      --recipe-version r3 --epochs "$EPOCHS" --time-budget-s "$BUDGET" --max-minutes 7 \
      --save-ckpt "$WORK/$name" --no-export $args $EXTRA > "$WORK/$name/train.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done

for c in "${CANDIDATES[@]}"; do
  name=${c%%|*}
  tail -n 3 "$WORK/$name/train.log" | sed "s/^/$name: /"
  tar -C "$WORK" -cf "$OUT/$name.tar" "$name"
done
cp "$WORK/machine.txt" "$OUT/machine.txt"
exit $status
