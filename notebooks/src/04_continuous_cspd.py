# %% [markdown]
# # Continuous tokens and CSpD
#
# MAR-style models generate images as sequences of *continuous* tokens (here 8 x 8 latents of 4 channels from a
# diffusers `AutoencoderKL`): a transformer gives a condition per position, and a small diffusion head samples the
# token from it. There is no vocabulary to compare draft and target probabilities on, so speculative decoding needs
# densities: CSpD (Wang et al. 2024, "Continuous Speculative Decoding for Autoregressive Image Generation") accepts
# a drafted token with probability min(1, p(x) / q(x)) computed along the denoising trajectory the drafter sampled
# it on, and resamples rejected positions from the residual. The rule is **exact**: the images have the target's
# distribution.
#
# Zoo models: `zoo:continuous` (ContinuousAR 256 x 10 with its diffusion head), `zoo:continuous-draft` (1 layer),
# `zoo:kl-vae`.

# %%
import time

import matplotlib.pyplot as plt
import torch

from image_ar import SpeculativeImagePipeline, generate_continuous
from image_ar.cli import image_grid
from image_ar.shapes import CLASS_NAMES
from image_ar.zoo import load
from mmspec.twosample import energy_test

target, draft, vae = load("continuous", progress=False), load("continuous-draft", progress=False), load("kl-vae", progress=False)
plain = SpeculativeImagePipeline(target, vae=vae)                  # target-only, through the same loop
cspd = {k: SpeculativeImagePipeline(target, drafter=draft, vae=vae, tree=k) for k in (2, 4)}
labels = list(range(10))
cfg = target.config
print(f"target: {cfg.dim} x {cfg.n_layer}, head {cfg.head_width} x {cfg.head_depth}, {cfg.grid_size ** 2} tokens of "
      f"{cfg.token_dim} channels; drafter: {draft.config.dim} x {draft.config.n_layer}")

# %% [markdown]
# ## Decoded images: target-only and CSpD
#
# The same class labels; different random draws (CSpD spends its randomness differently, so the same seed does not
# give the same image — the *distribution* is the same). CSpD saves target forwards, but on this CPU it is *slower*
# than target-only sampling: every drafted token costs a whole denoising chain of the drafter's head and a density
# evaluation under the target's, and the zoo's target transformer is too cheap for the saved forwards to pay for
# that (`mmspec bench continuous` splits the time).

# %%
runs = {"target-only": plain(class_labels=labels * 2, guidance_scale=2.0, seed=0)}
for k, pipe in cspd.items():
    runs[f"CSpD, k={k}"] = pipe(class_labels=labels * 2, guidance_scale=2.0, seed=0)
fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.1 * len(runs)))
for ax, (name, out) in zip(axes, runs.items()):
    st = out.stats
    ax.imshow(image_grid(out.images, rows=2))
    ax.set_title(f"{name}: {sum(st.target_forwards) / st.images:.1f} target forwards per image, tau {st.tau:.2f}, "
                 f"{st.seconds / st.images * 1e3:.0f} ms per image", fontsize=9)
    ax.set_axis_off()
plt.tight_layout()
plt.show()
print("classes:", ", ".join(CLASS_NAMES))

# %% [markdown]
# ## Accepted tokens per verification
#
# How many tokens each verification step committed (accepted drafts + the target's own), and where in the token
# grid drafts were accepted.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for ax, k in zip(axes[:2], cspd):
    hist = runs[f"CSpD, k={k}"].stats.engine.acceptance_length_histogram
    total = sum(hist)
    ax.bar(range(len(hist)), [h / total for h in hist], color="#2ca02c")
    st = runs[f"CSpD, k={k}"].stats
    ax.set_title(f"CSpD k={k}: mean acceptance length {st.mean_acceptance_length:.2f}", fontsize=9)
    ax.set_xlabel("tokens committed in the step")
    ax.set_ylabel("share of steps")
    ax.set_xticks(range(1, len(hist)))
im = axes[2].imshow(runs["CSpD, k=4"].stats.acceptance_grid.numpy(), vmin=0, vmax=1, cmap="viridis")
axes[2].set_title("k=4: accepted fraction per token position", fontsize=9)
axes[2].set_xticks([]), axes[2].set_yticks([])
fig.colorbar(im, ax=axes[2])
plt.tight_layout()
plt.show()
for name, out in runs.items():
    print(f"{name:>12}: {out.stats.summary()}")

# %% [markdown]
# ## The two-sample test: CSpD against target-only sampling
#
# 150 images of one class from each sampler, compared as whole token sequences (64 x 4 numbers each) with the
# energy distance and a permutation p-value (`mmspec.twosample`). If CSpD were not exact, the test would see it:
# the drafter's *own* samples, a different distribution, are the control and must be rejected. The assertion is a
# test at the 0.1% level, the project's standard for distribution tests (2000 permutations; seeded, so the notebook
# reads the same p every run).

# %%
n, label = 150, 3
t0 = time.perf_counter()
reference = plain(class_labels=[label] * n, guidance_scale=2.0, seed=10**6, output_type="tokens").tokens
t_plain = time.perf_counter() - t0
t0 = time.perf_counter()
speculative = cspd[4](class_labels=[label] * n, guidance_scale=2.0, seed=0, output_type="tokens")
t_cspd = time.perf_counter() - t0
drafter_only = generate_continuous(draft, [label] * n, guidance_scale=2.0, generator=torch.Generator().manual_seed(5))
stat, p_cspd = energy_test(speculative.tokens, reference, permutations=2000)
stat_d, p_draft = energy_test(drafter_only, reference, permutations=2000)
print(f"CSpD vs target-only:         energy distance {stat:.4f}, p = {p_cspd:.4f}")
print(f"drafter alone vs target-only: energy distance {stat_d:.4f}, p = {p_draft:.4f}  (the control)")
print(f"{n} images: target-only {t_plain:.1f} s, CSpD k=4 {t_cspd:.1f} s; "
      f"{sum(speculative.stats.target_forwards) / n:.1f} target forwards per image instead of {cfg.grid_size ** 2}")
assert p_cspd > 1e-3  # the key number: CSpD's samples are not distinguishable from the target's
assert p_draft < 1e-3  # and the test has the power to tell a different distribution apart

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, x in (("target-only", reference), ("CSpD k=4", speculative.tokens), ("drafter alone", drafter_only)):
    ax.hist(x[:, :, 0].mean(1).numpy(), bins=25, histtype="step", lw=1.5, density=True, label=name)
ax.set_xlabel("mean of channel 0 over the image's tokens")
ax.set_ylabel("density")
ax.legend(fontsize=8)
ax.set_title(f"one summary of the {n} samples of class {CLASS_NAMES[label]!r}", fontsize=9)
plt.show()
