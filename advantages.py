"""advantages.py: GRPO, Dr. GRPO, TEMPO (P2T), TreeAdv and HEPO advantages as batched tensor functions.

Implements SPEC sections 1 (GRPO; scale "group" | "batch" | "none" = Dr. GRPO), 2 (the prefix tree,
without building a trie), 3 (TEMPO), 4 (HEPO), 5 (TreeAdv redistribution), 9 (PPO's GAE from a critic's
values, and the batch whitening) and the SPEC 8 diagnostics.
`trie.py` computes the same numbers with a dictionary trie that reads like the paper; the tests
check the two against each other and against a third, loop-by-loop reading of the SPEC.

Layout: rows g*G .. g*G+G-1 answer prompt g (B = P*G); responses [B, T] are right-padded and
`mask` [B, T] (bool, a prefix mask per row) marks real tokens, so padding may hold any id. Every
function runs on the input's device, accumulates in float64 (float32 on MPS, which has none) and
returns float32 with zeros at padding.

How the tree is read without building a trie (SPEC 2): for two rows i, j of a group let lcp(i, j) be
the length of their longest common prefix (at most either row's length; lcp(i, i) = len_i). Then
D(s_t) on row i's path is {j : lcp(i, j) >= t}. Sorting row i's G lcp values ascending, the
members of D(s_t) are the sorted positions k(t) .. G-1 with k(t) = #{j : lcp(i, j) < t} (a
searchsorted), so n(s_t) = G - k(t) and the reward sum of D(s_t) is a suffix sum over the sorted
rewards. TEMPO needs V only where it changes: delta_{i,t} != 0 only at t = some lcp(i, j) < len_i
(SPEC 3's branch gate), at most G - 1 places a row, so it writes A_i everywhere and overwrites
those. TreeAdv and prefix_counts read k(t) for every token (one searchsorted over [B, T]). lcp values
are found by comparing the G(G-1)/2 pairs of each group over windows of doubling width that stop once
every pair has diverged: a loop of at most log2(T) steps, never over tokens or rows. Memory is
O(B*G + B*T); nothing is B*T*T or B*B*T. The sorted lcp values and their columns are a `PrefixTree`:
`prefix_tree` builds it once, and TEMPO, TreeAdv, prefix_counts and the diagnostics take it as `tree=`
(train.py builds one a step and passes it to all four).

Departures from the papers (all from SPEC): the END of a response counts as a child (a truncated
response that is a strict prefix of a sibling leaves at its own end); a group of one has mu = 0 and
sigma = 1 under every scale; a group of two or more with equal rewards gets exactly 0 everywhere;
TEMPO's TD term has a weight (1.0 = the paper) and an unscaled form (scale_td=False, SPEC 8);
scale="batch" takes sigma over the whole batch and keeps mu per group (as TRL does); HEPO breaks
entropy ties by position.

Input checks (a ValueError naming the argument, before any work) sit at the bottom of the file.

Benchmark against trie.py: `python benchmarks/bench_advantages.py` (tokens/s, CPU and CUDA).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

SCALES = ("group", "batch", "none")


# ----------------------------------------------------------------------------------------------
# SPEC 1: GRPO, Dr. GRPO, batch-std GRPO


def _baseline(r: torch.Tensor, G: int, eps: float, scale: str):
    """mu [B] and denominator sigma + eps [B] for rewards r [B] (float64).

    mu = group mean, sigma = group std with Bessel's correction (torch.std); scale="batch" takes
    sigma over the whole batch, scale="none" divides by 1 (Dr. GRPO). A group of one: mu=0, sigma=1.
    """
    B = r.shape[0]
    rg = r.view(B // G, G)  # [P, G]
    if G == 1:
        mu, sigma = torch.zeros_like(r), torch.ones_like(r)
    else:
        mu = rg.mean(1).repeat_interleave(G)  # [B]
        if scale == "batch":
            sigma = r.std().expand(B)  # G >= 2, so B >= 2
        else:
            sigma = rg.std(1).repeat_interleave(G)  # [B]
    denom = torch.ones_like(r) if scale == "none" else sigma + eps
    return mu, denom


def _equal_groups(r: torch.Tensor, G: int) -> torch.Tensor:
    """[B] bool: the row's group has G >= 2 equal rewards, so every advantage is exactly 0 (SPEC 1)."""
    B = r.shape[0]
    if G == 1:
        return torch.zeros(B, dtype=torch.bool, device=r.device)
    rg = r.view(B // G, G)
    return (rg == rg[:, :1]).all(1).repeat_interleave(G)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                    scale: str = "group") -> torch.Tensor:
    """A_i = (r_i - mu) / (sigma + eps) per row [B], float32.

    scale: "group" (GRPO), "batch" (sigma over the batch, mu still per group), "none" (Dr. GRPO,
    A_i = r_i - mu). A group of one has mu = 0, sigma = 1; equal rewards give exactly 0.
    """
    r = _check_rewards(rewards, None, None)
    G = _check_group_size(group_size, r.shape[0])
    eps, scale = _check_scalar("eps", eps, 0.0), _check_scale(scale)
    mu, denom = _baseline(r, G, eps, scale)
    A = (r - mu) / denom  # [B]
    return A.masked_fill(_equal_groups(r, G), 0.0).float()


# ----------------------------------------------------------------------------------------------
# SPEC 2: the prefix tree, read from pairwise longest common prefixes


def pairwise_lcp(responses: torch.Tensor, mask: torch.Tensor, group_size: int,
                 window: int = 64) -> torch.Tensor:
    """lcp [B, G]: lcp[i, k] = longest common prefix of row i and row k of its group (lcp[i, i] = len_i).

    lcp(i, j) = min(first position where the ids differ, len_i, len_j), so padding ids never matter
    (mask is a prefix mask). Pairs i < j are compared over windows [lo, lo + w) with w doubling; a
    pair drops out once it has a mismatch or its window passed min(len_i, len_j). The first window
    is `window` wide; at most log2(T / window) + 1 steps run, most pairs diverge in the first.
    Inputs are not checked here (the public functions check them).
    """
    B, T = responses.shape
    G = group_size
    dev = responses.device
    lengths = mask.sum(1)  # [B] int64
    lcp = lengths[:, None].repeat(1, G)  # [B, G]; the diagonal lcp(i, i) = len_i, the rest overwritten
    if G == 1:
        return lcp
    a_loc, b_loc = torch.triu_indices(G, G, offset=1, device=dev)  # [G(G-1)/2] each, a < b
    start = torch.arange(0, B, G, device=dev)[:, None]  # [P, 1] first row of each group
    a = (start + a_loc).reshape(-1)  # [N = P*G(G-1)/2] global row ids
    b = (start + b_loc).reshape(-1)
    bound = torch.minimum(lengths[a], lengths[b])  # [N] lcp is no longer than either row
    pair_lcp = bound.clone()  # [N] final for pairs that never mismatch before the bound
    alive = (bound > 0).nonzero().squeeze(1)  # [N_alive] pairs equal so far
    lo, w = 0, window
    while alive.numel() and lo < T:
        hi = min(T, lo + w)
        diff = responses[a[alive], lo:hi] != responses[b[alive], lo:hi]  # [N_alive, hi - lo]
        has = diff.any(1)
        first = lo + diff.to(torch.uint8).argmax(1)  # first mismatch (argmax returns the first max)
        pair_lcp[alive[has]] = torch.minimum(first[has], bound[alive[has]])
        alive = alive[~has & (bound[alive] > hi)]
        lo, w = hi, 2 * w
    P = B // G
    lcp[a, b_loc.repeat(P)] = pair_lcp  # row a, column of b in the group
    lcp[b, a_loc.repeat(P)] = pair_lcp
    return lcp


class PrefixTree(NamedTuple):
    """Each group's prefix tree as sorted lcp values (read, never built as a trie); see `prefix_tree`."""
    lcp_sorted: torch.Tensor  # [B, G] int64: row i's lcp(i, j) over j in its group, ascending; the last is len_i
    order: torch.Tensor  # [B, G] int64: the column j (in the group) of each sorted value

    def rows(self, index) -> PrefixTree:
        """The tree of some whole groups: the same rows (`index`, e.g. a slice) of each tensor."""
        return PrefixTree(self.lcp_sorted[index], self.order[index])


def prefix_tree(responses: torch.Tensor, mask: torch.Tensor, group_size: int) -> PrefixTree:
    """Row i's G lcp values lcp(i, j) sorted ascending, and the column j of each (SPEC 2).

    D(s_t) on row i's path = {j : lcp(i, j) >= t} = the sorted positions k(t) .. G-1 with
    k(t) = #{j : lcp(i, j) < t} = searchsorted(lcp_sorted, t), so n(s_t) = G - k(t). Build it once
    and pass it as `tree=` to tempo_advantages, treeadv_advantages, prefix_counts and
    branch_diagnostics; each builds it itself when not given.
    """
    mask = _check_tokens(responses, mask)
    G = _check_group_size(group_size, responses.shape[0], "responses")
    return _tree_of(responses, mask, G, None)


def _tree_of(responses, mask, G, tree) -> PrefixTree:
    """`tree` as given (checked against these rows), or built from responses and mask (checked) when None."""
    if tree is None:
        return PrefixTree(*pairwise_lcp(responses, mask, G).sort(1))
    return _check_tree(tree, mask, G)


def _prefix_sets(tree, r, G):
    """V_from [B, G+1]: V(s_t) = V_from[i, k(t)], the mean of row i's sorted rewards from position k(t) on."""
    B = r.shape[0]
    r_rows = r.view(B // G, 1, G).expand(B // G, G, G).reshape(B, G)  # [B, G] rewards of row i's group
    r_sorted = r_rows.gather(1, tree.order)  # [B, G] in the order of tree.lcp_sorted
    suffix = r_sorted.flip(1).cumsum(1).flip(1)  # [B, G] reward sum over sorted positions k..G-1
    suffix = torch.cat([suffix, torch.zeros_like(suffix[:, :1])], 1)  # [B, G+1]
    n_from = torch.arange(G, -1, -1, device=r.device, dtype=r.dtype)  # [G+1] G - k
    return suffix / n_from.clamp(min=1)  # [B, G+1]; k = G (empty set) only past a row's end


def _k_dense(lcp_sorted: torch.Tensor, T: int) -> torch.Tensor:
    """k(t) = #{j : lcp(i, j) < t} for t = 0..T [B, T+1]."""
    t = torch.arange(T + 1, device=lcp_sorted.device).expand(lcp_sorted.shape[0], T + 1)  # [B, T+1]
    return torch.searchsorted(lcp_sorted, t.contiguous(), side="left")


def prefix_counts(responses: torch.Tensor, mask: torch.Tensor, group_size: int, *,
                  tree: PrefixTree | None = None) -> torch.Tensor:
    """n(s_{t+1}) [B, T] int64: rows of the group sharing the prefix up to and including token t.

    1 for a token no other row shares; 0 at padding. train.py weights TreeAdv's unique-segment
    loss by 1/n (SPEC 5b). `tree`: `prefix_tree` of these rows (built here when None).
    """
    mask = _check_tokens(responses, mask)
    G = _check_group_size(group_size, responses.shape[0], "responses")
    tree = _tree_of(responses, mask, G, tree)
    k_next = _k_dense(tree.lcp_sorted, responses.shape[1])[:, 1:]  # [B, T] k(t+1)
    return (G - k_next).masked_fill_(~mask, 0)  # past a row's end k = G already; the fill says so


# ----------------------------------------------------------------------------------------------
# SPEC 3: TEMPO


def _tempo_events(tree, r, G, eps, td_weight, scale, scale_td):
    """TEMPO where it differs from GRPO: the token positions emitted at branch nodes.

    delta_{i,t} = V(s_{t+1}) - V(s_t) is non-zero only where D(s_{t+1}) != D(s_t), i.e. where t equals
    some lcp(i, j) < len_i. So each of row i's sorted lcp values L (first of its ties, L < len_i)
    is a branch event at t = L with V(s_L) = V_from[k(L)] and V(s_{L+1}) = V_from[k(L+1)].
    Returns A_i [B] (float64, the advantage of every other token), event [B, G] bool, col [B, G]
    (the event's t), A_event [B, G] (float64, the advantage there). Equal-reward groups get zeros.
    """
    mu, denom = _baseline(r, G, eps, scale)
    lcp_sorted, V_from = tree.lcp_sorted, _prefix_sets(tree, r, G)  # [B, G], [B, G+1]
    k_at = torch.searchsorted(lcp_sorted, lcp_sorted, side="left")  # [B, G] k(L)
    k_after = torch.searchsorted(lcp_sorted, lcp_sorted, side="right")  # [B, G] k(L+1) = #{lcp <= L}
    delta = V_from.gather(1, k_after) - V_from.gather(1, k_at)  # [B, G] V(s_{L+1}) - V(s_L)
    lengths = lcp_sorted[:, -1:]  # [B, 1] the largest lcp is the row's own length
    first_of_ties = torch.arange(G, device=r.device) == k_at  # [B, G]
    event = first_of_ties & (lcp_sorted < lengths)  # [B, G]
    zero = _equal_groups(r, G)  # [B]
    A_i = ((r - mu) / denom).masked_fill(zero, 0.0)  # [B]
    if scale_td:
        A_event = A_i[:, None] + (td_weight * delta) / denom[:, None]  # [B, G]
    else:
        A_event = A_i[:, None] + td_weight * delta
    return A_i, event, lcp_sorted, A_event.masked_fill(zero[:, None], 0.0)


def tempo_advantages(responses: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                     group_size: int, eps: float = 1e-6, td_weight: float = 1.0,
                     scale: str = "group", scale_td: bool = True, *,
                     tree: PrefixTree | None = None) -> torch.Tensor:
    """A_{i,t} = ((r_i - mu) + w * delta_{i,t}) / (sigma + eps), delta_{i,t} = V(s_{t+1}) - V(s_t).

    [B, T] float32, zeros at padding. w = td_weight (1.0 = the paper, 0.0 = GRPO broadcast);
    scale_td=False: A = (r_i - mu)/(sigma + eps) + w * delta (the TD term unscaled, SPEC 8).
    Built as A_i on every valid token, then the branch events written in (SPEC 3's branch gate).
    `tree`: `prefix_tree` of these rows (built here when None).
    """
    mask, r, G, eps, scale = _check_batch(responses, mask, rewards, group_size, eps, scale)
    td_weight = _check_scalar("td_weight", td_weight)
    tree = _tree_of(responses, mask, G, tree)
    A_i, event, col, A_event = _tempo_events(tree, r, G, eps, td_weight, scale, bool(scale_td))
    A = torch.where(mask, A_i.float()[:, None], 0.0)  # [B, T] GRPO broadcast
    rows, m = event.nonzero(as_tuple=True)  # events are valid tokens: L < len_i
    A[rows, col[rows, m]] = A_event[rows, m].float()
    return A


# ----------------------------------------------------------------------------------------------
# SPEC 4: HEPO


def hepo_advantages(entropy: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                    group_size: int, rho: float = 0.2, eps: float = 1e-6,
                    scale: str = "group") -> torch.Tensor:
    """A_{i,t} = A_i * [token (i, t) is among the k = floor(rho * #valid) highest-entropy of the batch].

    Ties are broken by position (row-major, earlier first), so the result is deterministic.
    """
    mask, r, G, rho, eps, scale = _check_hepo(entropy, mask, rewards, group_size, rho, eps, scale)
    mu, denom = _baseline(r, G, eps, scale)
    A_i = ((r - mu) / denom).masked_fill(_equal_groups(r, G), 0.0)  # [B]
    k = math.floor(rho * int(mask.sum()))
    H = entropy.masked_fill(~mask, -math.inf).reshape(-1)  # [B*T]; padding ranks last
    top = torch.zeros_like(H, dtype=torch.bool)
    top[H.sort(descending=True, stable=True).indices[:k]] = True
    keep = top.view_as(mask) & mask  # [B, T]
    return torch.where(keep, A_i[:, None], 0.0).float()


# ----------------------------------------------------------------------------------------------
# SPEC 5: TreeAdv


def treeadv_advantages(responses: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                       group_size: int, eps: float = 1e-6, scale: str = "group", *,
                       tree: PrefixTree | None = None) -> torch.Tensor:
    """Ahat_{i,t} = (V(s_{t+1}) - mu) / (sigma + eps): the mean leaf advantage under token t's node.

    [B, T] float32, zeros at padding. A token no other row shares has V(s_{t+1}) = r_i and keeps A_i.
    Summed over the rows sharing a token this gives the sum of their GRPO advantages (SPEC 5a).
    `tree`: `prefix_tree` of these rows (built here when None).
    """
    mask, r, G, eps, scale = _check_batch(responses, mask, rewards, group_size, eps, scale)
    tree = _tree_of(responses, mask, G, tree)
    mu, denom = _baseline(r, G, eps, scale)
    V_from = _prefix_sets(tree, r, G)  # [B, G+1]
    Ahat_from = ((V_from - mu[:, None]) / denom[:, None]).float()  # [B, G+1] per prefix set
    Ahat_from.masked_fill_(_equal_groups(r, G)[:, None], 0.0)
    k_next = _k_dense(tree.lcp_sorted, responses.shape[1])[:, 1:]  # [B, T] k(t+1): D(s_{t+1})
    return Ahat_from.gather(1, k_next).masked_fill_(~mask, 0.0)


# ----------------------------------------------------------------------------------------------
# SPEC 9: PPO's GAE from a critic's values, and the batch whitening


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (SPEC 9): (A [B, T], returns R [B, T]), float32, 0 at padding.

    r_t: `rewards` [B] sits on each row's last valid token (EOS, or the last token of a truncated row)
    and is 0 elsewhere; a [B, T] `rewards` gives r_t per token instead. V_t = values[:, t] (the critic's
    V(s_t), the state before token t); V after a row's last valid token is 0, truncated row or not.
        delta_t = r_t + gamma V_{t+1} - V_t
        A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}        (over the row's valid tokens)
        R_t = A_t + V_t
    With gamma = lam = 1 (the defaults, verl's) A_t = r_T - V_t and R_t = r_T. Rows are right-padded
    (`mask` is a prefix mask); padding may hold any value.
    """
    mask, gamma, lam = _check_gae(rewards, values, mask, gamma, lam)
    acc = _acc_dtype(values.device)
    m = mask.to(acc)
    V = torch.where(mask, values.detach().to(acc), 0.0)  # [B, T]
    if isinstance(rewards, torch.Tensor) and rewards.dim() == 2:
        r = torch.where(mask, rewards.detach().to(device=values.device, dtype=acc), 0.0)  # [B, T]
    else:
        r1 = _check_rewards(rewards, values.shape[0], values.device)  # [B]
        last = (mask.sum(1) - 1).clamp(min=0)  # [B] a row without tokens gets its reward masked away below
        r = torch.zeros_like(V).scatter_(1, last[:, None], r1[:, None]) * m  # [B, T]
    V_next = torch.cat([V[:, 1:], torch.zeros_like(V[:, :1])], 1)  # [B, T]: 0 after the last valid token
    delta = (r + gamma * V_next - V) * m
    A = torch.zeros_like(delta)  # [B, T]
    A_next = torch.zeros_like(delta[:, 0])  # [B] A_{t+1}: 0 after the last position
    for t in reversed(range(delta.shape[1])):  # A_t = delta_t + gamma lam A_{t+1}, as verl computes it
        A_next = A[:, t] = delta[:, t] + gamma * lam * A_next
    A = A * m
    return A.float(), ((A + V) * m).float()


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid tokens of the whole batch, float32, 0 at padding.

    var with Bessel's correction and eps = 1e-8, as verl's masked_whiten (its PPO advantages). Fewer
    than two valid tokens: var = 0, so the result is 0.
    """
    mask = _check_prefix_mask(mask, x.device)
    acc = _acc_dtype(x.device)
    v = torch.where(mask, x.detach().to(acc), 0.0)
    n = mask.sum()
    mean = v.sum() / n.clamp(min=1)
    var = (torch.where(mask, v - mean, 0.0) ** 2).sum() / (n - 1).clamp(min=1)
    return torch.where(mask, (v - mean) * torch.rsqrt(var + eps), 0.0).float()


# ----------------------------------------------------------------------------------------------
# SPEC 8: how much tree there was


def branch_diagnostics(responses: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                       group_size: int, eps: float = 1e-6, *, tree: PrefixTree | None = None) -> dict[str, float]:
    """Per-step numbers that say whether TEMPO had anything to work with (scale "group", w = 1).

    branch_token_frac: valid tokens emitted at a branch node / valid tokens;
    first_divergence_depth: mean over rows of min_{j != i} lcp(i, j) (nan for groups of one);
    unique_depth: mean over rows of max_{j != i} lcp(i, j) (nan for groups of one);
    td_share: sum |A_tempo - A_grpo| / sum |A_tempo| over valid tokens (0 if the denominator is 0).
    All from the branch events alone: off them A_tempo = A_grpo = A_i. `tree`: `prefix_tree` of these
    rows (built here when None).
    """
    mask, r, G, eps, _ = _check_batch(responses, mask, rewards, group_size, eps, "group")
    tree = _tree_of(responses, mask, G, tree)
    A_i, event, lcp_sorted, A_event = _tempo_events(tree, r, G, eps, 1.0, "group", True)
    lengths = lcp_sorted[:, -1]  # [B]
    n_tokens = int(lengths.sum())
    n_event = event.sum(1)  # [B] tokens of row i at branch nodes
    tempo_abs = float(((lengths - n_event) * A_i.abs()).sum() + (A_event.abs() * event).sum())
    td_abs = float(((A_event - A_i[:, None]).abs() * event).sum())
    if G >= 2:
        # row i's own entry len_i is its largest lcp: min over j != i is sorted[0], max is sorted[G-2]
        first = float(lcp_sorted[:, 0].double().mean())
        unique = float(lcp_sorted[:, G - 2].double().mean())
    else:
        first = unique = float("nan")
    return dict(
        branch_token_frac=float(n_event.sum()) / n_tokens if n_tokens else 0.0,
        first_divergence_depth=first,
        unique_depth=unique,
        td_share=td_abs / tempo_abs if tempo_abs > 0 else 0.0,
    )


# ----------------------------------------------------------------------------------------------
# Input checks: every bad input is a ValueError naming the argument, before any work


def _acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums and means, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_batch(responses, mask, rewards, group_size, eps, scale):
    """The checks every tree function starts with: (mask as bool, rewards in the accumulation dtype, G, eps, scale)."""
    mask = _check_tokens(responses, mask)
    r = _check_rewards(rewards, responses.shape[0], responses.device)
    G = _check_group_size(group_size, r.shape[0])
    return mask, r, G, _check_scalar("eps", eps, 0.0), _check_scale(scale)


def _check_tree(tree, mask, G: int) -> PrefixTree:
    """`prefix_tree` of these rows: two [B, G] tensors on mask's device, row i's largest lcp = len_i."""
    B = mask.shape[0]
    if not isinstance(tree, PrefixTree):
        raise ValueError(f"tree must be a PrefixTree (from prefix_tree) or None, got {type(tree)}")
    for name, x in zip(tree._fields, tree):
        if not isinstance(x, torch.Tensor) or x.shape != (B, G) or x.device != mask.device:
            got = (tuple(x.shape), str(x.device)) if isinstance(x, torch.Tensor) else type(x)
            raise ValueError(f"tree.{name} must be a [B, G] = [{B}, {G}] tensor on {mask.device}, got {got}")
    if not (tree.lcp_sorted[:, -1] == mask.sum(1)).all():  # lcp(i, i) = len_i is row i's largest
        raise ValueError("tree is not the tree of these rows: a row's largest lcp is not its length")
    return tree


def _check_group_size(group_size, B: int, rows: str = "rewards") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if B == 0:
        raise ValueError(f"{rows} is empty: the batch needs at least one row")
    if B % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch size B={B}")
    return int(group_size)


def _check_rewards(rewards, B: int | None, device) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards)}")
    if rewards.is_complex():
        raise ValueError("rewards must be real, got a complex tensor")
    if B is not None and rewards.shape[0] != B:
        raise ValueError(f"rewards has {rewards.shape[0]} rows but responses/mask have {B}")
    acc = _acc_dtype(torch.device(device) if device is not None else rewards.device)
    r = rewards.detach().to(device=device, dtype=acc)
    if not torch.isfinite(r).all():
        raise ValueError("rewards contains non-finite values (nan or inf)")
    return r


def _check_scalar(name: str, value, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _check_scale(scale) -> str:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale


def _check_tokens(responses, mask) -> torch.Tensor:
    """responses [B, T] integer ids, mask [B, T] bool prefix mask; returns mask as bool on responses' device."""
    if not isinstance(responses, torch.Tensor) or responses.dim() != 2:
        raise ValueError("responses must be a 2-D tensor [B, T] of token ids")
    if responses.is_floating_point() or responses.is_complex() or responses.dtype == torch.bool:
        raise ValueError(f"responses must hold integer token ids, got dtype {responses.dtype}")
    if not isinstance(mask, torch.Tensor) or mask.shape != responses.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask)
        raise ValueError(f"mask must be a tensor of the same shape as responses "
                         f"{tuple(responses.shape)}, got {shape}")
    return _check_prefix_mask(mask, responses.device)


def _check_prefix_mask(mask, device) -> torch.Tensor:
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask must be bool (or 0/1 integers), got dtype {mask.dtype}")
        mask = mask.bool()
    mask = mask.to(device)
    bad = (mask[:, 1:] & ~mask[:, :-1]).any(1)  # [B] a True right after a False
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"mask must be a prefix mask (True then False) in every row; row {row} "
                         f"has a real token after padding")
    return mask


def _same_shape(x, mask, name: str):
    """x a 2-D floating tensor [B, T] and mask a tensor of its shape (then checked as a prefix mask)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating tensor [B, T]")
    if not isinstance(mask, torch.Tensor) or mask.shape != x.shape:
        raise ValueError(f"mask must be a tensor of the same shape as {name} {tuple(x.shape)}")
    mask = _check_prefix_mask(mask, x.device)
    if not torch.isfinite(x[mask]).all():
        raise ValueError(f"{name} contains non-finite values at valid (mask=True) positions")
    return mask


def _check_hepo(entropy, mask, rewards, group_size, rho, eps, scale):
    mask = _same_shape(entropy, mask, "entropy")
    r = _check_rewards(rewards, entropy.shape[0], entropy.device)
    G = _check_group_size(group_size, r.shape[0])
    return mask, r, G, _check_scalar("rho", rho, 0.0, 1.0), _check_scalar("eps", eps, 0.0), _check_scale(scale)


def _check_gae(rewards, values, mask, gamma, lam):
    mask = _same_shape(values, mask, "values")
    if isinstance(rewards, torch.Tensor) and rewards.dim() == 2 and rewards.shape != values.shape:
        raise ValueError(f"per-token rewards must have the shape of values {tuple(values.shape)}")
    return mask, _check_scalar("gamma", gamma, 0.0, 1.0), _check_scalar("lam", lam, 0.0, 1.0)
