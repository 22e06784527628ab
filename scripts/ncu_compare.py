#!/usr/bin/env python3
"""Compare two kernels' Nsight Compute profiles from `.gpu/run_all.sh profile` (its
ncu_reports.tar, unpacked: ncu_raw_<kernel>.csv.gz and ncu_sass_<kernel>.csv.gz per kernel).

    python3 scripts/ncu_compare.py DIR_A[:KERNEL_A] DIR_B[:KERNEL_B] [--hot N]

KERNEL defaults to the one profile in DIR. Prints, for each of the two:
  * duration, tensor-pipe activity, instructions executed, branch instructions, and the
    warp-stall samples by reason (the whole kernel);
  * its hot loop: the SASS lines that ran the most frequent execution count carrying the
    most instructions (a loop body: every line of it runs once per trip; spin loops, of one
    to three lines, are left out), with their instruction and stall-sample totals;
  * the N lines (default 12) with the most stall samples, with their two largest reasons;
and then the hot loops' stall samples by opcode, side by side, largest difference first.

Stop 30 found with it that fwd_wspi's loop ran 25 % more instructions than fwd_wsps's
(descriptor arithmetic on the vector datapath), then that with the counts equal its samples
sat on its two barrier waits and the BSSY / BSYNC around them.
"""
import collections
import csv
import gzip
import io
import os
import sys

REASONS = ["barrier", "branch_resolving", "dispatch", "lg", "long_sb", "math", "membar", "mio",
           "no_inst", "not_selected", "selected", "short_sb", "wait"]


def rows(path):
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return list(csv.reader(io.StringIO(f.read())))


def open_profile(spec):
    d, _, k = spec.partition(":")
    if not k:
        ks = sorted(f[len("ncu_raw_"):-len(".csv.gz")] for f in os.listdir(d)
                    if f.startswith("ncu_raw_") and f.endswith(".csv.gz"))
        if len(ks) != 1:
            sys.exit(f"{d}: name the kernel (DIR:KERNEL), one of {ks}")
        k = ks[0]
    raw = rows(os.path.join(d, f"ncu_raw_{k}.csv.gz"))
    metrics = dict(zip(raw[0], raw[2]))  # row 1: units, row 2: the profiled launch
    metrics["_units"] = dict(zip(raw[0], raw[1]))
    s = rows(os.path.join(d, f"ncu_sass_{k}.csv.gz"))
    lines = [dict(zip(s[1], r)) for r in s[2:]]
    return k, metrics, lines


def num(x):
    try:
        return float(str(x).replace(",", ""))
    except ValueError:
        return 0.0


def opcode(src):
    w = src.strip().split()
    if not w:
        return "?"
    o = w[1] if w[0].startswith("@") and len(w) > 1 else w[0]
    return o.split(".")[0]


def hot_loop(lines):
    by = collections.defaultdict(list)
    for ln in lines:
        by[int(num(ln["Instructions Executed"]))].append(ln)
    best = max((c for c in by if c > 0 and len(by[c]) > 3), key=lambda c: c * len(by[c]))
    return best, by[best]


def summary(k, m, lines, hot_n):
    stalls = {r: num(m.get(f"smsp__pcsamp_warps_issue_stalled_{r}", 0)) for r in
              ["barrier", "branch_resolving", "dispatch_stall", "drain", "imc_miss", "lg_throttle",
               "long_scoreboard", "math_pipe_throttle", "membar", "mio_throttle", "misc",
               "no_instructions", "not_selected", "selected", "short_scoreboard", "sleeping",
               "tex_throttle", "wait", "warpgroup_arrive"]}
    tot = sum(stalls.values()) or 1.0
    print(f"== {k}")
    unit = m["_units"].get("gpu__time_duration.sum", "")
    print(f"  duration {num(m.get('gpu__time_duration.sum')):.4g} {unit}, tensor pipe "
          f"{num(m.get('sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed')):.1f} % active, "
          f"instructions {num(m.get('smsp__inst_executed.sum')):.4g}, "
          f"branches {num(m.get('smsp__inst_executed_op_branch.sum')):.4g}")
    print("  stall samples: " + ", ".join(f"{r} {v / tot:.1%}" for r, v in
                                           sorted(stalls.items(), key=lambda x: -x[1]) if v / tot >= 0.01))
    c, loop = hot_loop(lines)
    li = sum(num(x["Instructions Executed"]) for x in loop)
    ls = sum(num(x["Warp Stall Sampling (All Samples)"]) for x in loop)
    al = sum(num(x["Warp Stall Sampling (All Samples)"]) for x in lines) or 1.0
    print(f"  hot loop: {len(loop)} lines run {c} times each: {li:.4g} instructions, "
          f"{ls:.0f} stall samples ({ls / al:.1%} of the kernel's)")
    print(f"  the {hot_n} lines with the most samples:")
    idx = sorted(range(len(lines)), key=lambda i: -num(lines[i]["Warp Stall Sampling (All Samples)"]))[:hot_n]
    for i in sorted(idx):
        ln = lines[i]
        top = sorted(((num(ln.get("stall_" + r, 0)), r) for r in REASONS), reverse=True)[:2]
        why = " ".join(f"{r}={v:.0f}" for v, r in top if v > 0)
        print(f"    {i:5d} x{int(num(ln['Instructions Executed'])):>10d} "
              f"{num(ln['Warp Stall Sampling (All Samples)']):7.0f}  {ln['Source'].strip()[:52]:52s} {why}")
    ops = collections.Counter()
    for x in loop:
        ops[opcode(x["Source"])] += num(x["Warp Stall Sampling (All Samples)"])
    return ops


def main():
    args = sys.argv[1:]
    hot_n = 12
    if "--hot" in args:
        i = args.index("--hot")
        hot_n = int(args[i + 1])
        del args[i:i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    (ka, ma, la), (kb, mb, lb) = open_profile(args[0]), open_profile(args[1])
    oa, ob = summary(ka, ma, la, hot_n), summary(kb, mb, lb, hot_n)
    print(f"== hot-loop stall samples by opcode: {ka} vs {kb}")
    for o in sorted(set(oa) | set(ob), key=lambda o: -abs(oa[o] - ob[o]))[:20]:
        print(f"  {o:12s} {oa[o]:8.0f} {ob[o]:8.0f} {oa[o] - ob[o]:+8.0f}")


if __name__ == "__main__":
    main()
