#!/usr/bin/env bash
# Benchmark rows on one GPU, one PART per device call of under 10 minutes; rows are appended to OUT.jsonl by
# bench/train_throughput.py, and the random-weight models a PART needs are made under MODELS (default
# /tmp/bench-models). docs/benchmarks.md says which PART reproduces which figure; each bench/results/ README names
# the PARTs behind its rows. A row runs 12 steps with 3 left out, or 40 with 8 where the PART says so.
#   PART=a: job vs bare unsloth in one process (--compare), both trainer orders at 1B, then 8B; 4-bit, batch 2.
#   PART=b: `job run` with precision, batch size and checkpointing all auto, then the bare 4-bit points (no
#           checkpointing, batch 8; checkpointing, batch 16) it chooses between (8B; TOKENIZER_DIR for job run).
#   PART=c: fp8 base without checkpointing at batch 4, 8 and 12, bare loop then job's trainer on one 8B model.
#   PART=d: 16-bit and fp8 at 8B batch 8 without checkpointing, bare then job's trainer, from the same LoRA
#           initialisation and data, so the bare loss curves compare the precisions.
#   PART=h: bare, job's default and job without bf16 autocast (noautocast) at 8B batch 2, one process each.
#   PART=hf: transformers+peft+bitsandbytes at 8B.
#   PART=e: 1B batch 2, processes each running the bare loop then one trainer variant (VARIANTS).
#   PART=f: 1B, one measurement a process, bare and job alternating, at batch 8 and batch 2, twice.
#   PART=g: 1B batch 2, one process each, twice: bare, job's default, job noautocast.
#   PART=p: 1B batch 2: bare, default, noautocast, each then 3 steps under torch.profiler (tables beside OUT).
#   PART=i: 1B batch 2: bare, default and inline (collation in the training process), both orders, profiled.
#   PART=q: 1B batch 2: default, gcfreeze (objects alive before training frozen out of the collector), bare.
#   PART=r: 1B batch 2: bare, default, trl (trl's own SFTTrainer with transformers' data loading), noautocast.
#   PART=s: 1B batch 2: three pairs of processes, bare and job's default alternating (AB BA AB).
#   PART=t: as s; PIN="taskset -c 8-11" (or any prefix) runs every process pinned.
#   PART=u: bench/step_factors.py at 1B (the bare loop with one part of job's step added at a time), bare and job
#           under py-spy (stacks beside OUT, for bench/stack_diff.py), then the factors plain/autocast at 8B.
#   PART=v: job with trl's mask of ones passed (interleaved-mask) interleaved with bare blocks: three at 1B, one at 8B.
#   PART=w: interleaved-mask under py-spy, then job's path interleaved twice.
#   PART=x: job's path interleaved with bare blocks in one process, twice.
#   PART=y: the same, RUNS times (default 4): the current 1B batch-2 comparison of job against bare.
# Same-process pairs at 1B (a, e) start job's trainer from a compile cache unsloth has reset, and separate 1B processes
# scatter with the host's speed (f-t); PART=y is the comparison to use at 1B batch 2.
# Usage (GPU host, stack on PYTHONPATH): PART=a bash bench/open_rows.sh OUT.jsonl; PART=b TOKENIZER_DIR=… bash …
set -uo pipefail
out=${1:?usage: PART=a|b|c|d|e|f|g|h|i|p|q|r|s|t|u|v|w|x|y|hf open_rows.sh OUT.jsonl}
models=${MODELS:-/tmp/bench-models}
row() {  # SHAPE LIMIT ARGS...  (later --steps/--warmup override the defaults here)
  local shape=$1 limit=$2; shift 2
  [ -d "$models/$shape" ] || python bench/train_throughput.py make-model --shape "$shape" --dir "$models/$shape"
  timeout "$limit" ${PIN:-} python bench/train_throughput.py run --model-dir "$models/$shape" --shape "$shape" --seq 2048 \
    --steps 12 --warmup 3 --out "$out" "$@" || echo "{\"failed\": \"$shape $*\", \"exit\": $?}" >> "$out"
}
case "${PART:?set PART=a … i, p, q, r, s, t, u, v, w, x, y or hf}" in
  a)
    for order in bare,default,inline bare,inline,default; do row 1b 120 --impl job --compare "$order"; done
    row 8b 150 --impl job --compare bare,inline,default ;;
  b)
    SWEEP="4bit:0:8 4bit:1:16" LIMIT=130 AUTO_LIMIT=300 bash bench/auto_vs_sweep.sh "$out" ;;
  c)
    row 8b 480 --impl job --precision fp8 --checkpointing 0 --batch 4,8,12 --compare bare,default ;;
  d)
    row 8b 240 --impl job --precision 16bit --checkpointing 0 --batch 8 --compare bare,default
    row 8b 300 --impl job --precision fp8 --checkpointing 0 --batch 8 --compare bare,default ;;
  hf)
    row 8b 150 --impl hf ;;
  f)
    for batch in 8 2 8 2; do
      row 1b 130 --steps 40 --warmup 8 --impl unsloth --batch "$batch"
      row 1b 130 --steps 40 --warmup 8 --impl job --batch "$batch"
    done ;;
  g)
    for _ in 1 2; do
      row 1b 130 --steps 40 --warmup 8 --impl unsloth
      row 1b 130 --steps 40 --warmup 8 --impl job --variant default
      row 1b 130 --steps 40 --warmup 8 --impl job --variant noautocast
    done ;;
  h)
    row 8b 170 --impl unsloth
    row 8b 170 --impl job --variant default
    row 8b 170 --impl job --variant noautocast ;;
  p)
    dir=$(dirname "$out")
    row 1b 130 --steps 40 --warmup 8 --impl unsloth --profile "$dir/profile-1b-bare.txt"
    row 1b 130 --steps 40 --warmup 8 --impl job --variant default --profile "$dir/profile-1b-job.txt"
    row 1b 130 --steps 40 --warmup 8 --impl job --variant noautocast --profile "$dir/profile-1b-noautocast.txt" ;;
  i)
    dir=$(dirname "$out")
    for order in "default inline" "inline default"; do
      row 1b 130 --steps 40 --warmup 8 --impl unsloth --profile "$dir/profile-i-1b-bare.txt"
      for variant in $order; do
        row 1b 130 --steps 40 --warmup 8 --impl job --variant "$variant" --profile "$dir/profile-i-1b-$variant.txt"
      done
    done ;;
  q)
    row 1b 130 --steps 40 --warmup 8 --impl job --variant default
    row 1b 130 --steps 40 --warmup 8 --impl job --variant gcfreeze
    row 1b 130 --steps 40 --warmup 8 --impl unsloth ;;
  r)
    row 1b 130 --steps 40 --warmup 8 --impl unsloth
    for variant in default trl noautocast; do row 1b 130 --steps 40 --warmup 8 --impl job --variant "$variant"; done ;;
  u)
    dir=$(dirname "$out")
    [ -d "$models/1b" ] || python bench/train_throughput.py make-model --shape 1b --dir "$models/1b"
    timeout 200 python bench/step_factors.py --model-dir "$models/1b" --shape 1b --out "$dir/factors.jsonl"
    row 1b 130 --steps 40 --warmup 8 --impl unsloth --py-spy "$dir/stacks-1b-bare.txt"
    row 1b 130 --steps 40 --warmup 8 --impl job --py-spy "$dir/stacks-1b-job.txt"
    timeout 200 python bench/step_factors.py --model-dir "$models/8b" --shape 8b --variants plain,autocast --rounds 5 \
      --block 4 --out "$dir/factors.jsonl" ;;
  v)
    for _ in 1 2 3; do row 1b 150 --steps 40 --warmup 8 --impl job --variant interleaved-mask; done
    row 8b 260 --steps 28 --warmup 8 --impl job --variant interleaved-mask ;;
  w)
    dir=$(dirname "$out")
    row 1b 150 --steps 40 --warmup 8 --impl job --variant interleaved-mask --py-spy "$dir/stacks-1b-interleaved.txt"
    for _ in 1 2; do row 1b 150 --steps 40 --warmup 8 --impl job --variant interleaved; done ;;
  x)
    for _ in 1 2; do row 1b 150 --steps 40 --warmup 8 --impl job --variant interleaved; done ;;
  y)
    for _ in $(seq "${RUNS:-4}"); do row 1b 170 --steps 40 --warmup 8 --impl job --variant interleaved; done ;;
  s|t)
    for order in "unsloth job" "job unsloth" "unsloth job"; do
      for impl in $order; do row 1b 130 --steps 40 --warmup 8 --impl "$impl"; done
    done ;;
  e)
    for variant in ${VARIANTS:-default default default default default}; do
      row 1b 115 --steps 40 --warmup 8 --impl job --compare "bare,$variant"
    done ;;
esac
