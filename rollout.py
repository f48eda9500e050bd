"""rollout.py: load a causal LM and sample groups of responses from it (flat, or as an entropy-forked tree).

Part 1 loads models: a Hugging Face hub id, a local directory, a checkpoint that train.py wrote, or
`tiny`, a random Qwen3 of 80k-400k parameters with a character tokenizer built offline with the
`tokenizers` library. The tiny model is what the tests, the CPU demo and the study run on; nothing
here touches the network unless a hub id is given.

Part 2 samples: `sample(model, prompts, G, SamplingConfig(...))` returns a `Rollout` of P*G rows.
One plain PyTorch decode loop over the model's KV cache (transformers' DynamicCache) serves both
samplers. Prompts are prefilled once each (never once per row) and left-padded; each step feeds one
token for every row still alive, and a row that ends (EOS or max_new_tokens) leaves the batch, so
`decoded_tokens` counts real work. The sampling distribution is exactly log_softmax(logits / T)
restricted to top-k, then top-p, and renormalised; nothing from `generate` or a shipped
generation_config takes part. Randomness is counter-based (see `counter_uniform`), so a prompt's
tokens do not depend on what else is in the batch.

- sampler="flat": G independent responses per prompt (GRPO, TEMPO, HEPO).
- sampler="tree": TreeAdv's entropy-driven forest (SPEC 5). Each prompt starts M = num_chains
  chains; a position whose token entropy H_t exceeds tau is a fork candidate; a fork gives the
  branch a copy of the row's KV cache up to that position (the shared prefix is never prefilled or
  decoded again) and the branch samples its own token there. Exactly G leaves per prompt, each
  returned as its full token sequence (shared prefix repeated), so trie.py/advantages.py see the
  shared prefixes as they are. See `SamplingConfig` for when forks happen and why.

Departures (TreeAdv's sampler is not public; SPEC 5 asks us to choose): forks are placed when a
row ends, at its highest-entropy positions above tau, instead of at the first position above tau
(which spends the whole budget within the first few tokens and shares almost nothing); a prompt
whose rows all end before its G leaves exist gets its missing leaves as fresh chains from the
prompt's cached KV. Branches sample with replacement, so two may pick the same token and share a
longer prefix; every leaf is still a sample of the policy.

Benchmark (tree vs flat, flat vs `generate`): `python benchmarks/bench_rollout.py`.
"""
from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------
# Models: the tiny offline Qwen3, and loading anything else

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen3's template renders it without a system prompt or thinking switch.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """A character-level tokenizer over printable ASCII plus Qwen3's three special tokens.

    Left padding is passed to the constructor because transformers 5.x drops an attribute set
    afterwards when the tokenizer is saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]  # 97 characters incl. space, \t, \n
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None, padding_side="left",
        chat_template=CHAT_TEMPLATE, additional_special_tokens=[BOS],
    )


def build_tiny_model(tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A random Qwen3 sized for a laptop CPU: hidden 64 x 2 layers is 80k parameters, 128 x 4 about 600k."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        max_position_embeddings=40_960, tie_word_embeddings=True,  # Qwen3's context
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    # Sampling settings come from our arguments only; a shipped generation_config must not leak in.
    model.generation_config.do_sample = False
    return model


def load_model_and_tokenizer(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                             tiny_hidden: int = 64, tiny_layers: int = 2, seed: int = 0):
    """`name` is `tiny`, a local directory (a train.py checkpoint included) or a hub id.

    A hub id that cannot be reached fails fast with a message naming `--model PATH` and
    HF_HUB_OFFLINE, instead of transformers' retry loop and traceback.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, tiny_hidden, tiny_layers, seed)
        return model.to(device=device, dtype=dtype), tokenizer
    if not os.path.isdir(name) and ("/" not in name or name.startswith((".", "/"))):
        raise ValueError(f"--model {name!r}: no such directory, and not a hub id of the form owner/name")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if os.path.isdir(name) and not (os.path.isfile(os.path.join(name, "config.json"))
                                    and any(os.path.isfile(os.path.join(name, f)) for f in tokenizer_files)):
        raise ValueError(f"--model {name!r}: not a saved model: a model directory holds config.json, the weights "
                         "and the tokenizer's files (tokenizer.json or tokenizer_config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise SystemExit(
            f"could not load model {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}).\n"
            "Offline? Download it elsewhere and pass --model PATH to the local directory "
            "(set HF_HUB_OFFLINE=1 to fail at once instead of retrying)."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


# ----------------------------------------------------------------------------------------------
# Sampling: what is asked for, and what comes back


@dataclass
class SamplingConfig:
    """How to sample. Flat fields first, then the tree's (used only when sampler == "tree").

    Tree defaults, and why (TreeAdv did not publish its values):
    - tau = 0.5 nat, the entropy of an 80/20 choice between two tokens: a fork there gives the branch
      at least about a 20% chance of a different token than its parent's, so the two leaves differ from
      the fork on rather than repeating the parent. Since forks go to a row's highest-entropy positions
      anyway, tau is a floor, not the selector: it only decides whether a row has enough fork
      candidates at all, or its leaves turn into fresh chains that share nothing. 0.5 is the bottom of
      the range TreeAdv's authors name for their ablation (0.5-2.0), and close to the 80th percentile of
      token entropy in Qwen3 reasoning traces (0.67 nat, Wang et al. 2025, the 80/20 paper). On the
      tiny model warm-started on chain (benchmarks/bench_rollout.py), 16% of tokens are above 0.5 nat
      and under 1% above 1.0: at 1.0 a prompt forked 0.6 times of its 6 and the tree saved 6% of the
      decoded positions, at 0.5 it forks all 6 times and saves 49%; below 0.5 little changes (50%).
    - num_chains = 2: two independent trees per prompt, so a group never hinges on one root path
      (the paper's G = 7 gives 2 roots + 5 branches).
    - max_children = 2: binary forks, so each fork adds one leaf and the budget is spread over as
      many distinct uncertain positions as possible.
    - max_forks = 0 (no limit besides the leaf budget): with binary forks a prompt forks G - M times.

    When forks happen: a row's fork candidates are its own positions (after the point where it
    branched off) with H_t > tau. When the row ends, it takes its share of the prompt's unspent
    leaf budget, ceil(unspent / rows of the prompt still open), as forks at its highest-entropy
    candidates (max_children - 1 branches each). Choosing after the row ends puts forks where
    uncertainty peaks along the whole response, which is what shares long prefixes; the price is
    latency: branches start after their parent ends, so a tree takes more decode steps one after
    another than a flat batch (Rollout.decode_steps; 1.3-1.6x on the warm-started tiny model).
    If every row of a prompt has ended and leaves are still missing (no candidate above tau, or
    max_forks spent), the missing leaves are fresh chains from the prompt's cached KV. So tau = inf
    forks nothing and is flat sampling, token for token (all G chains then start at once); tau = 0
    forks wherever the distribution is not one-hot and spends the fork budget.

    What the leaves are: each token is drawn from pi given its prefix (log-probs exact), but the
    leaves are neither independent nor distributed as G flat samples. A branch at depth t exists
    only on a path that reached t, and its fork point is picked knowing the parent's whole path, so
    tree leaves over-represent long responses (on the random tiny model, whose EOS hazard is
    memoryless, 1.1-1.2x the tokens per leaf of flat sampling; `benchmarks/bench_rollout.py`
    prints it). Any sampler that shares deep prefixes pays some of this; first-position forking
    pays less and shares almost nothing.
    """

    max_new_tokens: int = 256
    """most tokens per response; a row that reaches it is truncated (finished = False)"""
    temperature: float = 1.0
    """softmax temperature T; 0.0 = greedy (argmax; logprobs/entropy of the T = 1 distribution)"""
    top_p: float = 1.0
    """nucleus: keep the smallest set of most likely tokens whose mass reaches top_p (1.0 = off)"""
    top_k: int = 0
    """keep the top_k most likely tokens (ties at the k-th value kept; 0 = off); applied before top_p"""
    sampler: str = "flat"
    """"flat" (G independent responses per prompt) or "tree" (TreeAdv's entropy-forked forest)"""
    tau: float = 0.5
    """tree: entropy threshold in nats; a position with H_t > tau may fork (inf = never: flat)"""
    num_chains: int = 2
    """tree: M independent root chains per prompt (1 <= M <= G)"""
    max_children: int = 2
    """tree: children per fork, the continuing row included (>= 2)"""
    max_forks: int = 0
    """tree: most forks per prompt (0 = limited by the leaf budget G only)"""


@dataclass
class Rollout:
    """P prompts x G leaves. B = P*G rows; rows g*G .. g*G+G-1 answer prompt g."""

    prompt_ids: torch.Tensor
    """[B, Tp] long, left-padded with pad_token_id"""
    prompt_mask: torch.Tensor
    """[B, Tp] bool"""
    response_ids: torch.Tensor
    """[B, T] long, right-padded with pad_token_id (T = longest response)"""
    response_mask: torch.Tensor
    """[B, T] bool, a prefix mask; EOS included when sampled"""
    logprobs: torch.Tensor
    """[B, T] float32, log-prob of each sampled token under the sampling distribution (0 at padding)"""
    entropy: torch.Tensor
    """[B, T] float32, entropy of the distribution each token was sampled from (0 at padding)"""
    group_index: torch.Tensor
    """[B] long, prompt index 0..P-1"""
    finished: torch.Tensor
    """[B] bool, ended with EOS (False = truncated at max_new_tokens)"""
    decoded_tokens: int
    """rows alive summed over decode steps (a shared prefix position counts once)"""
    prefilled_tokens: int
    """prompt tokens run through the model in prefill (each prompt once; padding not counted)"""
    decode_steps: int = 0
    """decode-loop model calls, one after another: the latency a batch-bound GPU pays (a tree's branches
    start when their parent ends, so it takes more steps than a flat batch of the same leaves)"""
    parent: torch.Tensor | None = None
    """[B] long, tree: the row this leaf branched off (-1 for a root chain)"""
    branch_pos: torch.Tensor | None = None
    """[B] long, tree: response position of the leaf's first own token (0 for a root chain)"""
    tree_forks: torch.Tensor | None = None
    """[P] long, tree: forks made per prompt (0 for flat)"""


# ----------------------------------------------------------------------------------------------
# The sampling distribution and counter-based randomness (small pure functions)


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """log pi(a|s) of the distribution we sample from, float32 [R, V]; -inf outside the kept set.

    pi = softmax(logits / T) restricted to the top_k largest logits (ties at the k-th kept), then to
    the smallest most-likely set whose mass reaches top_p, renormalised after each restriction.
    T = 0 (greedy) returns the unrestricted T = 1 distribution, the one greedy tokens are scored in.
    """
    z = logits.float()
    if temperature == 0:
        return torch.log_softmax(z, dim=-1)
    z = z / temperature
    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        p_sorted, order = torch.softmax(z, dim=-1).sort(dim=-1, descending=True)
        keep_sorted = (p_sorted.cumsum(-1) - p_sorted) < top_p  # mass strictly before a token < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        z = z.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def entropy_of(logp: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """H = -sum_a pi(a) log pi(a) over the kept set, [R, V] -> [R] (p = exp(logp) if already at hand)."""
    p = logp.exp() if p is None else p
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def _as_int64(x: int) -> int:
    """A 64-bit pattern as the signed value torch's int64 holds."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of 64-bit words with full avalanche (multiplies wrap)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def counter_uniform(seed: int, prompt: torch.Tensor, lane: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """u = mix(mix(mix(seed + g) ^ prompt) ^ (lane << 24 | pos)) / 2^64 in [0, 1), float64, broadcast shape.

    Why counter-based instead of torch.Generator: a stateful stream hands out numbers in batch order,
    so a prompt's tokens would change with the other prompts in the batch, with rows dropping out,
    and with forks. Here the uniform for (prompt index, lane = leaf id or fork alternative, response
    position) is a pure function of those integers: same seed, same tokens, whatever the batch, the
    device's row order or the number of ranks. mix is a bijection of 64-bit words and the packing
    (lane < 2^40, pos < 2^24) is injective, so distinct counters never share a word. 53 high bits
    give a float64 that never rounds to 1.
    """
    s = _mix64(torch.tensor(_as_int64(seed + 0x9E3779B97F4A7C15), device=pos.device))
    z = _mix64(_mix64(s ^ prompt) ^ ((lane << 24) | pos))
    return _shr(z, 11).double() * 2.0**-53


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token a with CDF(a-1) <= u * CDF(V-1) < CDF(a), vocabulary order; probs p [R, V], u [R, C] -> [R, C] long.

    The CDF is accumulated in float64; the target is kept strictly below the total, so the token
    found always has positive probability (the CDF is flat after the last such token).
    """
    cdf = p.double().cumsum(-1)  # [R, V]
    total = cdf[:, -1:]
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x.contiguous(), right=True)


# ----------------------------------------------------------------------------------------------
# Input checks: a ValueError naming the argument, before any model work


def _check_sample_args(model, prompts, group_size, cfg: SamplingConfig, eos_token_ids, pad_token_id) -> list[int]:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if not isinstance(cfg.max_new_tokens, int) or not 1 <= cfg.max_new_tokens < 2**24:
        raise ValueError(f"cfg.max_new_tokens must be an int in [1, 2^24), got {cfg.max_new_tokens!r}")
    if not (isinstance(cfg.temperature, (int, float)) and math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise ValueError(f"cfg.temperature must be a finite number >= 0 (0 = greedy), got {cfg.temperature!r}")
    if not (isinstance(cfg.top_p, (int, float)) and 0 < cfg.top_p <= 1):
        raise ValueError(f"cfg.top_p must be in (0, 1], got {cfg.top_p!r}")
    if isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int) or cfg.top_k < 0:
        raise ValueError(f"cfg.top_k must be an int >= 0 (0 = off), got {cfg.top_k!r}")
    if cfg.sampler not in ("flat", "tree"):
        raise ValueError(f"cfg.sampler must be 'flat' or 'tree', got {cfg.sampler!r}")
    if not isinstance(cfg.tau, (int, float)) or math.isnan(cfg.tau) or cfg.tau < 0:
        raise ValueError(f"cfg.tau must be >= 0 nats (inf = never fork), got {cfg.tau!r}")
    if cfg.sampler == "tree":
        if cfg.temperature == 0:
            raise ValueError("cfg.temperature = 0 (greedy) with cfg.sampler = 'tree': every branch would "
                             "repeat the argmax; use temperature > 0 or sampler = 'flat'")
        if not isinstance(cfg.num_chains, int) or not 1 <= cfg.num_chains <= group_size:
            raise ValueError(f"cfg.num_chains must be an int in [1, group_size={group_size}], got {cfg.num_chains!r}")
        if not isinstance(cfg.max_children, int) or not 2 <= cfg.max_children <= 256:
            raise ValueError(f"cfg.max_children must be an int in [2, 256], got {cfg.max_children!r}")
        if not isinstance(cfg.max_forks, int) or cfg.max_forks < 0:
            raise ValueError(f"cfg.max_forks must be an int >= 0 (0 = no limit), got {cfg.max_forks!r}")
    eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or [])
    V = model.config.get_text_config().vocab_size
    if not eos or not all(isinstance(e, int) and 0 <= e < V for e in eos):
        raise ValueError(f"eos_token_ids must be a token id or a non-empty list of ids in [0, {V}), got {eos_token_ids!r}")
    if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < V:
        raise ValueError(f"pad_token_id must be a token id in [0, {V}), got {pad_token_id!r}")
    n_ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for i, q in enumerate(prompts):
        if not isinstance(q, (list, tuple)) or len(q) == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
        if not all(isinstance(t, int) and 0 <= t < V for t in q):
            raise ValueError(f"prompts[{i}] holds an id outside [0, {V}) or a non-int")
        if n_ctx is not None and len(q) + cfg.max_new_tokens > n_ctx:
            raise ValueError(f"prompts[{i}] has {len(q)} tokens: with cfg.max_new_tokens={cfg.max_new_tokens} it exceeds "
                             f"the model's context of {n_ctx} (config.max_position_embeddings)")
    return eos


# ----------------------------------------------------------------------------------------------
# KV-cache rows: keep, copy and shift rows of a DynamicCache


def _take_rows(x: torch.Tensor, idx: torch.Tensor, shift: torch.Tensor, L: int) -> torch.Tensor:
    """Rows idx of x [S, ..., Ls, ...] (sequence on dim 2, or dim 1 for a 2-D mask), moved right by shift
    columns into a length-L window: out[r, j] = x[idx[r], j - shift[r]] (garbage where j < shift; the
    attention mask is 0 there). Rotary positions are baked into cached keys, so a shift changes nothing
    the model computes: it only left-pads a copied prefix to the batch's common length."""
    col = (torch.arange(L, device=x.device) - shift[:, None]).clamp(min=0)  # [n, L]
    if x.dim() == 2:
        return x[idx[:, None], col]
    return x[idx[:, None], :, col].transpose(1, 2)  # [n, L, H, D] -> [n, H, L, D]


# ----------------------------------------------------------------------------------------------
# The sampler


@torch.no_grad()
def sample(model, prompts: list[list[int]], group_size: int, cfg: SamplingConfig, *,
           eos_token_ids: list[int] | int, pad_token_id: int, seed: int = 0,
           prompt_keys: list[int] | None = None) -> Rollout:
    """Sample G responses (flat) or G leaves (tree) for each prompt. See the module and SamplingConfig docs.

    prompt_keys: the integer each prompt's randomness is keyed by (default 0..P-1). train.py passes a
    prompt's position in the whole step, so 1 or 8 ranks sample the same responses.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    eos = _check_sample_args(model, prompts, group_size, cfg, eos_token_ids, pad_token_id)
    G, P, Tmax = group_size, len(prompts), cfg.max_new_tokens
    if prompt_keys is not None and (len(prompt_keys) != P or not all(isinstance(k, int) and k >= 0 for k in prompt_keys)):
        raise ValueError(f"prompt_keys must hold one int >= 0 per prompt ({P}), got {prompt_keys!r}")
    B = P * G
    tree = cfg.sampler == "tree"
    # tau = inf can never fork: every leaf is a root chain, so all G start at once (= flat sampling).
    M = cfg.num_chains if tree and not math.isinf(cfg.tau) else G
    C = cfg.max_children if tree else 1  # draws per row and step: its own token + C-1 fork alternatives
    max_forks = cfg.max_forks or B
    device = next(model.parameters()).device
    eos_t = torch.tensor(eos, device=device)
    keys = torch.tensor(prompt_keys if prompt_keys is not None else range(P), dtype=torch.long, device=device)  # [P]
    arangeC = torch.arange(C, device=device)

    # Prefill: each prompt once, left-padded; logits only at the last position.
    plen = torch.tensor([len(q) for q in prompts], device=device)  # [P]
    Tp = int(plen.max())
    prompt_ids = torch.full((P, Tp), pad_token_id, dtype=torch.long, device=device)  # [P, Tp]
    for g, q in enumerate(prompts):
        prompt_ids[g, Tp - len(q):] = torch.tensor(q, device=device)
    prompt_mask = torch.arange(Tp, device=device) >= (Tp - plen)[:, None]  # [P, Tp] bool
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask.long(), past_key_values=cache, use_cache=True,
                position_ids=(prompt_mask.long().cumsum(-1) - 1).clamp(min=0), logits_to_keep=1)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        raise ValueError("sample() needs a full-attention KV cache (DynamicLayer); sliding-window or linear-attention "
                         f"layers are not supported: {[type(layer).__name__ for layer in cache.layers]}")
    root_logp = sampling_logprobs(out.logits[:, -1], cfg.temperature, cfg.top_p, cfg.top_k)  # [P, V]
    root_kv = [(layer.keys, layer.values) for layer in cache.layers]  # [P, H, Tp, D] per layer
    root_mask = prompt_mask.long()
    del out

    # Outputs by leaf slot g*G + k (k = leaf id within the prompt, the order leaves are created in).
    tokens = torch.full((B, Tmax), pad_token_id, dtype=torch.long, device=device)  # [B, Tmax]
    logprobs = torch.zeros(B, Tmax, device=device)  # [B, Tmax] float32
    entropy = torch.zeros(B, Tmax, device=device)  # [B, Tmax] float32
    length = torch.zeros(B, dtype=torch.long, device=device)  # [B] tokens sampled so far
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
    alt_tok = torch.zeros(B, Tmax, C - 1, dtype=torch.long, device=device)  # [B, Tmax, C-1] fork alternatives
    alt_lp = torch.zeros(B, Tmax, C - 1, device=device)  # [B, Tmax, C-1] their log-probs
    parent, branch_pos = [-1] * B, [0] * B
    created, open_rows, forks = [M] * P, [M] * P, [0] * P  # per prompt: leaves made, rows not ended, forks

    def record(slots: torch.Tensor, logp: torch.Tensor) -> list[bool]:
        """Draw each row's next token (and its C-1 fork alternatives) from logp [n, V], store them at
        position length[slot], return whether each row has ended (EOS, or max_new_tokens reached)."""
        pos = length[slots]  # [n]
        p = logp.exp()  # [n, V]
        if cfg.temperature == 0:
            tok = logp.argmax(-1, keepdim=True)  # [n, 1] greedy
        else:
            lane = (slots % G)[:, None] + (arangeC << 32)  # [n, C]: lane 0 = the row's own token
            tok = inverse_cdf(p, counter_uniform(seed, keys[slots // G][:, None], lane, pos[:, None]))  # [n, C]
        lp = logp.gather(1, tok)  # [n, C]
        tokens[slots, pos], logprobs[slots, pos], entropy[slots, pos] = tok[:, 0], lp[:, 0], entropy_of(logp, p)
        if C > 1:
            alt_tok[slots, pos], alt_lp[slots, pos] = tok[:, 1:], lp[:, 1:]
        length[slots] = pos + 1
        is_eos = torch.isin(tok[:, 0], eos_t)
        finished[slots] = is_eos
        return is_eos | (pos + 1 >= Tmax)

    def branch(s: int, row_of: dict[int, int], new_from_batch: list, new_from_root: list, ended_now: list) -> None:
        """Leaf s has ended: give it its share of the prompt's unspent leaf budget as forks at its
        highest-entropy own positions above tau. A branch at t copies s's tokens before t, takes the
        alternative drawn at t, and continues from s's KV cache cut back to the prompt + t tokens."""
        g, n = s // G, int(length[s])
        share = -(-(G - created[g]) // (open_rows[g] + 1))  # ceil(unspent / rows still open, s included)
        start = branch_pos[s] + (parent[s] >= 0)  # own positions begin after the parent's fork position
        if share == 0 or forks[g] >= max_forks or start >= n:
            return
        H = entropy[s, start:n].tolist()
        cand = sorted((t for t in range(start, n) if H[t - start] > cfg.tau), key=lambda t: -H[t - start])
        for t in sorted(cand[: min(-(-share // (C - 1)), max_forks - forks[g])]):
            forks[g] += 1
            for j in range(min(C - 1, G - created[g])):  # a fork makes max_children - 1 branches if the budget allows
                c = g * G + created[g]
                created[g] += 1; open_rows[g] += 1
                tokens[c, :t], logprobs[c, :t], entropy[c, :t + 1] = tokens[s, :t], logprobs[s, :t], entropy[s, :t + 1]
                tokens[c, t], logprobs[c, t], length[c] = alt_tok[s, t, j], alt_lp[s, t, j], t + 1
                parent[c], branch_pos[c] = s, t
                finished[c] = is_eos = bool(torch.isin(tokens[c, t], eos_t))
                if is_eos or t + 1 >= Tmax:
                    ended_now.append(c)
                elif t == 0:
                    new_from_root.append(c)
                else:  # s's cache holds the prompt + its tokens 0..n-2; the branch needs prompt + 0..t-1
                    new_from_batch.append((c, row_of[s], n - 1 - t))

    def settle(ended: list[int], row_of: dict[int, int]) -> tuple[list, list]:
        """Retire ended leaves: fork them (tree), then give a prompt whose rows have all ended its missing
        leaves as fresh root chains. New leaves can end at once (EOS first, or at max_new_tokens): they
        are retired in the next round. Returns the new rows to join the batch."""
        new_from_batch, new_from_root = [], []
        while ended:
            nxt = []
            for s in sorted(ended):  # per prompt in leaf order: the same whatever else is in the batch
                open_rows[s // G] -= 1
                if tree:
                    branch(s, row_of, new_from_batch, new_from_root, nxt)
            for g in sorted({s // G for s in ended}):
                if open_rows[g] == 0 and created[g] < G:
                    fill = torch.arange(g * G + created[g], g * G + G, device=device)
                    open_rows[g] += G - created[g]; created[g] = G
                    for c, d in zip(fill.tolist(), record(fill, root_logp[fill // G]).tolist()):
                        (nxt if d else new_from_root).append(c)
            ended = nxt
        return new_from_batch, new_from_root

    # Start: M root chains per prompt, first token from the prefill's distribution.
    init = torch.tensor([g * G + k for g in range(P) for k in range(M)], device=device)  # [P*M]
    done = record(init, root_logp[init // G]).tolist()
    from_batch, from_root = settle([c for c, d in zip(init.tolist(), done) if d], {})
    from_root += [c for c, d in zip(init.tolist(), done) if not d]
    # The batch: slot [R] (leaf of each row), attn [R, L] (mask over the cache), and the cache itself.
    slot = torch.zeros(0, dtype=torch.long, device=device)
    attn = torch.zeros(0, Tp, dtype=torch.long, device=device)
    kv = [(k[:0], v[:0]) for k, v in root_kv]
    keep = torch.zeros(0, dtype=torch.long, device=device)
    decoded, steps, changed = 0, 0, True
    while True:
        if changed:
            # Rebuild: rows kept; branches (a shifted prefix of their parent's cache row); root chains
            # (the prompt's cached KV, left-padded to the batch length). Only when rows end or join.
            L = attn.shape[1]
            cols = torch.arange(L, device=device)
            fb = torch.tensor([r for _, r, _ in from_batch], dtype=torch.long, device=device)
            fb_shift = torch.tensor([d for _, _, d in from_batch], dtype=torch.long, device=device)
            fr = torch.tensor(from_root, dtype=torch.long, device=device)
            fr_shift = torch.full_like(fr, L - Tp)

            def rows(x, x0):
                kept = x.index_select(0, keep)
                if len(fb) + len(fr) == 0:
                    return kept
                return torch.cat([kept, _take_rows(x, fb, fb_shift, L), _take_rows(x0, fr // G, fr_shift, L)])

            kv = [(rows(k, k0), rows(v, v0)) for (k, v), (k0, v0) in zip(kv, root_kv)]
            attn = rows(attn, root_mask) * (cols >= torch.cat([torch.zeros_like(keep), fb_shift, fr_shift])[:, None])
            slot = torch.cat([slot[keep], torch.tensor([c for c, _, _ in from_batch], dtype=torch.long, device=device), fr])
            for layer, (k, v) in zip(cache.layers, kv):
                layer.keys, layer.values = k, v
        R = len(slot)
        if R == 0:
            break
        # One decode step: feed each row's last token at its own position.
        pos = length[slot]  # [R]
        attn = torch.cat([attn, attn.new_ones(R, 1)], dim=1)  # [R, L+1]
        out = model(input_ids=tokens[slot, pos - 1][:, None], attention_mask=attn, past_key_values=cache,
                    use_cache=True, position_ids=(plen[slot // G] + pos - 1)[:, None])
        decoded += R
        steps += 1
        ended = record(slot, sampling_logprobs(out.logits[:, -1], cfg.temperature, cfg.top_p, cfg.top_k))
        del out
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        changed = bool(ended.any())
        if changed:
            keep = (~ended).nonzero()[:, 0]
            ended_rows = ended.nonzero()[:, 0].tolist()
            ended_slots = slot[ended].tolist()
            from_batch, from_root = settle(ended_slots, dict(zip(ended_slots, ended_rows)))

    # Assemble: rows grouped per prompt, leaves in creation order; padding beyond each length.
    T = int(length.max())
    response_mask = torch.arange(T, device=device) < length[:, None]  # [B, T]
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
        response_ids=tokens[:, :T].masked_fill(~response_mask, pad_token_id), response_mask=response_mask,
        logprobs=logprobs[:, :T] * response_mask, entropy=entropy[:, :T] * response_mask,
        group_index=torch.arange(B, device=device) // G, finished=finished,
        decoded_tokens=decoded, prefilled_tokens=int(plen.sum()), decode_steps=steps,
        parent=torch.tensor(parent, device=device), branch_pos=torch.tensor(branch_pos, device=device),
        tree_forks=torch.tensor(forks, device=device),
    )
