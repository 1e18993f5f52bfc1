"""Where two processes' host time goes, from the collapsed stacks that `train_throughput.py run --py-spy` writes.

  python bench/stack_diff.py stacks-bare.txt stacks-job.txt --steps 32 --rate 250 [--role autograd] [--top 25]

(either file may be gzipped, as under bench/results/). With `--variant interleaved` one file holds both paths: pass
it twice and compare the roles `training` (job's steps) and `training-bare` (the bare blocks) in the totals.

py-spy sampled every thread over the measured steps, leaving out samples where a thread was idle: a thread's samples
over the rate are the CPU time it used. Threads are grouped by role (the training thread, PyTorch's autograd thread
that runs the backward and unsloth's recomputed forward, the data loader's pinning thread, others). Prints, in
milliseconds a measured step for each file: every role's total, then for one role the functions whose inclusive time
differs most (a function counted once a sample however often it recurs), then the same for self time (the innermost
Python frame).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re

FRAME_LINE = re.compile(r" \(([^()]*):\d+\)$")


def role(thread: str, frames: list[str]) -> str:
    if "MainThread" in thread:  # the bare loop's blocks inside job's trainer (--variant interleaved) apart
        return "training-bare" if any(f.startswith("Interleave.step_end ") for f in frames) else "training"
    if "_pin_memory_loop" in thread:
        return "pin_memory"
    if frames and ("BackwardCFunction.apply" in frames[0] or "backward" in frames[0].lower()):
        return "autograd"
    if ":" not in thread:  # a thread no Python code started and named: PyTorch's autograd engine's
        return "autograd"
    return "other"


def function(frame: str) -> str:
    """'name (path/file.py:123)' without its line number, so the lines of one function add up."""
    return FRAME_LINE.sub(lambda m: f" ({m.group(1)})", frame)


def read(path: str) -> dict[str, dict[str, collections.Counter]]:
    """{role: {"total": Counter({"": n}), "inclusive": Counter, "self": Counter}} of sample counts."""
    out: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: {"total": collections.Counter(), "inclusive": collections.Counter(), "self": collections.Counter()})
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            thread, *frames = stack.split(";")
            names = [function(f) for f in frames]
            counts = out[role(thread, frames)]
            counts["total"][""] += int(count)
            for name in set(names):
                counts["inclusive"][name] += int(count)
            if names:
                counts["self"][names[-1]] += int(count)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--steps", type=int, required=True, help="measured steps the samples cover")
    parser.add_argument("--rate", type=int, default=250, help="py-spy's samples a second")
    parser.add_argument("--role", default="autograd")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    a, b = read(args.a), read(args.b)
    per_step = 1000 / args.rate / args.steps

    def ms(counter, key):
        return counter[key] * per_step

    print(f"{'ms a step':>10} {'a':>8} {'b':>8} {'b - a':>8}")
    for name in sorted(set(a) | set(b)):
        x, y = ms(a[name]["total"], ""), ms(b[name]["total"], "")
        print(f"{name:>10} {x:8.1f} {y:8.1f} {y - x:+8.1f}")
    for kind in "inclusive", "self":
        ca, cb = a[args.role][kind], b[args.role][kind]
        print(f"\n{args.role}, {kind}: the {args.top} largest differences, ms a step (a, b, b - a)")
        for name in sorted(set(ca) | set(cb), key=lambda n: -abs(cb[n] - ca[n]))[:args.top]:
            print(f"{ms(ca, name):8.1f} {ms(cb, name):8.1f} {ms(cb, name) - ms(ca, name):+8.1f}  {name[:150]}")


if __name__ == "__main__":
    main()
