"""advantages.py: GRPO, TEMPO (P2T), HEPO, TreeAdv, TreeRL, TreePO, SPO and PPO's GAE as batched tensor functions.

SPEC 1 (GRPO; scale "group" | "batch" | "none" = Dr. GRPO), 2 (the prefix tree, read without building
a trie), 3 (TEMPO), 4 (HEPO), 5 (TreeAdv), README's table of the other tree estimators (TreeRL, TreePO,
SPO, each as its authors' code computes it), 8 (the branch diagnostics) and 9 (GAE and whitening).
trie.py computes the same numbers group by group with a dictionary trie that reads like the papers;
tests/test_advantages.py checks the two against each other; benchmarks/bench_advantages.py times them.

Layout: rows g*G .. g*G+G-1 answer prompt g (B = P*G); responses [B, T] are right-padded and the
bool `mask` [B, T] (True then False in every row) marks real tokens, so padding may hold any id.
Sums run in float64 on the input's device; every function returns float32 with zeros at padding.
Inputs are checked once, where train.py parses and builds them; these functions trust their callers.

The prefix tree without a trie (SPEC 2): for rows i, j of a group let lcp(i, j) be the length of
their longest common prefix (lcp(i, i) = len_i). Then D(s_t) on row i's path = {j : lcp(i, j) >= t}:
with row i's G lcp values sorted, D(s_t) is the sorted positions k(t) .. G-1, k(t) = #{j : lcp(i, j)
< t} (a searchsorted), so n(s_t) = G - k(t) and V(s_t) is a suffix mean of the sorted rewards. The
sorted lcp values are a `PrefixTree`, built once a step (`prefix_tree`) and passed as `tree=`. Memory
is O(B*G + B*T); nothing is B*T*T.

Departures (all from SPEC): a response's END is a child (a truncated response that is a strict prefix
of a sibling leaves at its own end); a group of one has mu = 0, sigma = 1; a group of two or more with
equal rewards gets exactly 0; TEMPO's TD term has a weight (1.0 = the paper) and an unscaled form;
scale="batch" takes sigma over the batch, mu per group (as TRL); HEPO breaks entropy ties by position.
On the trie, where the authors' trees keep sibling samples apart, identical prefixes are one node: TreePO
averages over the distinct subgroups of a path (theirs counts a subgroup again at each depth it spans)
and SPO counts each response that ends at a node as a child of its own.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

SCALES = ("group", "batch", "none")  # sigma over the group (GRPO), over the batch, or none (Dr. GRPO)


# ---- SPEC 1: GRPO, Dr. GRPO, batch-std GRPO

def _baseline(r: torch.Tensor, G: int, eps: float, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mu [B] and the divisor sigma + eps [B] (1 for scale "none") of float64 rewards r [B].

    sigma has Bessel's correction (torch.std), over the group or (scale "batch") the batch. A group
    of one has mu = 0, sigma = 1.
    """
    if G == 1:
        mu, sigma = torch.zeros_like(r), torch.ones_like(r)
    else:
        rg = r.view(-1, G)  # [P, G]
        mu = rg.mean(1).repeat_interleave(G)  # [B]
        sigma = r.std().expand_as(r) if scale == "batch" else rg.std(1).repeat_interleave(G)
    return mu, (torch.ones_like(r) if scale == "none" else sigma + eps)


def _equal_groups(r: torch.Tensor, G: int) -> torch.Tensor:
    """[B] bool: the row's group has two or more equal rewards, so its advantages are exactly 0."""
    rg = r.view(-1, G)  # [P, G]
    return ((rg == rg[:, :1]).all(1) & (G >= 2)).repeat_interleave(G)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                    scale: str = "group") -> torch.Tensor:
    """A_i = (r_i - mu) / (sigma + eps) per row [B]; scale "none" (Dr. GRPO): A_i = r_i - mu."""
    r = rewards.detach().double()
    mu, denom = _baseline(r, group_size, eps, scale)
    return ((r - mu) / denom).masked_fill(_equal_groups(r, group_size), 0.0).float()


# ---- SPEC 2: the prefix tree, read from pairwise longest common prefixes

def pairwise_lcp(responses: torch.Tensor, mask: torch.Tensor, group_size: int,
                 window: int = 64) -> torch.Tensor:
    """lcp [B, G]: lcp[i, k] = the longest common prefix of row i and row k of its group; lcp[i, i] = len_i.

    lcp(i, j) = min(first position where the ids differ, len_i, len_j), so padding ids never count.
    The G(G-1)/2 pairs i < j of each group are compared over windows [lo, lo + w), w doubling from
    `window`; a pair drops out once it has a mismatch or passed min(len_i, len_j). So the loop runs
    at most log2(T / window) + 1 times, never over tokens or rows; most pairs part in the first window.
    """
    B, T = responses.shape
    G, dev = group_size, responses.device
    lengths = mask.sum(1)  # [B]
    lcp = lengths[:, None].repeat(1, G)  # [B, G]; the diagonal stays len_i, the rest is overwritten
    if G == 1:
        return lcp
    a_loc, b_loc = torch.triu_indices(G, G, offset=1, device=dev)  # [G(G-1)/2] each, a < b
    start = torch.arange(0, B, G, device=dev)[:, None]  # [P, 1] each group's first row
    a, b = (start + a_loc).reshape(-1), (start + b_loc).reshape(-1)  # [N = P*G(G-1)/2] row ids
    bound = torch.minimum(lengths[a], lengths[b])  # [N] an lcp is no longer than either row
    pair_lcp = bound.clone()  # [N] final for the pairs that never differ before the bound
    alive = (bound > 0).nonzero().squeeze(1)  # [N_alive] pairs equal so far
    lo, w = 0, window
    while alive.numel() and lo < T:
        hi = min(T, lo + w)
        diff = responses[a[alive], lo:hi] != responses[b[alive], lo:hi]  # [N_alive, hi - lo]
        has = diff.any(1)
        first = lo + diff.to(torch.uint8).argmax(1)  # argmax returns the first mismatch
        pair_lcp[alive[has]] = torch.minimum(first[has], bound[alive[has]])
        alive = alive[~has & (bound[alive] > hi)]
        lo, w = hi, 2 * w
    lcp[a, b_loc.repeat(B // G)] = pair_lcp  # row a, b's column in the group
    lcp[b, a_loc.repeat(B // G)] = pair_lcp
    return lcp


class PrefixTree(NamedTuple):
    """Each group's prefix tree as sorted lcp values: read off, never built as a trie (`prefix_tree`)."""
    lcp_sorted: torch.Tensor  # [B, G] int64: row i's lcp(i, j) over its group's j, ascending; the last is len_i
    order: torch.Tensor  # [B, G] int64: the column j (in the group) of each sorted value

    def rows(self, index) -> PrefixTree:
        """The tree of some whole groups (`index`, e.g. a slice of rows)."""
        return PrefixTree(self.lcp_sorted[index], self.order[index])


def prefix_tree(responses: torch.Tensor, mask: torch.Tensor, group_size: int) -> PrefixTree:
    """Row i's lcp values sorted, and their columns. D(s_t) on row i's path is the sorted positions
    k(t) .. G-1, k(t) = searchsorted(lcp_sorted, t), so n(s_t) = G - k(t)."""
    assert responses.shape[0] % group_size == 0, "the batch is whole groups of group_size rows"
    return PrefixTree(*pairwise_lcp(responses, mask, group_size).sort(1))


def _sorted_like(tree: PrefixTree, x: torch.Tensor, G: int) -> torch.Tensor:
    """[B, G]: x [B] of row i's group, in the order of row i's sorted lcp values."""
    return x.view(-1, 1, G).expand(-1, G, G).reshape(-1, G).gather(1, tree.order)


def _suffix_sums(tree: PrefixTree, x: torch.Tensor, G: int) -> torch.Tensor:
    """[B, G+1]: the sum of x [B] over row i's sorted positions k .. G-1, i.e. over D(s_t) for k = k(t)."""
    x_sorted = _sorted_like(tree, x, G)  # [B, G]
    return torch.cat([x_sorted.flip(1).cumsum(1).flip(1), torch.zeros_like(x[:, None])], 1)


def _prefix_sets(tree: PrefixTree, r: torch.Tensor, G: int) -> torch.Tensor:
    """V_from [B, G+1]: V(s_t) = V_from[i, k(t)], the mean of row i's sorted rewards from position k(t) on."""
    n_from = torch.arange(G, -1, -1, device=r.device).clamp(min=1)  # [G+1] G - k; k = G only past a row's end
    return _suffix_sums(tree, r, G) / n_from


def _branches(tree: PrefixTree):
    """Row i's branch points: each distinct sorted lcp value L < len_i is a token t = L emitted at a branch
    node s_L, D(s_L) = sorted positions k(L) .. G-1, D(s_{L+1}) = k(L+1) .. G-1. Returns k(L) [B, G] (the
    first of L's ties), k(L+1) [B, G] and event [B, G] (true once per distinct L < len_i)."""
    L = tree.lcp_sorted
    k_at = torch.searchsorted(L, L)
    event = (k_at == torch.arange(L.shape[1], device=L.device)) & (L < L[:, -1:])
    return k_at, torch.searchsorted(L, L, right=True), event


def _first_holder(tree: PrefixTree, G: int) -> torch.Tensor:
    """h [B]: the longest prefix row i shares with an earlier row of its group (0 if none). Row i is the
    first (lowest index) to hold its node s_{t+1} exactly when t >= h_i."""
    earlier = tree.order < (torch.arange(tree.order.shape[0], device=tree.order.device) % G)[:, None]  # [B, G]
    return torch.where(earlier, tree.lcp_sorted, 0).amax(1)


def _k_next(tree: PrefixTree, T: int) -> torch.Tensor:
    """k(t+1) = #{j : lcp(i, j) <= t} for t = 0..T-1 [B, T]: token t's node s_{t+1} is D = positions k(t+1)..G-1."""
    t = torch.arange(1, T + 1, device=tree.lcp_sorted.device).expand(tree.lcp_sorted.shape[0], T)
    return torch.searchsorted(tree.lcp_sorted, t.contiguous())


def prefix_counts(responses: torch.Tensor, mask: torch.Tensor, group_size: int, *,
                  tree: PrefixTree | None = None) -> torch.Tensor:
    """n(s_{t+1}) [B, T] int64: the rows sharing the prefix up to and including token t; 0 at padding.

    train.py weights TreeAdv's unique-segment loss by 1/n (SPEC 5b).
    """
    tree = prefix_tree(responses, mask, group_size) if tree is None else tree
    return (group_size - _k_next(tree, responses.shape[1])).masked_fill_(~mask, 0)


# ---- SPEC 3: TEMPO

def _tempo_events(tree: PrefixTree, r: torch.Tensor, G: int, eps: float, td_weight: float, scale: str,
                  scale_td: bool):
    """TEMPO where it differs from GRPO: the tokens emitted at branch nodes.

    delta_{i,t} = V(s_{t+1}) - V(s_t) is non-zero only where D changes, i.e. at t = some lcp(i, j)
    < len_i. Each distinct sorted lcp value L < len_i of row i is such an event, with
    V(s_L) = V_from[k(L)] and V(s_{L+1}) = V_from[k(L+1)]. Returns A_i [B] (every other token's
    advantage), event [B, G] bool, its token t = lcp_sorted [B, G], and A_event [B, G].
    """
    mu, denom = _baseline(r, G, eps, scale)
    V_from, (k_at, k_after, event) = _prefix_sets(tree, r, G), _branches(tree)  # [B, G+1], [B, G] x 3
    delta = V_from.gather(1, k_after) - V_from.gather(1, k_at)  # [B, G] V(s_{L+1}) - V(s_L)
    zero = _equal_groups(r, G)  # [B]
    A_i = ((r - mu) / denom).masked_fill(zero, 0.0)  # [B]
    td = td_weight * delta / (denom[:, None] if scale_td else 1.0)  # [B, G]
    return A_i, event, tree.lcp_sorted, (A_i[:, None] + td).masked_fill(zero[:, None], 0.0)


def tempo_advantages(responses: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                     group_size: int, eps: float = 1e-6, td_weight: float = 1.0,
                     scale: str = "group", scale_td: bool = True, *,
                     tree: PrefixTree | None = None) -> torch.Tensor:
    """A_{i,t} = ((r_i - mu) + w * delta_{i,t}) / (sigma + eps), delta_{i,t} = V(s_{t+1}) - V(s_t) [B, T].

    w = td_weight (1.0 = the paper, 0.0 = GRPO); scale_td=False: A = (r_i - mu)/(sigma + eps) + w * delta
    (SPEC 8). Written as A_i on every token, then the branch events (SPEC 3's gate) written over it.
    """
    tree = prefix_tree(responses, mask, group_size) if tree is None else tree
    r = rewards.detach().double()
    A_i, event, col, A_event = _tempo_events(tree, r, group_size, eps, td_weight, scale, scale_td)
    A = torch.where(mask, A_i.float()[:, None], 0.0)  # [B, T] GRPO's broadcast
    rows, m = event.nonzero(as_tuple=True)  # events are real tokens: L < len_i
    A[rows, col[rows, m]] = A_event[rows, m].float()
    return A


# ---- SPEC 4: HEPO

def hepo_advantages(entropy: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: int,
                    rho: float = 0.2, eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """A_{i,t} = A_i * [(i, t) is among the k = floor(rho * #valid) highest-entropy valid tokens of the batch].

    Ties go to the earlier position (row-major), so the result is deterministic.
    """
    A_i = grpo_advantages(rewards, group_size, eps, scale)  # [B]
    k = math.floor(rho * int(mask.sum()))
    H = entropy.masked_fill(~mask, -math.inf).reshape(-1)  # [B*T]; padding ranks last
    top = torch.zeros_like(H, dtype=torch.bool)
    top[H.sort(descending=True, stable=True).indices[:k]] = True
    return torch.where(top.view_as(mask) & mask, A_i[:, None], 0.0)


# ---- SPEC 5: TreeAdv

def treeadv_advantages(responses: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                       group_size: int, eps: float = 1e-6, scale: str = "group", centred: bool = False, *,
                       tree: PrefixTree | None = None) -> torch.Tensor:
    """Ahat_{i,t} = (V(s_{t+1}) - mu) / (sigma + eps) [B, T]: the mean leaf advantage below token t's node.

    A token no other row shares has V(s_{t+1}) = r_i and keeps A_i. Summed over the rows that share a
    token it is the sum of their GRPO advantages (SPEC 5a). centred (the seed's reading, README):
    (Ahat - m) / (s + 1e-6), m and s (Bessel) per group over its trie's token nodes, each shared token once.
    """
    (B, T), G = responses.shape, group_size
    tree = prefix_tree(responses, mask, G) if tree is None else tree
    r = rewards.detach().double()
    mu, denom = _baseline(r, G, eps, scale)
    Ahat_from = (_prefix_sets(tree, r, G) - mu[:, None]) / denom[:, None]  # [B, G+1] per prefix set
    Ahat_from.masked_fill_(_equal_groups(r, G)[:, None], 0.0)
    if not centred:
        return Ahat_from.float().gather(1, _k_next(tree, T)).masked_fill_(~mask, 0.0)
    a = Ahat_from.gather(1, _k_next(tree, T)).view(B // G, G * T)  # [P, G*T]
    # each node once: on the first row (lowest index) of the group that holds it
    own = (mask & (torch.arange(T, device=mask.device) >= _first_holder(tree, G)[:, None])).view(B // G, G * T)
    n = own.sum(1, keepdim=True)  # [P, 1] token nodes of the group's trie
    m = torch.where(own, a, 0.0).sum(1, keepdim=True) / n.clamp(min=1)
    s = (torch.where(own, a - m, 0.0) ** 2).sum(1, keepdim=True).div((n - 1).clamp(min=1)).sqrt()
    return torch.where(mask, ((a - m) / (s + 1e-6)).view(B, T), 0.0).float()


# ---- TreeRL, TreePO, SPO: the field's other estimators on the same prefix tree (README's table). Every one
# values a prefix by the rewards below it; they differ in how that value becomes a token's advantage.

def _segment_parents(tree: PrefixTree) -> torch.Tensor:
    """A segment is a maximal run of tokens with one D: row i's segment k holds its tokens t with k(t+1) = k.
    It hangs from the branch node s_L, L = lcp_sorted[k-1] (the root for k = 0), whose D starts at sorted
    position parent [B, G] = k(L); that node's own segment (the one before, on row i's path) is parent too."""
    L = tree.lcp_sorted
    return torch.cat([torch.zeros_like(L[:, :1]), torch.searchsorted(L, L)[:, :-1]], 1)  # [B, G]


def treerl_advantages(responses: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: int, *,
                      tree: PrefixTree | None = None) -> torch.Tensor:
    """TreeRL [B, T]: c(s) = N/(N-1) (V(s) - mu) / sqrt(n(s)), c(root) = 0 (leave-one-out leaf rewards,
    "sqrt" weighting); every token of segment s gets (c(s) - c(parent)) + c(s), "local + global", no sigma.
    A local value |c(s) - c(parent)| < 1e-8 takes the previous segment's (their fill_in_paths; they skip the
    first segment, whose local value is c(s) itself and so under 1e-8 either way). A group of one gets 0.
    """
    G, T = group_size, responses.shape[1]
    tree = prefix_tree(responses, mask, G) if tree is None else tree
    r = rewards.detach().double()
    mu = _baseline(r, G, 0.0, "none")[0]  # [B]
    n = torch.arange(G, 0, -1, device=r.device)  # [G] n(s) = G - k of segment k
    c = G / max(G - 1, 1) * (_prefix_sets(tree, r, G)[:, :G] - mu[:, None]) / n.sqrt()  # [B, G]
    c[:, 0] = 0.0  # D = the whole group: V = mu, the root's c = 0 (exactly, not float noise)
    parent = _segment_parents(tree)
    local = c - c.gather(1, parent)  # [B, G]
    for k in range(1, G):  # in position order: a segment's parent sits at a smaller position
        fill = local[:, k].abs() < 1e-8
        local[:, k] = torch.where(fill, local.gather(1, parent[:, k:k + 1])[:, 0], local[:, k])
    A_from = (local + c).masked_fill(_equal_groups(r, G)[:, None], 0.0)  # [B, G] per segment
    return A_from.float().gather(1, _k_next(tree, T).clamp(max=G - 1)).masked_fill_(~mask, 0.0)


def treepo_advantages(responses: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: int, *,
                      tree: PrefixTree | None = None) -> torch.Tensor:
    """TreePO [B, T] (the "average" weighting of its released run): x_i = the mean over X of (r_i - mean_X r),
    X = the whole group and each other distinct D(s) on row i's path with two or more members; every token
    of row i gets x_i, whitened over the batch's valid tokens (verl's masked_whiten). A group of one: mean 0.
    """
    G = group_size
    tree = prefix_tree(responses, mask, G) if tree is None else tree
    r = rewards.detach().double()
    _, k_after, event = _branches(tree)
    X = event & (k_after < G - 1)  # [B, G] the D a branch point leads into, if it has two or more rows
    V_X = (_prefix_sets(tree, r, G).gather(1, k_after) * X).sum(1)  # [B] their means, summed
    x = r - (_baseline(r, G, 0.0, "none")[0] + V_X) / (1 + X.sum(1))  # [B]; mu: the whole group's mean
    return whiten(torch.where(mask, x.masked_fill(_equal_groups(r, G), 0.0)[:, None], 0.0), mask)


def spo_advantages(responses: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: int, *,
                   tree: PrefixTree | None = None) -> torch.Tensor:
    """SPO, tree form [B, T] (its "rloo"): W(s) = the mean of the children's W, each response that ends at s
    a child with W = r_i; every token of segment s gets W(s) - W(parent).

    Unrolled, W(s) = sum_j p_j r_j / sum_j p_j over j in D(s), p_j = the chance that a walk down the trie,
    picking a child uniformly at every node, ends at row j: prod over j's nodes of 1 / #children. A node on
    row i's path is s_L, L one of its lcp values; its children are the rows through it (lcp >= L) that
    are the first of their child (h <= L, `_first_holder`), every response ending there among them.
    """
    G, T = group_size, responses.shape[1]
    tree = prefix_tree(responses, mask, G) if tree is None else tree
    r, L = rewards.detach().double(), tree.lcp_sorted  # [B], [B, G]
    h = _sorted_like(tree, _first_holder(tree, G), G)  # [B, G]
    kids = ((L[:, None, :] >= L[:, :, None]) & (h[:, None, :] <= L[:, :, None])).sum(2)  # [B, G] at s_{L_k}
    once = torch.searchsorted(L, L) == torch.arange(G, device=L.device)  # [B, G] each distinct L (node) once
    p = torch.where(once, 1.0 / kids.double(), 1.0).prod(1)  # [B]
    W = _suffix_sums(tree, p * r, G)[:, :G] / _suffix_sums(tree, p, G)[:, :G]  # [B, G] W of segment k
    A_from = (W - W.gather(1, _segment_parents(tree))).masked_fill(_equal_groups(r, G)[:, None], 0.0)
    return A_from.float().gather(1, _k_next(tree, T).clamp(max=G - 1)).masked_fill_(~mask, 0.0)


# ---- SPEC 8: how much tree there was

def branch_diagnostics(responses: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: int,
                       eps: float = 1e-6, *, tree: PrefixTree | None = None) -> dict[str, float]:
    """Whether TEMPO had anything to work with this step (scale "group", w = 1):

    branch_token_frac: valid tokens emitted at a branch node / valid tokens;
    first_divergence_depth / unique_depth: the mean over rows of min / max_{j != i} lcp(i, j) (nan if G = 1);
    td_share: sum |A_tempo - A_grpo| / sum |A_tempo| over valid tokens (0 if that is 0).
    All from the branch events: off them A_tempo = A_grpo = A_i.
    """
    G = group_size
    tree = prefix_tree(responses, mask, G) if tree is None else tree
    A_i, event, L, A_event = _tempo_events(tree, rewards.detach().double(), G, eps, 1.0, "group", True)
    lengths, n_event = L[:, -1], event.sum(1)  # [B], [B]: tokens of row i at branch nodes
    n_tokens = int(lengths.sum())
    tempo_abs = float(((lengths - n_event) * A_i.abs()).sum() + (A_event.abs() * event).sum())
    td_abs = float(((A_event - A_i[:, None]).abs() * event).sum())
    # row i's own lcp len_i is its largest: min over j != i is sorted[0], max is sorted[G-2]
    first, unique = (float(L[:, c].double().mean()) if G >= 2 else math.nan for c in (0, G - 2))
    return dict(branch_token_frac=float(n_event.sum()) / n_tokens if n_tokens else 0.0,
                first_divergence_depth=first, unique_depth=unique,
                td_share=td_abs / tempo_abs if tempo_abs > 0 else 0.0)


# ---- SPEC 9: PPO's GAE from a critic's values, and the batch whitening

def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [B, T], returns R [B, T]), 0 at padding:
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l},   R_t = A_t + V_t

    r_t: `rewards` [B] on each row's last valid token (EOS, or the last of a truncated row), 0 elsewhere;
    a [B, T] `rewards` gives r_t per token. V_t = values[:, t], the critic's V(s_t); V after a row's last
    token is 0, truncated or not. With gamma = lam = 1 (verl's defaults) A_t = r_T - V_t.
    """
    m = mask.double()
    V = torch.where(mask, values.detach().double(), 0.0)  # [B, T]; padding may hold anything, even nan
    if rewards.dim() == 2:
        r = torch.where(mask, rewards.detach().double(), 0.0)  # [B, T]
    else:
        last = (mask.sum(1) - 1).clamp(min=0)  # [B]; a row without tokens is masked away below
        r = torch.zeros_like(V).scatter_(1, last[:, None], rewards.detach().double()[:, None]) * m
    delta = (r + gamma * torch.cat([V[:, 1:], torch.zeros_like(V[:, :1])], 1) - V) * m  # [B, T]
    A, A_next = torch.zeros_like(delta), torch.zeros_like(delta[:, 0])  # A_{t+1} = 0 after the last position
    for t in reversed(range(delta.shape[1])):  # A_t = delta_t + gamma lam A_{t+1}, as verl computes it
        A_next = A[:, t] = delta[:, t] + gamma * lam * A_next
    return (A * m).float(), ((A + V) * m).float()


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the batch's valid tokens, var with Bessel's correction (verl's
    masked_whiten); fewer than two valid tokens give var = 0. float32, 0 at padding."""
    v = torch.where(mask, x.detach().double(), 0.0)
    n = mask.sum()
    mean = v.sum() / n.clamp(min=1)
    var = (torch.where(mask, v - mean, 0.0) ** 2).sum() / (n - 1).clamp(min=1)
    return torch.where(mask, (v - mean) * torch.rsqrt(var + eps), 0.0).float()
