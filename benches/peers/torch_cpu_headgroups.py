"""PyTorch CPU peer: head-group dilated attention with SDPA per pattern, the way the
Python seed project computes it (SPEC §1b, with its head-range bug fixed).

Usage: torch_cpu_headgroups.py DIR N H D CAUSAL W1,R1 W2,R2 ...
Reads DIR/q.f32, DIR/k.f32, DIR/v.f32 ((1, N, H, D) little-endian f32), writes
DIR/torch_out.f32, then times the forward (median of 3 after a warm-up) and prints
`torch_seconds=<t>`.
"""
import sys
import time

import torch


def head_groups(q, k, v, schedule, causal):
    b, n, h, d = q.shape
    g = len(schedule)
    out = torch.zeros_like(q)
    base, extra = divmod(h, g)
    start = 0
    for i, (w, r) in enumerate(schedule):
        hs, he = start, start + base + (1 if i < extra else 0)
        start = he
        w = min(w, n)
        o = i % r
        if o >= w:
            continue
        nseg = n // w

        def pick(x):
            x = x[:, :, hs:he].reshape(b, nseg, w, he - hs, d)[:, :, o::r]
            m = x.shape[2]
            return x.reshape(b * nseg, m, he - hs, d).transpose(1, 2), m

        qs, m = pick(q)
        ks, _ = pick(k)
        vs, _ = pick(v)
        y = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        y = y.transpose(1, 2).reshape(b, nseg, m, he - hs, d)
        view = out.view(b, nseg, w, h, d)
        view[:, :, o::r, hs:he] = y
    return out / g


def main():
    folder, n, h, d, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    schedule = [tuple(int(x) for x in p.split(",")) for p in sys.argv[6:]]
    torch.set_num_threads(int(__import__("os").environ.get("PEER_THREADS", "2")))

    def load(name):
        t = torch.frombuffer(bytearray(open(f"{folder}/{name}.f32", "rb").read()), dtype=torch.float32)
        return t.reshape(1, n, h, d)

    q, k, v = load("q"), load("k"), load("v")
    with torch.no_grad():
        y = head_groups(q, k, v, schedule, causal)
        y.numpy().tofile(f"{folder}/torch_out.f32")
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            head_groups(q, k, v, schedule, causal)
            times.append(time.perf_counter() - t0)
    times.sort()
    print(f"torch_seconds={times[1]:.6f} torch={torch.__version__} threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
