#!/usr/bin/env bash
# Train several configurations side by side on one accelerator (small models leave most of a GPU idle), from the
# packed data of scripts/pack_training_data.py. Each spec is "NAME ARGS..." (napari-sam train arguments beyond the
# common ones below). Results: RESULTS/NAME.best.pt, NAME.final.pt and NAME.history.jsonl (RESULTS: $OUT or runs/gpu).
#   MIN=7 bash scripts/gpu_train.sh "ft --model builtin --mode full --lr 4e-4" "scratch --model nsam_t --lr 6e-4"
set -u
DATA=${DATA:-.gpu/dsb}
MIN=${MIN:-7}
RESULTS=${RESULTS:-${OUT:-runs/gpu}}
PY=${PY:-python3}
RUNS=${RUNS:-/tmp/runs}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$RESULTS"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
names=()
for spec in "$@"; do
  read -r name args <<<"$spec"
  names+=("$name")
  # shellcheck disable=SC2086
  timeout $((${MIN%.*} * 60 + 150)) "$PY" -m napari_sam train --images "$DATA" --split-csv "$DATA/split.csv" \
    --split train --val-split val --val-limit 12 --threads 4 --eval-every-min 1 --ckpt-every-min 2 --log-every 100 \
    --steps 1000000 --max-minutes "$MIN" --out "$RUNS/$name" $args >"$RUNS/$name.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  echo "== $name"; grep -v '^{"step"' "$RUNS/$name.log" | tail -5
  grep '"eval"' "$RUNS/$name/history.jsonl" | tail -2
  for f in best.pt final.pt history.jsonl; do cp "$RUNS/$name/$f" "$RESULTS/$name.$f" 2>/dev/null; done
done
