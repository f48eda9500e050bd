"""bench_rollout.py: tree sampling against flat sampling at equal leaves, and flat sampling against `generate`.

For each tiny random Qwen3 shape (hidden x layers) it samples P prompts x G leaves with rollout.sample
(flat, and tree at SamplingConfig's defaults) and with `model.generate` (do_sample, top_k=0, top_p=1,
temperature 1, the same max_new_tokens and EOS), then prints:
- decoded token positions per leaf (rows fed to the model, summed over steps) and wall time per leaf,
  tree / flat as ratios (issue 3's target: tree decodes >= 25% fewer positions per leaf); response
  tokens per leaf (tree leaves run longer than flat samples) and decoded positions per response token;
- prefilled tokens: rollout prefills each prompt once, so re-prefilled prefix tokens = prefilled -
  sum of prompt lengths (target 0); `generate` prefills every row;
- sampled tokens per second, flat vs generate (target: flat no slower).
Wall times are medians over `repeats` runs (seeds 0..repeats-1) after one warm-up; token counts are
means over the same runs. The prompts are synthetic "chain" sums ("12+34+56=") of random length.

Run from the repository root:  python benchmarks/bench_rollout.py  [--shapes 64x2 128x4 --G 8 --device cuda ...]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, fields

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import rollout  # noqa: E402


@dataclass
class Args:
    shapes: list[str] = field(default_factory=lambda: ["64x2", "128x4"])
    """tiny Qwen3 shapes, hidden x layers"""
    P: int = 8
    """prompts per batch"""
    G: int = 8
    """leaves per prompt (equal for tree and flat)"""
    max_new_tokens: int = 64
    """most tokens per response"""
    repeats: int = 5
    """timed runs per sampler (seeds 0..repeats-1), after one warm-up"""
    device: str = "cpu"
    """cpu or cuda"""
    dtype: str = "float32"
    """model dtype: float32 or bfloat16"""
    threads: int = 2
    """torch CPU threads"""


def parse_args() -> Args:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Args):
        default = f.default_factory() if callable(f.default_factory) else f.default
        kind = str if f.name in ("device", "dtype", "shapes") else int
        ap.add_argument(f"--{f.name}", type=kind, default=default, nargs="+" if isinstance(default, list) else None,
                        help=f.metadata.get("doc", ""))
    args = Args(**vars(ap.parse_args()))
    for s in args.shapes:
        if len(s.split("x")) != 2 or not all(x.isdigit() for x in s.split("x")):
            raise ValueError(f"--shapes: {s!r} is not HIDDENxLAYERS, e.g. 128x4")
    if min(args.P, args.G, args.max_new_tokens, args.repeats) < 1:
        raise ValueError("--P, --G, --max_new_tokens and --repeats must be >= 1")
    return args


def chain_prompts(tok, P: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [tok("+".join(str(rng.randint(1, 99)) for _ in range(rng.randint(2, 5))) + "=").input_ids for _ in range(P)]


def timed(fn, repeats: int):
    fn(0)  # warm-up
    walls, outs = [], []
    for seed in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs.append(fn(seed))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), outs


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    tok = rollout.build_tiny_tokenizer()
    prompts = chain_prompts(tok, args.P)
    P, G = args.P, args.G
    B, prompt_tokens = P * G, sum(map(len, prompts))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    print(f"device={args.device} dtype={args.dtype} P={P} G={G} max_new_tokens={args.max_new_tokens} "
          f"prompt tokens={prompt_tokens} tree defaults: {rollout.SamplingConfig(sampler='tree')}")
    for shape in args.shapes:
        hidden, layers = map(int, shape.split("x"))
        model = rollout.build_tiny_model(tok, hidden=hidden, layers=layers).to(args.device, getattr(torch, args.dtype)).eval()

        def run(sampler):
            cfg = rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, sampler=sampler)
            return lambda seed: rollout.sample(model, prompts, G, cfg, eos_token_ids=eos, pad_token_id=pad, seed=seed)

        wall_flat, flat = timed(run("flat"), args.repeats)
        wall_tree, tree = timed(run("tree"), args.repeats)

        # generate on the same rows: each prompt repeated G times, left-padded
        Tp = max(map(len, prompts))
        ids = torch.tensor([[pad] * (Tp - len(q)) + q for q in prompts for _ in range(G)], device=args.device)
        mask = (torch.arange(Tp, device=args.device) >= Tp - torch.tensor([len(q) for q in prompts for _ in range(G)],
                                                                         device=args.device)[:, None]).long()

        def gen(seed):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                     temperature=1.0, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                     pad_token_id=pad)
            new = out[:, Tp:]
            is_eos = (new == eos).long()
            # tokens up to and including the first EOS (generate pads after it)
            return int(((is_eos.cumsum(1) - is_eos) == 0).sum())

        wall_gen, gen_tokens = timed(gen, args.repeats)

        def mean(xs):
            return sum(xs) / len(xs)

        dec_flat, dec_tree = mean([r.decoded_tokens for r in flat]) / B, mean([r.decoded_tokens for r in tree]) / B
        tok_flat = mean([int(r.response_mask.sum()) for r in flat])
        tok_tree = mean([int(r.response_mask.sum()) for r in tree])
        forks = mean([float(r.tree_forks.float().mean()) for r in tree])
        share = mean([float(r.branch_pos[r.parent >= 0].float().mean()) / args.max_new_tokens for r in tree])
        print(f"\n[{shape}] {sum(p.numel() for p in model.parameters()):,} parameters")
        print(f"  decoded positions/leaf  flat {dec_flat:7.2f}  tree {dec_tree:7.2f}  tree/flat {dec_tree / dec_flat:.3f}"
              f"  ({1 - dec_tree / dec_flat:.1%} fewer; forks/prompt {forks:.2f}, mean fork position "
              f"{share:.2f} of max_new_tokens)")
        print(f"  wall ms/leaf            flat {1e3 * wall_flat / B:7.3f}  tree {1e3 * wall_tree / B:7.3f}  "
              f"tree/flat {wall_tree / wall_flat:.3f}")
        print(f"  response tokens/leaf    flat {tok_flat / B:7.2f}  tree {tok_tree / B:7.2f}  tree/flat {tok_tree / tok_flat:.3f}"
              f"  (tree leaves run longer: see SamplingConfig)")
        print(f"  decoded/response token  flat {dec_flat * B / tok_flat:7.3f}  tree {dec_tree * B / tok_tree:7.3f}  "
              f"tree/flat {(dec_tree / tok_tree) / (dec_flat / tok_flat):.3f}")
        print(f"  prefilled tokens        flat {flat[0].prefilled_tokens}  tree {tree[0].prefilled_tokens}  "
              f"generate {int(mask.sum())} (prompt tokens {prompt_tokens}; re-prefilled prefix tokens: "
              f"flat {flat[0].prefilled_tokens - prompt_tokens}, tree {tree[0].prefilled_tokens - prompt_tokens})")
        print(f"  sampled tokens/s        flat {tok_flat / wall_flat:9.0f}  generate {mean(gen_tokens) / wall_gen:9.0f}  "
              f"flat/generate {(tok_flat / wall_flat) / (mean(gen_tokens) / wall_gen):.2f}")


if __name__ == "__main__":
    main(parse_args())
