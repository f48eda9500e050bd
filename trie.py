"""trie.py: the prefix trie of one group, and the advantages read off it the way the papers say them.

SPEC 1 (mu, sigma), 2 (the trie, n(s), V(s), branch nodes), 3 (TEMPO), 5 (TreeAdv) and 8 (tree
statistics) for one group of G responses, in plain Python on lists. This is the readable form:
advantages.py computes the same numbers for a whole batch without building a trie, and the tests
check the two against each other (tests/trie_batch.py runs this file over a padded batch).

Departures (all from SPEC): a response that ends at a node leaves the tree there (END is its own
child); a group of one has mu = 0, sigma = 1; a group of two or more with equal rewards gets exactly 0.

Run `python trie.py` to print SPEC 3's worked example as a tree with its advantages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

END = "<end>"  # the children key for "the response ends here"; a str never equals an int token id


# ---- SPEC 1: the group baseline


def group_baseline(rewards: list[float]) -> tuple[float, float]:
    """mu = mean(r), sigma = std(r) with Bessel's correction; a group of one has mu = 0, sigma = 1."""
    G = len(rewards)
    if G == 1:
        return 0.0, 1.0
    mu = sum(rewards) / G
    return mu, math.sqrt(sum((r - mu) ** 2 for r in rewards) / (G - 1))


def all_equal(rewards: list[float]) -> bool:
    """Two or more equal rewards carry no signal: every advantage is exactly 0 (not 1e-17 / eps)."""
    return len(rewards) >= 2 and all(r == rewards[0] for r in rewards)


# ---- SPEC 2: the prefix trie


@dataclass(eq=False)
class Node:
    """A state s = (q, o_<t): one distinct response prefix. The root is the prompt (depth 0)."""

    token: int | str | None  # the token that led here (None at the root, END for an end marker)
    depth: int  # t = |o_<t|
    n: int = 0  # |D(s)|: the responses whose prefix is s
    reward_sum: float = 0.0  # sum of r_j over D(s)
    children: dict = field(default_factory=dict)  # next token id (or END) -> Node

    @property
    def V(self) -> float:
        """V(s) = (1/|D(s)|) sum_{j in D(s)} r_j."""
        return self.reward_sum / self.n

    @property
    def is_branch(self) -> bool:
        """Two or more children; a response that ends here is the child END."""
        return len(self.children) >= 2


def build_trie(responses: list[list[int]], rewards: list[float]) -> Node:
    """Insert the G responses; every node on a response's path (root and END included) counts it once."""
    root = Node(token=None, depth=0)
    for o, r in zip(responses, rewards):
        node = root
        for tok in [*o, END]:
            node.n += 1
            node.reward_sum += r
            node = node.children.setdefault(tok, Node(tok, node.depth + (tok != END)))
        node.n += 1  # the END marker
        node.reward_sum += r
    return root


def path(root: Node, o: list[int]) -> list[Node]:
    """The states s_0 (root), s_1, ..., s_L that response o passes through: s_{t+1} = s_t + o_t."""
    nodes = [root]
    for tok in o:
        nodes.append(nodes[-1].children[tok])
    return nodes


def nodes(root: Node) -> list[Node]:
    """Every node but the END markers, breadth first: a parent before its children."""
    out = [root]
    for node in out:  # the list grows as it is read
        out.extend(c for k, c in node.children.items() if k != END)
    return out


# ---- SPEC 3 and 5: a token's advantage from the values of the states around it


def tempo_group(responses: list[list[int]], rewards: list[float], eps: float = 1e-6,
                td_weight: float = 1.0, sigma: float | None = None,
                scale_td: bool = True) -> list[list[float]]:
    """TEMPO: A_{i,t} = ((r_i - mu) + w * (V(s_{t+1}) - V(s_t))) / (sigma + eps), w = td_weight.

    The TD step delta = V(s_{t+1}) - V(s_t) is 0 unless s_t is a branch node. scale_td=False leaves
    it undivided: A = (r_i - mu) / (sigma + eps) + w * delta (SPEC 8). `sigma` replaces the group's
    std (tests/trie_batch.py passes the batch's, or sigma = 1 with eps = 0 for Dr. GRPO).
    """
    if all_equal(rewards):
        return [[0.0] * len(o) for o in responses]
    mu, group_sigma = group_baseline(rewards)
    denom = (group_sigma if sigma is None else sigma) + eps
    root = build_trie(responses, rewards)
    out = []
    for o, r in zip(responses, rewards):
        s = path(root, o)
        deltas = [s[t + 1].V - s[t].V for t in range(len(o))]
        out.append([((r - mu) + td_weight * d) / denom if scale_td else (r - mu) / denom + td_weight * d
                    for d in deltas])
    return out


def treeadv_group(responses: list[list[int]], rewards: list[float], eps: float = 1e-6,
                  sigma: float | None = None) -> list[list[float]]:
    """TreeAdv: token t lies in the node s_{t+1}; Ahat = (V(s_{t+1}) - mu) / (sigma + eps).

    That is the mean of the leaf advantages A_j of the responses through s_{t+1}; a token no other
    response shares has V(s_{t+1}) = r_i and keeps A_i.
    """
    if all_equal(rewards):
        return [[0.0] * len(o) for o in responses]
    mu, group_sigma = group_baseline(rewards)
    denom = (group_sigma if sigma is None else sigma) + eps
    root = build_trie(responses, rewards)
    return [[(s.V - mu) / denom for s in path(root, o)[1:]] for o in responses]


def prefix_counts_group(responses: list[list[int]]) -> list[list[int]]:
    """n(s_{t+1}) for every token: how many responses share the prefix up to and including token t."""
    root = build_trie(responses, [0.0] * len(responses))
    return [[s.n for s in path(root, o)[1:]] for o in responses]


# ---- SPEC 8: how much tree there is, and a picture of it


def tree_stats(root: Node, responses: list[list[int]]) -> dict:
    """nodes (root included, END markers not), branch_nodes, tokens, branch_tokens (tokens emitted at a
    branch node); per response, first_divergence = min_{j != i} lcp(i, j) = the last t with n(s_t) = G,
    and unique_depth = max_{j != i} lcp(i, j) = the last t with n(s_t) >= 2 (empty lists when G = 1)."""
    G = len(responses)
    every = nodes(root)
    stats = dict(nodes=len(every), branch_nodes=sum(s.is_branch for s in every), tokens=0, branch_tokens=0,
                 first_divergence=[], unique_depth=[])
    for o in responses:
        s = path(root, o)
        stats["tokens"] += len(o)
        stats["branch_tokens"] += sum(s[t].is_branch for t in range(len(o)))
        if G >= 2:
            stats["first_divergence"].append(max(t for t in range(len(s)) if s[t].n == G))
            stats["unique_depth"].append(max(t for t in range(len(s)) if s[t].n >= 2))
    return stats


def show(root: Node, decode=None, sigma: float | None = None, eps: float = 1e-6, file=None) -> None:
    """Print the trie, a chain of single-child nodes (a segment, TreeAdv's word) on one line: its tokens,
    n, V at its last node, '*' where that node branches and, given sigma, the TD step
    delta / (sigma + eps) of the token that enters it. decode maps token ids to text."""
    decode = decode or (lambda ids: " ".join(map(str, ids)))
    print(f"root  n={root.n}  V={root.V:.3f}{'  *' if root.is_branch else ''}", file=file)

    def walk(node: Node, indent: str) -> None:
        kids = list(node.children.values())
        for k, child in enumerate(kids):
            last = k == len(kids) - 1
            head = indent + ("`-- " if last else "|-- ")
            if child.token == END:
                print(f"{head}<end>  n={child.n}  r_sum={child.reward_sum:g}", file=file)
                continue
            seg = [child]
            while len(seg[-1].children) == 1 and END not in seg[-1].children:
                seg.append(next(iter(seg[-1].children.values())))
            td = f"  delta/(sigma+eps)={(child.V - node.V) / (sigma + eps):+.3f}" if sigma is not None else ""
            star = "  *" if seg[-1].is_branch else ""
            print(f"{head}{decode([s.token for s in seg])!r}  n={seg[-1].n}  V={seg[-1].V:.3f}{td}{star}", file=file)
            walk(seg[-1], indent + ("    " if last else "|   "))

    walk(root, "")


if __name__ == "__main__":
    # SPEC 3's worked example: tokens A=0, B=1, x=2, y=3, '.'=4.
    names = {0: "A", 1: "B", 2: "x", 3: "y", 4: "."}
    group = [[0, 2, 4, 4], [0, 2, 4, 4], [0, 3, 4, 4], [1, 4, 4, 4]]
    rewards = [1.0, 1.0, 0.0, 0.0]
    mu, sigma = group_baseline(rewards)
    root = build_trie(group, rewards)
    show(root, decode=lambda ids: "".join(names[i] for i in ids), sigma=sigma)
    print(f"mu={mu:.4f} sigma={sigma:.4f}")
    for o, a in zip(group, tempo_group(group, rewards)):
        print("".join(names[i] for i in o), " ".join(f"{x:+.3f}" for x in a))
    print(tree_stats(root, group))
