#!/usr/bin/env python3
"""A model of fwd_wspm's K/V stage hand-off between the two CTAs of a cluster (hopper.cu).

fwd_wspm is fwd_wsps in clusters of two CTAs that stream the same K/V tiles: each CTA's
producer thread 0 loads half of every tile (its 64-column boxes of K and V) into the same
stage of both CTAs by multicast box loads. What that adds to fwd_wsps's pipeline, and what
this model checks, is the cross-CTA part:
- a stage's `full` barrier (129 arrivals: the 128 producer threads' key metadata, thread
  0's expect_tx) must not complete before both halves have landed, although the peer's
  half may land before this CTA's thread 0 has even announced the bytes (the mbarrier's
  transaction count then runs negative);
- a producer may refill a stage only once the consumers of *both* CTAs are done with it,
  since its multicast writes into the peer too: `empty` counts the 256 local consumer
  threads plus one arrival from each of the peer's two consumer warpgroups;
- each CTA reads only what it means to: every tile a consumer warpgroup reads holds both
  halves of that tile, and no half lands in a stage a warpgroup is still reading.

The CTAs' producers and consumer warpgroups are coroutines over the mbarriers (phase
counts, try_wait.parity, the transaction count), written after the kernel's loops: the
same stage and parity arithmetic, the same order of waits, arrivals and loads. Box loads
are in flight until a random later step delivers them, one destination at a time. A random
scheduler interleaves everything over random pair-item lists (items of 0..20 key tiles,
the same list for both CTAs, as the host's mc_pairs_fit guarantees). The consumers'
ping-pong turns and the Q buffer are fwd_wsps's, local to a CTA, and not modelled here.

Mutations (--mutate NAME) break one rule each; every one must make the model fail:
  local-empty   empty counts the local consumers only (no remote arrivals)
  own-bytes     thread 0 expects only its own two boxes' bytes
  early-release the remote arrival is sent before the warpgroup has read the stage

Usage: python3 scripts/wspm_model.py [schedules] [--mutate NAME]   (default 2000; seeded)
"""
import random
import sys

NS = 3  # fwd_wsps's K/V stages (WS_STAGES)


class Bar:
    """An mbarrier: a phase completes when `count` arrivals are in and tx is zero."""

    def __init__(self, count):
        self.count, self.arrived, self.tx, self.phases = count, 0, 0, 0

    def _check(self):
        if self.arrived == self.count and self.tx == 0:
            self.arrived = 0
            self.phases += 1

    def arrive(self, n=1, expect=0):
        self.arrived += n
        self.tx += expect
        assert self.arrived <= self.count, "more arrivals than the count in one phase"
        self._check()

    def complete_tx(self, n):
        self.tx -= n
        self._check()

    def passed(self, parity):  # try_wait.parity: the phase of this parity has completed
        return (self.phases & 1) != parity


def run(items, rng, mutate=None):
    """items: the cluster's pair items, each its number of key tiles (0: no keys)."""
    tiles = [(wi, t) for wi, n in enumerate(items) for t in range(n)]
    remote = 0 if mutate == "local-empty" else 2
    full = [[Bar(129) for _ in range(NS)] for _ in range(2)]
    empty = [[Bar(256 + remote) for _ in range(NS)] for _ in range(2)]
    # stage[c][s][h]: the tile whose half h (the 64 columns loaded by rank h) CTA c's stage
    # s holds; reading[c][s]: warpgroups of CTA c between their full wait and their release.
    stage = [[[None, None] for _ in range(NS)] for _ in range(2)]
    reading = [[set() for _ in range(NS)] for _ in range(2)]
    flight = []  # box loads issued, not yet landed: (dest CTA, stage, half, tile)
    done = [0, 0]  # consumer warpgroups finished, per CTA

    def wait(bar, parity):
        while not bar.passed(parity):
            yield

    def producer0(c):
        # thread 0 of CTA c's producer: its loop over the item's key tiles (TK && MC)
        for it, tile in enumerate(tiles):
            s = it % NS
            if it >= NS:
                yield from wait(empty[c][s], ((it // NS) & 1) ^ 1)
            halves = 1 if mutate == "own-bytes" else 2
            full[c][s].arrive(expect=halves)
            for dest in (0, 1):  # multicast, mask 0b11: this rank's half into both CTAs
                flight.append((dest, s, c, tile))
            yield
            full[c][s].arrive()  # thread 0's own key metadata row
            yield

    def producer_rest(c):
        # the other 127 producer threads: key metadata, one arrival each (batched)
        for it in range(len(tiles)):
            s = it % NS
            if it >= NS:
                yield from wait(empty[c][s], ((it // NS) & 1) ^ 1)
            full[c][s].arrive(127)
            yield

    def consumer(c, wg):
        for it, tile in enumerate(tiles):
            s = it % NS
            yield from wait(full[c][s], (it // NS) & 1)
            assert stage[c][s] == [tile, tile], (
                f"CTA {c} warpgroup {wg} reads stage {s} for {tile} holding {stage[c][s]}")
            reading[c][s].add(wg)
            if mutate == "early-release":
                empty[1 - c][s].arrive()
            yield  # S(n), softmax, P·V: the MMAs read the stage
            assert stage[c][s] == [tile, tile], f"CTA {c} stage {s} changed under its reader"
            reading[c][s].discard(wg)
            empty[c][s].arrive(128)  # every thread of the warpgroup
            if remote and mutate != "early-release":
                empty[1 - c][s].arrive()  # thread 0 of the warpgroup, on the peer's barrier
            yield
        done[c] += 1

    def land():
        # one box in flight lands in one destination
        while True:
            if flight:
                dest, s, h, tile = flight.pop(rng.randrange(len(flight)))
                assert not reading[dest][s], (
                    f"half {h} of {tile} lands in CTA {dest} stage {s} while it is read")
                stage[dest][s][h] = tile
                full[dest][s].complete_tx(1)
            yield

    actors = [producer0(0), producer0(1), producer_rest(0), producer_rest(1),
              consumer(0, 0), consumer(0, 1), consumer(1, 0), consumer(1, 1)]
    lander = land()
    live = list(actors)
    steps = 0
    while live:
        steps += 1
        assert steps < 200000, "deadlock: no progress"
        if flight and rng.random() < 0.3:
            next(lander)
            continue
        a = rng.choice(live)
        try:
            next(a)
        except StopIteration:
            live.remove(a)
    while flight:  # loads still in flight land before the kernel's closing cluster barrier
        next(lander)
    assert done == [2, 2], f"consumers finished {done}"
    # every phase accounted for: each stage completed one full phase per tile loaded into it
    for c in (0, 1):
        for s in range(NS):
            n = len(range(s, len(tiles), NS))
            assert full[c][s].phases == n, (c, s, full[c][s].phases, n)


def main():
    args = sys.argv[1:]
    mutate = None
    if "--mutate" in args:
        i = args.index("--mutate")
        mutate = args[i + 1]
        del args[i:i + 2]
    schedules = int(args[0]) if args else 2000
    rng = random.Random(32)
    for k in range(schedules):
        n = rng.randint(1, 6)
        items = [rng.choice([0, rng.randint(1, 20)]) for _ in range(n)]
        try:
            run(items, rng, mutate)
        except AssertionError as e:
            if mutate:
                print(f"mutation {mutate}: fails as it must (schedule {k}: {e})")
                return 0
            print(f"schedule {k}, items {items}: {e}")
            return 1
    if mutate:
        print(f"mutation {mutate}: passed {schedules} schedules, the model does not catch it")
        return 1
    print(f"fwd_wspm stage hand-off: {schedules} schedules, no deadlock, no stale or overwritten stage")
    return 0


if __name__ == "__main__":
    sys.exit(main())
