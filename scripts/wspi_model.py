#!/usr/bin/env python3
"""A model of fwd_wspi's pipeline (hopper.cu), run before the kernel meets a GPU.

The producer warpgroup (thread 0, which issues the K/V boxes and waits for the V stages,
and its 127 other threads) and the two consumer warpgroups are coroutines over the
kernel's mbarriers (phase counts, `try_wait.parity` semantics) and its two named
barriers, written line for line after the kernel's loops: the same stage, parity and Q
buffer arithmetic, the same order of waits and arrivals. A random scheduler interleaves
them over random CTA work lists (items with 1..20 key tiles, items without keys). It
checks that no schedule deadlocks, that every S and P·V reads the stage and Q buffer of
the tile and item it means, that nothing overwrites a stage or Q buffer still being
read, and that each item's output is stored once, by the right party.

What it cannot check: the kernel's arithmetic, its shared-memory layout, or the tensor
memory accelerator's and cp.async's timing (a load here lands when issued). The GPU
oracle tests (code 20) and compute-sanitizer check those.

Usage: python3 scripts/wspi_model.py [schedules]   (default 3000; seeded, so repeatable)
"""
import random
import sys

NK, NV = 2, 3  # fwd_wspi's K and V stages (hopper.cu)


class Bar:
    """An mbarrier: `count` arrivals complete a phase."""

    def __init__(self, count):
        self.count, self.arrived, self.phases = count, 0, 0

    def arrive(self, n=1):
        self.arrived += n
        assert self.arrived <= self.count, "more arrivals than the count in one phase"
        if self.arrived == self.count:
            self.arrived = 0
            self.phases += 1

    def passed(self, parity):  # try_wait.parity: the phase of this parity has completed
        return (self.phases & 1) != parity


class Named:
    """bar.sync / bar.arrive with 256 threads (two warpgroups of 128)."""

    def __init__(self):
        self.arrived, self.gen = 0, 0

    def arrive(self):
        self.arrived += 128
        if self.arrived == 256:
            self.arrived = 0
            self.gen += 1


def run(items, rng):
    """items: this CTA's work list, each its number of key tiles (0: no keys)."""
    fullk = [Bar(129) for _ in range(NK)]
    emptyk = [Bar(256) for _ in range(NK)]
    fullv = [Bar(1) for _ in range(NV)]
    emptyv = [Bar(256) for _ in range(NV)]
    qfull = [Bar(128) for _ in range(2)]
    qempty = [Bar(256) for _ in range(2)]
    named = {1: Named(), 2: Named()}
    K = [None] * NK  # (item, tile) each stage holds
    V = [None] * NV
    Q = [None, None]
    stored = {}  # item -> who stored its rows
    readers = {}  # ('K', s) / ('V', s) / ('Q', j) -> contents each consumer read, until release

    def keyed_from(wi):
        while wi < len(items) and items[wi] == 0:
            wi += 1
        return wi if wi < len(items) else None

    def wait(bar, parity):
        while not bar.passed(parity):
            yield

    def sync(nid):  # bar.sync: arrive, then wait for the barrier's generation to turn
        g = named[nid].gen
        named[nid].arrive()
        while named[nid].gen == g:
            yield

    def read(kind, slot, want, wg):
        got = {"K": K, "V": V, "Q": Q}[kind][slot]
        assert got == want, f"{kind}[{slot}] holds {got}, wg {wg} wants {want}"
        readers.setdefault((kind, slot), {})[wg] = want

    def release(kind, slot, want, wg):
        got = {"K": K, "V": V, "Q": Q}[kind][slot]
        assert got == want, f"{kind}[{slot}] overwritten while wg {wg} read {want}: now {got}"
        readers.get((kind, slot), {}).pop(wg, None)

    def write(kind, slot, what):
        assert not readers.get((kind, slot)), f"{kind}[{slot}] written while read: {readers[(kind, slot)]}"
        {"K": K, "V": V, "Q": Q}[kind][slot] = what

    # The producer: thread 0 (role 0) and the other 127 threads (role 1), as in the kernel.
    def producer(role):
        n = 1 if role == 0 else 127
        it, done = 0, 0

        def load_q(item):
            nonlocal done
            qb = done & 1
            if done >= 2:
                yield from wait(qempty[qb], ((done - 2) >> 1) & 1)
            if role == 0:
                write("Q", qb, item)
            qfull[qb].arrive(n)
            done += 1

        def zero_rows(lo, hi):  # next_keyed's writes on the way (both roles write rows)
            for w in range(lo, hi):
                if items[w] == 0 and role == 0:
                    assert w not in stored, f"item {w} stored twice"
                    stored[w] = "producer"

        wi = keyed_from(0)
        zero_rows(0, len(items) if wi is None else wi)
        if wi is not None:
            yield from load_q(wi)
        while wi is not None:
            wn = keyed_from(wi + 1)
            zero_rows(wi + 1, len(items) if wn is None else wn)
            qdone = wn is None
            j = 0
            for tile in range(items[wi]):
                sk, sv = it % NK, it % NV
                if it >= NK:
                    yield from wait(emptyk[sk], ((it // NK) & 1) ^ 1)
                if role == 0:
                    write("K", sk, (wi, tile))  # expect_tx arrival; the box lands at once here
                    fullk[sk].arrive()
                fullk[sk].arrive(n)  # the key metadata's arrivals
                if role == 0:
                    if it >= NV:
                        yield from wait(emptyv[sv], ((it // NV) & 1) ^ 1)
                    write("V", sv, (wi, tile))
                    fullv[sv].arrive()
                it += 1
                j += 1
                if j == 3 and not qdone:
                    yield from load_q(wn)
                    qdone = True
                yield
            if not qdone:
                yield from load_q(wn)
            wi = wn

    def consumer(wg):
        it, done = 0, 0
        wi = keyed_from(0)
        if wi is None:
            return
        tile = 0
        qb = 0
        yield from wait(qfull[0], 0)
        done = 1
        yield from wait(fullk[0], 0)
        read("Q", 0, wi, wg)
        read("K", 0, (wi, 0), wg)
        release("K", 0, (wi, 0), wg)
        emptyk[0].arrive(128)
        if wg == 1:
            named[1].arrive()
        while True:
            vc, kn = it % NV, (it + 1) % NK
            ob = wi
            cross = False
            if tile + 1 < items[wi]:
                tile += 1
            else:
                wi = keyed_from(wi + 1)
                if wi is None:
                    break
                tile, cross = 0, True
            qbn = qb
            if cross:
                qbn = done & 1
                yield from wait(qfull[qbn], (done >> 1) & 1)
                done += 1
            yield from wait(fullk[kn], ((it + 1) // NK) & 1)
            yield from wait(fullv[vc], (it // NV) & 1)
            yield from sync(1 + wg)
            read("Q", qbn, wi, wg)  # S(n) = Q K(n)ᵀ
            read("K", kn, (wi, tile), wg)
            cur_v = V[vc]
            read("V", vc, cur_v, wg)  # P(c) V(c): the previous tile's V, checked below
            assert cur_v[0] == ob, f"P·V of item {ob} reads V of item {cur_v[0]}"
            named[2 - wg].arrive()
            yield  # wait<1>: S(n) landed
            release("K", kn, (wi, tile), wg)
            emptyk[kn].arrive(128)
            yield  # wait<0>: P(c) V(c) done
            release("V", vc, cur_v, wg)
            emptyv[vc].arrive(128)
            if cross:
                release("Q", qb, ob, wg)
                qempty[qb].arrive(128)
                if wg == 0:
                    assert ob not in stored, f"item {ob} stored twice"
                    stored[ob] = "consumers"
                qb = qbn
            release("Q", qbn, wi, wg)  # S landed: the reads of Q for this S are done
            it += 1
        vc = it % NV
        yield from wait(fullv[vc], (it // NV) & 1)
        yield from sync(1 + wg)
        cur_v = V[vc]
        read("V", vc, cur_v, wg)
        assert cur_v[0] == ob, f"the last P·V of item {ob} reads V of item {cur_v[0]}"
        if wg == 0:
            named[2].arrive()
        yield
        release("V", vc, cur_v, wg)
        emptyv[vc].arrive(128)
        if wg == 0:
            assert ob not in stored, f"item {ob} stored twice"
            stored[ob] = "consumers"

    actors = [producer(0), producer(1), consumer(0), consumer(1)]
    live = list(range(len(actors)))
    stalls = 0
    while live:
        a = rng.choice(live)
        before = (
            [(b.phases, b.arrived) for b in fullk + emptyk + fullv + emptyv + qfull + qempty],
            [(n.gen, n.arrived) for n in named.values()],
        )
        try:
            next(actors[a])
        except StopIteration:
            live.remove(a)
            stalls = 0
            continue
        after = (
            [(b.phases, b.arrived) for b in fullk + emptyk + fullv + emptyv + qfull + qempty],
            [(n.gen, n.arrived) for n in named.values()],
        )
        stalls = 0 if after != before else stalls + 1
        if stalls > 2000:  # every live actor has spun long without any barrier moving
            raise AssertionError(f"deadlock: items {items}")
    for w, n in enumerate(items):
        want = "producer" if n == 0 else "consumers"
        assert stored.get(w) == want, f"item {w} ({n} tiles) stored by {stored.get(w)}, not {want}"


def main():
    schedules = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    rng = random.Random(28)
    for k in range(schedules):
        n = rng.randint(0, 9)
        items = [0 if rng.random() < 0.4 else rng.randint(1, rng.choice([2, 4, 20])) for _ in range(n)]
        run(items, rng)
    print(f"fwd_wspi pipeline model: {schedules} random schedules, no deadlock, every read as meant")


if __name__ == "__main__":
    main()
