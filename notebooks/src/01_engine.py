# %% [markdown]
# # The verify engine
#
# A drafter proposes a tree of tokens; the target scores the whole tree in one forward; an **acceptance rule**
# decides which drafted tokens to keep and draws the next token. This notebook looks at the rules exactly (no
# sampling), then at what draft length and tree shape buy on a real model pair of the zoo, measured on this
# machine against the speedup its forward costs predict.

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from mmspec import DynamicTree, StaticTree
from mmspec.kernels import accept_point_mass, accept_speculative, typical
from mmspec.testing.exact import mix, sampled_drafts, step_distribution, toy_model

VOCAB = 5
P = toy_model(seed=1, vocab=VOCAB)  # the target: a random next-token distribution per prefix
Q = toy_model(seed=2, vocab=VOCAB)  # an unrelated drafter

# %% [markdown]
# ## The acceptance rules, by exact enumeration
#
# For a tree shape, every draft Q can sample is enumerated with its probability, and for each draft every sequence
# of the rule's accept/reject coins (`mmspec.testing.exact`). One verification step emits the accepted tokens and
# a token from the residual; extended with P to depth + 1 tokens, that is a distribution over sequences, compared
# with P's own by total variation. Lossless rules must give 0 (to float64 rounding); Medusa's typical acceptance is
# lossy and shows its drift.

# %%
shapes = {"chain 1": StaticTree.chain(1), "chain 2": StaticTree.chain(2), "chain 3": StaticTree.chain(3),
          "2 siblings": StaticTree.full((2,)), "tree (2, 1)": StaticTree.full((2, 1))}
rules = [("speculative sampling (i.i.d. siblings)", accept_speculative, "iid"),
         ("speculative sampling (without replacement)", accept_speculative, "without_replacement"),
         ("point mass (EAGLE, any proposal)", accept_point_mass, "iid"),
         ("typical acceptance (Medusa; LOSSY)", typical(), "iid")]
results = []
for rule_name, kernel, siblings in rules:
    for shape_name, shape in shapes.items():
        r = step_distribution(kernel, P, sampled_drafts(Q, shape, siblings), shape.depth)
        results.append((rule_name, shape_name, r, kernel.lossless))
lines = ["| rule | shape | output TV vs target | expected tokens per step |", "|---|---|---|---|"]
lines += [f"| {a} | {b} | {r.tv:.2e} | {r.acceptance_length:.3f} |" for a, b, r, _ in results]
display(Markdown("\n".join(lines)))
worst = max(r.tv for _, _, r, lossless in results if lossless)
print(f"largest TV of a lossless rule: {worst:.1e}")
assert worst < 1e-9  # the key number: the lossless rules reproduce the target's distribution exactly

# %%
fig, ax = plt.subplots(figsize=(9, 3.2))
for i, (rule_name, _, _) in enumerate(rules):
    tvs = [max(r.tv, 1e-18) for a, _, r, _ in results if a == rule_name]
    ax.scatter(range(len(shapes)), tvs, label=rule_name, marker="x" if "LOSSY" in rule_name else "o")
ax.set_yscale("log")
ax.set_xticks(range(len(shapes)), list(shapes))
ax.axhline(1e-9, color="grey", ls="--", lw=1)
ax.set_ylabel("output TV (log)")
ax.legend(fontsize=7, loc="center right")
ax.set_title("lossless rules sit at rounding error; typical acceptance drifts")
plt.show()

# %% [markdown]
# ## Acceptance length against draft length and tree shape, exactly
#
# The expected tokens per step for drafters of growing quality (Q mixed into P: a weight of 0 is a perfect
# drafter), as the chain grows, and for trees with the same number of nodes spent on width instead of depth.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for w in (0.1, 0.4, 0.8):
    Qw = mix(P, Q, w)
    ks = [1, 2, 3, 4]
    axes[0].plot(ks, [step_distribution(accept_speculative, P, sampled_drafts(Qw, StaticTree.chain(k)), k).acceptance_length
                      for k in ks], marker="o", label=f"drafter = {1 - w:.1f} P + {w:.1f} Q")
axes[0].set_xlabel("chain length k (drafted tokens per step)")
axes[0].set_ylabel("expected tokens per step")
axes[0].legend(fontsize=8)
Qw = mix(P, Q, 0.4)
trees = {"chain 3": StaticTree.chain(3), "(2, 1)": StaticTree.full((2, 1)), "(3,)": StaticTree.full((3,)),
         "((0),(1),(0,0))": StaticTree(((0,), (1,), (0, 0)))}
vals = [step_distribution(accept_speculative, P, sampled_drafts(Qw, t, "without_replacement"), t.depth).acceptance_length
        for t in trees.values()]
axes[1].bar(list(trees), vals, color="#1f77b4")
axes[1].set_ylabel("expected tokens per step")
axes[1].set_title("three drafted nodes, spent on depth or width (drafter 0.6 P + 0.4 Q)", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## On a real pair: measured speedup against the predicted limit
#
# The zoo VLM (`zoo:vlm`, LLaVA with a LLaMA 512 x 8) and its MASSV-distilled draft VLM (`zoo:vlm-draft`), greedy,
# four held-out questions, chains of growing length and two trees. *predicted* is what tau and the model forward
# times measured in the same run allow with no engine overhead (`mmspec.trace.predicted_speedup`): the verify
# forward grows with the block, the drafter pays one forward per depth, so a longer chain helps only while the
# extra accepted tokens outrun those costs. The gap between *measured* and *predicted* is the engine's own
# bookkeeping on this CPU.

# %%
from vision import SpeculativeVLM
from vision.bench import zoo_prompts
from vision.compare import compare_drafters

svlm = SpeculativeVLM.from_pretrained("zoo:vlm")
size = svlm.processor.image_processor.crop_size["height"]
questions = [r for r in zoo_prompts(12, size) if r["images"]][:4]
configs = [(f"chain {k}", "zoo:vlm-draft", k) for k in (1, 2, 3, 4, 6)]
configs += [("static tree (2, 2, 1)", "zoo:vlm-draft", StaticTree.full((2, 2, 1))),
            ("dynamic tree (top-3, depth 4, 10 nodes)", "zoo:vlm-draft", DynamicTree(topk=3, depth=4, total=10))]
table = compare_drafters(svlm.model, svlm.processor, configs, questions, max_new_tokens=48, repeats=2)
lines = ["| draft | tau | ms / token | measured speedup | predicted | identical |", "|---|---|---|---|---|---|"]
lines += [f"| {r['method']} | {r['tau']:.2f} | {r['ms_per_token']:.1f} | {r['speedup']:.2f}x | "
          f"{r['predicted_speedup']:.2f}x | {r['identical']} |" for r in table]
display(Markdown("\n".join(lines)))
assert all(r["identical"] for r in table)

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
chains = [r for r in table if r["method"].startswith("chain")]
ks = [int(r["method"].split()[1]) for r in chains]
axes[0].plot(ks, [r["tau"] for r in chains], marker="o")
axes[0].set_xlabel("chain length k")
axes[0].set_ylabel("tau (tokens per verification)")
axes[0].set_title("acceptance length vs draft length (zoo:vlm-draft)", fontsize=9)
for r in table[1:]:
    axes[1].scatter(r["predicted_speedup"], r["speedup"])
    axes[1].annotate(r["method"], (r["predicted_speedup"], r["speedup"]), textcoords="offset points", xytext=(4, 3),
                     fontsize=7)
lo = min(min(r["speedup"], r["predicted_speedup"]) for r in table) * 0.95
hi = max(max(r["speedup"], r["predicted_speedup"]) for r in table) * 1.05
axes[1].plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="measured = predicted")
axes[1].set_xlabel("predicted speedup (from tau and forward costs)")
axes[1].set_ylabel("measured wall-clock speedup")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()
