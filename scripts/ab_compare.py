#!/usr/bin/env python3
"""Compare two builds of the GPU bench measured in the same device call (the `ab` stage of
scripts/gpu_run.sh): the logs of `gpu_bench` (this checkout) and `gpu_bench_base` (the
revision given to scripts/gpu_check.sh as BASE_REV), several alternating rounds each.

Per bench line (workload, n, causal, combine, variant) it prints the best time of each build
over its rounds, the spread of the rounds, and the change in throughput of this build
against the base (+: this build is faster). Runs are interleaved (new, base, new, base...)
so clock and thermal drift hit both builds alike; the best of the rounds is what is compared.

    python3 ab_compare.py NEW_LOG [NEW_LOG...] -- BASE_LOG [BASE_LOG...]
"""

import re
import sys

LINE = re.compile(
    r"^(\w+)\s+n=\s*(\d+)\s+causal=(\w+)\s+combine=(\S+)\s+(\S+)\s+([\d.]+) ms")


def parse(path):
    """{(workload, n, causal, combine, variant): ms} of one bench log."""
    out = {}
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                out[m.groups()[:5]] = float(m.group(6))
    return out


def runs(paths):
    """{key: [ms of each log that has it]}."""
    acc = {}
    for p in paths:
        for k, v in parse(p).items():
            acc.setdefault(k, []).append(v)
    return acc


def main(argv):
    if "--" not in argv:
        sys.exit(__doc__)
    i = argv.index("--")
    new, base = runs(argv[:i]), runs(argv[i + 1:])
    if not new or not base:
        sys.exit("no bench lines in one of the two sets of logs")
    print(f"{'case':58} {'new ms':>10} {'base ms':>10} {'change':>8}  spread new / base")
    for k in sorted(new, key=lambda k: (k[0], int(k[1]), k[2], k[3], k[4])):
        if k not in base:
            print(f"{' '.join(k):58} {min(new[k]):10.3f} {'-':>10}")
            continue
        n, b = min(new[k]), min(base[k])
        spread = lambda v: 100 * (max(v) - min(v)) / min(v)
        print(f"{' '.join(k):58} {n:10.3f} {b:10.3f} {100 * (b / n - 1):+7.1f}%"
              f"  {spread(new[k]):.1f} % / {spread(base[k]):.1f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
