"""The image zoo: image models mmspec trains itself, offline and deterministically, on its own image set.

Random or one-millisecond models say nothing about speculative decoding: their forwards are all overhead and no
drafter agrees with them. These recipes train, on `image_ar.shapes` (ten classes of procedurally drawn 32x32 images:
a red disc, blue stripes, a green triangle, ...), the models a visual-AR speed-up needs, sized so that their cost
structure is that of real ones (a target forward costs many drafter forwards):

    vq                a diffusers VQModel (downsample 4: 8x8 codes, 256-code l2-normalised codebook, LlamaGen's
                      lookup), wrapped by `image_ar.models.vq.VQTokenizer`
    llamagen          a class-conditional LlamaGen (CFG null class) on the VQ codes: the target
    llamagen-draft    a small LlamaGen on the same codes: the draft-model drafter
    llamagen-head     an EAGLE-style ImageHead trained by self-distillation on the target's samples (image_ar.train)
    image-classifier  a small CNN on the image set's labels; its penultimate features give the Fréchet distance
                      (`image_ar.frechet`)
    kl-vae            a diffusers AutoencoderKL (4 latent channels, downsample 4: 8x8 tokens)
    continuous        a ContinuousAR (MAR-style: causal transformer + diffusion head) on the KL latents: the target
    continuous-draft  a small ContinuousAR: the CSpD drafter

    from image_ar.zoo import load
    target, vq = load("llamagen"), load("vq")                    # trained now (progress bars) if not cached
    pipe = SpeculativeImagePipeline.from_pretrained("zoo:llamagen", vq="zoo:vq", drafter="zoo:llamagen-head")

The machinery (cache directory, digests, model cards, ``zoo:NAME`` / ``zoo:NAME@quick`` paths) is `mmspec.zoo`; this
module holds the recipes (`MODELS`). Every recipe is deterministic (seeded generators; the same machine gives the
same weights) and has a quick variant (tiny sizes, a few steps, seconds) for the fast test tier.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmspec.zoo import BuildContext, Zoo, ZooModel, parameter_count, seeded

from . import shapes

DATA = "shapes-v1"  # bump when image_ar.shapes draws different images


# --- the shared training loop ---------------------------------------------------------------------------------------
def fit(module: torch.nn.Module, batch_loss, *, steps: int, lr: float, seed: int, desc: str, progress: bool,
        params=None, weight_decay: float = 0.0, every=None) -> list[float]:
    """AdamW with a one-cycle (warm-up, cosine) schedule and gradient clipping at 1.

    batch_loss(step, generator) -> loss of a fresh batch; every(step, generator) runs after each step (codebook
    restarts). Returns the per-step losses."""
    from tqdm.auto import tqdm

    module.train()
    opt = torch.optim.AdamW(params if params is not None else module.parameters(), lr=lr, betas=(0.9, 0.99),
                            weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        loss = batch_loss(step, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if every is not None:
            every(step, g)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    module.eval()
    return losses


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _tail(losses: list[float], n: int = 20) -> float:
    return round(sum(losses[-n:]) / len(losses[-n:]), 5)


def _data(r: dict) -> str:
    return (f"{DATA}: image_ar.shapes, {shapes.NUM_CLASSES} classes ({', '.join(shapes.CLASS_NAMES)}), "
            f"{r['image_size']}x{r['image_size']} px, fresh images every step (seed {r['seed']})")


def _batch(g: torch.Generator, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, shapes.NUM_CLASSES, (batch,), generator=g)
    return shapes.render(labels, g, size), labels


HELD_OUT_SEED = 10_000  # held-out images come from this seed; training draws from the recipe's


# --- VQ tokenizer ---------------------------------------------------------------------------------------------------
def _vq_model(r: dict):
    from diffusers import VQModel

    from .models.vq import llamagen_vq_config

    kw = llamagen_vq_config(tuple(r["channels"]), layers_per_block=1, attn_levels=(), z_channels=r["channels"][-1],
                            embed_dim=r["embed_dim"], codebook_size=r["codebook_size"], image_size=r["image_size"],
                            norm_num_groups=r["norm_groups"])
    return VQModel(**kw, mid_block_add_attention=False)


def _vq_pass(vq, x: torch.Tensor, quantise: bool, bf16: bool):
    """Reconstruction through l2-normalised latents, nearest l2-normalised code (LlamaGen's lookup) and the
    straight-through estimator (van den Oord et al. 2017, "Neural Discrete Representation Learning", eq. 3).
    Returns (loss, reconstruction loss, flat normalised latents (N, D), codes (N,) or None)."""
    with _autocast(bf16):
        h = vq.quant_conv(vq.encoder(x))
    z = F.normalize(h.float(), dim=1)  # (B, D, h, w)
    b, d, hh, ww = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D)
    loss, codes = 0.0, None
    if quantise:
        e = F.normalize(vq.quantize.embedding.weight, dim=-1)  # (V, D)
        codes = (flat @ e.t()).argmax(1)  # unit vectors: nearest = largest dot product
        zq = e[codes]
        loss = F.mse_loss(zq, flat.detach()) + 0.25 * F.mse_loss(flat, zq.detach())  # codebook + commitment
        flat_q = flat + (zq - flat).detach()
    else:
        flat_q = flat
    with _autocast(bf16):
        rec = vq.decoder(vq.post_quant_conv(flat_q.view(b, hh, ww, d).permute(0, 3, 1, 2)))
    rec_loss = F.mse_loss(rec.float(), x)
    return loss + rec_loss, rec_loss, flat, codes


def build_vq(ctx: BuildContext) -> dict:
    """Warm up as a plain autoencoder (the first `ae_fraction` of the steps), seed the codebook with encoder outputs,
    then train the VQ-VAE, restarting codes unused over a window with current latents (a standard fix against
    codebook collapse)."""
    from .models.vq import VQTokenizer

    r = ctx.recipe
    with seeded(r["seed"]):
        vq = _vq_model(r)
    warm = int(r["ae_fraction"] * r["steps"])
    state = {"usage": torch.zeros(r["codebook_size"]), "flat": None}

    def batch_loss(step, g):
        x, _ = _batch(g, r["batch_size"], r["image_size"])
        if step == warm:  # seed the codebook with encoder outputs
            with torch.no_grad():
                _, _, flat, _ = _vq_pass(vq, x, False, r["bf16"])
                pick = torch.randint(0, len(flat), (r["codebook_size"],), generator=g)
                vq.quantize.embedding.weight.copy_(flat[pick] + 0.02 * torch.randn(len(pick), flat.shape[1],
                                                                                    generator=g))
        loss, _, flat, codes = _vq_pass(vq, x, step >= warm, r["bf16"])
        if codes is not None:
            state["usage"] += torch.bincount(codes, minlength=r["codebook_size"])
            state["flat"] = flat.detach()
        return loss

    def restart(step, g):
        if step <= warm or (step - warm) % r["restart_every"] or step > 0.8 * r["steps"]:
            return
        dead = (state["usage"] == 0).nonzero().view(-1)
        if len(dead):
            with torch.no_grad():
                flat = state["flat"]
                pick = torch.randint(0, len(flat), (len(dead),), generator=g)
                vq.quantize.embedding.weight[dead] = flat[pick] + 0.02 * torch.randn(len(dead), flat.shape[1],
                                                                                    generator=g)
        state["usage"].zero_()

    losses = fit(vq, batch_loss, steps=r["steps"], lr=r["lr"], seed=r["seed"], desc="zoo vq", progress=ctx.progress,
                 every=restart)
    tok = VQTokenizer(vq.eval(), l2_norm=True)
    held = _vq_held_out(tok, r)
    tok.save_pretrained(ctx.out)
    return {"data": _data(r), "parameters": parameter_count(vq), "final_loss": _tail(losses), "held_out": held,
            "notes": f"{r['image_size']}x{r['image_size']} images -> {tok.grid_size}x{tok.grid_size} codes of a "
                     f"{r['codebook_size']}-code codebook (dimension {r['embed_dim']}, l2-normalised lookup)."}


@torch.no_grad()
def _vq_held_out(tok, r: dict) -> dict:
    x, _ = shapes.dataset(r["held_out"], seed=HELD_OUT_SEED, size=r["image_size"])
    codes = tok.encode(x)
    rec = tok.decode_codes(codes)
    return {"reconstruction MSE ([-1, 1] pixels)": round(float(F.mse_loss(rec, x)), 5),
            "codes used": int(codes.unique().numel()), "images": len(x)}


# --- LlamaGen target and draft --------------------------------------------------------------------------------------
def _codes(vq, g: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh batch: labels (B,) and their images' codes (B, N) in raster order."""
    x, labels = _batch(g, batch, vq.image_size)
    with torch.no_grad():
        return labels, vq.encode(x).flatten(1)


def _llamagen_config(r: dict, vq):
    from .models.llamagen import LlamaGenConfig

    return LlamaGenConfig(vocab_size=vq.codebook_size, dim=r["dim"], n_layer=r["n_layer"], n_head=r["n_head"],
                          multiple_of=32, grid_size=vq.grid_size, num_classes=shapes.NUM_CLASSES,
                          class_dropout_prob=r["class_dropout"])


def build_llamagen(ctx: BuildContext) -> dict:
    """Teacher-forced next-code cross-entropy on fresh images' codes every step, with class dropout (CFG's null
    class, LlamaGen's 10%)."""
    from .models.llamagen import LlamaGen
    from .models.vq import VQTokenizer

    r = ctx.recipe
    vq = VQTokenizer.from_pretrained(ctx.deps["vq"])
    with seeded(r["seed"]):
        model = LlamaGen(_llamagen_config(r, vq))

    def batch_loss(step, g):
        labels, codes = _codes(vq, g, r["batch_size"])
        drop = model.sample_cond_drop(len(labels), g)
        with _autocast(r["bf16"]):
            logits = model(codes[:, :-1], labels, cond_drop=drop).logits  # (B, N, V): prefix predicts code 0
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))

    losses = fit(model, batch_loss, steps=r["steps"], lr=r["lr"], seed=r["seed"], desc=f"zoo {ctx.name}",
                 progress=ctx.progress, weight_decay=r.get("weight_decay", 0.0))
    held = {"cross-entropy (nats / code)": round(_held_out_ce(model, vq, r), 4)}
    if "llamagen" in ctx.deps:  # a draft model: how often the target accepts its tokens
        target = LlamaGen.from_pretrained(ctx.deps["llamagen"])
        held.update(_drafter_held_out(target, vq, model, r))
    model.save_pretrained(ctx.out)
    cfg = model.config
    return {"data": _data({**r, "image_size": vq.image_size}) + " encoded by zoo:vq", "parameters": parameter_count(model),
            "final_loss": _tail(losses), "held_out": held,
            "notes": f"c2i LlamaGen, {cfg.dim} wide x {cfg.n_layer} layers, {cfg.vocab_size} codes on a "
                     f"{cfg.grid_size}x{cfg.grid_size} grid, {cfg.num_classes} classes + the CFG null class."}


@torch.no_grad()
def _held_out_ce(model, vq, r: dict) -> float:
    x, labels = shapes.dataset(r["held_out"], seed=HELD_OUT_SEED, size=vq.image_size)
    codes = vq.encode(x).flatten(1)
    logits = model(codes[:, :-1], labels).logits
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1)))


@torch.no_grad()
def _drafter_held_out(target, vq, drafter, r: dict) -> dict:
    """tau (tokens per target forward) and the per-token acceptance rate of the lossless pipeline on held-out class
    labels, CFG 4, temperature 1, no top-k, draft depth r["draft_tokens"]."""
    from .drafters import ImageHeadDrafter, ImageModelDrafter
    from .drafters.head import ImageHead
    from .pipeline import SpeculativeImagePipeline

    k = r.get("draft_tokens", 4)
    d = ImageHeadDrafter(drafter, k) if isinstance(drafter, ImageHead) else ImageModelDrafter(drafter, k)
    pipe = SpeculativeImagePipeline(target, vq, d)
    labels = [i % shapes.NUM_CLASSES for i in range(r["held_out_images"])]
    taus, acc = [], []
    for i, label in enumerate(labels):
        st = pipe(class_labels=[label], seed=HELD_OUT_SEED + i, top_k=0, output_type="tokens").stats
        taus.append(st.tau)
        acc.append(float(st.acceptance_grid.mean()))
    return {f"tau (k={k}, CFG 4, T=1)": round(sum(taus) / len(taus), 3),
            "accepted fraction of tokens": round(sum(acc) / len(acc), 3), "images": len(labels)}


def build_head(ctx: BuildContext) -> dict:
    """EAGLE-style self-distillation (Li et al. 2024, arXiv:2401.15077; image_ar.train's loss): the head learns the
    target's features and guided distribution on grids the target sampled itself (LANTERN's recipe). The teacher's
    features and distributions are recorded while sampling (`image_ar.train.sample_teacher`), so training costs only
    the head's own passes."""
    from .drafters.head import ImageHead
    from .models.llamagen import LlamaGen
    from .models.vq import VQTokenizer
    from .train import head_loss, sample_teacher

    r = ctx.recipe
    target = LlamaGen.from_pretrained(ctx.deps["llamagen"]).requires_grad_(False)
    vq = VQTokenizer.from_pretrained(ctx.deps["vq"])
    g = torch.Generator().manual_seed(r["seed"])
    labels = shapes.balanced_labels(r["samples"], g)
    t0 = time.perf_counter()
    grids, feats, probs = sample_teacher(target, labels, guidance_scale=r["guidance_scale"],
                                         batch_size=r["sample_batch"], generator=g, progress=ctx.progress)
    sampling = time.perf_counter() - t0
    with seeded(r["seed"]):
        head = ImageHead(target, n_layer=r["n_layer"])
    s = len(grids)

    def batch_loss(step, gen):
        idx = torch.randint(0, s, (r["batch_size"],), generator=gen)
        f = torch.cat([feats[idx], feats[s + idx]]) if r["guidance_scale"] != 1.0 else feats[idx]
        return head_loss(head, grids[idx], f, probs[idx], r["guidance_scale"], r["ce_weight"], r["feature_noise"],
                         gen)["loss"]

    losses = fit(head, batch_loss, steps=r["steps"], lr=r["lr"], seed=r["seed"], desc="zoo llamagen-head",
                 progress=ctx.progress)
    held = _drafter_held_out(target, vq, head, r)
    head.save_pretrained(ctx.out)
    return {"data": f"{r['samples']} grids sampled from zoo:llamagen (CFG {r['guidance_scale']}, temperature 1; "
                    f"{sampling:.0f} s), balanced classes", "parameters": parameter_count(head),
            "final_loss": _tail(losses), "held_out": held,
            "notes": f"EAGLE head: fc + {r['n_layer']} LlamaGen block(s) on the target's features; embedding and "
                     "output layer are the target's (not stored here). Load it with its target."}


# --- the classifier behind the Fréchet distance ---------------------------------------------------------------------
def build_classifier(ctx: BuildContext) -> dict:
    from .frechet import ClassifierConfig, ShapeClassifier

    r = ctx.recipe
    with seeded(r["seed"]):
        model = ShapeClassifier(ClassifierConfig(shapes.NUM_CLASSES, tuple(r["channels"]), r["image_size"]))

    def batch_loss(step, g):
        x, labels = _batch(g, r["batch_size"], r["image_size"])
        x = x + r["noise"] * torch.randn(x.shape, generator=g)  # robust to the small artefacts of decoded images
        return F.cross_entropy(model(x), labels)

    losses = fit(model, batch_loss, steps=r["steps"], lr=r["lr"], seed=r["seed"], desc="zoo image-classifier",
                 progress=ctx.progress)
    x, labels = shapes.dataset(r["held_out"], seed=HELD_OUT_SEED, size=r["image_size"])
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == labels).float().mean())
    model.save_pretrained(ctx.out)
    return {"data": _data(r), "parameters": parameter_count(model), "final_loss": _tail(losses),
            "held_out": {"accuracy": round(acc, 4), "images": len(x)},
            "notes": f"Its {model.feature_dim} penultimate features give the Fréchet distance (image_ar.frechet)."}


# --- continuous tokens: KL-VAE, ContinuousAR target and draft -------------------------------------------------------
def _kl_model(r: dict):
    from diffusers import AutoencoderKL

    n = len(r["channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(r["channels"]),
                         layers_per_block=1, latent_channels=r["latent_channels"], norm_num_groups=r["norm_groups"],
                         sample_size=r["image_size"], mid_block_add_attention=False)


def build_kl_vae(ctx: BuildContext) -> dict:
    """Reconstruction MSE + a small KL to N(0, I) (the LDM recipe without the adversarial and perceptual terms);
    the scaling factor is then set to 1 / std of the held-out latents (MAR's `vae_scale` is chosen the same way)."""
    r = ctx.recipe
    with seeded(r["seed"]):
        vae = _kl_model(r)

    def batch_loss(step, g):
        x, _ = _batch(g, r["batch_size"], r["image_size"])
        with _autocast(r["bf16"]):
            moments = vae.quant_conv(vae.encoder(x))
        mean, logvar = moments.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        with _autocast(r["bf16"]):
            rec = vae.decoder(vae.post_quant_conv(z))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        return F.mse_loss(rec.float(), x) + r["kl_weight"] * kl

    losses = fit(vae, batch_loss, steps=r["steps"], lr=r["lr"], seed=r["seed"], desc="zoo kl-vae",
                 progress=ctx.progress)
    x, _ = shapes.dataset(r["held_out"], seed=HELD_OUT_SEED, size=r["image_size"])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        std = float(z.std())
        vae.register_to_config(scaling_factor=1.0 / std, shift_factor=float(z.mean()))
        mse = float(F.mse_loss(vae.decode(z).sample.clamp(-1, 1), x))
    vae.save_pretrained(str(ctx.out), safe_serialization=True)
    return {"data": _data(r), "parameters": parameter_count(vae), "final_loss": _tail(losses),
            "held_out": {"reconstruction MSE ([-1, 1] pixels)": round(mse, 5), "latent std": round(std, 4),
                         "images": len(x)},
            "notes": f"{r['image_size']}x{r['image_size']} images -> {r['latent_channels']}-channel latents at "
                     f"1/{2 ** (len(r['channels']) - 1)} resolution; scaling_factor = 1 / latent std."}


def _latents(vae, g: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh batch: labels (B,) and their images' scaled latent tokens (B, N, C) (posterior mode)."""
    from .models.kl_vae import encode_images

    x, labels = _batch(g, batch, vae.config.sample_size)
    return labels, encode_images(vae, x)


def _continuous_config(r: dict, vae):
    from .models.continuous_ar import ContinuousARConfig

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return ContinuousARConfig(token_dim=vae.config.latent_channels, grid_size=vae.config.sample_size // f,
                              dim=r["dim"], n_layer=r["n_layer"], n_head=r["n_head"], num_classes=shapes.NUM_CLASSES,
                              head_width=r["head_width"], head_depth=r["head_depth"], train_steps=1000,
                              sampling_steps=r["sampling_steps"], noise_schedule=r["noise_schedule"])


def build_continuous(ctx: BuildContext) -> dict:
    """MAR's loss on fresh images' latents: the transformer's output conditions the diffusion head, trained on
    `diffusion_batch_mul` noisy copies of every token (MAR: 4), with class dropout for CFG."""
    from .models.continuous_ar import ContinuousAR
    from .models.kl_vae import load_kl_vae

    r = ctx.recipe
    vae = load_kl_vae(ctx.deps["kl-vae"])
    with seeded(r["seed"]):
        model = ContinuousAR(_continuous_config(r, vae))
    mul = r["diffusion_batch_mul"]

    def batch_loss(step, g):
        labels, tokens = _latents(vae, g, r["batch_size"])
        drop = model.sample_cond_drop(len(labels), g)
        with _autocast(r["bf16"]):
            z = model(tokens[:, :-1], labels, cond_drop=drop).hidden  # (B, N, D): condition of token i at i
        z = z.float().reshape(-1, z.shape[-1]).repeat(mul, 1)
        return model.diffloss.loss(z, tokens.reshape(-1, tokens.shape[-1]).repeat(mul, 1), g)

    losses = fit(model, batch_loss, steps=r["steps"], lr=r["lr"], seed=r["seed"], desc=f"zoo {ctx.name}",
                 progress=ctx.progress)
    g = torch.Generator().manual_seed(HELD_OUT_SEED)
    with torch.no_grad():
        labels, tokens = _latents(vae, g, r["held_out"])
        z = model(tokens[:, :-1], labels).hidden.reshape(-1, model.config.dim)
        held = {"diffusion loss": round(float(model.diffloss.loss(z.repeat(4, 1),
                                                                   tokens.reshape(-1, tokens.shape[-1]).repeat(4, 1),
                                                                   g)), 5)}
    if "continuous" in ctx.deps:
        target = ContinuousAR.from_pretrained(ctx.deps["continuous"])
        held.update(_cspd_held_out(target, model, r))
    model.save_pretrained(ctx.out)
    cfg = model.config
    return {"data": _data({**r, "image_size": vae.config.sample_size}) + " encoded by zoo:kl-vae",
            "parameters": parameter_count(model), "final_loss": _tail(losses), "held_out": held,
            "notes": f"causal ContinuousAR, {cfg.dim} wide x {cfg.n_layer} layers; diffusion head {cfg.head_width} "
                     f"wide x {cfg.head_depth} blocks, {cfg.sampling_steps} {cfg.noise_schedule} sampling steps; "
                     f"{cfg.grid_size}x{cfg.grid_size} tokens of {cfg.token_dim} channels."}


@torch.no_grad()
def _cspd_held_out(target, draft, r: dict) -> dict:
    from .pipeline import SpeculativeImagePipeline

    k = r.get("draft_tokens", 4)
    pipe = SpeculativeImagePipeline(target, drafter=draft, tree=k)
    labels = [i % shapes.NUM_CLASSES for i in range(r["held_out_images"])]
    st = pipe(class_labels=labels, seed=HELD_OUT_SEED, guidance_scale=2.0, output_type="tokens").stats
    return {f"CSpD tau (k={k}, CFG 2)": round(st.tau, 3), "images": len(labels)}


# --- recipes ----------------------------------------------------------------------------------------------------------
HELD = dict(held_out=500, held_out_images=10)
QUICK_HELD = dict(held_out=16, held_out_images=1)
MODELS = [
    ZooModel("vq", "VQ tokenizer (diffusers VQModel, 32 px -> 8x8 codes of 256)", build=build_vq,
             recipe=dict(data=DATA, image_size=32, channels=(16, 32, 64), norm_groups=8, embed_dim=8,
                         codebook_size=256, steps=450, batch_size=32, lr=3e-3, ae_fraction=0.3, restart_every=50,
                         bf16=True, seed=0, **HELD),
             quick=dict(image_size=16, channels=(8, 8, 16), codebook_size=32, steps=12, batch_size=8, **QUICK_HELD),
             loads_with="image_ar.models.vq.load_vq(mmspec.zoo.resolve('zoo:vq', image_ar.zoo.zoo()))"),
    ZooModel("llamagen", "class-conditional LlamaGen target on zoo:vq codes", build=build_llamagen, needs=("vq",),
             recipe=dict(data=DATA, dim=384, n_layer=8, n_head=6, class_dropout=0.1, steps=150, batch_size=32,
                         lr=3e-3, bf16=True, seed=0, **HELD),
             quick=dict(dim=32, n_layer=1, n_head=2, steps=10, batch_size=8, **QUICK_HELD),
             loads_with="SpeculativeImagePipeline.from_pretrained('zoo:llamagen', vq='zoo:vq')"),
    ZooModel("llamagen-draft", "small LlamaGen on zoo:vq codes (draft-model drafter for zoo:llamagen)",
             build=build_llamagen, needs=("vq", "llamagen"),
             recipe=dict(data=DATA, dim=128, n_layer=2, n_head=2, class_dropout=0.1, steps=400, batch_size=32,
                         lr=2e-3, bf16=False, seed=1, draft_tokens=4, **HELD),
             quick=dict(dim=32, n_layer=1, n_head=2, steps=8, batch_size=8, **QUICK_HELD),
             loads_with="SpeculativeImagePipeline.from_pretrained('zoo:llamagen', vq='zoo:vq', "
                        "drafter='zoo:llamagen-draft')"),
    ZooModel("llamagen-head", "EAGLE-style head for zoo:llamagen (self-distilled)", build=build_head,
             needs=("vq", "llamagen"),
             recipe=dict(n_layer=1, samples=256, sample_batch=128, guidance_scale=4.0, steps=300, batch_size=16,
                         lr=3e-3, ce_weight=1.0, feature_noise=0.0, seed=2, draft_tokens=3, **HELD),
             quick=dict(samples=8, sample_batch=8, steps=5, batch_size=4, **QUICK_HELD),
             loads_with="SpeculativeImagePipeline.from_pretrained('zoo:llamagen', vq='zoo:vq', "
                        "drafter='zoo:llamagen-head')"),
    ZooModel("image-classifier", "small CNN on the image set's classes (features for the Fréchet distance)",
             build=build_classifier,
             recipe=dict(data=DATA, image_size=32, channels=(16, 32, 64), steps=300, batch_size=64, lr=3e-3,
                         noise=0.05, seed=3, **HELD),
             quick=dict(image_size=16, channels=(4, 8), steps=6, batch_size=8, **QUICK_HELD),
             loads_with="image_ar.frechet.ShapeClassifier.from_pretrained(mmspec.zoo.resolve('zoo:image-classifier', "
                        "image_ar.zoo.zoo()))"),
    ZooModel("kl-vae", "KL autoencoder (diffusers AutoencoderKL, 32 px -> 8x8x4 latents)", build=build_kl_vae,
             recipe=dict(data=DATA, image_size=32, channels=(16, 32, 64), norm_groups=8, latent_channels=4,
                         kl_weight=1e-4, steps=500, batch_size=32, lr=3e-3, bf16=True, seed=4, **HELD),
             quick=dict(image_size=16, channels=(8, 8, 16), steps=10, batch_size=8, **QUICK_HELD),
             loads_with="image_ar.models.kl_vae.load_kl_vae(mmspec.zoo.resolve('zoo:kl-vae', image_ar.zoo.zoo()))"),
    ZooModel("continuous", "continuous-token AR target (MAR-style) on zoo:kl-vae latents", build=build_continuous,
             needs=("kl-vae",),
             recipe=dict(data=DATA, dim=256, n_layer=10, n_head=4, head_width=96, head_depth=2, sampling_steps=10,
                         noise_schedule="linear", diffusion_batch_mul=4, steps=200, batch_size=32, lr=2e-3,
                         bf16=True, seed=5, **HELD),
             quick=dict(dim=32, n_layer=1, n_head=2, head_width=16, head_depth=1, sampling_steps=4, steps=8,
                        batch_size=8, **QUICK_HELD),
             loads_with="SpeculativeImagePipeline.from_pretrained('zoo:continuous', vae='zoo:kl-vae')"),
    ZooModel("continuous-draft", "small ContinuousAR (CSpD drafter for zoo:continuous)", build=build_continuous,
             needs=("kl-vae", "continuous"),
             recipe=dict(data=DATA, dim=96, n_layer=1, n_head=2, head_width=64, head_depth=2, sampling_steps=10,
                         noise_schedule="linear", diffusion_batch_mul=4, steps=300, batch_size=32, lr=2e-3,
                         bf16=False, seed=6, draft_tokens=4, **HELD),
             quick=dict(dim=32, n_layer=1, n_head=2, head_width=16, head_depth=1, sampling_steps=4, steps=6,
                        batch_size=8, **QUICK_HELD),
             loads_with="SpeculativeImagePipeline.from_pretrained('zoo:continuous', vae='zoo:kl-vae', "
                        "drafter='zoo:continuous-draft')"),
]
IMAGE_DEMO = ("vq", "llamagen", "llamagen-head")  # what `run_image_demo` needs
IMAGE_BENCH = ("vq", "llamagen", "llamagen-draft", "llamagen-head", "image-classifier")
CONTINUOUS_BENCH = ("kl-vae", "continuous", "continuous-draft")


def zoo(root: Path | str | None = None) -> Zoo:
    """The image zoo over `root` (default: mmspec.zoo.zoo_dir(), i.e. $MMSPEC_ZOO or ~/.cache/mmspec/zoo)."""
    return Zoo(MODELS, root)


def resolve(spec, progress: bool = True):
    """`spec` itself, or the directory of the image-zoo model it names ("zoo:NAME" / "zoo:NAME@quick")."""
    from mmspec.zoo import resolve as _resolve

    return _resolve(spec, zoo(), progress=progress)


def load(name: str, quick: bool = False, progress: bool = True, target=None):
    """A zoo model as an object (built first if not cached): vq -> VQTokenizer, llamagen / llamagen-draft ->
    LlamaGen, llamagen-head -> ImageHead (on `target`, default the zoo target), image-classifier -> ShapeClassifier,
    kl-vae -> AutoencoderKL, continuous / continuous-draft -> ContinuousAR."""
    path = zoo().get(name, quick=quick, progress=progress)
    if name == "vq":
        from .models.vq import VQTokenizer

        return VQTokenizer.from_pretrained(path)
    if name in ("llamagen", "llamagen-draft"):
        from .models.llamagen import LlamaGen

        return LlamaGen.from_pretrained(path)
    if name == "llamagen-head":
        from .drafters.head import ImageHead

        return ImageHead.from_pretrained(path, target if target is not None else load("llamagen", quick, progress))
    if name == "image-classifier":
        from .frechet import ShapeClassifier

        return ShapeClassifier.from_pretrained(path)
    if name == "kl-vae":
        from .models.kl_vae import load_kl_vae

        return load_kl_vae(path)
    from .models.continuous_ar import ContinuousAR

    return ContinuousAR.from_pretrained(path)
