"""bench_step.py: one RL step of train.py, timed phase by phase, with tokens/s and peak memory.

Runs --steps steps of `train.train` (4 by default) and prints the median over the steps after the first (which
pays for warm-up) of each phase's seconds (t_update holds the old log-probs' recompute under bf16, the reference's
pass and the critic's update, as in metrics.jsonl), of tokens/s (response tokens over the step's seconds) and of
the mean response length, then the peak memory: on CUDA the most allocated on a rank, on the CPU the process's
peak resident set. The model:
- tiny (default): the tiny Qwen3 128 x 4 on the offline task `chain` (the longest responses of the offline
  tasks), 16 prompts x G = 8, at most 64 new tokens, on the CPU;
- --shape 0.6b | 1.7b: Qwen3-0.6B's or -1.7B's shape with random weights and the real vocabulary (151,936), with
  the character tokenizer. A random model almost never samples EOS, so every response runs to --max-new-tokens:
  a worst-case step. Meant for GPUs (bf16 compute, `rollout.compute_dtype`).
Every other flag is train.py's and overrides these defaults. The run writes to a temporary OUT, removed at the end
(train.py's closing "wrote ..." line names it), unless --out names a directory that holds no run.

Run from the repository root:
    python benchmarks/bench_step.py                                       # tiny, CPU
    python benchmarks/bench_step.py --shape 1.7b --max-new-tokens 2048     # one GPU
    torchrun --nproc_per_node 8 benchmarks/bench_step.py --shape 1.7b --max-new-tokens 2048 --fsdp
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rollout  # noqa: E402
import train  # noqa: E402

PRESET = dict(model="tiny", tiny_hidden=128, tiny_layers=4, task="chain", group_size=8, prompts_per_step=16,
              mini_batch_prompts=16, micro_batch_rows=32, max_new_tokens=64, lr=1e-5, steps=4, val_every=0,
              save_every=0, sample_every=0, progress=False)
SHAPES = {  # Qwen3-0.6B and -1.7B as in their config.json (both: vocabulary 151,936, tied embeddings)
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
}
KEYS = ("t_rollout", "t_reward", "t_advantage", "t_update", "t_step", "tokens_per_s", "response_len")


def random_qwen3(shape: dict, vocab: int = 151_936, seed: int = 0):
    """(model, tokenizer): a Qwen3 of `shape` (Qwen3Config fields) with random fp32 weights on the CPU and tied
    embeddings, and the character tokenizer, whose EOS and pad ids it uses."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tokenizer = rollout.build_tiny_tokenizer()
    config = Qwen3Config(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=40_960,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         **shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config), tokenizer


def bench_step(shape: str, args: train.Args) -> dict:
    """Run args.steps steps; print and return (rank 0; {} elsewhere) the medians of KEYS and peak_mem_gb."""
    train.check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    worker = train.setup_worker(args)
    model = tokenizer = None
    if shape != "tiny":  # on the CPU: this copy stays alive while train() runs, so it must not hold GPU memory
        model, tokenizer = random_qwen3(SHAPES[shape], seed=args.seed)
    t = time.time()
    train.train(args, worker, model, tokenizer)
    if worker.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(worker.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    peak = train.all_reduce(torch.tensor([peak / 2**30], device=worker.device), dist.ReduceOp.MAX).item()
    if worker.rank != 0:  # rank 0 alone writes metrics.jsonl
        return {}
    rows = [r for r in train.read_metrics(args.out) if "t_step" in r]
    timed = rows[1:] or rows  # the first step pays for warm-up (allocator, kernels)
    res = dict({k: statistics.median(r[k] for r in timed) for k in KEYS}, peak_mem_gb=peak)
    name = f"tiny {args.tiny_hidden}x{args.tiny_layers}" if shape == "tiny" else f"Qwen3-{shape} shape, random"
    wrap = "FSDP2" if args.fsdp else "DDP" if worker.world_size > 1 else "one process"
    print(f"\nbench_step: {name}, {args.method}, {worker.device}, world {worker.world_size}, {wrap}, compute "
          f"{str(rollout.compute_dtype(worker.device)).removeprefix('torch.')}, grad ckpt {args.grad_ckpt}; "
          f"{args.prompts_per_step} prompts x G={args.group_size}, at most {args.max_new_tokens} new tokens; "
          f"median of {len(timed)} step(s) after the first ({time.time() - t:.0f} s in all)")
    for k, v in res.items():
        print(f"  {k:14s} {v:12.3f}")
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)  # --help: train.py's flags
    parser.add_argument("--shape", choices=("tiny", *SHAPES), default="tiny")
    parser.add_argument("--out")
    known, rest = parser.parse_known_args(argv)
    tmp = None if known.out else tempfile.mkdtemp(prefix="bench-step-")  # each rank its own; rank 0's gets the run
    try:
        return bench_step(known.shape, train.parse_args(rest, preset=dict(PRESET, out=known.out or tmp)))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except train.UserError as e:
        sys.exit(f"bench_step.py: error: {e}")
