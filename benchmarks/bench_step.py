"""bench_step.py: one RL step of train.py, timed phase by phase (rollout, reward, advantages, log-probs, update).

Runs a few steps of `train.train` and prints the median of each phase's seconds after the first step (which
pays for warm-up), tokens/s and peak memory. The model:
- tiny (default): the tiny Qwen3 (--tiny-hidden x --tiny-layers) on the offline task `chain` (the longest
  responses of the offline tasks), 16 prompts x G = 8, 64 new tokens, on CPU;
- --shape 0.6b / 1.7b: a Qwen3-shaped model with random weights and the real vocabulary (151,936) with the
  character tokenizer. Random weights almost never sample EOS, so every response runs to --max-new-tokens:
  a worst-case step. Meant for a GPU.
Every other flag is train.py's and overrides the defaults above.

Run:
    python benchmarks/bench_step.py                                    # tiny, CPU
    torchrun --nproc_per_node 8 benchmarks/bench_step.py --shape 1.7b --max-new-tokens 2048   # GPUs
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rollout  # noqa: E402
import train  # noqa: E402
from train import print0  # noqa: E402

# train.py's flags for the tiny case; flags given on the command line win.
PRESET = dict(model="tiny", tiny_hidden=128, tiny_layers=4, task="chain", train_limit=None, group_size=8,
              prompts_per_step=16, mini_batch_prompts=16, micro_batch_rows=32, max_new_tokens=64, lr=1e-5,
              steps=4, val_every=0, save_every=0, sample_every=0, overwrite=True, progress=False, out="runs/bench-step")
QWEN3_SHAPES = {  # Qwen3-0.6B / -1.7B as in their config.json (vocab 151,936, tied embeddings)
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
}
PHASES = ("t_rollout", "t_reward", "t_advantage", "t_logprob", "t_update", "t_step", "tokens_per_s",
          "decode_tokens_per_s", "update_tokens_per_s", "response_len", "peak_mem_gb")


def random_qwen3(shape: str, device: torch.device, seed: int):
    """(model, tokenizer): a Qwen3 of `shape` with random weights, the real vocabulary, the character tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tokenizer = rollout.build_tiny_tokenizer()
    config = Qwen3Config(vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=40_960,
                         rope_theta=1_000_000.0, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **QWEN3_SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3ForCausalLM(config), tokenizer


def bench_step(shape: str, args: train.Args) -> dict:
    """Run args.steps steps; print and return the median of every PHASES entry over the steps after the first."""
    worker = train.checked_and_joined(args)
    model = tokenizer = None
    if shape != "tiny":
        model, tokenizer = random_qwen3(shape, torch.device("cpu") if args.fsdp else worker.device, args.seed)
    t = time.time()
    train.train(args, worker, model, tokenizer)
    rows = [r for r in train.read_metrics(args.out) if "t_step" in r]
    timed = rows[1:] or rows  # the first step pays for warm-up (allocator, kernels)
    keys = PHASES + (("t_critic",) if "t_critic" in rows[0] else ())  # --method ppo: the critic's pass and update
    res = {k: sorted(r[k] for r in timed)[len(timed) // 2] for k in keys}
    model_name = f"tiny {args.tiny_hidden}x{args.tiny_layers}" if shape == "tiny" else f"Qwen3-{shape} shape"
    wrap = "FSDP2" if args.fsdp else "DDP" if worker.world_size > 1 else "one process"
    print0(f"\nbench_step: {model_name}, {worker.device}, world {worker.world_size}, {wrap}, dtype {args.dtype}, "
           f"grad ckpt {args.grad_ckpt}; {args.prompts_per_step} prompts x G={args.group_size}, "
           f"max {args.max_new_tokens} new tokens; median of {len(timed)} step(s) after the first "
           f"({time.time() - t:.0f} s in all)")
    for k in keys:
        print0(f"  {k:22s} {res[k]:12.3f}")
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--shape", choices=("tiny", *QWEN3_SHAPES), default="tiny",
                        help="tiny (train.py's --tiny-hidden/--tiny-layers) | 0.6b | 1.7b (random weights)")
    known, rest = parser.parse_known_args(argv)
    return bench_step(known.shape, train.parse_args(rest, preset=PRESET))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except train.UserError as e:
        sys.exit(f"bench_step.py: error: {e}")
