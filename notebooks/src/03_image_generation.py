# %% [markdown]
# # Image generation, speculatively, on the zoo
#
# `SpeculativeImagePipeline` draws images with a visual autoregressive model and speculative decoding. The zoo's
# target is a class-conditional LlamaGen (384 wide, 8 layers) over the 8 x 8 codes of a diffusers `VQModel`
# (32 px images of ten shape classes); its drafter here is the EAGLE-style head trained on it (`zoo:llamagen-head`).
#
# The default acceptance is **lossless**: greedy runs give the plain sampler's tokens, sampled runs the same
# distribution. LANTERN and GSD accept more drafts by counting a drafted code as right when it is *close* to what the
# target wanted; they are **lossy**, and every such run measures its drift (the total variation between the
# distribution each token was emitted from and the target's). `tv_budget=` bounds that drift position by position.

# %%
import time

import matplotlib.pyplot as plt
import torch

from image_ar import ImageHeadDrafter, SpeculativeImagePipeline, generate_tokens
from image_ar.cli import image_grid
from image_ar.quality import FrechetScorer
from image_ar.shapes import CLASS_NAMES
from image_ar.zoo import load

target, vq = load("llamagen", progress=False), load("vq", progress=False)
head = load("llamagen-head", target=target, progress=False)
pipe = SpeculativeImagePipeline(target, vq, ImageHeadDrafter(head, 4))  # 4 drafted tokens per step
plain = SpeculativeImagePipeline(target, vq)                            # no drafter: one token per forward
labels = list(range(10))
print(f"LlamaGen {target.config.dim} x {target.config.n_layer}, {target.config.grid_size ** 2} tokens per image, "
      f"classes: {', '.join(CLASS_NAMES)}")

# %% [markdown]
# ## Lossless means the plain sampler's tokens
#
# At temperature 0 (with the same classifier-free guidance) the speculative pipeline must give exactly what
# `generate_tokens`, the plain autoregressive sampler, gives.

# %%
ref = generate_tokens(target, torch.tensor(labels), guidance_scale=4.0, temperature=0)
greedy = pipe(class_labels=labels, guidance_scale=4.0, temperature=0)
assert len(set(ref.flatten().tolist())) > 20  # diverse: the equality below is not vacuous
assert torch.equal(greedy.tokens, ref)  # the key number: identical tokens
print(greedy.stats.summary())

# %% [markdown]
# ## A grid: lossless, LANTERN, GSD, and LANTERN under a TV budget
#
# Sampled at LlamaGen's defaults (CFG 4, temperature 1, top-k), the same seed for every row. The lossless row is a
# sample of the target's own distribution; the relaxed rows take fewer target forwards and drift by the measured
# TV printed beside them.

# %%
settings = {"lossless": {}, "LANTERN δ=0.2": dict(acceptance="lantern", lantern_delta=0.2),
            "GSD": dict(acceptance="gsd"),
            "LANTERN δ=0.2, TV ≤ 0.05": dict(acceptance="lantern", lantern_delta=0.2, tv_budget=0.05)}
runs = {name: pipe(class_labels=labels * 4, seed=0, **kw) for name, kw in settings.items()}
fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.0 * len(runs)))
for ax, (name, out) in zip(axes, runs.items()):
    ax.imshow(image_grid(out.images[:20], rows=2))
    st = out.stats
    drift = "lossless" if st.lossless else f"LOSSY: TV mean {st.tv_mean:.3f}, max {st.tv_max:.2f}"
    ax.set_title(f"{name}: {sum(st.target_forwards) / st.images:.1f} target forwards per image (plain: 64), "
                 f"tau {st.tau:.2f} — {drift}", fontsize=9)
    ax.set_axis_off()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Where drafts are accepted, and where the drift goes
#
# Per token position of the 8 x 8 grid: the fraction of the 40 images whose token there was an accepted draft, and
# for the lossy rules the mean measured TV at that position. Position (0, 0) always comes from the prefill.

# %%
fig, axes = plt.subplots(2, len(runs), figsize=(3.0 * len(runs), 5.6))
for j, (name, out) in enumerate(runs.items()):
    im = axes[0, j].imshow(out.stats.acceptance_grid.numpy(), vmin=0, vmax=1, cmap="viridis")
    axes[0, j].set_title(f"{name}\naccepted {float(out.stats.acceptance_grid.mean()):.2f}", fontsize=9)
    tv = out.stats.tv_grid
    axes[1, j].imshow((tv if tv is not None else torch.zeros(8, 8)).numpy(), vmin=0, vmax=0.3, cmap="magma")
    axes[1, j].set_title("drift (TV)" if tv is not None else "drift: none (lossless)", fontsize=9)
    for ax in axes[:, j]:
        ax.set_xticks([]), ax.set_yticks([])
fig.colorbar(im, ax=axes[0], shrink=0.8, label="accepted fraction")
fig.colorbar(axes[1, 0].images[0], ax=axes[1], shrink=0.8, label="mean TV")
plt.show()

# %% [markdown]
# ## The δ / λ sweep: what relaxation buys and what it costs
#
# LANTERN's δ bounds the probability mass borrowed from a drafted code's latent neighbours (δ = 0 is lossless);
# LANTERN++ uses a ratio bound λ over the top-k neighbours instead. Each setting draws 100 images (10 per class,
# the same seeds); per setting: target forwards per image, the measured output TV (mean over tokens), and the
# Fréchet distance of the decoded images to 1000 real images of the image set (the zoo classifier's features in
# their top 8 principal axes, `image_ar.quality`). At 100 images the distance is noisy: the lossless rows (the
# speculative pipeline and plain decoding, one distribution) show how far two draws of the *same* distribution land.
# Wall-clock is timed one image per call, the latency regime speculative decoding is for (in a batch of 100 the
# plain sampler is already compute-bound on this CPU and drafting does not pay).

# %%
fd = FrechetScorer(load("image-classifier", progress=False), vq)
sweep = [("lossless", {})] + [(f"δ={d:g}", dict(acceptance="lantern", lantern_delta=d)) for d in (0.05, 0.1, 0.2, 0.4)] \
    + [(f"λ={l:g}", dict(acceptance="lantern", lantern_lambda=l, lantern_k=10)) for l in (2.0, 5.0)]
def ms_per_image(p, **kw):
    """Wall-clock of one image per call (the latency regime speculative decoding is for), over the ten classes."""
    p(class_labels=[0], seed=0, output_type="tokens", **kw)  # warm-up
    t0 = time.perf_counter()
    for c in labels:
        p(class_labels=[c], seed=c, output_type="tokens", **kw)
    return (time.perf_counter() - t0) / len(labels) * 1e3


points = []
for name, kw in sweep:
    out = pipe(class_labels=labels * 10, seed=1, output_type="tokens", **kw)
    points.append(dict(name=name, forwards=sum(out.stats.target_forwards) / 100, ms=ms_per_image(pipe, **kw),
                       tv=out.stats.tv_mean or 0.0, fd=fd(out.tokens), lossless=out.stats.lossless))
plain_out = plain(class_labels=labels * 10, seed=1, output_type="tokens")
points.append(dict(name="plain (no drafter)", forwards=64.0, ms=ms_per_image(plain), tv=0.0, fd=fd(plain_out.tokens),
                   lossless=True))
for p in points:
    print(f"{p['name']:>20}: {p['forwards']:5.1f} forwards/image, {p['ms']:5.0f} ms/image, "
          f"TV {p['tv']:.3f}, FD {p['fd']:.2f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
for ax, key, label in zip(axes, ("tv", "fd", "tv"), ("measured output TV (mean per token)",
                                                     "Fréchet distance to real images", "measured output TV")):
    xkey = "ms" if ax is axes[2] else "forwards"
    for p in points:
        x = p[xkey]
        ax.scatter(x, p[key], color="#1f77b4" if p["lossless"] else "#d62728", marker="o" if p["lossless"] else "x")
        ax.annotate(p["name"], (x, p[key]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("target forwards per image" if xkey == "forwards" else "ms per image, one image per call (this CPU)")
    ax.set_ylabel(label)
axes[0].set_title("drift vs forwards")
axes[1].set_title("quality vs forwards")
axes[2].set_title("drift vs wall-clock")
plt.tight_layout()
plt.show()
