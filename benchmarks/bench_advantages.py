"""bench_advantages.py: tokens/s of the dictionary trie (trie.py) against the tensor version (advantages.py).

Prints one line per (device, G, T) with B = 512 rows: valid response tokens per second for trie.py's
batch wrapper and for advantages.py, and their ratio (issue 2's target: >= 100x at B=512, T=4096,
G=8 on CPU). The trie is timed on the first `trie_prompts` prompts only (median of 3; it is linear
in tokens and groups are independent, so its rate on a subset stands for the batch; with Python's
garbage collector on, as a user has it, a whole batch would if anything be slower). The fast version
is timed on the whole batch (median of `repeats` runs after one warm-up). By default torch runs on
one thread, as the trie does, so the ratio compares algorithms rather than cores.

The batch looks like sampled groups: each response copies a prefix of an earlier response of its
group (mostly a few tokens, sometimes most of it), then goes its own way; lengths vary from T/4 to
T, and a tenth of the rows are truncated at T. Ids in the padding are random real ids.

Run from the repository root:  python benchmarks/bench_advantages.py  [--Ts 1024 4096 --Gs 4 8 16 ...]
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import advantages  # noqa: E402
import evaluate  # noqa: E402  (the Args -> argparse helper)
import trie_batch  # noqa: E402  (trie.py run group by group over a padded batch)


@dataclass
class Args:
    B: int = 512
    """rows per batch (P prompts x G responses)"""
    Ts: list[int] = field(default_factory=lambda: [1024, 4096])
    """response lengths T (padded width) to measure"""
    Gs: list[int] = field(default_factory=lambda: [4, 8, 16])
    """group sizes G to measure; P = B / G"""
    method: str = "tempo"
    """which advantage to time: tempo | treeadv"""
    vocab: int = 32000
    """token ids are drawn from 0..vocab-1"""
    trie_prompts: int = 8
    """prompts (groups) the trie is timed on (median of 3); its tokens/s is measured on that subset"""
    repeats: int = 5
    """timed runs of the fast version (median reported)"""
    devices: list[str] = field(default_factory=lambda: ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    """devices for advantages.py (the trie always runs in Python on the CPU)"""
    seed: int = 0
    """seed for the synthetic batch"""
    threads: int = 1
    """torch CPU threads for advantages.py (0 = torch's default)"""


def parse_args(argv=None) -> Args:
    args = Args(**vars(evaluate.dataclass_parser(Args, __doc__.splitlines()[0]).parse_args(argv)))
    for G in args.Gs:
        assert args.B % G == 0, f"B={args.B} must be divisible by every G, not by {G}"
    assert args.method in ("tempo", "treeadv"), args.method
    assert all(T >= 4 for T in args.Ts) and args.trie_prompts >= 1 and args.repeats >= 1
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


def time_fast(fn, args_, device: str, repeats: int) -> float:
    args_ = [a.to(device) for a in args_]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn(*args_)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args_)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    fast = {"tempo": advantages.tempo_advantages, "treeadv": advantages.treeadv_advantages}[args.method]
    slow = {"tempo": trie_batch.tempo_batch, "treeadv": trie_batch.treeadv_batch}[args.method]
    print(f"{args.method} advantages, B={args.B}; trie: median of 3 on the first {args.trie_prompts} prompts "
          f"(tokens/s on that subset); fast: whole batch, median of {args.repeats}; "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'device':>6} {'G':>3} {'T':>5} {'tokens':>9} {'trie tok/s':>12} {'fast tok/s':>12} {'fast ms':>8} {'ratio':>7}")
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
                sec = time_fast(lambda *a: fast(*a, G), (resp, mask, r), device, args.repeats)
                rate = tokens / sec
                print(f"{device:>6} {G:>3} {T:>5} {tokens:>9} {trie_rate:>12.3g} {rate:>12.3g} "
                      f"{1e3 * sec:>8.1f} {rate / trie_rate:>7.0f}x", flush=True)


if __name__ == "__main__":
    main(parse_args())
