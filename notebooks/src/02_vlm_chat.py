# %% [markdown]
# # VLM chat, speculatively, on the zoo
#
# `SpeculativeVLM` wraps a stock transformers VLM and its processor and drafts with a small VLM, a text-only LM, a
# feature head (EAGLE-1/3, DREAM, ViSpec, DFlash) or n-grams. The answer is **the target's own**: at temperature 0
# token for token what plain decoding gives.
#
# The models are the project's zoo (`mmspec zoo list`; trained offline on first use, cached under
# `~/.cache/mmspec/zoo`): `zoo:vlm` is a LLaVA (CLIP tower on 60 px images, LLaMA 512 x 8) trained on rendered scenes
# of shapes. It is small and undertrained for grounding — its answers have the data's form but often name the wrong
# shapes. What this notebook shows is how the drafts are verified and what that buys. For your own model:
# `SpeculativeVLM.from_pretrained("your/vlm", drafter="your/drafter")`.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from mmspec import DynamicTree
from mmspec.plots import plot_acceptance_per_step, plot_draft_tree
from mmspec.trace import record_steps
from vision import SpeculativeVLM
from vision.bench import zoo_prompts
from vision.compare import compare_drafters
from vision.regions import region_acceptance

torch.manual_seed(0)
svlm = SpeculativeVLM.from_pretrained("zoo:vlm", drafter="zoo:vlm-eagle", tree=4)  # EAGLE-1 head, chain of 4
model, processor = svlm.model, svlm.processor
plain = SpeculativeVLM(model, processor, None)  # the same target without a drafter: the reference answers
size = processor.image_processor.crop_size["height"]
questions = [r for r in zoo_prompts(12, size) if r["images"]][:4]  # held-out scenes the models never saw
print(f"target: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
      f"images {size} px")

# %% [markdown]
# ## Ask about a few images
#
# Greedy decoding; the speculative answer is compared with plain decoding's, token for token.

# %%
fig, axes = plt.subplots(1, len(questions), figsize=(3.2 * len(questions), 3.4))
answers = []
for ax, row in zip(axes, questions):
    ref = plain.generate(images=row["images"], prompt=row["prompt"], max_new_tokens=64)
    out = svlm.generate(images=row["images"], prompt=row["prompt"], max_new_tokens=64)
    answers.append((row, ref, out))
    ax.imshow(row["images"][0])
    ax.set_axis_off()
    ax.set_title(row["prompt"], fontsize=8)
plt.tight_layout()
plt.show()
for row, ref, out in answers:
    print(f"Q: {row['prompt']}\nA: {out.text.strip()}\n   identical to plain decoding: {out.token_ids == ref.token_ids}"
          f" | tau {out.stats.tau:.2f}, {out.stats.target_forwards} target forwards for {len(out.token_ids)} tokens\n")
assert all(out.token_ids == ref.token_ids for _, ref, out in answers)

# %% [markdown]
# ## One step's draft tree, and what the target accepted
#
# An EAGLE-2 dynamic tree: the head expands the `topk` most likely continuations of the best nodes, level by level,
# and keeps the `total` best by their path probability. The target scores the whole tree in **one** forward (a tree
# attention mask), and greedy verification walks down from the last committed token while the target's own choice
# is among the children. `mmspec.trace.record_steps` records each step's drafts and accepted paths without changing
# anything.

# %%
from vision.drafters import EagleDrafter

tree_vlm = SpeculativeVLM(model, processor, EagleDrafter(svlm.drafter.head, DynamicTree(topk=3, depth=5, total=14)))
row = questions[0]
with record_steps(tree_vlm.decoder) as steps:
    out = tree_vlm.generate(images=row["images"], prompt=row["prompt"], max_new_tokens=64)
assert out.token_ids == answers[0][1].token_ids  # a tree changes the speed, never the answer
# show a step where the tree branched and more than one drafted token was accepted
n = max(range(1, len(steps)), key=lambda i: (min(steps[i].accepted[0], 3), len(steps[i].drafts[0])))
step = steps[n]
tok = processor.tokenizer
fig = plot_draft_tree(step.drafts[0], step.paths[0], labels=tok.convert_ids_to_tokens,
                      title=f"step {n + 1}: {len(step.drafts[0])} drafted tokens, "
                            f"{step.accepted[0]} accepted (green) + 1 from the target")
plt.show()

# %% [markdown]
# ## Acceptance length per step
#
# Tokens committed at each verification step of that answer (the accepted drafts plus the target's own next
# token). Steps that reach the tree's depth are where the drafter followed the target's phrasing; short steps are
# where the answer names something from the image the head guessed wrong.

# %%
fig = plot_acceptance_per_step([s.accepted[0] for s in steps], [max(s.drafts[0].depth, default=0) for s in steps],
                               title=f"{len(steps)} steps for {len(out.token_ids)} tokens (tau {out.stats.tau:.2f})")
plt.show()
print(out.stats.summary())

# %% [markdown]
# ## Which image regions a compressing drafter reads
#
# `zoo:vlm-vispec` is an EAGLE head whose view of the image goes through ViSpec's query compressor (a few learned
# queries cross-attending to the image features, plus a global vector fused into the text). `vision.regions`
# hides one patch of the 6 x 6 patch grid at a time from the compressor's input (its feature replaced by the
# image's mean feature), answers the questions again and measures the mean acceptance length. The target is
# untouched, so the answers stay identical; the map shows how much acceptance each region is worth to the drafter.
# On this zoo pair the answer is sobering: the head's acceptance hangs on the first image position (where the
# target's features summarise the image) and barely on the rest — its drafts follow the answer's wording more than
# the picture, which is also why the train-free compressors below cost it nothing.

# %%
from vision.pipeline import load_drafter

vispec = SpeculativeVLM(model, processor, load_drafter("zoo:vlm-vispec", model, tree=4)[0], tree=4)
rmap = region_acceptance(vispec, questions[:2], region=1, max_new_tokens=48)
assert rmap.identical
fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
for ax, r in zip(axes[:2], questions[:2]):
    ax.imshow(r["images"][0])
    ax.imshow(rmap.drop.clamp_min(0).numpy(), cmap="Reds", alpha=0.45, extent=(0, size, size, 0),
              interpolation="nearest", vmin=0, vmax=max(1e-6, float(rmap.drop.max())))
    ax.set_axis_off()
    ax.set_title(r["prompt"], fontsize=8)
im = axes[2].imshow(rmap.hidden.numpy(), cmap="viridis")
axes[2].set_title(f"acceptance length with the patch hidden\n(all visible: {rmap.baseline:.2f})", fontsize=9)
axes[2].set_xticks([]), axes[2].set_yticks([])
fig.colorbar(im, ax=axes[2])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Drafters and compressors side by side
#
# Every zoo drafter, a chain of 4 drafted tokens per step (DFlash: its block), on the same four questions, greedy,
# alternated passes on this 2-core CPU. The last rows give the EAGLE-1 head a *compressed* view of the image with
# the train-free compressors of `vision.compressors` (it was trained on the full view).
# *predicted* is the speedup tau and the measured model forward times allow with no engine overhead.

# %%
from vision.compressors import AttentionPrune, AvgPool

head = svlm.drafter.head
drafters = [("draft VLM (MASSV)", "zoo:vlm-draft"), ("text-only LM", "zoo:vlm-text"), ("EAGLE-1", "zoo:vlm-eagle"),
            ("EAGLE-3", "zoo:vlm-eagle3"), ("DREAM", "zoo:vlm-dream"), ("ViSpec", "zoo:vlm-vispec"),
            ("DFlash", "zoo:vlm-dflash"), ("n-gram", "ngram"),
            ("EAGLE-1 + avg_pool (stride 2)", EagleDrafter(head, 4, compressor=AvgPool(2))),
            ("EAGLE-1 + attention_prune (25%)", EagleDrafter(head, 4, compressor=AttentionPrune(0.25)))]
table = compare_drafters(model, processor, drafters, questions, k=4, max_new_tokens=48, repeats=2)
lines = ["| method | mean acceptance length | tau | ms / token | speedup | predicted | identical |", "|---|---|---|---|---|---|---|"]
lines += [f"| {r['method']} | {r['mean_acceptance_length']:.2f} | {r['tau']:.2f} | {r['ms_per_token']:.1f} | "
          f"{r['speedup']:.2f}x | {r['predicted_speedup']:.2f}x | {r['identical']} |" for r in table]
display(Markdown("\n".join(lines)))
assert all(r["identical"] for r in table)  # the key number: every drafter gives plain decoding's answers

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.5))
for r in table[1:]:
    ax.scatter(r["mean_acceptance_length"], r["speedup"], s=40)
    ax.annotate(r["method"], (r["mean_acceptance_length"], r["speedup"]), textcoords="offset points", xytext=(5, 3),
                fontsize=7)
ax.axhline(1.0, color="grey", lw=1, ls="--")
ax.set_xlabel("mean acceptance length (tokens per verification)")
ax.set_ylabel("wall-clock speedup over plain decoding")
ax.set_title("zoo:vlm, greedy, chain of 4, 2-core CPU")
plt.show()
