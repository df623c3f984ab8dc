"""matplotlib figures for the notebooks and reports: a draft tree with its accepted path, acceptance per step.

    fig = plot_draft_tree(step.drafts[0], step.paths[0], labels=tokenizer.convert_ids_to_tokens)
    fig = plot_acceptance_per_step([s.accepted[0] for s in steps])

matplotlib is imported inside each function (Agg-safe; nothing is drawn at import).
"""
from __future__ import annotations

from typing import Callable, Sequence

from .tree import Draft

ACCEPTED, REJECTED, ROOT = "#2ca02c", "#bbbbbb", "#1f77b4"


def tree_layout(draft: Draft) -> dict[int, tuple[float, float]]:
    """(x = depth, y) per node, the root as -1 at depth 0; leaves spread one unit apart, parents centred on their
    children (a tidy layered layout)."""
    children, pos, nxt = draft.children, {}, [0.0]

    def place(node: int, depth: int) -> float:
        kids = children[node + 1]
        if not kids:
            y = nxt[0]
            nxt[0] += 1.0
        else:
            ys = [place(c, depth + 1) for c in kids]
            y = sum(ys) / len(ys)
        pos[node] = (float(depth), y)
        return y

    place(-1, 0)
    return pos


def plot_draft_tree(draft: Draft, path: Sequence[int], labels: Callable[[list[int]], list[str]] | None = None,
                    title: str = "", ax=None):
    """One step's draft tree, depth left to right: accepted nodes green, the rest grey, labelled with their tokens
    (`labels(ids) -> strings`, e.g. a tokenizer's convert_ids_to_tokens; ids without it). Returns the figure."""
    import matplotlib.pyplot as plt

    pos = tree_layout(draft)
    toks = draft.token_list
    names = labels(toks) if labels is not None else [str(t) for t in toks]
    on_path = set(path)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 + 1.7 * max(draft.depth, default=1), 0.9 + 0.42 * max(1, len(
            [n for n in range(len(draft)) if not draft.children[n + 1]]))))
    for i, p in enumerate(draft.parent_list):
        (x0, y0), (x1, y1) = pos[p], pos[i]
        ax.plot([x0, x1], [y0, y1], color=ACCEPTED if i in on_path else REJECTED, lw=2.5 if i in on_path else 1,
                zorder=1)
    ax.scatter([pos[-1][0]], [pos[-1][1]], s=90, color=ROOT, zorder=2)
    ax.annotate("last token", pos[-1], textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8)
    for i, name in enumerate(names):
        x, y = pos[i]
        ax.text(x, y, name.replace("\n", "\\n"), ha="center", va="center", fontsize=8, zorder=3,
                bbox=dict(boxstyle="round,pad=0.25", fc=ACCEPTED if i in on_path else "white",
                          ec=ACCEPTED if i in on_path else REJECTED, alpha=0.9))
    ax.set_xticks(range(max(draft.depth, default=0) + 1))
    ax.set_xlabel("draft depth")
    ax.set_yticks([])
    ax.invert_yaxis()
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or f"{len(draft)} drafted tokens, {len(path)} accepted (green)")
    return ax.figure


def plot_acceptance_per_step(accepted: Sequence[int], drafted: Sequence[int] | None = None, title: str = "", ax=None):
    """Bars of tokens committed per verification step (accepted drafts + 1), with the draft depth as a line."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 2.6))
    steps = range(1, len(accepted) + 1)
    ax.bar(steps, [a + 1 for a in accepted], color=ACCEPTED, label="tokens committed (accepted + 1)")
    if drafted is not None:
        ax.step(steps, [d + 1 for d in drafted], where="mid", color="k", lw=1,
                label="draft depth + 1 (the most possible)")
    mean = sum(accepted) / max(1, len(accepted)) + 1
    ax.axhline(mean, color="#d62728", ls="--", lw=1, label=f"mean {mean:.2f}")
    ax.set_xlabel("verification step")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title)
    return ax.figure
