"""bench_advantages.py: tokens/s of the dictionary trie (trie.py) against the tensor version (advantages.py).

One line per (device, G, T) with B = 512 rows: valid response tokens per second of trie.py (group by group,
through tests/trie_batch.py) and of advantages.py, and their ratio. The trie is timed on the first
`--trie-prompts` prompts (median of 3; it is linear in tokens and groups are independent, so its rate on a
subset stands for the batch); advantages.py on the whole batch (median of `--repeats` after a warm-up).
torch runs on one thread by default, as the trie does, so the ratio compares algorithms, not cores.
`--vs DIR` also times DIR/advantages.py (another checkout, e.g. a `git worktree` of an older commit) on the
same batches, interleaved run by run with this one, so the two are compared on the same machine state.

The batch looks like sampled groups: each response copies a prefix of an earlier response of its group
(mostly a few tokens, sometimes most of it), then goes its own way; lengths vary from T/4 to T, a tenth of
the rows are truncated at T, and the padding holds random real ids.

Run from the repository root:  python benchmarks/bench_advantages.py [--Ts 1024 4096 --Gs 4 8 16 --vs DIR]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import advantages  # noqa: E402
import trie_batch  # noqa: E402  (trie.py run group by group over a padded batch)

METHODS = ("tempo", "treeadv", "treerl", "treepo", "spo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=512, help="rows per batch (P prompts x G responses)")
    p.add_argument("--Ts", type=int, nargs="+", default=[1024, 4096], help="response lengths (padded width)")
    p.add_argument("--Gs", type=int, nargs="+", default=[4, 8, 16], help="group sizes; P = B / G")
    p.add_argument("--method", choices=METHODS, default="tempo", help="which advantage to time")
    p.add_argument("--vocab", type=int, default=32000, help="token ids are drawn from 0..vocab-1")
    p.add_argument("--trie-prompts", type=int, default=8, help="prompts the trie is timed on")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of advantages.py (median reported)")
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--vs", default=None, help="another checkout whose advantages.py is timed beside this one")
    args = p.parse_args(argv)
    assert all(args.B % G == 0 for G in args.Gs), "B must be divisible by every G"
    return args


def sampled_like_batch(B: int, G: int, T: int, vocab: int, seed: int):
    """responses [B, T] long, mask [B, T] bool, rewards [B] float32 shaped like sampled groups."""
    rng = np.random.default_rng(seed)
    responses = rng.integers(0, vocab, size=(B, T))  # [B, T]; padding keeps random real ids
    lengths = rng.integers(T // 4, T + 1, size=B)  # [B]
    lengths[rng.random(B) < 0.1] = T  # truncated rows
    for i in range(B):
        g0 = i - i % G
        if i > g0:  # share a prefix with an earlier row of the group
            parent = rng.integers(g0, i)
            shared = rng.geometric(0.25) if rng.random() < 0.8 else rng.integers(0, lengths[parent] + 1)
            shared = min(shared, lengths[parent])
            responses[i, :shared] = responses[parent, :shared]
            lengths[i] = max(lengths[i], shared)
    mask = np.arange(T)[None, :] < lengths[:, None]
    rewards = (rng.random(B) < 0.4).astype(np.float32)
    return torch.from_numpy(responses), torch.from_numpy(mask), torch.from_numpy(rewards)


def time_side_by_side(fns: list, inputs, device: str, repeats: int) -> list[float]:
    """Median seconds of each fn(*inputs) after one warm-up, the fns run in turn within each repeat."""
    inputs = [x.to(device) for x in inputs]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = [[] for _ in fns]
    for rep in range(repeats + 1):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn(*inputs)
            sync()
            if rep:  # the first round warms up
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    mods = [advantages]
    if args.vs:
        spec = importlib.util.spec_from_file_location("advantages_vs", os.path.join(args.vs, "advantages.py"))
        mods.append(importlib.util.module_from_spec(spec))
        spec.loader.exec_module(mods[1])
    fast = [getattr(m, f"{args.method}_advantages") for m in mods]
    slow = getattr(trie_batch, f"{args.method}_batch")
    print(f"{args.method} advantages, B={args.B}; trie: median of 3 on the first {args.trie_prompts} prompts; "
          f"fast: whole batch, median of {args.repeats}; torch threads={torch.get_num_threads()}"
          + (f"; 'vs ms' = {args.vs}/advantages.py, interleaved" if args.vs else ""))
    print(f"{'device':>6} {'G':>3} {'T':>5} {'tokens':>9} {'trie tok/s':>11} {'fast tok/s':>11} {'fast ms':>8} "
          f"{'ratio':>6}" + (f" {'vs ms':>8}" if args.vs else ""))
    for T in args.Ts:
        for G in args.Gs:
            resp, mask, r = sampled_like_batch(args.B, G, T, args.vocab, args.seed)
            rows = args.trie_prompts * G
            trie_sec = []
            for _ in range(3):  # the garbage collector stays on: a trie user pays for it too
                gc.collect()
                t0 = time.perf_counter()
                slow(resp[:rows], mask[:rows], r[:rows], G)
                trie_sec.append(time.perf_counter() - t0)
            trie_rate = int(mask[:rows].sum()) / statistics.median(trie_sec)
            tokens = int(mask.sum())
            for device in args.devices:
                secs = time_side_by_side([lambda *a, f=f: f(*a, G) for f in fast], (resp, mask, r), device, args.repeats)
                rate = tokens / secs[0]
                print(f"{device:>6} {G:>3} {T:>5} {tokens:>9} {trie_rate:>11.3g} {rate:>11.3g} {1e3 * secs[0]:>8.1f} "
                      f"{rate / trie_rate:>5.0f}x" + (f" {1e3 * secs[1]:>8.1f}" if args.vs else ""), flush=True)


if __name__ == "__main__":
    main(parse_args())
