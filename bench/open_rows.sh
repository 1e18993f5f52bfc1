#!/usr/bin/env bash
# The rows docs/benchmarks.md still lacked after session 5, for one GPU, in device calls of under 10 minutes each.
#   PART=a: job vs bare unsloth in one process per row, each order (bare first, then job's trainer before and after
#           the session-3 setting), at 1B and 8B.
#   PART=b: `job run` with everything auto (may pick fp8), then the bare 4-bit points (no checkpointing, batch 8;
#           checkpointing, batch 16) of the auto-vs-sweep comparison (8B).
#   PART=c: toward the 18,000 tokens/s stretch at 8B: fp8 base without checkpointing at batch 4, 8 and 12, the bare
#           loop (every batch) then job's trainer, on one loaded model (the H200's 139 GiB holds batch 12): also the
#           fp8 row of job vs bare at batch 4.
#   PART=d: the 16-bit and fp8 rows of job vs bare in one call (8B, batch 8, no checkpointing), each process's bare
#           loop first from the same LoRA initialisation and data, so their loss curves compare the two precisions.
#   PART=hf: transformers+peft+bitsandbytes at 8B.
#   PART=e: the open 1B question (docs/benchmarks.md, "1B: job vs bare is not settled"): five processes, each the bare
#           loop then job's trainer (a variant that runs second in a process is 20-30% slower, so never two), 32
#           measured steps each (the host-bound step's median moves over 9); VARIANTS="default noautocast …" to vary.
#   PART=f: 1B, one measurement per process (unsloth warns that a bare run before trainer.train() poisons its compile
#           cache, which it then resets): bare unsloth and job's path alternating, at batch 8 (bound by the GPU) and
#           batch 2 (bound by the host).
#   PART=g: after f (job's path 11-22% slower at 1B batch 2, with more host time in the forward and backward): one
#           process each, twice: bare unsloth, job's default, job without bf16 autocast (`noautocast`, the bare
#           loop's numerics: unsloth keeps the LoRA weights in float32 and casts inside its kernels), at 1B batch 2.
#   PART=h: the same three at 8B batch 2 (session 4 saw noautocast 13% slower there, from log lines only).
#   PART=p: after g (bare 27,619 and 34,303 tokens/s; job 22,242 and 22,625; noautocast 22,589 and 27,603): the same
#           three at 1B batch 2, each then 3 steps under torch.profiler (after the measured ones), its table of host
#           calls and its ops and kernel launches a step written beside OUT: where job's host time goes.
#   PART=i: after p (job's process: the same ops and kernels as bare, 16% more host CPU, 12.5 ms a step of it in the
#           collating workers' iterator): bare, job's default (2 collating workers, pinned non-blocking copies) and
#           `inline` (collation in the training process), one process each, twice in alternating order, profiled.
#   PART=q: after i (inline slower than the workers; job's host ops 10-40% slower than bare's, same ops): job's default,
#           job with everything alive before training frozen out of the garbage collector (`gcfreeze`), bare, 1B batch
#           2; every row carries the collector's time and passes (gc_*).
#   PART=r: after q: is the 1B batch-2 gap trl's loop or job's? bare, job's default, `trl` (trl's own SFTTrainer with
#           transformers' data-loading defaults: what unsloth's notebooks run) and `noautocast`, one process each.
#   PART=s: after r (job 9.5% ahead of bare, where session 8 saw it 18% behind): three pairs of processes, bare unsloth
#           and job's default in alternating order (AB BA AB), 1B batch 2, so the medians over processes decide.
#   PART=t: after s (pairs from -25% to +32% around medians at -3%; bare's own processes 19,338-28,698): the same
#           pairs, each row with a host probe before and after (a pure-Python loop, tiny kernel launches, the CPU it
#           ran on): does the host's speed, process by process, carry the scatter? PIN="taskset -c 8-11" runs every
#           process on those CPUs only.
#   PART=u: after t (job's training thread spends more CPU a step than bare's in every call): where. bench/step_factors.py
#           on one loaded 1B model, the bare loop with one part of job's step added at a time (autocast, attention
#           mask, pinned non-blocking copy, the trainer's per-step calls), the variants in turns of 5 steps; then bare
#           and job's default, one process each, with py-spy sampling every thread over the measured steps
#           (collapsed stacks beside OUT, for bench/stack_diff.py); then the factors at 8B (plain, autocast).
#   PART=v: after u (py-spy: job's trainer adds about 1.5 ms a step of its own to the training thread; the rest of the
#           host work is the same code, on two threads, at the host's speed of the moment): job's trainer and the bare
#           loop in one process, blocks of 4 bare steps between every 4 of job's (`--variant interleaved`), three
#           processes at 1B batch 2, then one at 8B batch 2. (Session 13 ran it before f28d6cb, with the mask:
#           `--variant interleaved-mask` now.)
#   PART=w: after v (in one process job's steps were 9% slower than bare's in two of three, 4.5% faster in one):
#           with trl's mask of ones passed to the model, interleaved under py-spy (the training thread's stacks of
#           job's steps and of the bare blocks apart); then twice without it, which bench/step_factors.py saw cost
#           the bare loop 7 ms of the training thread a step. (Session 13 ran the second half as `interleaved-nomask`,
#           the bench dropping the mask before the model, at f28d6cb's parent; since f28d6cb job leaves it out
#           itself, so `interleaved-mask` is job with the mask and plain `interleaved` job without.)
#   PART=x: after w (without the mask job's steps were 2.5% and 1.7% faster than bare's; with it 7.8% slower), job
#           leaves a mask of ones out of its batches (job/train.py, WithoutFullAttentionMask): interleaved, twice.
#   PART=y: after x (ten processes of job's shipped path interleaved: median -4.1%, -2.3% on a host whose probe read
#           6.5 ms, -6.9% on one that read 14 ms): job's trainer walks the module tree once a run instead of three
#           times a step (job/train.py, ModuleWalksOnce; 4.4 ms a step on a 2-core CPU at 1,337 modules): interleaved,
#           four times (RUNS=n: n times); each row carries the walks' cost on the host (module_walk_ms).
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
