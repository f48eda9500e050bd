"""trie.py's per-group functions run over a padded batch (rows g*G .. g*G+G-1 answer prompt g).

The slow, readable side of the readable-vs-fast tests and of benchmarks/bench_advantages.py: each row is
cut at its mask (padding ids are never looked at), rows are grouped G at a time, and the trie code runs
group by group.
"""
from __future__ import annotations

import math

import torch

import trie


def groups(responses, mask, rewards, G: int) -> list[tuple[list[list[int]], list[float]]]:
    """[(the group's unpadded rows, their rewards)] for each prompt."""
    rows = [row[:n] for row, n in zip(responses.tolist(), mask.sum(1).tolist())]
    r = [float(x) for x in rewards.tolist()]
    return [(rows[g:g + G], r[g:g + G]) for g in range(0, len(rows), G)]


def per_group(fn, responses, mask, rewards, G: int, dtype=torch.float32) -> torch.Tensor:
    """fn(rows, rewards) -> one list of numbers per row, for each group; padded to [B, T] with zeros."""
    out = torch.zeros(responses.shape, dtype=torch.float64)
    for g, (rows, r) in enumerate(groups(responses, mask, rewards, G)):
        for i, values in enumerate(fn(rows, r)):
            out[g * G + i, :len(values)] = torch.tensor(values, dtype=torch.float64)
    return out.to(dtype)


def sigma_and_eps(all_rewards: list[float], group: list[float], scale: str, eps: float):
    """(sigma, eps) for one group: None = the group's own std (scale 'group' or a group of one), the batch's
    std for 'batch', 1 with eps 0 for 'none' (Dr. GRPO)."""
    if scale == "none":
        return 1.0, 0.0
    if scale == "batch" and len(group) >= 2:
        B = len(all_rewards)
        m = sum(all_rewards) / B
        return (math.sqrt(sum((x - m) ** 2 for x in all_rewards) / (B - 1)) if B >= 2 else 1.0), eps
    return None, eps


def tempo_batch(responses, mask, rewards, G: int, eps: float = 1e-6, td_weight: float = 1.0,
                scale: str = "group", scale_td: bool = True) -> torch.Tensor:
    """TEMPO advantages [B, T] (float32, zeros at padding)."""
    all_r = [float(x) for x in rewards.tolist()]

    def fn(rows, r):
        sigma, e = sigma_and_eps(all_r, r, scale, eps)
        return trie.tempo_group(rows, r, e, td_weight, sigma, scale_td)
    return per_group(fn, responses, mask, rewards, G)


def treeadv_batch(responses, mask, rewards, G: int, eps: float = 1e-6, scale: str = "group",
                  centred: bool = False) -> torch.Tensor:
    """TreeAdv advantages [B, T] (float32, zeros at padding)."""
    all_r = [float(x) for x in rewards.tolist()]

    def fn(rows, r):
        sigma, e = sigma_and_eps(all_r, r, scale, eps)
        return trie.treeadv_group(rows, r, e, sigma, centred)
    return per_group(fn, responses, mask, rewards, G)


def prefix_counts_batch(responses, mask, G: int) -> torch.Tensor:
    """n(s_{t+1}) as [B, T] int64 (0 at padding): the n of the node each token enters."""
    def fn(rows, r):
        root = trie.build_trie(rows, r)
        return [[s.n for s in trie.path(root, o)[1:]] for o in rows]
    return per_group(fn, responses, mask, torch.zeros(responses.shape[0]), G, dtype=torch.int64)


def treerl_batch(responses, mask, rewards, G: int) -> torch.Tensor:
    return per_group(trie.treerl_group, responses, mask, rewards, G)


def spo_batch(responses, mask, rewards, G: int) -> torch.Tensor:
    return per_group(trie.spo_group, responses, mask, rewards, G)


def treepo_batch(responses, mask, rewards, G: int) -> torch.Tensor:
    """trie.treepo_group's per-response values, whitened over the batch's valid tokens in plain Python:
    (x - mean) / sqrt(var + 1e-8), Bessel's var, as verl's masked_whiten (TreePO's)."""
    x = per_group(trie.treepo_group, responses, mask, rewards, G, dtype=torch.float64)
    vals = x[mask].tolist()
    n = len(vals)
    mean = sum(vals) / max(n, 1)
    var = sum((v - mean) ** 2 for v in vals) / max(n - 1, 1)
    return torch.where(mask, (x - mean) / math.sqrt(var + 1e-8), 0.0).float()


def diagnostics_batch(responses, mask, rewards, G: int, eps: float = 1e-6) -> dict:
    """The SPEC 8 numbers for a batch, with the same keys as advantages.branch_diagnostics."""
    tokens = branch_tokens = 0
    first, unique = [], []
    td_abs = tempo_abs = 0.0
    for rows, r in groups(responses, mask, rewards, G):
        st = trie.tree_stats(trie.build_trie(rows, r), rows)
        tokens += st["tokens"]
        branch_tokens += st["branch_tokens"]
        first += st["first_divergence"]
        unique += st["unique_depth"]
        for a_row, g_row in zip(trie.tempo_group(rows, r, eps), trie.tempo_group(rows, r, eps, td_weight=0.0)):
            td_abs += sum(abs(a - g) for a, g in zip(a_row, g_row))
            tempo_abs += sum(abs(a) for a in a_row)
    return dict(
        branch_token_frac=branch_tokens / tokens if tokens else 0.0,
        first_divergence_depth=sum(first) / len(first) if first else float("nan"),
        unique_depth=sum(unique) / len(unique) if unique else float("nan"),
        td_share=td_abs / tempo_abs if tempo_abs > 0 else 0.0,
    )
