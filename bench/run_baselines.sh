#!/usr/bin/env bash
# One `lookalike eval` run per combination (model x mode x precision x detection x gallery),
# queries = grocery-dev val photos; each run appends its JSON line (or the error) to bench/results.jsonl.
#   MODES="direct pipeline" PRECS="fp32 bf16" DETS="none yolo" GALLERIES="train iconic" \
#     bash bench/run_baselines.sh [MODEL...]     (default: efficientnet_lite0 resnet50 resnet18)
# (bench/baselines.py computes the direct-mode grid faster, embedding each image set once.)
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -f bench/grocery/train.csv ] || $PY bench/grocery_csvs.py
DET=${DETECT_WEIGHTS:-$(cd .. && pwd)/shared/models/yolov8n-coco/yolov8n_int8.tflite}
OUT=bench/results.jsonl
MODELS=${*:-efficientnet_lite0 resnet50 resnet18}
MODES=${MODES:-direct}
PRECS=${PRECS:-fp32 bf16}
DETS=${DETS:-none yolo}
GALLERIES=${GALLERIES:-train iconic}
run() {  # args: lookalike eval arguments
  echo "+ python -m lookalike.quality eval $*" >&2
  line=$($PY -m lookalike.quality eval "$@" --json 2>bench/logs/last_err.txt | tail -1)
  if [ -n "$line" ] && [ "${line:0:1}" = "{" ]; then
    echo "$line" | $PY -c "import json,sys; r=json.loads(sys.stdin.read()); r['command']='lookalike eval '+' '.join(sys.argv[1:]); print(json.dumps(r))" "$@" >> $OUT
  else
    err=$(tail -1 bench/logs/last_err.txt)
    $PY -c "import json,sys; print(json.dumps({'command': 'lookalike eval '+' '.join(sys.argv[2:]), 'error': sys.argv[1]}))" "$err" "$@" >> $OUT
  fi
  tail -1 $OUT >&2
}
for model in $MODELS; do
  for mode in $MODES; do
    for prec in $PRECS; do
      for d in $DETS; do
        det=$([ "$d" = yolo ] && echo "$DET" || echo none)
        for gallery in $GALLERIES; do
          run --gallery bench/grocery/$gallery.csv --queries bench/grocery/val.csv --model $model \
              --mode $mode --precision $prec --detect $det
        done
      done
    done
  done
done
