"""rollout.py: load a causal LM and sample groups of responses from it (flat, or as an entropy-forked tree).

Part 1 samples: `sample(model, prompts, G, SamplingConfig(...))` returns a `Rollout` of P*G leaves.
The sampling distribution is exactly log_softmax(logits / T) restricted to top-k, then top-p, and
renormalised; nothing from `generate` or a shipped generation_config takes part. Randomness is
counter-based (see `counter_uniform`): a token is a pure function of (seed, prompt key, leaf, position),
so a prompt's tokens do not depend on what else is in the batch, on the memory budget or on the order
rows are scheduled in.

- sampler="flat": G independent responses per prompt (GRPO, TEMPO, HEPO).
- sampler="tree": TreeAdv's entropy-driven forest (SPEC 5). Each prompt starts M = num_chains root
  chains; when a root ends it forks at its highest-entropy positions above tau (`fork_rule`); a branch
  continues from the root's cached prefix (never prefilled or decoded again) with its own token at the
  fork. Exactly G leaves per prompt, each returned as its full token sequence (shared prefix repeated),
  so trie.py/advantages.py see the shared prefixes as they are.

Part 2 is the decode engine both samplers run on, built for the paper's scale (224 rows of up to
1,024 + 2,048 tokens per GPU): a paged KV cache of [pages, KV heads, page_size, head_dim] per layer in the
compute dtype, written in place by an attention function registered with transformers' AttentionInterface
(the model's own code runs unchanged) and read in place (`page_attention`, flash-decoding over pages). A
row holds a table of pages; a group's rows share its prompt's pages and a tree's branches share their
root's, each copying at most the part of one page before its first own position (copy on write).
Continuous batching: a waiting prompt is prefilled when the free pages hold it, rows leave as they end, and
when a step finds no page free the newest group is swapped out to host memory and back in later, bit for
bit (vLLM's preemption by swap). One small host read per decode step, and an optional torch.compile'd step
over fixed slot counts (CUDA graphs on CUDA). README "The decode engine" has the design and the measurements.

Part 3 places this process on its device (under torchrun, in its process group too) and loads models:
a Hugging Face hub id, a local directory, a checkpoint that train.py wrote, or `tiny`, a random Qwen3 of a
few hundred thousand parameters with a character tokenizer built offline with the `tokenizers` library.
The tiny model is what the tests, the CPU demo and the study run on; nothing here touches the network
unless a hub id is given. Input checks come last.

Benchmarks (flat vs `generate`, tree vs flat, the paper-shaped case): `python benchmarks/bench_rollout.py`.
"""
from __future__ import annotations

import collections
import contextlib
import heapq
import math
import os
import string
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Sampling: what is asked for, and what comes back


@dataclass
class SamplingConfig:
    """How to sample. Flat fields first, then the tree's (used only when sampler == "tree"), then the engine's.

    Tree defaults (TreeAdv did not publish its values; README "Benchmarks" has the tree-vs-flat measurements):
    - tau = 0.5 nat, the entropy of an 80/20 choice between two tokens: a branch forked there has at
      least about a 20% chance of a token other than its root's, so the two leaves differ from the fork
      on. Forks go to a root's highest-entropy positions anyway, so tau is a floor, not the selector: it
      decides whether a root has enough fork candidates, or its leaves start as fresh chains that share
      nothing. 0.5 is the bottom of the range TreeAdv's authors name for their ablation (0.5-2.0).
    - num_chains = 2: two independent trees per prompt, so a group never hinges on one root path
      (the paper's G = 7 gives 2 roots + 5 branches).
    - max_children = 2: binary forks, so each fork adds one leaf and the leaves are spread over as many
      distinct uncertain positions as possible.
    - max_forks = 0 (no limit besides the leaf budget): with binary forks a prompt forks G - M times.
    When and where forks happen: `fork_rule`. tau = inf forks nothing and is flat sampling, token for token.

    What the leaves are: each token is drawn from pi given its prefix (log-probs exact), but the
    leaves are neither independent nor distributed as G flat samples. A branch at depth t exists only
    on a path that reached t, and its fork point is picked knowing the root's whole path, so tree
    leaves over-represent long responses (`benchmarks/bench_rollout.py` prints tokens per leaf, tree
    against flat). Any sampler that shares deep prefixes pays some of this.

    kv_budget bounds the cache; it changes the schedule (which groups decode at once, which are swapped
    out), never the tokens.
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
    kv_budget: int | None = None
    """most cached token positions, counted in whole pages and one scratch page (None = every group at once at its
    longest); rows share their prompt's and their root's pages. `default_kv_budget` derives one from free GPU memory"""
    page_size: int = 128
    """cache positions per page: a row holds its positions in pages of this size (the last one partly filled)"""
    compile: bool = False
    """run the decode step's forward under torch.compile (mode reduce-overhead, i.e. CUDA graphs, on CUDA)"""


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
    start when their root ends, so it takes more steps than a flat batch of the same leaves)"""
    parent: torch.Tensor | None = None
    """[B] long, tree: the row this leaf branched off (-1 for a root chain or a fresh chain)"""
    branch_pos: torch.Tensor | None = None
    """[B] long, tree: response position of the leaf's first own token (0 for a root chain)"""
    forks_made: torch.Tensor | None = None
    """[P] long, tree: forks made per prompt (0 for flat)"""
    peak_kv_tokens: int = 0
    """most cache positions held at once: pages in use x page_size, a shared page counted once (< kv_capacity)"""
    kv_capacity: int = 0
    """cache positions allocated: pages x page_size, the scratch page included; <= cfg.kv_budget when one is set"""
    kv_traffic: dict = field(default_factory=dict)
    """cache positions written or copied, by kind: prefill (written by prompt prefills, padding included), decode
    (one per computed slot and step, idle slots included), copy (the shared part of a page a row copies before
    writing into it), swap (positions of pages copied to the host and back by preemption, both ways).
    x kv_bytes_per_position = bytes"""


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
    return _keyed_uniform(_seed_word(seed, pos.device), prompt, lane, pos)


def _seed_word(seed: int, device) -> torch.Tensor:
    """mix(seed + g) as a 0-d int64 tensor: the seed's part of every counter, computed once per call."""
    return _mix64(torch.tensor(_as_int64(seed + 0x9E3779B97F4A7C15), device=device))


def _keyed_uniform(s: torch.Tensor, prompt: torch.Tensor, lane: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """counter_uniform with the seed word s = _seed_word(seed) already computed."""
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
# The tree's fork rule (SPEC 5: TreeAdv's branching; our choice where the paper is silent)


def fork_rule(entropy: list[float], root: int, G: int, M: int, C: int, max_forks: int, tau: float
              ) -> tuple[list[tuple[int, int]], int, int]:
    """Where root chain `root` (0..M-1) of a prompt forks when it ends: ([(t, branches at t)], fresh chains,
    leaf id of its first new leaf). `entropy` is the root's H_t over its response, C = max_children.

    Dealt before sampling, the same for every prompt: the G - M leaves beyond the roots go to
    F = ceil((G - M) / (C - 1)) forks (at most max_forks), dealt round-robin to the roots, each fork
    carrying C - 1 leaves until they run out; leaves no fork can carry (max_forks) are dealt
    round-robin as fresh chains. When the root ends, it forks at its dealt number of highest-entropy
    positions with H_t > tau (ties: the earlier one), shallowest first taking C - 1 of its leaves
    each; its leaves left over (too few positions above tau) start at once as fresh chains from the
    prompt. Branches never fork again, so a tree is two levels deep: its latency is one root plus
    one branch, however many leaves it has.

    Why a fixed deal (the rule before it gave an ending row a share of the prompt's unspent leaves over
    the rows still open): which rows are open at a given moment depends on the schedule, and so on
    kv_budget; a deal depends on the root's own tokens only.
    """
    forks, leaves, extra = [0] * M, [0] * M, G - M
    n_forks = -(-extra // (C - 1))
    for i in range(min(n_forks, max_forks) if max_forks else n_forks):
        forks[i % M] += 1
        leaves[i % M] += min(C - 1, extra - sum(leaves))
    for i in range(extra - sum(leaves)):
        leaves[i % M] += 1
    top = sorted((t for t, h in enumerate(entropy) if h > tau), key=lambda t: (-entropy[t], t))[:forks[root]]
    plan, left = [], leaves[root]
    for t in sorted(top):
        if left:
            plan.append((t, min(C - 1, left)))
            left -= plan[-1][1]
    return plan, left, M + sum(leaves[:root])


# ----------------------------------------------------------------------------------------------
# The sampler: prefill -> admit -> decode -> record -> fork -> assemble


@torch.no_grad()
def sample(model, prompts: list[list[int]], group_size: int, cfg: SamplingConfig, *,
           eos_token_ids: list[int] | int, pad_token_id: int, seed: int = 0,
           prompt_keys: list[int] | None = None) -> Rollout:
    """Sample G responses (flat) or G leaves (tree) for each prompt. See the module and SamplingConfig docs.

    prompt_keys: the integer each prompt's randomness is keyed by (default 0..P-1). train.py passes a
    prompt's position in the whole step, so 1 or 8 ranks sample the same responses.

    The loop: admit groups while the cache has pages for them (prefill a waiting prompt, or swap a preempted
    group back in), give every row the page its next position needs (a fresh one, or a private copy of a
    page it shares), decode one token for every row in flight (recorded on the device), then retire the
    rows that ended: a tree root forks (`fork_rule`), its branches start at once on the root's pages.
    """
    eos = _check_sample_args(model, prompts, group_size, cfg, eos_token_ids, pad_token_id, prompt_keys)
    eng = _Engine.create(model, prompts, group_size, cfg, eos, pad_token_id, seed, prompt_keys)
    with _paged_attention(model):
        while True:
            _admit(eng)
            if not eng.rows:
                break
            _grow(eng)
            for s in _decode_step(eng):
                _retire(eng, s)
    return _assemble(eng)


@dataclass
class _Engine:
    """One sample() call: the paged cache and per-slot tensors on the device, the schedule on the host.

    A row (a leaf being decoded) sits in a slot (its row of the decode batch) and owns a page table: the
    pages holding its positions 0, 1, ... in blocks of `page`. Rows share pages (a group's prompt, a root's
    prefix under its branches); `ref` counts the tables holding each page, and a row copies a shared page
    before it writes into it. A group (a prompt's rows) is in flight, waiting to be prefilled, or swapped
    out to host memory.
    """

    model: torch.nn.Module
    cfg: SamplingConfig
    prompts: list[list[int]]
    G: int
    M: int  # rows a prompt starts with: G (flat), num_chains (tree)
    C: int  # draws per row and step: its own token + C - 1 fork alternatives
    page: int  # positions per page
    pad: int
    seed_word: torch.Tensor  # 0-d int64
    keys: torch.Tensor  # [P + 1] long: prompt keys (the last for idle slots)
    eos: torch.Tensor  # [E] long
    K: list[torch.Tensor]  # per layer [N + 1, Hkv, page, D], compute dtype; page N: scratch for idle slots, never read
    V: list[torch.Tensor]
    # outputs by leaf, row B the scratch row of idle slots: tokens, logprobs, entropy [B+1, Tmax];
    # alt_tok, alt_lp [B+1, Tmax, C-1] (fork alternatives); finished [B+1]
    out: dict[str, torch.Tensor]
    # the device's copy of the schedule. Per slot, slot S meaning "no row": leaf, t, tp [S+1] long, live [S+1] bool,
    # pages [S+1, J] (the slot's page table). Per page: j [N+1] (its block of positions), reader [N+1, G] (the slot
    # of the row in each lane of its group that reads it, S if none)
    dev: dict[str, torch.Tensor]
    forward: object  # _forward, or its torch.compile'd twin
    live: list[int] = field(default_factory=list)  # the slots the last step computed
    idx: torch.Tensor | None = None  # and their indices on the device
    rows: dict[int, list[int]] = field(default_factory=dict)  # slot -> [leaf, response position it samples next]
    table: dict[int, list[int]] = field(default_factory=dict)  # leaf in flight -> its pages
    ref: list[int] = field(default_factory=list)  # per page: tables holding it (0 = free)
    free_pages: list[int] = field(default_factory=list)  # heaps: the lowest first
    free_slots: list[int] = field(default_factory=list)
    top: int = 0  # pages [0, top) hold every page in use: the range an eager step reads
    shared: set = field(default_factory=set)  # pages held by more than one table
    shared_at: tuple = (None, None)  # the shared set the last eager step used, and its indices on the device
    waiting: collections.deque = field(default_factory=collections.deque)  # prompts not yet prefilled
    swapped: dict = field(default_factory=dict)  # group -> (its pages on the host, [(leaf, t, table as page indices)])
    updates: dict[str, dict] = field(default_factory=dict)  # device tensor -> {index: value} not yet on the device
    length: list[int] = field(default_factory=list)  # per leaf: tokens sampled
    parent: list[int] = field(default_factory=list)
    branch_pos: list[int] = field(default_factory=list)
    forks: list[int] = field(default_factory=list)  # per prompt
    first_eos: list[list[bool]] = field(default_factory=list)  # per prompt and lane: the prefill's token is EOS
    steps: int = 0
    decoded: int = 0
    peak: int = 0  # pages in use
    traffic: dict = field(default_factory=lambda: dict(prefill=0, decode=0, copy=0, swap=0))

    @property
    def tree(self) -> bool:
        return self.C > 1

    @property
    def S(self) -> int:
        """Slots (rows of the decode batch); index S in the device's tensors means no row."""
        return len(self.dev["live"]) - 1

    @classmethod
    def create(cls, model, prompts, G, cfg, eos, pad, seed, prompt_keys) -> "_Engine":
        P, Tmax, B, page = len(prompts), cfg.max_new_tokens, len(prompts) * G, cfg.page_size
        device = next(model.parameters()).device
        tree = cfg.sampler == "tree" and not math.isinf(cfg.tau)  # tau = inf never forks: all G start at once
        L = max(map(len, prompts)) + Tmax
        N = sum(group_pages(len(q), G, Tmax, page) for q in prompts) if cfg.kv_budget is None else \
            cfg.kv_budget // page - 1  # usable pages; one more is the scratch page
        C = cfg.max_children if tree else 1
        keys = list(prompt_keys) if prompt_keys is not None else list(range(P))
        t = model.config.get_text_config()
        Hkv, D = t.num_key_value_heads, getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        dtype = _cache_dtype(model, device)
        # zeros, not empty: attention multiplies masked positions by 0, and 0 * NaN garbage would be NaN
        K = [torch.zeros(N + 1, Hkv, page, D, dtype=dtype, device=device) for _ in range(t.num_hidden_layers)]
        V = [torch.zeros(N + 1, Hkv, page, D, dtype=dtype, device=device) for _ in range(t.num_hidden_layers)]
        if cfg.compile:  # the same tensors every step: CUDA graphs write them in place instead of copying them in
            for x in K + V:
                torch._dynamo.mark_static_address(x)
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        out = dict(tokens=torch.full((B + 1, Tmax), pad, dtype=torch.long, device=device),  # row B: idle slots
                   logprobs=zeros(B + 1, Tmax), entropy=zeros(B + 1, Tmax), finished=zeros(B + 1, dtype=torch.bool),
                   alt_tok=zeros(B + 1, Tmax, C - 1, dtype=torch.long), alt_lp=zeros(B + 1, Tmax, C - 1))
        S = B  # every row could be in flight: a slot costs no cache, only a row of the decode batch
        dev = dict(leaf=torch.full((S + 1,), B, dtype=torch.long, device=device), t=zeros(S + 1, dtype=torch.long),
                   tp=zeros(S + 1, dtype=torch.long), live=zeros(S + 1, dtype=torch.bool),
                   pages=torch.full((S + 1, -(-L // page)), N, dtype=torch.long, device=device),
                   j=zeros(N + 1, dtype=torch.long), reader=torch.full((N + 1, G), S, dtype=torch.long, device=device))
        eng = cls(model=model, cfg=cfg, prompts=prompts, G=G, M=cfg.num_chains if tree else G, C=C, page=page,
                  pad=pad, seed_word=_seed_word(seed, device), keys=torch.tensor(keys + [0], device=device),
                  eos=torch.tensor(eos, device=device), K=K, V=V, out=out, dev=dev,
                  forward=_compiled_forward(device) if cfg.compile else _forward)
        eng.free_pages, eng.free_slots, eng.ref = list(range(N)), list(range(S)), [0] * N
        eng.waiting, eng.updates = collections.deque(range(P)), {k: {} for k in dev}
        eng.length, eng.parent, eng.branch_pos, eng.forks, eng.first_eos = [0] * B, [-1] * B, [0] * B, [0] * P, [[]] * P
        return eng


def group_pages(prompt_len: int, G: int, max_new_tokens: int, page: int) -> int:
    """The most pages one group can hold: its prompt, and for each of its G rows the positions only it
    holds (at most max_new_tokens, starting part-way into a page: one page more)."""
    return -(-prompt_len // page) + G * (-(-max_new_tokens // page) + 1)


# ----------------------------------------------------------------------------------------------
# The engine's steps


PREFILL_TOKENS = 8192
"""most prompt positions (padding included) one prefill forward runs; bounds its activations"""


def _admit(eng: _Engine) -> None:
    """Bring groups in, oldest first, while the free pages hold them and still leave a page for every row in
    flight (each may open one next step): a swapped-out group back, else waiting prompts, prefilled together.
    With no row in flight the oldest group comes in if it fits at all, which the budget check guarantees."""
    P = lambda g: _prompt_pages(eng, g)  # noqa: E731
    fits = lambda pages, rows: pages + len(eng.rows) + rows <= len(eng.free_pages)  # noqa: E731
    alone = lambda pages: not eng.rows and pages <= len(eng.free_pages)  # noqa: E731
    while eng.swapped or eng.waiting:
        if eng.swapped:  # every swapped group is older than every waiting prompt: prompts start in order
            g = min(eng.swapped)
            pages, rows = len(eng.swapped[g][0][0]), len(eng.swapped[g][1])
            if not (fits(pages, rows) or alone(pages)):
                break
            _swap_in(eng, g)
            continue
        batch = [eng.waiting[0]]
        if not (fits(P(batch[0]), eng.M) or alone(P(batch[0]))):
            break
        eng.waiting.popleft()
        while (eng.waiting and fits(sum(map(P, batch + [eng.waiting[0]])), eng.M * (len(batch) + 1))
               and (len(batch) + 1) * max(len(eng.prompts[g]) for g in [*batch, eng.waiting[0]]) <= PREFILL_TOKENS):
            batch.append(eng.waiting.popleft())
        _prefill(eng, batch)
    if not eng.rows and (eng.swapped or eng.waiting):
        raise RuntimeError(f"rollout: no group fits the {len(eng.free_pages)} free pages ({eng.cfg.kv_budget=})")


def _prefill(eng: _Engine, batch: list[int]) -> None:
    """Run prompts `batch` (right-padded, so causal attention never sees the padding) into fresh pages, draw the
    first token of all G lanes of each (C draws a lane; later fresh chains use theirs), start the first rows."""
    G, C, dev, page = eng.G, eng.C, eng.keys.device, eng.page
    plen = torch.tensor([len(eng.prompts[g]) for g in batch], device=dev)  # [b]
    Tq = int(plen.max())
    ids = torch.full((len(batch), Tq), eng.pad, dtype=torch.long, device=dev)  # [b, Tq]
    where = torch.full((len(batch), -(-Tq // page)), len(eng.ref), dtype=torch.long)  # [b, Tq/page] padding: scratch
    tables = []
    for i, g in enumerate(batch):
        ids[i, : len(eng.prompts[g])] = torch.tensor(eng.prompts[g], device=dev)
        tables.append(_alloc(eng, _prompt_pages(eng, g)))
        where[i, : len(tables[-1])] = torch.tensor(tables[-1])
    pos = torch.arange(Tq, device=dev)
    view = _PageView(eng.K, eng.V, where.to(dev).repeat_interleave(page, 1)[:, :Tq], (pos % page).expand(len(batch), Tq))
    logits = eng.model(input_ids=ids, position_ids=pos.expand(len(batch), Tq), attention_mask={"full_attention": None},
                       use_cache=False, page_kv=view, logits_to_keep=(plen - 1)[:, None]).logits[:, 0]  # [b, V]
    eng.traffic["prefill"] += len(batch) * Tq
    g_t = torch.tensor(batch, device=dev)
    lanes = (torch.arange(G, device=dev)[:, None] + (torch.arange(C, device=dev) << 32)).flatten()  # [G*C]
    tok, lp, H = _draw(eng, logits, g_t, lanes.expand(len(batch), -1), torch.zeros_like(g_t))  # [b, G*C]
    leaves = g_t[:, None] * G + torch.arange(G, device=dev)  # [b, G]
    tok, lp = tok.reshape(len(batch), G, C), lp.reshape(len(batch), G, C)
    o = eng.out
    o["tokens"][leaves, 0], o["logprobs"][leaves, 0], o["entropy"][leaves, 0] = tok[..., 0], lp[..., 0], H[:, None]
    o["alt_tok"][leaves, 0], o["alt_lp"][leaves, 0] = tok[..., 1:], lp[..., 1:]
    is_eos = torch.isin(tok[..., 0], eng.eos)  # [b, G]
    o["finished"][leaves] = is_eos
    for g, table, first_eos in zip(batch, tables, is_eos.tolist()):
        eng.first_eos[g] = first_eos
        for c in range(g * G, g * G + eng.M):
            eng.length[c] = 1
            ends = first_eos[c - g * G] or eng.cfg.max_new_tokens == 1
            for t, b in _end_leaf(eng, c) if ends else [(0, c)]:
                _start(eng, b, t, table)
        _release(eng, table)  # the prompt's pages now belong to its rows (freed if none continues)


def _grow(eng: _Engine) -> None:
    """Give every row the page its next position goes to: a fresh page when the position opens one, a private
    copy of the positions before it when the page is shared (copy on write: a branch's or a prompt's last,
    partly filled page). With no page free, the newest group in flight is swapped out (`_swap_out`) until
    one is; the oldest groups are served first, so they always progress."""
    for s in sorted(eng.rows, key=lambda s: eng.rows[s][0]):  # leaf order: the oldest group first
        if s not in eng.rows:
            continue  # its group was swapped out in this loop
        c, t = eng.rows[s]
        j, off = divmod(len(eng.prompts[c // eng.G]) + t - 1, eng.page)  # the page and offset it writes
        table = eng.table[c]
        if j < len(table) and eng.ref[table[j]] == 1:
            continue
        while not eng.free_pages:
            newest = max(b // eng.G for b, _ in eng.rows.values())
            if newest == c // eng.G and len({b // eng.G for b, _ in eng.rows.values()}) == 1:
                raise RuntimeError("rollout: one group outgrew the cache; group_pages() is wrong")
            _swap_out(eng, newest)
        if s not in eng.rows:
            continue
        new = _alloc(eng, 1)[0]
        if j < len(table):  # copy on write: the positions before `off` are the shared prefix
            for x in eng.K + eng.V:
                x[new, :, :off] = x[table[j], :, :off]
            eng.traffic["copy"] += off
            _release(eng, table[j: j + 1], c % eng.G)
            table[j] = new
        else:
            table.append(new)
        _hold(eng, s, c, [new], j)
        _release(eng, [new])  # _alloc's temporary hold: the table holds it now
    eng.peak = max(eng.peak, len(eng.ref) - len(eng.free_pages))


def _decode_step(eng: _Engine) -> list[int]:
    """One token for every row in flight: feed its last token at its own position, write that position's
    keys and values in place, draw on the device, record by index. Returns the slots whose row ended."""
    _flush(eng)
    live, dev, N = sorted(eng.rows), eng.keys.device, len(eng.ref)
    if eng.cfg.compile:  # a few fixed slot counts (S, S/2, S/4, S/8) and every page: a handful of graphs
        S = eng.S
        live = list(range(min(b for b in (S, -(-S // 2), -(-S // 4), -(-S // 8)) if b > live[-1])))
    if live != eng.live:  # the computed slots changed (a row ended or started): their indices, made on the device
        eng.live, eng.idx = live, torch.tensor(live, device=dev)
    # eager: each page scored against one reader, and only the shared pages against their other readers; compiled
    # (fixed shapes): every page against all G lanes of its group
    if not eng.cfg.compile and eng.shared != eng.shared_at[0]:
        eng.shared_at = (set(eng.shared), torch.tensor(sorted(eng.shared), dtype=torch.long, device=dev))
    while eng.top and not eng.ref[eng.top - 1]:
        eng.top -= 1
    u = N + 1 if eng.cfg.compile else eng.top
    idx, d = eng.idx, eng.dev  # [n] the slots computed
    leaf, t, live_n = d["leaf"][idx], d["t"][idx], d["live"][idx]  # [n]
    kv_len = torch.where(d["live"], d["tp"] + d["t"], 0)  # [S+1] positions each slot's row attends to, this step's too
    pos = (kv_len[idx] - 1).clamp(min=0)  # [n] where its keys go
    page = torch.where(live_n, d["pages"][idx, pos // eng.page], N)  # [n] idle slots write the scratch page
    view = _decode_view(eng.K, eng.V, page, pos % eng.page, idx, kv_len, d["j"][:u], d["reader"][:u],
                        d["pages"].shape[1], None if eng.cfg.compile else eng.shared_at[1])
    logits = eng.forward(eng.model, eng.out["tokens"][leaf, t - 1][:, None], pos[:, None], view)  # [n, V]
    G, C = eng.G, eng.C
    lanes = (leaf % G)[:, None] + (torch.arange(C, device=dev) << 32)  # [n, C]: lane 0 = the row's own token
    tok, lp, H = _draw(eng, logits, leaf // G, lanes, t)
    _record(eng, leaf, t, tok, lp, H)
    ended = live_n & (torch.isin(tok[:, 0], eng.eos) | (t + 1 >= eng.cfg.max_new_tokens))  # [n]
    d["t"][idx] = t + live_n
    eng.steps += 1
    eng.decoded += len(eng.rows)
    eng.traffic["decode"] += len(idx)
    for row in eng.rows.values():
        row[1] += 1
    return [s for s in torch.where(ended, idx, -1).tolist() if s >= 0]  # the step's one device-to-host transfer


def _draw(eng: _Engine, logits: torch.Tensor, prompt: torch.Tensor, lanes: torch.Tensor, pos: torch.Tensor):
    """Tokens [n, X] for lanes [n, X] of rows of prompts [n] at response positions [n], from logits [n, V]:
    (tokens, their log-probs [n, X], the distribution's entropy [n])."""
    cfg = eng.cfg
    logp = sampling_logprobs(logits, cfg.temperature, cfg.top_p, cfg.top_k)  # [n, V] float32
    p = logp.exp()
    if cfg.temperature == 0:
        tok = logp.argmax(-1, keepdim=True).expand_as(lanes)  # greedy: every lane the argmax
    else:
        tok = inverse_cdf(p, _keyed_uniform(eng.seed_word, eng.keys[prompt][:, None], lanes, pos[:, None]))
    return tok, logp.gather(1, tok), entropy_of(logp, p)


def _record(eng: _Engine, leaf, t, tok, lp, H) -> None:
    """Store each row's token (and fork alternatives) at its position; idle slots write the scratch row B."""
    o = eng.out
    o["tokens"][leaf, t], o["logprobs"][leaf, t], o["entropy"][leaf, t] = tok[:, 0], lp[:, 0], H
    if eng.C > 1:
        o["alt_tok"][leaf, t], o["alt_lp"][leaf, t] = tok[:, 1:], lp[:, 1:]
    o["finished"][leaf] = torch.isin(tok[:, 0], eng.eos)


def _retire(eng: _Engine, s: int) -> None:
    """Slot s's row has ended: record its length, start its branches (tree root) on its pages, release them."""
    c, n = eng.rows.pop(s)
    eng.length[c] = n
    for t, b in _end_leaf(eng, c):
        _start(eng, b, t, eng.table[c])
    _release(eng, eng.table.pop(c), c % eng.G)
    _free_slot(eng, s)


def _end_leaf(eng: _Engine, c: int) -> list[tuple[int, int]]:
    """Leaf c has ended. A tree root forks (`fork_rule`): each branch gets the root's tokens before its fork
    point t and the alternative drawn at t; a branch or fresh chain that ends at once (EOS, or at
    max_new_tokens) is done, the others are returned as (t, leaf) to continue from the root's pages."""
    G, Tmax = eng.G, eng.cfg.max_new_tokens
    g, k = divmod(c, G)
    if not eng.tree or k >= eng.M:
        return []
    n, o = eng.length[c], eng.out
    # one transfer: the root's entropies and whether each fork alternative is EOS, [n, C]
    rows = torch.cat([o["entropy"][c, :n, None].double(), torch.isin(o["alt_tok"][c, :n], eng.eos).double()], 1)
    rows = rows.tolist()
    plan, fresh, nxt = fork_rule([r[0] for r in rows], k, G, eng.M, eng.C, eng.cfg.max_forks, eng.cfg.tau)
    items = []
    for t, branches in plan:
        eng.forks[g] += 1
        for j in range(branches):
            b, nxt = g * G + nxt, nxt + 1
            o["tokens"][b, :t], o["logprobs"][b, :t] = o["tokens"][c, :t], o["logprobs"][c, :t]
            o["entropy"][b, : t + 1] = o["entropy"][c, : t + 1]
            o["tokens"][b, t], o["logprobs"][b, t] = o["alt_tok"][c, t, j], o["alt_lp"][c, t, j]
            o["finished"][b] = is_eos = bool(rows[t][1 + j])
            eng.parent[b], eng.branch_pos[b], eng.length[b] = c, t, t + 1
            if not (is_eos or t + 1 >= Tmax):
                items.append((t, b))
    for b in range(g * G + nxt, g * G + nxt + fresh):  # fresh chains: their first token was drawn at prefill
        eng.length[b] = 1
        if not (eng.first_eos[g][b - g * G] or Tmax == 1):
            items.append((0, b))
    return items


# ----------------------------------------------------------------------------------------------
# Pages and slots: who holds what (host), and the device's copy of it


def _start(eng: _Engine, c: int, t: int, source: list[int]) -> None:
    """Leaf c decodes from response position t + 1 (its tokens up to t are recorded) on the pages of `source`
    that hold the prompt and its tokens before t: shared, not copied."""
    _run_row(eng, c, t + 1, source[: -(-(len(eng.prompts[c // eng.G]) + t) // eng.page)])


def _run_row(eng: _Engine, c: int, t: int, table: list[int]) -> None:
    """Leaf c takes the lowest free slot and holds `table`; it samples response position t next."""
    s = heapq.heappop(eng.free_slots)
    eng.rows[s], eng.table[c] = [c, t], list(table)
    eng.updates["leaf"][s], eng.updates["t"][s], eng.updates["live"][s] = c, t, True
    eng.updates["tp"][s] = len(eng.prompts[c // eng.G])
    _hold(eng, s, c, table, 0)


def _hold(eng: _Engine, s: int, c: int, pages: list[int], j: int) -> None:
    """The row of leaf c in slot s holds `pages` as its blocks j, j + 1, ...: counted, and read by its slot."""
    for i, p in enumerate(pages, j):
        eng.ref[p] += 1
        if eng.ref[p] == 2:
            eng.shared.add(p)
        eng.updates["pages"][s, i], eng.updates["j"][p], eng.updates["reader"][p, c % eng.G] = p, i, s


def _release(eng: _Engine, pages: list[int], lane: int | None = None) -> None:
    """A table lets go of `pages` (lane: the row's lane in its group, no longer reading them); a page no table
    holds is free."""
    for p in pages:
        eng.ref[p] -= 1
        if eng.ref[p] == 1:
            eng.shared.discard(p)
        if lane is not None:
            eng.updates["reader"][p, lane] = eng.S  # no slot
        if not eng.ref[p]:
            heapq.heappush(eng.free_pages, p)


def _prompt_pages(eng: _Engine, g: int) -> int:
    """Pages prompt g fills, the last one partly."""
    return -(-len(eng.prompts[g]) // eng.page)


def _alloc(eng: _Engine, n: int) -> list[int]:
    """n free pages, the lowest first (pages in use stay low: an eager step reads pages [0, top)). Held by no one
    yet: the caller holds them."""
    pages = [heapq.heappop(eng.free_pages) for _ in range(n)]
    for p in pages:
        eng.ref[p] += 1  # a temporary hold, dropped by the caller's _release (prefill) or taken over (_grow)
        eng.top = max(eng.top, p + 1)
    return pages


def _free_slot(eng: _Engine, s: int) -> None:
    heapq.heappush(eng.free_slots, s)
    eng.updates["leaf"][s], eng.updates["t"][s], eng.updates["live"][s] = len(eng.length), 0, False  # scratch row B


def _swap_out(eng: _Engine, g: int) -> None:
    """Preempt group g (vLLM's swap preemption, whole groups as vLLM does for parallel samples): copy every page
    its rows hold to host memory and free them and their slots. Nothing is recomputed when it returns
    (`_swap_in`), so its rows continue bit for bit where they stopped, and the tokens cannot change."""
    slots = [s for s, (c, _) in eng.rows.items() if c // eng.G == g]
    pages = sorted({p for s in slots for p in eng.table[eng.rows[s][0]]})
    index = {p: i for i, p in enumerate(pages)}
    ids = torch.tensor(pages, device=eng.keys.device)
    saved = [x[ids].to("cpu") for x in eng.K + eng.V]  # [pages, Hkv, page, D] each
    rows = []
    for s in slots:
        c, t = eng.rows.pop(s)
        rows.append((c, t, [index[p] for p in eng.table[c]]))
        _release(eng, eng.table.pop(c), c % eng.G)
        _free_slot(eng, s)
    eng.swapped[g] = (saved, rows)
    eng.traffic["swap"] += len(pages) * eng.page


def _swap_in(eng: _Engine, g: int) -> None:
    """Group g's pages back from the host into free pages (anywhere), its rows back in flight."""
    saved, rows = eng.swapped.pop(g)
    pages = _alloc(eng, len(saved[0]))
    ids = torch.tensor(pages, device=eng.keys.device)
    for x, h in zip(eng.K + eng.V, saved):
        x[ids] = h.to(x.device)
    for c, t, table in rows:
        _run_row(eng, c, t, [pages[i] for i in table])
    _release(eng, pages)
    eng.traffic["swap"] += len(pages) * eng.page


def _flush(eng: _Engine) -> None:
    """Copy the host's schedule changes to the device, one transfer per tensor that changed. Kept as dicts: an
    entry changed twice in one round is written once (index_put with repeated indices: undefined winner on CUDA)."""
    for name, changes in eng.updates.items():
        if changes:
            x, dev = eng.dev[name], eng.keys.device
            where = torch.tensor(list(changes), device=dev)
            x[where.T.unbind() if where.dim() == 2 else where] = torch.tensor(list(changes.values()), device=dev,
                                                                               dtype=x.dtype)
            changes.clear()


def _assemble(eng: _Engine) -> Rollout:
    """Rows grouped per prompt, leaves in id order; padding beyond each length."""
    dev, P, G, o = eng.keys.device, len(eng.prompts), eng.G, eng.out
    B = P * G
    plen = torch.tensor([len(q) for q in eng.prompts], device=dev)  # [P]
    Tp = int(plen.max())
    prompt_ids = torch.full((P, Tp), eng.pad, dtype=torch.long, device=dev)  # [P, Tp] left-padded
    for g, q in enumerate(eng.prompts):
        prompt_ids[g, Tp - len(q):] = torch.tensor(q, device=dev)
    prompt_mask = torch.arange(Tp, device=dev) >= (Tp - plen)[:, None]  # [P, Tp] bool
    length = torch.tensor(eng.length, device=dev)  # [B]
    T = int(length.max())
    response_mask = torch.arange(T, device=dev) < length[:, None]  # [B, T]
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
        response_ids=o["tokens"][:B, :T].masked_fill(~response_mask, eng.pad), response_mask=response_mask,
        logprobs=o["logprobs"][:B, :T] * response_mask, entropy=o["entropy"][:B, :T] * response_mask,
        group_index=torch.arange(B, device=dev) // G, finished=o["finished"][:B].clone(),
        decoded_tokens=eng.decoded, prefilled_tokens=int(plen.sum()), decode_steps=eng.steps,
        parent=torch.tensor(eng.parent, device=dev), branch_pos=torch.tensor(eng.branch_pos, device=dev),
        forks_made=torch.tensor(eng.forks, device=dev), peak_kv_tokens=eng.peak * eng.page,
        kv_capacity=eng.K[0].shape[0] * eng.page, kv_traffic=dict(eng.traffic),
    )


# ----------------------------------------------------------------------------------------------
# The paged KV cache: an attention function that writes and reads pages in place


ATTENTION_NAME = "rollout_pages"
"""the attention implementation sample() switches the model to, registered with transformers' AttentionInterface"""


@dataclass
class _PageView:
    """What one forward pass writes and reads in the cache; reaches the attention function as the model kwarg
    `page_kv` (transformers passes unknown kwargs through to it). Decode's fields come from `_decode_view`."""

    K: list[torch.Tensor]  # per layer [N + 1, Hkv, page, D]
    V: list[torch.Tensor]
    page: torch.Tensor  # [n] (decode) or [b, Tq] (prefill): the page each new position's keys go to
    offset: torch.Tensor  # the same shape: their offset in it
    # decode: the pages scored, in one or two passes: (which pages: None = the first u, or [us] indices; [u, R] the
    # batch row of each reader; [u, R, page] 0 at the positions the reader sees, -inf at the others)
    passes: list | None = None
    at: tuple | None = None  # decode: ([pairs], [pairs]) each (page, reader) pair's batch row and block, where it goes
    blocks: int = 0  # decode: J, the most pages a row holds


def _decode_view(K, V, page, offset, slots, kv_len, j, reader, blocks, shared=None) -> _PageView:
    """A decode step's view, its indices made once for all layers. slots [n]: the slot of each batch row;
    kv_len [S+1]: positions each slot's row attends to; j [u]: the block each page read holds; reader [u, G]: the slot
    reading each page by lane (S: none). shared [us]: the pages several rows read; then every page is scored against
    one reader, and the shared ones again against their other readers. shared None: every page against all G lanes.
    Batch row n stands for "no row": it reads zeros and its results are dropped."""
    n, S1, size = len(slots), len(kv_len), K[0].shape[2]
    row_of = torch.full((S1,), n, dtype=torch.long, device=slots.device)  # [S+1]
    row_of[slots] = torch.arange(n, device=slots.device)

    def scored(pages, readers, blocks_of):  # readers [p, R] slots -> a pass, and where its pairs combine
        seen = kv_len[readers] - blocks_of[:, None] * size  # [p, R] positions of the page each reader sees
        bias = torch.zeros(*seen.shape, size, device=slots.device).masked_fill(
            torch.arange(size, device=slots.device) >= seen[..., None], float("-inf"))  # [p, R, page]
        rows = row_of[readers]
        return (pages, rows, bias), (rows.flatten(), blocks_of.repeat_interleave(rows.shape[1]))

    if shared is None:
        passes = [scored(None, reader, j)]
    else:
        first, again = reader.amin(1, keepdim=True), reader[shared]  # [u, 1] one reader of each page; [us, G]
        others = torch.where(again == first[shared], S1 - 1, again)  # [us, G] the shared pages' other readers
        passes = [scored(None, first, j)] + ([scored(shared, others, j[shared])] if len(shared) else [])
    at = tuple(torch.cat(x) for x in zip(*(a for _, a in passes)))
    return _PageView(K, V, page, offset, [p for p, _ in passes], at, blocks)


def page_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, view: _PageView, scale: float) -> torch.Tensor:
    """Decode attention over pages read in place, for the n batch rows: q [n, Hkv, r, D] -> [n, Hkv, r, D].

    Flash-decoding with a page as the split: page p (block j of its rows) is scored once against the queries
    of every row that reads it, s = q k^T * scale over its valid positions, giving per (row, page) a max m_j,
    a sum l_j = sum exp(s - m_j) and an output o_j = sum exp(s - m_j) v. A row's pages combine as
        out = sum_j exp(m_j - M) o_j / sum_j exp(m_j - M) l_j,   M = max_j m_j,
    summed over j in order, so the result does not depend on where in the pool a row's pages are."""
    n, Hkv, r, D = q.shape
    qz = F.pad(q, (0, 0, 0, 0, 0, 0, 0, 1))  # [n+1, Hkv, r, D]; row n: zeros
    parts = [_page_partials(qz, *((K[: len(row)], V[: len(row)]) if pages is None else (K[pages], V[pages])), row, bias,
                            scale) for pages, row, bias in view.passes]  # a shared page's copy: its other readers' pass
    # each (page, reader) pair's o, m, l to its batch row, column j: [n+1, J, Hkv, r, D+2]; unread pairs to row n
    x = q.new_zeros(n + 1, view.blocks, Hkv, r, D + 2, dtype=torch.float32)
    x[..., D] = float("-inf")  # a block the row does not hold: m = -inf, weight 0
    x = x.index_put_(view.at, torch.cat(parts))[:n]
    oj, mj, lj = x[..., :D], x[..., D], x[..., D + 1]  # [n, J, Hkv, r(, D)]
    M = mj.amax(1, keepdim=True)
    w = torch.exp(mj - torch.where(M.isinf(), 0, M))  # [n, J, Hkv, r]; an idle slot reads nothing: all 0
    return ((oj * w[..., None]).sum(1) / (lj * w).sum(1).clamp(min=1e-30)[..., None]).to(q.dtype)


def _page_partials(qz, K, V, row, bias, scale) -> torch.Tensor:
    """Pages K, V [u, Hkv, page, D] against the queries qz[row] of their readers row [u, R]: per (page, reader) the
    output, max and sum of flash-decoding, [u*R, Hkv, r, D+2] fp32."""
    u, R = row.shape
    Hkv, r, D = qz.shape[1:]
    qp = qz[row].transpose(1, 2).reshape(u, Hkv, R * r, D)  # [u, Hkv, R*r, D] each page's readers
    s = (qp @ K.transpose(-1, -2)).float() * scale  # [u, Hkv, R*r, page]
    s = (s.unflatten(2, (R, r)) + bias[:, None, :, None]).flatten(2, 3)
    m = s.amax(-1, keepdim=True)  # [u, Hkv, R*r, 1]
    e = torch.exp(s - torch.where(m.isinf(), 0, m))  # a page a reader cannot see: all 0
    o = (e.to(V.dtype) @ V).float()  # [u, Hkv, R*r, D]
    return torch.cat([o, m, e.sum(-1, keepdim=True)], -1).unflatten(2, (R, r)).transpose(1, 2).flatten(0, 1)


def _page_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, page_kv=None,
                            **kwargs):
    """transformers' attention-function interface over our pages: query [n, H, Tq, D], key/value [n, Hkv, Tq, D]
    (rotary applied) -> ([n, Tq, H, D], None). Writes key/value into their pages (cast to the cache's dtype: under
    autocast Qwen3's k_norm returns fp32), then attends: prefill causally over the prompt, decode over the pages."""
    K, V = page_kv.K[module.layer_idx], page_kv.V[module.layer_idx]
    n, H, Tq, D = query.shape
    Hkv = key.shape[1]
    if page_kv.passes is None:  # prefill from position 0, right-padded; attention over the prompt's own keys
        K[page_kv.page, :, page_kv.offset] = key.transpose(1, 2).to(K.dtype)  # [b, Tq, Hkv, D]
        V[page_kv.page, :, page_kv.offset] = value.transpose(1, 2).to(V.dtype)
        rep = H // Hkv
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1),
                                             is_causal=True, scale=scaling)
        return out.transpose(1, 2), None
    K[page_kv.page, :, page_kv.offset] = key[:, :, 0].to(K.dtype)  # [n, Hkv, D] at each row's own position
    V[page_kv.page, :, page_kv.offset] = value[:, :, 0].to(V.dtype)
    # GQA without repeating the cache: the H / Hkv query heads that share a KV head become its query rows
    q = query.reshape(n, Hkv, H // Hkv, D).to(K.dtype)
    scale = scaling if scaling is not None else D ** -0.5
    return page_attention(q, K, V, page_kv, scale).reshape(n, 1, H, D), None


@contextlib.contextmanager
def _paged_attention(model):
    """The model attends through `_page_attention_forward` inside the block; its attention implementation is
    restored after, so training and evaluation see the model unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _page_attention_forward)
    # Never called (sample() passes attention_mask as a prepared dict, so no [n, L] mask is built); registered
    # so that set_attn_implementation accepts the name.
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *args, **kwargs: None)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _forward(model, ids: torch.Tensor, pos: torch.Tensor, view: _PageView) -> torch.Tensor:
    """The decode step's forward: ids, pos [n, 1] -> last-position logits [n, V]."""
    return model(input_ids=ids, position_ids=pos, attention_mask={"full_attention": None}, use_cache=False,
                 page_kv=view).logits[:, -1]


_COMPILED: dict = {}


def _compiled_forward(device: torch.device):
    """_forward under torch.compile, built once per process: CUDA graphs (mode reduce-overhead) on CUDA, where
    the cache's fixed address (mark_static_address) lets each replay write it in place; inductor on CPU."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in _COMPILED:
        compiled = torch.compile(_forward, mode=mode)

        def step(*args):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: its buffers may be reused
            return compiled(*args)

        _COMPILED[mode] = step
    return _COMPILED[mode]


def _cache_dtype(model, device: torch.device) -> torch.dtype:
    """The compute dtype: autocast's when it is on (fp32 master weights, bf16 compute), else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def kv_bytes_per_position(model, dtype: torch.dtype | None = None) -> int:
    """Bytes one cached token position takes: layers x (K, V) x KV heads x head_dim x dtype bytes."""
    t = model.config.get_text_config()
    D = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    dtype = dtype or _cache_dtype(model, next(model.parameters()).device)
    return t.num_hidden_layers * 2 * t.num_key_value_heads * D * dtype.itemsize


def default_kv_budget(model, rows: int, optimizer=None, fraction: float = 0.9) -> int:
    """A kv_budget (token positions) from the CUDA memory free now; call it inside the sampling context
    (autocast on, parameters gathered), where the cache dtype and the weights are what sample() will see.

    Free = what the driver has free + what PyTorch's caching allocator holds but does not use (freed
    tensors of the last update, which it hands out again). From it come off: the AdamW states still to
    come (exp_avg and exp_avg_sq, fp32, 8 bytes a parameter, allocated at the first update: counted
    while `optimizer` has no state) and the decode step's [rows, V] tensors (logits and the sampler's
    fp32 log-probs and probs, its fp64 CDF: 24 bytes an entry). `fraction` of the rest goes to the
    cache; the other 10% covers a prefill's activations (PREFILL_TOKENS positions), the allocator's
    fragmentation and, with compile, the CUDA graphs' memory pool.
    """
    device = next(model.parameters()).device
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    pending_adamw = 0
    if optimizer is not None and not optimizer.state:
        pending_adamw = 8 * sum(getattr(p, "to_local", lambda p=p: p)().numel()
                                for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
    vocab = model.config.get_text_config().vocab_size
    return kv_budget_for(free - pending_adamw, rows, vocab, kv_bytes_per_position(model), fraction)


DECODE_BYTES_PER_LOGIT = 24  # the decode step's [rows, V] tensors: logits, fp32 log-probs and probs, fp64 CDF


def kv_budget_for(free: int, rows: int, vocab: int, bytes_per_position: int, fraction: float = 0.9) -> int:
    """default_kv_budget's arithmetic, given the bytes free (AdamW's pending states already taken off):
        kv_budget = fraction x (free - 24 x rows x V) / bytes per position   (whole positions, at least 0)."""
    return max(0, int(fraction * (free - DECODE_BYTES_PER_LOGIT * rows * vocab)) // bytes_per_position)


# ----------------------------------------------------------------------------------------------
# Models: the tiny offline Qwen3, and loading anything else


def setup_device(name: str = "auto", timeout_minutes: float = 60.0) -> torch.device:
    """This process's device, and under torchrun (RANK set) its process group: NCCL on CUDA, gloo otherwise.

    name: auto (this rank's GPU, LOCAL_RANK, if CUDA is there, else the CPU) | cuda (this rank's GPU) |
    cuda:N | cpu. The timeout bounds how long a rank waits in a collective (README "How train.py runs at
    scale" says why train.py's default is an hour). train.py and evaluate.py both start here.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s)")
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        import datetime
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: auto (bf16 on CUDA, fp32 elsewhere) or one of DTYPES."""
    return DTYPES[name] if name != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32


PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # every entry point's --dtype names
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
    """A random Qwen3 sized for a laptop CPU (Qwen3's attention layout: 4 heads, 2 KV heads)."""
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


def eos_token_ids(model, tokenizer) -> list[int]:
    """Where a response ends: the tokenizer's EOS and the model's generation EOS (Qwen3: <|im_end|>, <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------------------------
# Input checks: a ValueError naming the argument, before any model work


def check_config(cfg: SamplingConfig, group_size: int, longest_prompt: int) -> None:
    """A ValueError "cfg.FIELD=VALUE: why" for every invalid setting; sample() calls it, and
    train.py calls it on its flags before anything loads (a row reserves longest_prompt + max_new_tokens)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if not isinstance(cfg.max_new_tokens, int) or not 1 <= cfg.max_new_tokens < 2**24:
        raise ValueError(f"cfg.max_new_tokens={cfg.max_new_tokens!r}: must be an int in [1, 2^24)")
    if not (isinstance(cfg.temperature, (int, float)) and math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise ValueError(f"cfg.temperature={cfg.temperature!r}: must be a finite number >= 0 (0 = greedy)")
    if not (isinstance(cfg.top_p, (int, float)) and 0 < cfg.top_p <= 1):
        raise ValueError(f"cfg.top_p={cfg.top_p!r}: must be in (0, 1]")
    if isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int) or cfg.top_k < 0:
        raise ValueError(f"cfg.top_k={cfg.top_k!r}: must be an int >= 0 (0 = off)")
    if cfg.sampler not in ("flat", "tree"):
        raise ValueError(f"cfg.sampler={cfg.sampler!r}: must be 'flat' or 'tree'")
    if not isinstance(cfg.tau, (int, float)) or math.isnan(cfg.tau) or cfg.tau < 0:
        raise ValueError(f"cfg.tau={cfg.tau!r}: must be >= 0 nats (inf = never fork)")
    if cfg.sampler == "tree":
        if cfg.temperature == 0:
            raise ValueError("cfg.temperature=0: greedy with cfg.sampler = 'tree' would repeat the argmax in every "
                             "branch; use temperature > 0 or sampler = 'flat'")
        if not isinstance(cfg.num_chains, int) or not 1 <= cfg.num_chains <= group_size:
            raise ValueError(f"cfg.num_chains={cfg.num_chains!r}: must be an int in [1, group_size={group_size}]")
        if not isinstance(cfg.max_children, int) or not 2 <= cfg.max_children <= 256:
            raise ValueError(f"cfg.max_children={cfg.max_children!r}: must be an int in [2, 256]")
        if not isinstance(cfg.max_forks, int) or cfg.max_forks < 0:
            raise ValueError(f"cfg.max_forks={cfg.max_forks!r}: must be an int >= 0 (0 = no limit)")
    if isinstance(cfg.page_size, bool) or not isinstance(cfg.page_size, int) or not 1 <= cfg.page_size <= 2**16:
        raise ValueError(f"cfg.page_size={cfg.page_size!r}: must be an int in [1, 65536]")
    need = (group_pages(longest_prompt, group_size, cfg.max_new_tokens, cfg.page_size) + 1) * cfg.page_size
    if cfg.kv_budget is not None and (isinstance(cfg.kv_budget, bool) or not isinstance(cfg.kv_budget, int)
                                      or cfg.kv_budget < need):
        raise ValueError(f"cfg.kv_budget={cfg.kv_budget!r}: cannot hold one group at its longest: the longest "
                         f"prompt ({longest_prompt}) + {group_size} rows x max_new_tokens ({cfg.max_new_tokens}), in "
                         f"pages of {cfg.page_size} (one more per row, as a row starts part-way into a page, and a "
                         f"scratch page) = {need} positions; give at least that (or None: every group at once)")
    if not isinstance(cfg.compile, bool):
        raise ValueError(f"cfg.compile={cfg.compile!r}: must be a bool")


def _check_sample_args(model, prompts, group_size, cfg: SamplingConfig, eos_token_ids, pad_token_id,
                       prompt_keys) -> list[int]:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, q in enumerate(prompts):
        if not isinstance(q, (list, tuple)) or len(q) == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
    check_config(cfg, group_size, max(map(len, prompts)))
    eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or [])
    V = model.config.get_text_config().vocab_size
    if not eos or not all(isinstance(e, int) and 0 <= e < V for e in eos):
        raise ValueError(f"eos_token_ids must be a token id or a non-empty list of ids in [0, {V}), "
                         f"got {eos_token_ids!r}")
    if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < V:
        raise ValueError(f"pad_token_id must be a token id in [0, {V}), got {pad_token_id!r}")
    n_ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for i, q in enumerate(prompts):
        if not all(isinstance(t, int) and 0 <= t < V for t in q):
            raise ValueError(f"prompts[{i}] holds an id outside [0, {V}) or a non-int")
        if n_ctx is not None and len(q) + cfg.max_new_tokens > n_ctx:
            raise ValueError(f"prompts[{i}] has {len(q)} tokens: with cfg.max_new_tokens={cfg.max_new_tokens} it "
                             f"exceeds the model's context of {n_ctx} (config.max_position_embeddings)")
    P = len(prompts)
    if prompt_keys is not None and (len(prompt_keys) != P
                                    or not all(isinstance(k, int) and k >= 0 for k in prompt_keys)):
        raise ValueError(f"prompt_keys must hold one int >= 0 per prompt ({P}), got {prompt_keys!r}")
    text = model.config.get_text_config()
    if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or []):
        raise ValueError("sample() needs full attention in every layer; sliding-window or linear-attention layers are "
                         f"not supported: config.layer_types = {text.layer_types}")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"sample() needs a model whose attention goes through transformers' AttentionInterface; "
                         f"{type(model).__name__} does not")
    return eos

