"""rollout.py: sample groups of responses from a causal LM, flat or as an entropy-forked tree (README, SPEC 5).

`sample(model, prompts, G, SamplingConfig(...))` returns a `Rollout` of P*G leaves, G per prompt:
- sampler="flat": G independent responses per prompt (GRPO, TEMPO, HEPO).
- sampler="tree": TreeAdv's entropy-driven forest. Each prompt starts M = num_chains root chains; when a root ends it
  forks at its highest-entropy positions above tau (`fork_rule`), and each branch continues from the root's cached
  prefix (never prefilled or decoded again) with its own token at the fork. A leaf comes back as its full token
  sequence (the shared prefix repeated), so trie.py and advantages.py see the sharing as it is.
The distribution is exactly softmax(logits / T) restricted to top-k, then top-p (`sampling_logprobs`); nothing of
`generate` or a shipped generation_config takes part. Randomness is counter-based (`counter_uniform`): a token is a
pure function of (seed, prompt key, leaf, position), whatever else is in the batch, the KV budget or the ranks.

Where it departs from TreeAdv, which publishes neither its fork schedule nor its defaults: each root's forks are dealt
before sampling and placed when it ends, at its highest-entropy positions (tau is a floor, not the selector), and
branches never fork again, so a tree is two levels deep. SamplingConfig's docstring has the defaults and why.

Below the banner, the decode engine (nanochat's shape: prefill a prompt once, its rows share its cache): a paged KV
cache written and read in place by an attention function registered with transformers (the model's code runs
unchanged), continuous batching with swap preemption under a KV budget, one host read per decode step. Why not
transformers' own continuous batching: benchmarks/README.md "The decode engine". Then model loading, the config
check.

Benchmarks (the engine's syncs and dispatched ops, tree vs flat, the paper-shaped case): benchmarks/bench_rollout.py.
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

    Tree defaults (TreeAdv did not publish its values; benchmarks/README.md measures tree against flat):
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
    tau = inf forks nothing and is flat sampling, token for token.

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
    """run the decode step (forward and draw) under torch.compile, dynamic shapes: compiled once per process"""


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
    """cache positions written or moved, by kind: prefill (written by prompt prefills, padding included), decode (one
    per row and step), swap (positions of pages copied to the host and back by preemption, both ways); nothing is
    copied besides. x kv_bytes_per_position = bytes"""


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
    z = z / temperature if temperature != 1 else z
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


_MIX1, _MIX2 = (_as_int64(c) for c in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


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
# The sampler: prefill a prompt once, decode its rows together, fork a tree's roots as they end


def _draw(cfg: SamplingConfig, seed_word: torch.Tensor, keys: torch.Tensor, logits: torch.Tensor, prompt: torch.Tensor,
         lanes: torch.Tensor, pos: torch.Tensor):
    """Tokens [n, X] for lanes [n, X] of rows of prompts [n] (indices into keys) at response positions [n], from
    logits [n, V]: (tokens, their log-probs [n, X], the distribution's entropy [n]). Lane 0 is a row's own token; a
    tree draws the alternatives a fork would take at the same time, from the same distribution (lanes + c << 32)."""
    logp = sampling_logprobs(logits, cfg.temperature, cfg.top_p, cfg.top_k)  # [n, V] float32
    p = logp.exp()
    if cfg.temperature == 0:
        tok = logp.argmax(-1, keepdim=True).expand_as(lanes)  # greedy: every lane the argmax
    else:
        tok = inverse_cdf(p, _keyed_uniform(seed_word, keys[prompt][:, None], lanes, pos[:, None]))
    return tok, logp.gather(1, tok), entropy_of(logp, p)


@torch.no_grad()
def sample(model, prompts: list[list[int]], group_size: int, cfg: SamplingConfig, *,
           eos_token_ids: list[int] | int, pad_token_id: int, seed: int = 0,
           prompt_keys: list[int] | None = None) -> Rollout:
    """Sample G responses (flat) or G leaves (tree) for each prompt. See the module and SamplingConfig docs.

    prompt_keys: the integer each prompt's randomness is keyed by (default 0..P-1). train.py passes a
    prompt's position in the whole step, so 1 or 8 ranks sample the same responses.

    The loop: admit groups while pages allow (prefill waiting prompts, or swap a group back in), give rows the pages
    they open, decode a token for every row, read which rows ended (the step's one wait for the device) and retire
    them: a tree root forks (`fork_rule`), its branches starting at once on its pages.
    """
    check_config(cfg, group_size, max(map(len, prompts), default=1))
    eos, text = [eos_token_ids] if isinstance(eos_token_ids, int) else [*eos_token_ids], model.config.get_text_config()
    assert prompts and all(prompts) and eos and len(prompts if prompt_keys is None else prompt_keys) == len(prompts)
    assert all(0 <= i < text.vocab_size for q in [*prompts, eos, [pad_token_id]] for i in q), "an id outside the vocab"
    assert max(map(len, prompts)) + cfg.max_new_tokens <= getattr(text, "max_position_embeddings", math.inf), "context"
    assert all(kind == "full_attention" for kind in getattr(text, "layer_types", None) or []), "full attention only"
    eng = _Engine(model, prompts, group_size, cfg, eos, pad_token_id, seed, prompt_keys)
    with _paged_attention(model):
        while eng.admit():
            eng.grow()
            eng.decode()
    return eng.assemble()


# ---- infrastructure: the decode engine ---------------------------------------------------------------------------
#
# The cache is one pool [layers, K/V, page_size, pages, KV heads, head_dim] in the compute dtype, allocated per
# sample() call, not zeroed (offset-major: the positions the rows write in one step lie together). A row (a leaf
# being decoded) holds a page table in three runs, each from the start of a page: its prompt's pages, shared by the
# group's rows; a tree branch's root's pages up to the fork, shared; its own pages, the only ones it writes. So nothing
# is ever copied; `ref` counts the tables holding a page. The schedule lives on the host: a step sends the device its
# rows and the tables' changes (pinned memory, non-blocking) and reads back one small tensor, which rows drew EOS and
# what a tree's forks need. That read is the step's one wait for the device.

PREFILL_TOKENS = 8192
"""most prompt positions (padding included) one prefill forward runs; bounds its activations"""


def group_pages(prompt_len: int, G: int, max_new_tokens: int, page: int) -> int:
    """A bound on the pages one group holds: its prompt's, and per row max_new_tokens and one page to spare (a row's own
    pages hold its T - 1 written positions from the start of a page: at most ceil((T - 1) / page))."""
    return -(-prompt_len // page) + G * (-(-max_new_tokens // page) + 1)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without waiting: pinned, non-blocking (the host allocator keeps the block until it is copied)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x


def _read(x: torch.Tensor) -> torch.Tensor:
    """The read that waits for the device: once a decode step and once a prefill."""
    return x.cpu()


class _Engine:
    """One sample() call. Device: the pool, the outputs, `table` [B, J] every leaf's pages. Host: the rows in flight
    `live` [n, 4] (leaf; t, the response position it samples next, from token t - 1 at cache position prompt length
    + t - 1; t0, the response positions it reads from its root, its own start there; prompt length), pages[leaf] its
    table, the groups waiting or swapped out. A step's host work is a few tensor ops over `live` and a loop over the
    rows something happens to."""

    def __init__(self, model, prompts, G, cfg, eos, pad, seed, keys):
        P, T, page, dev = len(prompts), cfg.max_new_tokens, cfg.page_size, next(model.parameters()).device
        self.model, self.cfg, self.prompts, self.G, self.page, self.pad = model, cfg, prompts, G, page, pad
        self.dev = dev
        self.tree = cfg.sampler == "tree" and not math.isinf(cfg.tau)  # tau = inf forks nothing: all G start at once
        self.M, self.C = (cfg.num_chains, cfg.max_children) if self.tree else (G, 1)
        # usable pages; page N is where a prefill's padding writes. No budget: every group at its longest, its prompt's
        # pages and per leaf the own pages of its T - 1 written positions at most
        N = cfg.kv_budget // page - 1 if cfg.kv_budget is not None else \
            sum(-(-len(q) // page) + G * -(-(T - 1) // page) for q in prompts)
        t, B, C = model.config.get_text_config(), P * G, self.C
        self.pool = torch.empty(t.num_hidden_layers, 2, page, N + 1, t.num_key_value_heads, getattr(t, "head_dim", None)
                                or t.hidden_size // t.num_attention_heads, dtype=_cache_dtype(model, dev), device=dev)
        self.slots = self.pool.flatten(0, 3)  # [layers * 2 * page * (N + 1), Hkv, D]: what the forward writes in place
        self.out = {k: torch.zeros(B, T, *shape, dtype=dtype, device=dev) for k, shape, dtype in [  # C - 1 alternatives
            ("tokens", (), torch.long), ("logprobs", (), None), ("entropy", (), None),
            ("alt_tok", (C - 1,), torch.long), ("alt_lp", (C - 1,), None)]}
        self.seed_word = _seed_word(seed, dev)
        # one entry more each (unused): compile would specialize a size of 1
        self.keys = _to_device(torch.tensor([*(keys if keys is not None else range(P)), 0]), dev)  # [P + 1]
        self.eos = _to_device(torch.tensor(eos + eos[:1]), dev)  # [E + 1]
        self.table = torch.full((B, 3 - (-max(map(len, prompts)) - T) // page), N, device=dev)  # [B, J + 3] N: none
        self.changes = {}  # (leaf, block) -> page not yet in `table` (a dict: one value an entry)
        self.live, self.joining = torch.zeros(0, 4, dtype=torch.long), []
        self.pages, self.ref, self.free = {}, [0] * N, list(range(N))  # free: a heap, the lowest first
        self.waiting, self.swapped = collections.deque(range(P)), {}
        self.length, self.finished, self.parent, self.branch_pos = [0] * B, [False] * B, [-1] * B, [0] * B
        self.forks, self.steps, self.peak = [0] * P, 0, 0
        self.hist = torch.zeros(B, T, C + 1, dtype=torch.float64) if self.tree else None  # what each step read back
        self.traffic = dict(prefill=0, decode=0, swap=0)
        self.step = _compiled_decode() if cfg.compile else _decode

    def admit(self) -> bool:
        """Bring groups in, oldest first, while the free pages hold them and a page for every row in flight: a swapped
        group back, else waiting prompts, prefilled together. With no row in flight the oldest comes in if it fits."""
        def fits(pages, rows, first):
            n = len(self._rows())
            return pages + n + rows <= len(self.free) or first and not n and pages <= len(self.free)

        while self.swapped or self.waiting:
            if self.swapped:  # every swapped group is older than every waiting prompt: prompts start in order
                g = min(self.swapped)
                if not fits(self.swapped[g][0].shape[3], len(self.swapped[g][1]), True):
                    break
                self._swap_in(g)
                continue
            batch, pages = [], 0
            while self.waiting:
                g, longest = self.waiting[0], max(len(self.prompts[h]) for h in batch + [self.waiting[0]])
                more = -(-len(self.prompts[g]) // self.page)
                if not fits(pages + more, self.M * (len(batch) + 1), not batch) or \
                        batch and (len(batch) + 1) * longest > PREFILL_TOKENS:
                    break
                batch, pages = batch + [self.waiting.popleft()], pages + more
            if not batch:
                break
            self._prefill(batch)
        assert len(self._rows()) or not (self.swapped or self.waiting), "no group fits: check_config's floor is wrong"
        return len(self.live) > 0

    def grow(self) -> None:
        """Give each row whose next position opens one of its own pages a fresh page. With none free, the newest group
        is swapped out until one is: the oldest groups are served first, so they always progress."""
        live, G = self._rows(), self.G
        for c in sorted(live[(live[:, 1] - 1 - live[:, 2]) % self.page == 0, 0].tolist()):  # leaf order: oldest first
            while not self.free:
                newest = int(self.live[:, 0].max()) // G
                assert newest > c // G or int(self.live[:, 0].min()) // G < newest, "a group outgrew group_pages()"
                self._swap_out(newest)
            if c in self.pages:  # not swapped out in this loop
                new = self._take(1)[0]  # the row's: _take's hold is its
                self.changes[c, len(self.pages[c])] = new
                self.pages[c].append(new)

    def decode(self) -> None:
        """One token for every row in flight (`_decode`), then the step's read: which rows drew EOS (and for a tree
        what a root's forks need: the entropies, the alternatives' EOS). Ended rows retire (`_end`)."""
        live, T = self._rows(), self.cfg.max_new_tokens
        if self.changes:  # one copy; a dict, as index_put with a repeated index has no defined winner on CUDA
            ch = _to_device(torch.tensor([[c, j, p] for (c, j), p in self.changes.items()]), self.dev)  # [k, 3]
            self.table[ch[:, 0], ch[:, 1]] = ch[:, 2]
            self.changes.clear()
        meta = live  # [n, 4] leaf, t, t0, prompt length
        if self.cfg.compile and len(meta) == 1:
            meta = meta.repeat(2, 1)  # compile would specialize a size of 1: the lone row twice (the same writes)
        L = int((live[:, 1] + live[:, 3]).max())  # the most positions a row reads
        flags = _read(self.step(self.model, self.slots, self.out, self.table, _to_device(meta, self.dev), L, self.page,
                                len(self.ref) + 1, self.cfg, self.G, self.seed_word, self.keys, self.eos))[: len(live)]
        self.steps += 1
        self.traffic["decode"] += len(live)
        if self.tree:
            self.hist[live[:, 0], live[:, 1]] = flags
        ended = (flags[:, 0] > 0) | (live[:, 1] + 1 >= T)
        self.live = live[~ended]
        self.live[:, 1] += 1
        for c, t, _, _, eos in torch.cat([live, flags[:, :1].long()], 1)[ended].tolist():
            self._end(c, t + 1, eos > 0, self.pages[c])
            self._drop(self.pages.pop(c))

    def _prefill(self, batch: list[int]) -> None:
        """Prompts `batch` into fresh pages (right-padded: causal attention never sees the padding, which writes the
        scratch page); the first token of all G lanes of each (a fresh chain started later uses its lane's); the
        first M rows start. One read: the draws' EOS flags."""
        G, C, page, N, b, dev = self.G, self.C, self.page, len(self.ref), len(batch), self.dev
        plen = [len(self.prompts[g]) for g in batch]
        Tq, tables = max(plen), [self._take(-(-n // page)) for n in plen]
        ids = [self.prompts[g] + [self.pad] * (Tq - n) for g, n in zip(batch, plen)]
        slots = [[(tab[x // page] if x < n else N) + x % page * (N + 1) for x in range(Tq)]
                 for tab, n in zip(tables, plen)]
        x = _to_device(torch.tensor([ids, slots]), dev)  # [2, b, Tq] token ids, each position's slot
        g_t, last = _to_device(torch.tensor([batch, [n - 1 for n in plen]]), dev)  # [b] each
        logits = self.model(input_ids=x[0], position_ids=torch.arange(Tq, device=dev).expand(b, Tq), use_cache=False,
                            attention_mask={"full_attention": None},
                            page_kv=_View(self.slots, page * (N + 1), torch.stack((x[1], x[1] + page * (N + 1)))),
                            logits_to_keep=last[:, None]).logits[:, 0]  # [b, V] at each prompt's last position
        self.traffic["prefill"] += b * Tq
        lanes = (torch.arange(G, device=dev)[:, None] + (torch.arange(C, device=dev) << 32)).flatten()  # [G*C]
        tok, lp, H = _draw(self.cfg, self.seed_word, self.keys, logits, g_t, lanes.expand(b, -1), torch.zeros_like(g_t))
        leaves, o = g_t[:, None] * G + torch.arange(G, device=dev), self.out  # [b, G]
        tok, lp = tok.view(b, G, C), lp.view(b, G, C)
        o["tokens"][leaves, 0], o["logprobs"][leaves, 0], o["entropy"][leaves, 0] = tok[..., 0], lp[..., 0], H[:, None]
        o["alt_tok"][leaves, 0], o["alt_lp"][leaves, 0] = tok[..., 1:], lp[..., 1:]
        flags = _read(torch.cat([torch.isin(tok, self.eos).flatten(1).double(), H[:, None].double()], 1))  # [b, G*C+1]
        if self.tree:  # each lane's C draws EOS?, the entropy
            self.hist[torch.tensor(batch)[:, None] * G + torch.arange(G), 0] = torch.cat(
                [flags[:, :-1].view(b, G, C), flags[:, None, -1:].expand(b, G, 1)], 2)
        for g, tab, f in zip(batch, tables, flags.tolist()):
            for c, eos in zip(range(g * G, g * G + self.M), f[: self.M * C: C]):
                self._end(c, 1, eos > 0, tab) if eos or self.cfg.max_new_tokens == 1 else self._start(c, 0, tab, 0)
            self._drop(tab)  # the prompt's pages now belong to its rows (free if none continues)

    def _end(self, c: int, n: int, eos: bool, pages: list[int]) -> None:
        """Leaf c ended with n tokens. A tree root forks (`fork_rule`): a branch forked at t takes the alternative drawn
        at t (its tokens before t are the root's, `assemble`); those that go on start on the root's `pages`."""
        G, T, o = self.G, self.cfg.max_new_tokens, self.out
        self.length[c], self.finished[c] = n, eos
        g, k = divmod(c, G)
        if not self.tree or k >= self.M:
            return
        plan, fresh, nxt = fork_rule(self.hist[c, :n, -1].tolist(), k, G, self.M, self.C, self.cfg.max_forks,
                                     self.cfg.tau)
        at = []  # (branch, t, alternative)
        for t, branches in plan:
            self.forks[g] += 1
            for j in range(branches):
                b, nxt = g * G + nxt, nxt + 1
                self.parent[b], self.branch_pos[b], self.length[b] = c, t, t + 1
                self.finished[b] = bool(self.hist[c, t, 1 + j])
                at.append((b, t, j))
                if not (self.finished[b] or t + 1 >= T):
                    self._start(b, t, pages, t)
        if at:
            b, t, j = _to_device(torch.tensor(at).T, self.dev)
            o["tokens"][b, t], o["logprobs"][b, t] = o["alt_tok"][c, t, j], o["alt_lp"][c, t, j]
            o["entropy"][b, t] = o["entropy"][c, t]
        for b in range(g * G + nxt, g * G + nxt + fresh):  # fresh chains: their first token was drawn at prefill
            self.length[b], self.finished[b] = 1, bool(self.hist[b, 0, 0])
            if not (self.finished[b] or T == 1):
                self._start(b, 0, pages, 0)

    def assemble(self) -> Rollout:
        """Leaves in id order, a branch's positions before its fork read from its root's row; padding past each end."""
        P, G, o, dev, pad = len(self.prompts), self.G, self.out, self.dev, self.pad
        B, T, Tp = P * G, max(self.length), max(map(len, self.prompts))
        src = torch.arange(B)[:, None].repeat(1, T)  # [B, T] the row each position is read from
        for b in (b for b, p in enumerate(self.parent) if p >= 0):
            src[b, : self.branch_pos[b]] = self.parent[b]
        at = (_to_device(src, dev), torch.arange(T, device=dev)) if self.tree else (slice(None), slice(T))
        rows = _to_device(torch.tensor([self.length, self.finished, self.parent, self.branch_pos]), dev)  # [4, B]
        prompts = torch.tensor([[pad] * (Tp - len(q)) + q for q in self.prompts])  # [P, Tp] left-padded
        plen = torch.tensor([len(q) for q in self.prompts])
        prompts = _to_device(torch.stack([prompts, torch.arange(Tp) >= Tp - plen[:, None]]), dev)  # and the mask
        mask = torch.arange(T, device=dev) < rows[0][:, None]  # [B, T]
        return Rollout(
            prompt_ids=prompts[0].repeat_interleave(G, 0), prompt_mask=prompts[1].bool().repeat_interleave(G, 0),
            response_ids=o["tokens"][at].masked_fill(~mask, pad), response_mask=mask,
            logprobs=o["logprobs"][at] * mask, entropy=o["entropy"][at] * mask,
            group_index=torch.arange(B, device=dev) // G, finished=rows[1].bool(),
            decoded_tokens=self.traffic["decode"], prefilled_tokens=sum(map(len, self.prompts)),
            decode_steps=self.steps,
            parent=rows[2], branch_pos=rows[3], forks_made=_to_device(torch.tensor(self.forks), dev),
            peak_kv_tokens=self.peak * self.page, kv_capacity=self.pool.shape[3] * self.page,
            kv_traffic=dict(self.traffic))

    def _rows(self) -> torch.Tensor:  # the rows in flight, those that joined since the last call included
        if self.joining:
            self.live, self.joining = torch.cat([self.live, torch.tensor(self.joining)]), []
        return self.live

    def _take(self, n: int) -> list[int]:  # n free pages, the lowest first, held by the caller until it drops them
        pages = [heapq.heappop(self.free) for _ in range(n)]
        for p in pages:
            self.ref[p] = 1
        self.peak = max(self.peak, len(self.ref) - len(self.free))
        return pages

    def _hold(self, c: int, pages: list[int]) -> None:  # leaf c's row holds `pages` as its page table
        self.pages[c] = list(pages)
        for i, p in enumerate(pages):
            self.ref[p] += 1
            self.changes[c, i] = p

    def _drop(self, pages: list[int]) -> None:  # a table or a caller lets go of `pages`; one no one holds is free
        for p in pages:
            self.ref[p] -= 1
            if not self.ref[p]:
                heapq.heappush(self.free, p)

    def _start(self, c: int, t: int, pages: list[int], t0: int) -> None:
        """Leaf c, its tokens up to response position t recorded, decodes from t + 1, reading its prompt and its
        first t0 response positions from `pages` (its prompt's, then its root's own): shared, not copied."""
        plen = len(self.prompts[c // self.G])
        self.joining.append([c, t + 1, t0, plen])
        self._hold(c, pages[: -(-plen // self.page) - (-t0 // self.page)])

    def _swap_out(self, g: int) -> None:
        """Preempt group g (vLLM's swap, whole groups): its pages to pinned host memory without waiting (only a later
        copy on the same stream reads them), its rows out of flight; `_swap_in` brings them back bit for bit."""
        live = self._rows()
        mine = live[:, 0] // self.G == g
        self.live, rows = live[~mine], [(row, self.pages.pop(row[0])) for row in live[mine].tolist()]
        pages = sorted({p for _, ps in rows for p in ps})
        x = self.pool[:, :, :, _to_device(torch.tensor(pages), self.dev)]  # [layers, 2, page, pages, Hkv, D]
        self.swapped[g] = (torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda).copy_(x, non_blocking=True),
                           [(row, [pages.index(p) for p in ps]) for row, ps in rows])
        for _, ps in rows:
            self._drop(ps)
        self.traffic["swap"] += len(pages) * self.page

    def _swap_in(self, g: int) -> None:
        saved, rows = self.swapped.pop(g)
        pages = self._take(saved.shape[3])
        self.pool[:, :, :, _to_device(torch.tensor(pages), self.dev)] = _to_device(saved, self.dev)
        for row, idx in rows:
            self.joining.append(row)
            self._hold(row[0], [pages[i] for i in idx])
        self._drop(pages)
        self.traffic["swap"] += len(pages) * self.page


def _decode(model, slots, out, table, meta, L: int, page: int, width: int, cfg: SamplingConfig, G: int, seed_word,
            keys, eos):
    """The decode step on the device (compiled whole with cfg.compile). meta [n, 4]: per row its leaf, the response
    position t it samples, t0 (its own positions start there), its prompt length; L: the most positions a row reads;
    table [B, J]: every leaf's pages; slots: the pool [layers * 2 * page * width, Hkv, D] (width = N + 1 pages), passed
    whole so that the compiled step writes it in place. Writes each row's key and value, draws and records by leaf.
    Returns [n, C + 1] float64: each draw's EOS, the entropy."""
    leaf, t, t0, plen = (x[:, None] for x in meta.unbind(1))  # [n, 1] each
    at = torch.arange(L, device=meta.device)
    gap = (-plen) % page  # the prompt's last page's unused part: the next run starts a page of its own
    # each position as if each run (prompt, root's, own) started a page: v // page is its block in the table
    v = at + torch.where(at < plen, 0, torch.where(at < plen + t0, gap, gap + (-t0) % page))  # [n, L]
    seen = at < plen + t  # the positions a row attends to, its token t - 1's included
    # each position's slot in a layer's K (or V), offset x (N + 1) + page
    slot = table[leaf, (v // page).clamp(max=table.shape[1] - 1)] + v % page * width
    pos = plen + t - 1  # [n, 1] the cache position of token t - 1
    write = slot.gather(1, pos)  # [n, 1]
    mask = torch.zeros(seen.shape, dtype=slots.dtype, device=meta.device).masked_fill(~seen, float("-inf"))
    # an unseen position reads the row's newest, written first: weight 0, and never unwritten memory (0 x NaN = NaN)
    read, S = torch.where(seen, slot, write).flatten(), page * width
    view = _View(slots, S, torch.stack((write, write + S)), torch.cat((read, read + S)), mask[:, None, None])
    logits = model(input_ids=out["tokens"][leaf, t - 1], position_ids=pos, use_cache=False,
                   attention_mask={"full_attention": None}, page_kv=view).logits[:, -1]  # [n, V]
    leaf, t = leaf[:, 0], t[:, 0]
    C = out["alt_tok"].shape[2] + 1
    lanes = (leaf % G)[:, None] + (torch.arange(C, device=meta.device) << 32)  # [n, C] lane 0: the row's own token
    tok, lp, H = _draw(cfg, seed_word, keys, logits, leaf // G, lanes, t)
    out["tokens"][leaf, t], out["logprobs"][leaf, t], out["entropy"][leaf, t] = tok[:, 0], lp[:, 0], H
    if C > 1:
        out["alt_tok"][leaf, t], out["alt_lp"][leaf, t] = tok[:, 1:], lp[:, 1:]
    return torch.cat([torch.isin(tok, eos).double(), H[:, None].double()], 1)


_COMPILED = []


def _compiled_decode():
    """`_decode` under torch.compile, built once per process, dynamic shapes (rows and length vary every step) and no
    duck sizing (else rows == B at the first step becomes a guard the next step breaks). Inductor's kernels only: CUDA
    graphs would need the pool at one address for the whole run."""
    if not _COMPILED:
        no_duck = torch.fx.experimental._config.patch(use_duck_shape=False)
        _COMPILED.append(no_duck(torch.compile(_decode, dynamic=True)))
    return _COMPILED[0]


@dataclass
class _View:
    """What one forward writes and reads in the pool, a position named by its slot, offset x (N + 1) + page, in a
    layer's pool seen as one axis; reaches `_attend` as the model kwarg page_kv (transformers passes kwargs through)."""

    pool: torch.Tensor  # [layers * 2 * S, Hkv, D]: layer l's K at slots 2lS + s, its V at (2l + 1)S + s
    slots: int  # S = page * (N + 1), the slots of one layer's K (or V)
    write: torch.Tensor  # [2, n, Tq] the slots each new position's key and value go to (from the layer's start)
    read: torch.Tensor | None = None  # decode: [2 * n * L] the slots of each row's keys 0 .. L - 1, then its values
    mask: torch.Tensor | None = None  # decode: [n, 1, 1, L] 0 where the row attends, -inf elsewhere


def _attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, page_kv=None, **kwargs):
    """transformers' attention interface over the pool: query [n, H, Tq, D], key/value [n, Hkv, Tq, D] (rotary applied)
    -> ([n, Tq, H, D], None). Writes key/value into their slots (in the cache's dtype: under autocast Qwen3's k_norm
    returns fp32), then attends: prefill causally over the prompt's own keys; decode over each row's positions,
    gathered (K and V at once) into [n, Hkv, L, D] for one SDPA call, whose kernels accumulate the scores in fp32."""
    pool, at = page_kv.pool, 2 * module.layer_idx * page_kv.slots  # where this layer's K, then V, start
    pool.index_put_((at + page_kv.write,), torch.stack((key, value)).transpose(2, 3).to(pool.dtype))  # in place
    if page_kv.read is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None
    n, H, Tq, D = query.shape
    k, v = pool.index_select(0, at + page_kv.read).unflatten(0, (2, n, -1)).transpose(2, 3)  # [n, Hkv, L, D] each
    q = query.reshape(n, k.shape[1], -1, D).to(pool.dtype)  # [n, Hkv, H / Hkv, D]: a KV head's query heads as its rows
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=page_kv.mask, scale=scaling)
    return out.reshape(n, H, Tq, D).transpose(1, 2), None


@contextlib.contextmanager
def _paged_attention(model):
    """The model attends through `_attend` inside the block (registered under the name rollout_pages with transformers'
    AttentionInterface); its attention implementation is restored after, so training sees the model unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("rollout_pages", _attend)
    # never called (sample() passes attention_mask as a prepared dict); set_attn_implementation wants the name known
    AttentionMaskInterface.register("rollout_pages", lambda *args, **kwargs: None)
    previous = model.config._attn_implementation
    model.set_attn_implementation("rollout_pages")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


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


def default_kv_budget(model, rows: int, optimizer=None, fraction: float = 0.9, *, longest: int) -> int:
    """A kv_budget (token positions) from the CUDA memory free now; call it inside the sampling context (autocast on,
    parameters gathered), where the cache dtype and the weights are what sample() will see. longest: the longest row,
    prompt + max_new_tokens.

    Free = what the driver has free + what PyTorch's caching allocator holds but does not use. From it come off what
    sampling allocates besides the cache: the AdamW states still to come (fp32 exp_avg and exp_avg_sq, 8 bytes a
    trainable parameter, while `optimizer` has no state) and autocast's copies of the weights in its dtype (made at the
    first prefill, kept until the sampling context ends: every nn.Linear weight that is wider than the compute dtype);
    then `kv_budget_for`. The rest of 1 - fraction covers a prefill's activations (PREFILL_TOKENS positions) and the
    allocator's fragmentation. No CUDA-graph pool: the compiled step records none.
    """
    device = next(model.parameters()).device
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    local = lambda p: getattr(p, "to_local", lambda: p)()  # noqa: E731  FSDP2's DTensor: this rank's shard
    pending_adamw = 0
    if optimizer is not None and not optimizer.state:
        pending_adamw = 8 * sum(local(p).numel() for group in optimizer.param_groups for p in group["params"]
                                if p.requires_grad)
    dtype = _cache_dtype(model, device)
    weights = {id(m.weight): local(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    copies = sum(w.numel() * dtype.itemsize for w in weights.values() if w.dtype.itemsize > dtype.itemsize)
    t = model.config.get_text_config()
    return kv_budget_for(free - pending_adamw - copies, rows, t.vocab_size, kv_bytes_per_position(model, dtype),
                         longest, t.num_hidden_layers, fraction)


DECODE_BYTES_PER_LOGIT = 24  # the decode step's [rows, V] tensors: logits, fp32 log-probs and probs, fp64 CDF


def kv_budget_for(free: int, rows: int, vocab: int, bytes_per_position: int, longest: int, layers: int,
                  fraction: float = 0.9) -> int:
    """default_kv_budget's arithmetic, given the bytes free (AdamW's pending states and autocast's copies taken off):
        kv_budget = fraction x (free - 24 x rows x V - rows x longest x bytes per position / layers)
                    / bytes per position
    (whole positions, at least 0). The third term is one layer's gathered pages in decode attention: every row at
    the longest, its pages in order, K and V."""
    gathered = rows * longest * bytes_per_position // layers
    return max(0, int(fraction * (free - DECODE_BYTES_PER_LOGIT * rows * vocab - gathered)) // bytes_per_position)


# ----------------------------------------------------------------------------------------------
# Models: the tiny offline Qwen3, and loading anything else


def setup_device(name: str = "auto", timeout_minutes: float = 60.0) -> torch.device:
    """This process's device, and under torchrun (RANK set) its process group: NCCL on CUDA, gloo otherwise.

    name: auto (this rank's GPU, LOCAL_RANK, if CUDA is there, else the CPU) | cuda (this rank's GPU) |
    cuda:N | cpu. The timeout bounds how long a rank waits in a collective: train.py's hour covers the slowest rank's
    rollout (8,192 sequential decode steps of a 1.7-4B model are minutes). train.py and evaluate.py both start here.
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
                                             timeout=datetime.timedelta(minutes=timeout_minutes),
                                             device_id=device if device.type == "cuda" else None)
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 compute on CUDA (train.py keeps fp32 weights: at lr 1e-6 an update is far below bf16's resolution), fp32
    on the CPU, where bf16 pays only from hidden 512 up. train.py and evaluate.py both use it."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # bench_rollout's --dtype names
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


def check_model_name(name: str) -> None:
    """A ValueError unless `name` is `tiny`, a saved model's directory or a hub id (owner/name); the entry points
    call it with their flags, before anything loads."""
    if name != "tiny" and not os.path.isdir(name) and ("/" not in name or name.startswith((".", "/"))):
        raise ValueError(f"--model {name!r}: no such directory, and not a hub id of the form owner/name")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if os.path.isdir(name) and not (os.path.isfile(os.path.join(name, "config.json"))
                                    and any(os.path.isfile(os.path.join(name, f)) for f in tokenizer_files)):
        raise ValueError(f"--model {name!r}: not a saved model: a model directory holds config.json, the weights "
                         "and the tokenizer's files (tokenizer.json or tokenizer_config.json)")


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
    check_model_name(name)
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
# The config check: a ValueError naming the field, before any model work


def check_config(cfg: SamplingConfig, group_size: int, longest_prompt: int) -> None:
    """A ValueError "cfg.FIELD=VALUE: why" for the first invalid setting; sample() calls it, and train.py calls it on
    its flags before anything loads (a row reserves longest_prompt + max_new_tokens)."""
    def integer(lo, hi=math.inf):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def number(lo, hi=math.inf):  # NaN compares false: refused
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi

    if not integer(1)(group_size):
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    tree = cfg.sampler == "tree"
    for name, ok, why in [
        ("max_new_tokens", integer(1, 2**24 - 1), "an int in [1, 2^24)"),
        ("temperature", lambda v: number(0)(v) and math.isfinite(v) and (v > 0 or not tree),
         "a finite number >= 0 (0 = greedy), > 0 for sampler 'tree' (greedy branches would all repeat the argmax)"),
        ("top_p", lambda v: number(0, 1)(v) and v > 0, "in (0, 1]"),
        ("top_k", integer(0), "an int >= 0 (0 = off)"),
        ("sampler", lambda v: v in ("flat", "tree"), "'flat' or 'tree'"),
        ("tau", number(0), ">= 0 nats (inf = never fork)"),
        ("num_chains", lambda v: not tree or integer(1, group_size)(v), f"an int in [1, group_size={group_size}]"),
        ("max_children", lambda v: not tree or integer(2, 256)(v), "an int in [2, 256]"),
        ("max_forks", lambda v: not tree or integer(0)(v), "an int >= 0 (0 = no limit)"),
        ("page_size", integer(1, 2**16), "an int in [1, 65536]"),
        ("compile", lambda v: isinstance(v, bool), "a bool"),
    ]:
        if not ok(getattr(cfg, name)):
            raise ValueError(f"cfg.{name}={getattr(cfg, name)!r}: must be {why}")
    need = (group_pages(longest_prompt, group_size, cfg.max_new_tokens, cfg.page_size) + 1) * cfg.page_size
    if cfg.kv_budget is not None and not integer(need)(cfg.kv_budget):
        raise ValueError(f"cfg.kv_budget={cfg.kv_budget!r}: cannot hold one group at its longest: the longest "
                         f"prompt ({longest_prompt}) + {group_size} rows x max_new_tokens ({cfg.max_new_tokens}), in "
                         f"pages of {cfg.page_size} (one more per row, as a row starts part-way into a page, and a "
                         f"scratch page) = {need} positions; give at least that (or None: every group at once)")
