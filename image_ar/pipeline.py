"""SpeculativeImagePipeline: class- or text-conditional image generation with speculative decoding.

    from image_ar import SpeculativeImagePipeline
    pipe = SpeculativeImagePipeline.from_pretrained("path/to/llamagen", vq="path/to/vq", drafter="jacobi")
    out = pipe(class_labels=[3, 7], guidance_scale=4.0, temperature=1.0, top_k=2000,
               acceptance="lossless", generator=torch.Generator().manual_seed(0))
    out.images   # PIL images
    out.stats    # target forwards per image, tau, acceptance by token position (a grid the size of the image)

The pipeline composes components passed in (ARCHITECTURE.md): an image target (``LlamaGenTarget``, or the Janus /
Emu3 adapters), a VQ tokenizer for LlamaGen, a drafter (``"jacobi"``: SJD, no model; a head or LlamaGen checkpoint
path; any Drafter object), and an acceptance rule. The decode loop is the engine's, so the lossless rules are its
kernels (ALGORITHMS.md section 5): at temperature 0 greedy verification, else speculative sampling with the draft's
q, both over the CFG-combined distribution, which makes the images exactly the target's. ``acceptance="lantern"`` /
``"gsd"`` are LOSSY: every such run measures the per-position TV between the distribution each token was emitted from
and the target's, reports it in ``out.stats`` (mean, max, a grid) and can be held under ``tv_budget``.

Continuous-token targets (:class:`~image_ar.models.continuous_ar.ContinuousAR`, MAR-style: VAE latents and a
diffusion head) run through the same class: ``vae=`` decodes their tokens (diffusers ``AutoencoderKL``), drafters are
small ContinuousARs, and ``acceptance="cspd"`` (or "lossless", the same rule) is exact CSpD (section 6).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import torch

from mmspec.checks import check_number, check_seed
from mmspec.errors import (CheckpointError, GenerationConfigError, IncompatibleModelsError, InvalidInputError,
                           UnsupportedModelError)
from mmspec.loop import SpeculativeDecoder
from mmspec.stats import GenerationStats

from .acceptance import gsd, latent_neighbours, lantern
from .acceptance.budget import check_tv_budget
from .acceptance.cspd import CSpD
from .continuous_target import ContinuousARTarget
from .drafters import ImageHead, ImageHeadDrafter, ImageModelDrafter, JacobiDrafter, is_head_checkpoint
from .drafters.continuous import ContinuousDrafter, check_prefill_ratio
from .models.continuous_ar import KIND as CONTINUOUS_KIND, ContinuousAR
from .models.guided import check_guidance_scale
from .models.kl_vae import decode_tokens, load_kl_vae
from .models.llamagen import LlamaGen, directory_kind
from .models.vq import VQTokenizer, load_vq, to_pil
from .target import LlamaGenTarget

ACCEPTANCE = ("lossless", "lantern", "gsd", "cspd")


class _Default(int):
    """An int default that knows it was not passed: continuous targets refuse a top_k they were given, not this."""


TOP_K = _Default(2000)  # LlamaGen's c2i default


@dataclass
class ImageStats:
    """What a generation cost and, for lossy rules, how far it drifted. Grids are (rows, cols) over image positions.

    target_forwards: per image, the target forwards it took part in (prefill included); tau: image tokens per
    target forward, mean over images; acceptance_grid: fraction of images whose token at that position was an
    accepted draft token; tv_grid: mean measured per-position TV (None for lossless rules); tv_mean / tv_max over
    every generated token.
    """

    acceptance: str
    lossless: bool
    images: int
    tokens_per_image: int
    target_forwards: list[int]
    tau: float
    acceptance_grid: torch.Tensor
    tv_grid: torch.Tensor | None
    tv_mean: float | None
    tv_max: float | None
    seconds: float
    engine: GenerationStats = field(repr=False)
    residual_draws: int | None = None  # CSpD: chains the residual sampler drew from the target's head (all images)
    settings: dict = field(default_factory=dict)  # every setting of the call, defaults resolved (seed included)

    @property
    def mean_acceptance_length(self) -> float:
        """vLLM's mean acceptance length over the decoding steps that had a draft (1 + accepted drafts per draft,
        prefill excluded); `tau` above counts tokens per target forward with the prefill."""
        return self.engine.mean_acceptance_length

    def as_dict(self) -> dict:
        return {"acceptance": self.acceptance, "lossless": self.lossless, "images": self.images,
                **self.engine.vllm_metrics(),  # vLLM's names (mmspec.stats)
                "tokens_per_image": self.tokens_per_image, "target_forwards": self.target_forwards,
                "mean_target_forwards": sum(self.target_forwards) / max(1, len(self.target_forwards)),
                "tau": self.tau, "mean_acceptance": float(self.acceptance_grid.mean()),
                "tv_mean": self.tv_mean, "tv_max": self.tv_max, "seconds": self.seconds,
                "residual_draws": self.residual_draws, "settings": dict(self.settings)}

    def summary(self) -> str:
        rule = self.acceptance if self.lossless else f"{self.acceptance} (LOSSY)"
        line = (f"{self.images} image(s) x {self.tokens_per_image} tokens | {rule} | tau {self.tau:.2f} tokens/"
                f"forward | {sum(self.target_forwards) / max(1, self.images):.1f} target forwards per image | "
                f"{self.seconds:.2f} s")
        if self.tv_mean is not None:
            line += f" | measured output TV per position: mean {self.tv_mean:.4f}, max {self.tv_max:.4f}"
        return line


@dataclass
class ImagePipelineOutput:
    images: list | None  # PIL images (None with output_type="tokens")
    tokens: torch.Tensor  # (N, tokens_per_image) long; continuous targets: (N, tokens_per_image, C) float
    stats: ImageStats


class SpeculativeImagePipeline:
    """target: a LlamaGen or an image target adapter (``requests``/``prefill``/``verify``/``commit``, with ``grid`` and
    ``decode``). vq: a VQTokenizer (or anything ``load_vq`` takes) for LlamaGen targets; its codebook must match the
    target's vocabulary. drafter: None (plain decoding), "jacobi", a LlamaGen (draft model), a path to a head or
    LlamaGen checkpoint, or a Drafter object. tree: tokens drafted per step, the engine's and SpeculativeVLM's name
    (image drafters draft chains, so an int; default 4 for model and head drafters, 15 for SJD, whose window is
    the pending token + tree). Old names, still accepted: ``draft_tokens`` (= tree) and ``window`` (= tree + 1).
    jacobi_init: SJD's initialisation.

    Continuous targets (a ContinuousAR or ContinuousARTarget): vae (or vq, the same slot) is an AutoencoderKL or
    anything ``load_kl_vae`` takes; drafter is None, a ContinuousAR or its directory; cspd_max_candidates bounds the
    residual sampler (see image_ar.acceptance.cspd). compile: decode over a static cache with compiled forwards
    (`mmspec.compile`; None = on for CUDA where the target and drafter can: Janus and Emu3 targets can, LlamaGen's
    buffer-cache models not yet)."""

    def __init__(self, target, vq=None, drafter=None, *, vae=None, tree: int | None = None,
                 jacobi_init: str = "random", neighbours_cache: str | Path | None = None,
                 cspd_max_candidates: int = 1 << 16, draft_tokens: int | None = None, window: int | None = None,
                 compile: bool | None = None):
        from mmspec.compat import renamed

        tree = renamed("tree", tree, "draft_tokens", draft_tokens)
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or window < 2:
                raise InvalidInputError(f"window={window!r}: must be an int >= 2 (the pending token + >= 1 draft); "
                                        "pass tree= (the drafted tokens) instead")
            tree = renamed("tree", tree, "window", window - 1, note=f" (window={window} is tree={window - 1})")
        if tree is not None and (isinstance(tree, bool) or not isinstance(tree, int) or tree < 1):
            raise InvalidInputError(f"tree={tree!r}: image drafters draft chains; pass the number of tokens drafted "
                                    "per step (an int >= 1)")
        if tree is not None and drafter is None:  # (it would be ignored: target-only decoding drafts nothing)
            raise InvalidInputError(f"tree={tree!r} without a drafter: target-only decoding drafts nothing; pass "
                                    "drafter= (e.g. 'jacobi') or drop tree=")
        if isinstance(target, LlamaGen):  # LlamaGen's c2i default CFG scale when the model has a null class
            target = LlamaGenTarget(target, 4.0 if target.config.has_null_class else 1.0)
        elif isinstance(target, ContinuousAR):
            target = ContinuousARTarget(target)
        self.target = target
        if not all(hasattr(self.target, a) for a in ("requests", "prefill", "verify", "commit", "grid")):
            raise UnsupportedModelError(f"target {type(target).__name__} is neither a LlamaGen nor an image target "
                                        "adapter (requests / prefill / verify / commit / grid)")
        self.continuous = bool(getattr(self.target, "continuous", False))
        self.cspd_max_candidates = cspd_max_candidates
        self.vae = None
        if self.continuous:
            self.vae, vq = _as_vae(vae if vae is not None else vq), None
        elif vae is not None:
            raise InvalidInputError("vae= decodes continuous tokens; a discrete (VQ) target takes vq=")
        self.vq = None if vq is None else load_vq(vq)
        if self.vq is not None and self.vq.codebook_size != self.target.vocab_size:
            raise IncompatibleModelsError(f"the VQ tokenizer has {self.vq.codebook_size} codes but the target "
                                          f"predicts {self.target.vocab_size} image tokens: use the tokenizer the "
                                          "target was trained with")
        self.drafter_spec = drafter
        self.tree, self.jacobi_init = tree, jacobi_init
        self.neighbours_cache = neighbours_cache
        self._drafter = self._make_drafter(drafter)
        self.decoder = SpeculativeDecoder(self.target, self._drafter, compile=compile)

    @classmethod
    def from_pretrained(cls, target, vq=None, drafter=None, *, dtype=torch.float32, device_map=None,
                        target_config=None, device=None, **kwargs):
        """target: a LlamaGen directory (``save_pretrained``) or reference checkpoint file, or a model; vq: a VQ
        directory / reference file; drafter: None, "jacobi", or a head / LlamaGen checkpoint path. target_config: for
        reference files, a preset name ("GPT-L"), a LlamaGenConfig, or a dict of fields the weights do not hold
        (e.g. {"grid_size": 24} for the 384 px models; LlamaGen.from_pretrained documents the rest).

        Every path may name a model of the image zoo instead (`image_ar.zoo`, trained on first use):
        ``from_pretrained("zoo:llamagen", vq="zoo:vq", drafter="zoo:llamagen-head")``; "zoo:NAME@quick" is its
        quick variant. dtype / device_map name the weights' dtype and device as in transformers 5 (device_map is
        one device here; ``device`` is its old spelling, still accepted)."""
        from mmspec.compat import renamed

        from .zoo import resolve

        device = renamed("device_map", device_map, "device", device)
        target, vq, drafter = resolve(target), resolve(vq), resolve(drafter)
        if "vae" in kwargs:
            kwargs["vae"] = resolve(kwargs["vae"])
        if isinstance(target, (str, Path)):
            over = target_config if isinstance(target_config, dict) else {}
            cfg = None if isinstance(target_config, dict) else target_config
            kind = ContinuousAR if is_continuous_dir(Path(target)) else LlamaGen
            target = kind.from_pretrained(target, cfg, dtype=dtype, **over)
        if device is not None and isinstance(target, torch.nn.Module):
            target = target.to(device)
        if isinstance(target, ContinuousAR):
            vae = kwargs.pop("vae", None) or vq
            vae = load_kl_vae(vae, dtype=dtype) if isinstance(vae, (str, Path)) else vae
            if vae is not None and device is not None:
                vae = vae.to(device)
            return cls(target, None, drafter, vae=vae, **kwargs)
        if vq is not None and not isinstance(vq, VQTokenizer):
            vq = load_vq(vq)
        if vq is not None and device is not None:
            vq = vq.to(device)
        return cls(target, vq, drafter, **kwargs)

    def _make_drafter(self, drafter):
        if drafter is None:
            return None
        if self.continuous:
            return self._continuous_drafter(drafter)
        if isinstance(drafter, str) and drafter == "jacobi":
            return JacobiDrafter((self.tree or 15) + 1, self.jacobi_init)
        if isinstance(drafter, (str, Path)):
            drafter = self._load_drafter(Path(drafter))
        if isinstance(drafter, LlamaGen):
            return ImageModelDrafter(drafter.to(self.target.device), self.tree or 4)
        if _is_drafter(drafter):
            return drafter
        raise InvalidInputError(f"drafter={drafter!r}: expected None, 'jacobi', a LlamaGen, a checkpoint path or a "
                                "Drafter object")

    def _continuous_drafter(self, drafter):
        if isinstance(drafter, (str, Path)) and str(drafter) != "jacobi":
            if not is_continuous_dir(Path(drafter)):
                raise CheckpointError(f"drafter {str(drafter)!r} is not a ContinuousAR directory (save_pretrained)")
            drafter = ContinuousAR.from_pretrained(drafter, dtype=self.target.model.dtype)
        if isinstance(drafter, ContinuousAR):
            return ContinuousDrafter(drafter.to(self.target.device), self.tree or 4)
        if _is_drafter(drafter):
            return drafter
        raise InvalidInputError(f"drafter={drafter!r}: a continuous-token target takes None, a ContinuousAR (or its "
                                "directory) or a Drafter object; 'jacobi' and heads work on discrete tokens")

    def _load_drafter(self, path: Path):
        if not path.exists():
            raise CheckpointError(f"drafter {str(path)!r} does not exist: expected 'jacobi', a head directory "
                                  "(image_ar.train) or a LlamaGen checkpoint")
        if is_head_checkpoint(path):
            return ImageHeadDrafter(ImageHead.from_pretrained(path, self.target.model), self.tree or 4)
        return LlamaGen.from_pretrained(path, dtype=self.target.model.dtype)

    @property
    def drafter(self):
        return self._drafter

    # --- generation -----------------------------------------------------------------------------------------------
    def _kernel(self, acceptance, temperature, lantern_k, lantern_delta, lantern_lambda, gsd_rank_window,
                gsd_prob_threshold, gsd_embed_threshold, tv_budget, progress: bool = False):
        """The acceptance rule of one call (settings already checked by `check_settings`)."""
        if self.continuous:
            return CSpD(self.target.head, temperature, max_candidates=self.cspd_max_candidates)
        if acceptance == "lossless":
            return None
        codebook = self._codebook(acceptance)
        if acceptance == "gsd":
            return gsd(rank_window=7 if gsd_rank_window is None else gsd_rank_window,
                       prob_threshold=0.15 if gsd_prob_threshold is None else gsd_prob_threshold,
                       embed_threshold=0.5 if gsd_embed_threshold is None else gsd_embed_threshold,
                       embeddings=codebook, tv_budget=tv_budget, report_tv=True)
        vocab = self.target.vocab_size
        if lantern_delta is None and lantern_lambda is None:
            lantern_delta = 0.1
        k = lantern_k if lantern_k is not None else (1000 if lantern_lambda is None else 10)
        k = min(k, vocab - 2)
        table = latent_neighbours(codebook, k + 1, cache_dir=self.neighbours_cache,  # k + 1: LANTERN zeroes k + 1
                                  progress=progress)
        return lantern(table, delta=lantern_delta, lam=lantern_lambda, k=k, tv_budget=tv_budget, report_tv=True)

    def _codebook(self, acceptance: str) -> torch.Tensor:
        if self.vq is not None:
            return self.vq.codebook_embeddings().detach()
        embed = getattr(self.target, "codebook_embeddings", None)
        if embed is None:
            raise GenerationConfigError(f"acceptance={acceptance!r} needs the codebook's latent geometry, which "
                                        f"{type(self.target).__name__} does not expose; relaxed rules run on "
                                        "LlamaGen targets with vq= (use acceptance='lossless' here)")
        return embed().detach()

    def _conditions(self, class_labels, prompt_embeds, prompt_mask, prompt, num_images_per_prompt):
        given = [n for n, v in (("class_labels", class_labels), ("prompt_embeds", prompt_embeds), ("prompt", prompt))
                 if v is not None]
        if len(given) != 1:
            raise InvalidInputError(f"pass exactly one of class_labels, prompt_embeds, prompt; got {given or 'none'}")
        n = num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"num_images_per_prompt={n!r}: must be an int >= 1")
        if class_labels is not None:
            return _class_labels(class_labels).repeat_interleave(n), None
        if prompt_embeds is not None:
            embeds = torch.as_tensor(prompt_embeds)
            mask = None if prompt_mask is None else torch.as_tensor(prompt_mask).repeat_interleave(n, 0)
            return embeds.repeat_interleave(n, 0), mask
        if isinstance(self.target, LlamaGenTarget):
            raise UnsupportedModelError("prompt= needs a text encoder, which LlamaGen does not include: pass "
                                        "prompt_embeds= (caption embeddings, e.g. from FLAN-T5) for a t2i LlamaGen, "
                                        "class_labels= for c2i")
        prompts = [prompt] if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                             and isinstance(prompt[0], int)) else list(prompt)
        return [p for p in prompts for _ in range(n)], None

    def __call__(self, class_labels=None, prompt_embeds=None, *, prompt=None, prompt_mask=None,
                 guidance_scale: float | None = None, temperature: float = 1.0, top_k: int | None = TOP_K,
                 top_p: float = 1.0, acceptance: str = "lossless", lantern_k: int | None = None,
                 lantern_delta: float | None = None, lantern_lambda: float | None = None,
                 gsd_rank_window: int | None = None, gsd_prob_threshold: float | None = None,
                 gsd_embed_threshold: float | None = None, tv_budget: float | None = None,
                 num_images_per_prompt: int = 1, generator=None, seed: int | None = None,
                 num_tokens: int | None = None, output_type: str = "pil", progress: bool = False,
                 guidance_schedule: str | None = None, prefill_ratio: float | None = None) -> ImagePipelineOutput:
        stream = self.stream(class_labels, prompt_embeds, prompt=prompt, prompt_mask=prompt_mask,
                             guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                             acceptance=acceptance, lantern_k=lantern_k, lantern_delta=lantern_delta,
                             lantern_lambda=lantern_lambda, gsd_rank_window=gsd_rank_window,
                             gsd_prob_threshold=gsd_prob_threshold, gsd_embed_threshold=gsd_embed_threshold,
                             tv_budget=tv_budget, num_images_per_prompt=num_images_per_prompt, generator=generator,
                             seed=seed, num_tokens=num_tokens, output_type=output_type,
                             guidance_schedule=guidance_schedule, prefill_ratio=prefill_ratio, progress=progress)
        bar = _progress(progress, stream.total_tokens)
        for event in stream:
            if bar is not None:
                bar.update(len(event.tokens))
        if bar is not None:
            bar.close()
        return stream.output

    def stream(self, class_labels=None, prompt_embeds=None, *, prompt=None, prompt_mask=None,
               guidance_scale: float | None = None, temperature: float = 1.0, top_k: int | None = TOP_K,
               top_p: float = 1.0, acceptance: str = "lossless", lantern_k: int | None = None,
               lantern_delta: float | None = None, lantern_lambda: float | None = None,
               gsd_rank_window: int | None = None, gsd_prob_threshold: float | None = None,
               gsd_embed_threshold: float | None = None, tv_budget: float | None = None,
               num_images_per_prompt: int = 1, generator=None, seed: int | None = None,
               num_tokens: int | None = None, output_type: str = "pil", guidance_schedule: str | None = None,
               prefill_ratio: float | None = None, progress: bool = False) -> "ImageStream":
        """Generate images. Defaults are LlamaGen's c2i sampling defaults (CFG 4, temperature 1, top-k 2000);
        guidance_scale None keeps the target's (4.0 for a LlamaGen with a null class, else 1.0; an adapter's own).

        class_labels (c2i: an int or a 1-D list / tensor of ints) / prompt_embeds + prompt_mask (t2i LlamaGen) /
        prompt (Janus, Emu3 adapters); generator: one torch.Generator (rows draw from per-row generators seeded from
        it) or one per image; seed: shortcut (None with no generator: a fresh seed, recorded in ``out.stats``).
        temperature: >= 0 (0 = greedy); top_k: default 2000 (LlamaGen's), None or 0 = off; top_p in (0, 1];
        guidance_scale >= 0. acceptance: "lossless" | "lantern" (lantern_delta in [0, 1] (default 0.1) or
        lantern_lambda >= 1, lantern_k (default 1000, or 10 with lambda; capped at V - 2)) | "gsd" (gsd_rank_window
        7, gsd_prob_threshold 0.15, gsd_embed_threshold 0.5 when None); tv_budget in [0, 1]: per-position TV budget
        for the relaxed rules (0 = lossless). A setting of another rule (or one a continuous target has no use for)
        is refused, never ignored. num_tokens: stop after this many tokens (partial images come back as tokens only).
        output_type: "pil" | "tokens". progress: tqdm bars for the slow set-up steps (LANTERN's neighbour tables;
        ``__call__`` adds one for the tokens).

        Continuous targets: temperature scales the diffusion noise (> 0); top_k / top_p do not apply (a top_k
        other than None / 0, or a top_p other than 1, is refused); guidance is on eps with guidance_schedule
        "constant" or MAR's "linear"; acceptance "cspd" (= "lossless"); prefill_ratio: the fraction of each image's first tokens the target generates alone
        (CSpD's pre-filling; needs a ContinuousAR drafter).

        `stream` takes the same arguments and returns an iterator of the engine's TokenEvents (``event.request`` =
        image index) whose ``.output`` is the ImagePipelineOutput once it is exhausted; several streams of one
        pipeline may be read interleaved, each with its own settings. Every argument is checked before any work."""
        gsd_settings = {"gsd_rank_window": gsd_rank_window, "gsd_prob_threshold": gsd_prob_threshold,
                        "gsd_embed_threshold": gsd_embed_threshold}
        check_settings(continuous=self.continuous, continuous_drafter=isinstance(self._drafter, ContinuousDrafter),
                       target_name=type(self.target).__name__, acceptance=acceptance, temperature=temperature,
                       top_k=top_k, top_p=top_p, guidance_scale=guidance_scale, tv_budget=tv_budget,
                       lantern_k=lantern_k, lantern_delta=lantern_delta, lantern_lambda=lantern_lambda,
                       gsd_settings=gsd_settings, seed=seed, generator=generator, output_type=output_type,
                       guidance_schedule=guidance_schedule, prefill_ratio=prefill_ratio)
        cond, mask = self._conditions(class_labels, prompt_embeds, prompt_mask, prompt, num_images_per_prompt)
        total = self.target.num_image_tokens
        n_tok = total if num_tokens is None else num_tokens
        if isinstance(n_tok, bool) or not isinstance(n_tok, int) or not 0 < n_tok <= total:
            raise InvalidInputError(f"num_tokens={num_tokens!r}: must be an int in [1, {total}]")
        requests = self._requests(cond, mask, guidance_scale, guidance_schedule, prefill_ratio, temperature)
        if self.continuous and output_type == "pil" and n_tok == total and self.vae is None:
            raise InvalidInputError("no VAE to decode continuous tokens with: pass vae= (an AutoencoderKL) to the "
                                    "pipeline, or output_type='tokens'")
        if not self.continuous and output_type == "pil" and n_tok == total and self.vq is None \
                and not hasattr(self.target, "decode"):
            raise InvalidInputError("no VQ tokenizer to decode image tokens with: pass vq= to the pipeline, or "
                                    "output_type='tokens'")
        top_k = 0 if self.continuous else int(top_k or 0)  # None / 0: off
        if seed is None and generator is None:  # the engine would draw this one itself; drawn here, it is recorded
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        kernel = self._kernel(acceptance, temperature, lantern_k, lantern_delta, lantern_lambda, gsd_rank_window,
                              gsd_prob_threshold, gsd_embed_threshold, tv_budget, progress)
        t0 = time.perf_counter()
        stream = self.decoder.stream(requests, max_new_tokens=n_tok, generator=generator, seed=seed,
                                     acceptance=kernel, temperature=1.0 if self.continuous else temperature,
                                     top_k=top_k, top_p=top_p)
        rule = "cspd" if self.continuous else acceptance
        settings = self._settings(rule, kernel, temperature, top_k, top_p, guidance_scale, guidance_schedule,
                                  prefill_ratio, seed, generator, n_tok, num_images_per_prompt)
        return ImageStream(self, stream, rule, kernel, n_tok, output_type, t0, settings)

    def _settings(self, rule, kernel, temperature, top_k, top_p, guidance_scale, schedule, prefill_ratio, seed,
                  generator, n_tok, per_prompt) -> dict:
        """Every setting this call ran with, defaults resolved: what reproduces it (with the same models)."""
        drafter = self.drafter_spec
        out = {"acceptance": rule, "temperature": temperature, "top_k": top_k, "top_p": top_p,
               "guidance_scale": guidance_scale if guidance_scale is not None
               else getattr(self.target, "guidance_scale", None),
               "seed": seed, "generator": None if generator is None else "given (per-row generators)",
               "drafter": drafter if drafter is None or isinstance(drafter, str) else
               str(drafter) if isinstance(drafter, Path) else type(drafter).__name__,
               "drafter_class": None if self._drafter is None else type(self._drafter).__name__,
               "tree": self.tree if self.tree is not None or self._drafter is None
               else getattr(self._drafter, "k", getattr(self._drafter, "max_depth", None)),
               "num_tokens": n_tok, "num_images_per_prompt": per_prompt,
               "tv_budget": getattr(kernel, "tv_budget", None)}
        if isinstance(self._drafter, JacobiDrafter):
            out["jacobi_init"] = self.jacobi_init
        if self.continuous:
            out.update(guidance_schedule=schedule, prefill_ratio=prefill_ratio)
        names = {"lantern": (("lantern_delta", "delta"), ("lantern_lambda", "lam"), ("lantern_k", "k")),
                 "gsd": (("gsd_rank_window", "rank_window"), ("gsd_prob_threshold", "prob_threshold"),
                         ("gsd_embed_threshold", "embed_threshold"))}.get(rule, ())
        for name, attr in names:
            out[name] = getattr(kernel, attr)
        if names:
            out["residual"] = kernel.residual
        return out

    def _requests(self, cond, mask, guidance_scale, schedule, prefill_ratio, temperature) -> list:
        """The engine's requests for this call (settings checked by `check_settings`): conditions and this call's
        settings travel in them (None: the documented defaults, the target's), so no call changes what a later one
        does."""
        if not self.continuous:
            if isinstance(self.target, LlamaGenTarget):
                return self.target.requests(cond, mask, guidance_scale=guidance_scale)
            return self.target.requests(cond, guidance_scale=guidance_scale)
        requests = self.target.requests(cond, guidance_scale=guidance_scale, guidance_schedule=schedule,
                                        temperature=float(temperature))
        if prefill_ratio is not None:  # check_settings: the drafter is a ContinuousDrafter
            ratio = check_prefill_ratio(prefill_ratio)
            for r in requests:
                r.draft_inputs["prefill_ratio"] = ratio
        return requests

    def decode(self, tokens: torch.Tensor) -> list:
        """Image tokens (N, rows * cols) -> PIL images, through the VQ tokenizer (or the adapter's own decoder);
        continuous tokens (N, rows * cols, C) through the VAE."""
        if self.continuous:
            if self.vae is None:
                raise InvalidInputError("no VAE to decode continuous tokens with: pass vae= (or output_type='tokens')")
            with torch.no_grad():
                return to_pil(decode_tokens(self.vae, tokens.to(self.vae.device, self.vae.dtype), self.target.grid))
        if hasattr(self.target, "decode") and self.vq is None:
            return self.target.decode(tokens)
        if self.vq is None:
            raise InvalidInputError("no VQ tokenizer to decode image tokens with: pass vq= (or output_type='tokens')")
        with torch.no_grad():
            return to_pil(self.vq.decode_codes(tokens.to(self.vq.vq.post_quant_conv.weight.device), self.target.grid))


class ImageStream:
    """Iterator of the engine's TokenEvents for one pipeline call; `.output` is the ImagePipelineOutput once it is
    exhausted (images decoded then)."""

    def __init__(self, pipe: SpeculativeImagePipeline, stream, acceptance: str, kernel, n_tok: int,
                 output_type: str, t0: float, settings: dict | None = None):
        self.pipe, self.stream, self.acceptance, self.kernel = pipe, stream, acceptance, kernel
        self.settings = dict(settings or {})
        self.n_tok, self.output_type, self.t0 = n_tok, output_type, t0
        self.total_tokens = len(stream.requests) * n_tok
        self.record = _Recorder(len(stream.requests), n_tok)
        self.output: ImagePipelineOutput | None = None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            event = next(self.stream)
        except StopIteration:
            if self.output is None:
                self.output = self._finish()
            raise
        self.record.add(event)
        return event

    def _finish(self) -> ImagePipelineOutput:
        pipe, out, total = self.pipe, self.stream.output, self.pipe.target.num_image_tokens
        if pipe.continuous:
            tokens = torch.stack([torch.stack(seq) for seq in out.sequences]).cpu()
        else:
            tokens = torch.tensor(out.sequences, dtype=torch.long)
        kernel = self.kernel
        stats = self.record.stats(pipe.target.grid, self.acceptance, kernel is None or getattr(kernel, "lossless",
                                  False), total, out.stats, time.perf_counter() - self.t0)
        stats.residual_draws = getattr(kernel, "residual_draws", None)
        stats.settings = dict(self.settings)
        images = pipe.decode(tokens) if self.output_type == "pil" and self.n_tok == total else None
        return ImagePipelineOutput(images, tokens, stats)


class _Recorder:
    """Per image: which positions were accepted drafts, the measured TV per position, forwards taken part in."""

    def __init__(self, n: int, tokens: int):
        self.accepted = torch.zeros(n, tokens)
        self.tv = torch.zeros(n, tokens, dtype=torch.float64)  # the kernels' drift is float64
        self.has_tv = False
        self.forwards = [0] * n
        self.filled = [0] * n

    def add(self, event) -> None:
        i, start, k = event.request, self.filled[event.request], len(event.tokens)
        self.forwards[i] += 1
        self.accepted[i, start: start + event.accepted] = 1.0
        if event.drift is not None:
            self.has_tv = True
            self.tv[i, start: start + len(event.drift)] = torch.tensor(event.drift, dtype=torch.float64)
        self.filled[i] = start + k

    def stats(self, grid, acceptance, lossless, total, engine, seconds) -> ImageStats:
        rows, cols = grid
        n, t = self.accepted.shape

        def as_grid(x):  # (N, t) -> (rows, cols) mean over images; positions not generated stay 0
            full = torch.zeros(total, dtype=x.dtype)
            full[:t] = x.mean(0)
            return full.view(rows, cols) if total == rows * cols else full

        tau = sum(f / max(1, c) for f, c in zip(self.filled, self.forwards)) / max(1, n)
        tv = self.tv if self.has_tv else None
        return ImageStats(acceptance, lossless, n, t, list(self.forwards), tau, as_grid(self.accepted),
                          None if tv is None else as_grid(tv), None if tv is None else float(tv.mean()),
                          None if tv is None else float(tv.max()), seconds, engine)


def check_settings(*, continuous: bool, continuous_drafter: bool, target_name: str = "target",
                   acceptance="lossless", temperature=1.0, top_k=None, top_p=1.0, guidance_scale=None,
                   tv_budget=None, lantern_k=None, lantern_delta=None, lantern_lambda=None, gsd_settings=None,
                   seed=None, generator=None, output_type="pil", guidance_schedule=None, prefill_ratio=None) -> None:
    """Every scalar setting of one pipeline call, checked before any work starts (diffusers' ``check_inputs``) with
    the shared rules of `mmspec.checks`; a setting that does not apply to this target or rule is refused by name.

    continuous: the target has continuous tokens; continuous_drafter: its drafter is a ContinuousAR (prefill_ratio
    needs one); target_name: the target's kind, for messages. The pipeline calls it with its own facts; the CLI
    calls it before loading anything."""
    if output_type not in ("pil", "tokens"):
        raise InvalidInputError(f"output_type={output_type!r}: expected 'pil' or 'tokens'")
    if not isinstance(acceptance, str) or acceptance not in ACCEPTANCE:
        raise GenerationConfigError(f"acceptance={acceptance!r}: expected one of {ACCEPTANCE}")
    check_seed(seed)
    if seed is not None and generator is not None:
        raise GenerationConfigError("pass generator= or seed=, not both")
    cont = continuous
    check_number(temperature, "temperature", low=0, low_open=cont)
    if top_k is not None:
        check_number(top_k, "top_k", low=0, integer=True)
    check_number(top_p, "top_p", low=0, low_open=True, high=1)
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    check_tv_budget(tv_budget)
    if lantern_delta is not None:
        check_number(lantern_delta, "lantern_delta", low=0, high=1)
    if lantern_lambda is not None:
        check_number(lantern_lambda, "lantern_lambda", low=1)
    if lantern_k is not None:
        check_number(lantern_k, "lantern_k", low=0, integer=True)
    if prefill_ratio is not None:
        check_prefill_ratio(prefill_ratio)
    lantern_given = {n: v for n, v in (("lantern_delta", lantern_delta), ("lantern_lambda", lantern_lambda),
                                       ("lantern_k", lantern_k)) if v is not None}
    gsd_given = {n: v for n, v in (gsd_settings or {}).items() if v is not None}
    refused = []  # (settings, why they do not apply)
    if cont:
        if acceptance not in ("lossless", "cspd"):
            raise GenerationConfigError(f"a continuous-token target verifies with exact CSpD (acceptance='cspd' "
                                        f"or 'lossless'); got acceptance={acceptance!r}")
        if top_k is not TOP_K and top_k not in (None, 0):
            refused.append(({"top_k": top_k}, "continuous tokens have no vocabulary to truncate"))
        if top_p != 1.0:
            refused.append(({"top_p": top_p}, "continuous tokens have no vocabulary to truncate"))
        if prefill_ratio is not None and not continuous_drafter:
            refused.append(({"prefill_ratio": prefill_ratio}, "for a ContinuousAR drafter only (the share of tokens "
                            "it leaves to the target); this pipeline has none"))
    else:
        if acceptance == "cspd":
            raise GenerationConfigError("acceptance='cspd' is for continuous-token targets (ContinuousAR); this "
                                        f"{target_name} has discrete tokens: use 'lossless', "
                                        "'lantern' or 'gsd'")
        given = {n: v for n, v in (("guidance_schedule", guidance_schedule), ("prefill_ratio", prefill_ratio))
                 if v is not None}
        if given:
            refused.append((given, f"for continuous-token targets only; this {target_name} has discrete tokens"))
        if acceptance in ("lantern", "gsd") and temperature == 0:
            raise GenerationConfigError(f"acceptance={acceptance!r} relaxes *sampling*; at temperature 0 use "
                                        "acceptance='lossless' (greedy verification)")
    if acceptance not in ("lantern", "gsd") and tv_budget not in (None, 0):
        refused.append(({"tv_budget": tv_budget}, "a continuous-token target verifies with exact CSpD, TV 0" if cont
                        else f"for a relaxed rule (acceptance='lantern' or 'gsd') only; {acceptance!r} has TV 0"))
    if acceptance != "lantern" and lantern_given:
        refused.append((lantern_given, f"for acceptance='lantern' only; this call has acceptance={acceptance!r}"))
    if acceptance != "gsd" and gsd_given:
        refused.append((gsd_given, f"for acceptance='gsd' only; this call has acceptance={acceptance!r}"))
    if acceptance == "lantern" and lantern_delta is not None and lantern_lambda is not None:
        raise GenerationConfigError(f"lantern_delta={lantern_delta!r} and lantern_lambda={lantern_lambda!r}: pass "
                                    "one (delta: LANTERN's bound; lambda: LANTERN++'s)")
    if refused:
        names, why = refused[0]
        given = ", ".join(f"{n}={v!r}" for n, v in names.items())
        raise GenerationConfigError(f"{given}: not used by this call ({why}); leave it unset")


def _class_labels(class_labels) -> torch.Tensor:
    """An int or a 1-D sequence / tensor of ints -> (B,) long; anything else is refused by name (the range is the
    target's to check)."""
    def integer(v) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool)

    labels = [class_labels] if integer(class_labels) else class_labels
    if isinstance(labels, torch.Tensor) or hasattr(labels, "__array__"):  # a tensor or a numpy array
        labels = torch.as_tensor(labels)
        labels = labels.reshape(1) if labels.dim() == 0 else labels
        ok = labels.dim() == 1 and not (labels.is_floating_point() or labels.is_complex()
                                         or labels.dtype == torch.bool)
        values = labels.tolist() if ok else None
    else:
        values = list(labels) if isinstance(labels, (list, tuple, range)) else None
        ok = values is not None and all(integer(v) for v in values)
    if not ok or not values:
        raise InvalidInputError(f"class_labels={class_labels!r}: must be an int or a non-empty 1-D list / tensor of "
                                "int class ids (one per image)")
    return torch.tensor(values, dtype=torch.long)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="image tokens", unit="tok")


def _as_vae(vae):
    """None, an AutoencoderKL-like decoder (``decode`` + ``config.scaling_factor``), or a path for load_kl_vae."""
    if vae is None or (hasattr(vae, "decode") and hasattr(getattr(vae, "config", None), "scaling_factor")):
        return vae
    if isinstance(vae, (str, Path)):
        return load_kl_vae(vae)
    raise InvalidInputError(f"vae={type(vae).__name__}: expected a diffusers AutoencoderKL, a path to one (directory, "
                            "safetensors, or an LDM/MAR .ckpt), or None (output_type='tokens')")


def _is_drafter(obj) -> bool:
    """Implements the engine's Drafter protocol."""
    return all(hasattr(obj, a) for a in ("begin", "propose", "commit", "select_rows", "check_target"))


def is_continuous_dir(path: Path) -> bool:
    """A directory written by ContinuousAR.save_pretrained (its config.json names the kind)."""
    return directory_kind(path) == CONTINUOUS_KIND
