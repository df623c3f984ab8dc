"""The VLM zoo: a LLaVA target and its drafters, trained here, offline and deterministically, on rendered scenes.

No pretrained weights reach the machines this project runs on, and random models say nothing about speculative
decoding (their forwards are all overhead and no drafter agrees with them). These recipes train models whose cost
structure is that of real ones: a target token costs several drafter tokens, and drafters agree with the target as
often as their view of it allows.

    vlm-data     the training and held-out conversations (`vision.scenes`: rendered scenes of shapes, colours,
                 positions and words with varied questions and answers, mixed with natural English text), on disk
                 in `vision.train.data`'s format
    vlm          the target: a stock `LlavaForConditionalGeneration` (CLIP tower, two-layer projector, LLaMA LM).
                 Stage 1 pretrains the tower to see the scenes (per-cell attribute probes, the role of CLIP
                 pretraining); stage 2 freezes it and trains projector + LM on conversations (LLaVA's stage 2)
    vlm-text     a small LlamaForCausalLM with the target's tokenizer: the text-only drafter
    vlm-draft    a small draft VLM (the target's frozen tower, a new projector, vlm-text's LM), distilled against
                 the target on its own distributions (MASSV, Dumitru et al. 2025)
    vlm-eagle    EAGLE-1 head (Li et al. 2024)          vlm-eagle3   EAGLE-3 head: low/middle/high taps, unrolled
    vlm-dream    DREAM head (cross-attention to the target's mid features)
    vlm-vispec   ViSpec-style head: a learned query compressor of the image features, ViSpec's losses
    vlm-dflash   DFlash block drafter: one forward drafts a block from the target's low/middle/high features

    from vision import SpeculativeVLM
    svlm = SpeculativeVLM.from_pretrained("zoo:vlm", drafter="zoo:vlm-eagle")   # trained on first use

The machinery (cache directory, digests, model cards, ``zoo:NAME`` / ``zoo:NAME@quick``) is `mmspec.zoo`; this
module holds the recipes (`MODELS`). Every recipe has a quick variant (tiny sizes, a few steps) for the fast tests.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from mmspec.zoo import BuildContext, Zoo, ZooModel, parameter_count, seeded

from . import scenes

DATA = "scenes-v1"  # bump when vision.scenes renders or phrases differently
HELD_OUT_SEED = 1_000_000  # held-out conversations come from seeds >= this; training from the recipe's seed


# --- conversations ----------------------------------------------------------------------------------------------------
def _user(text: str, image: bool) -> dict:
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def conversation(i: int, seed: int, image_size: int, text_fraction: float = 0.2, two_turn: float = 0.15):
    """Conversation `i` of the stream `seed`: (images, messages). A rendered scene with one or two questions about
    it, or (text_fraction of the time) a question about a passage of natural text, without an image."""
    rng = random.Random(seed * 1_000_003 + i)
    if rng.random() < text_fraction:
        passage = rng.choice(_passages())
        q, a = scenes.text_conversation(passage, rng)
        return [], [_user(q, False), _assistant(a)]
    scene = scenes.random_scene(rng)
    image = scenes.render(scene, image_size, seed=rng.randrange(1 << 30))
    q, a = scenes.conversation(scene, rng)
    messages = [_user(q, True), _assistant(a)]
    if rng.random() < two_turn:
        q2, a2 = scenes.conversation(scene, rng)
        messages += [_user(q2, False), _assistant(a2)]
    return [image], messages


@functools.cache
def _passages() -> list:
    return scenes.passages()


# --- vlm-data -----------------------------------------------------------------------------------------------------
def build_data(ctx: BuildContext) -> dict:
    """Write the drafters' training conversations (train/) and the held-out ones (held_out/) to disk."""
    from .train.data import save_dataset

    r = ctx.recipe
    for split, n, seed in (("train", r["train"], r["seed"]), ("held_out", r["held_out"], HELD_OUT_SEED)):
        rows = [conversation(i, seed, r["image_size"], r["text_fraction"], 0.0) for i in range(n)]
        save_dataset(ctx.out / split, rows)
    return {"data": f"{DATA}: vision.scenes conversations ({r['image_size']} px scenes; {r['text_fraction']:.0%} "
                    "natural-text questions without an image)",
            "held_out": {"train conversations": r["train"], "held-out conversations": r["held_out"]},
            "notes": "Load with vision.train.data.load_dataset(path / 'train') (or 'held_out')."}


def load_records(path: Path, split: str):
    from .train.data import load_dataset

    return load_dataset(Path(path) / split)


# --- vlm: stage 1, the vision tower -------------------------------------------------------------------------------
ATTRIBUTES = {"colour": list(scenes.COLOURS), "shape": list(scenes.SHAPES), "size": ["small", "large"],
              "word": list(scenes.WORDS)}


def cell_labels(scene) -> dict[str, list[int]]:
    """Per attribute, the class of each of the 9 cells (0 = nothing there, else 1 + the attribute's index)."""
    out = {k: [0] * 9 for k in ATTRIBUTES}
    for t in scene.things:
        for k in ("colour", "shape", "size"):
            out[k][t.cell] = 1 + ATTRIBUTES[k].index(getattr(t, k))
    if scene.word is not None:
        out["word"][scene.word_cell] = 1 + ATTRIBUTES["word"].index(scene.word)
    return out


def _cell_features(hidden: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 1 + grid^2, D) tower states -> (B, 9, D): the patches of each cell of the 3 x 3 layout, averaged."""
    b, _, d = hidden.shape
    x = hidden[:, 1:].reshape(b, grid, grid, d).permute(0, 3, 1, 2)  # (B, D, g, g)
    return F.adaptive_avg_pool2d(x, 3).flatten(2).transpose(1, 2)  # (B, 9, D)


def pretrain_tower(tower, image_processor, *, steps: int, batch_size: int, lr: float, seed: int, image_size: int,
                   progress: bool) -> dict:
    """Teach the CLIP tower to see the scenes: linear probes on its cell-pooled last hidden states predict each
    cell's colour, shape, size and word (cross-entropy), training tower and probes together."""
    from tqdm.auto import tqdm

    d = tower.config.hidden_size
    grid = image_size // tower.config.patch_size
    probes = torch.nn.ModuleDict({k: torch.nn.Linear(d, 1 + len(v)) for k, v in ATTRIBUTES.items()})
    params = list(tower.parameters()) + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)

    def batch():
        imgs, labels = [], {k: [] for k in ATTRIBUTES}
        for _ in range(batch_size):
            sc = scenes.random_scene(rng)
            imgs.append(scenes.render(sc, image_size, seed=rng.randrange(1 << 30)))
            for k, v in cell_labels(sc).items():
                labels[k].append(v)
        px = image_processor(imgs, return_tensors="pt")["pixel_values"]
        return px, {k: torch.tensor(v) for k, v in labels.items()}

    def step_loss(px, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = tower(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        cells = _cell_features(hidden.float(), grid)
        losses, hits = [], {}
        for k, probe in probes.items():
            logits = probe(cells)  # (B, 9, C)
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[k].reshape(-1)))
            hits[k] = float((logits.argmax(-1) == labels[k]).float().mean())
        return sum(losses), hits

    tower.train()
    losses = []
    for _ in tqdm(range(steps), desc="zoo vlm: vision tower", disable=not progress, mininterval=1.0):
        px, labels = batch()
        loss, _ = step_loss(px, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    tower.eval()
    with torch.no_grad():
        rng = random.Random(HELD_OUT_SEED)
        px, labels = batch()
        _, hits = step_loss(px, labels)
    return {"tower loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            **{f"tower probe accuracy ({k}, per cell)": round(v, 3) for k, v in hits.items()}}


# --- vlm: stage 2, the conversation model -----------------------------------------------------------------------------
def _tokenizer(r: dict):
    from .zoo_models import tokenizer_corpus, train_tokenizer

    return train_tokenizer(r["vocab"], tokenizer_corpus(scenes=r["tokenizer_scenes"]))


def build_vlm(ctx: BuildContext) -> dict:
    from .train.sft import train_conversations
    from .zoo_models import llava_model, llava_processor

    r = ctx.recipe
    tok = _tokenizer(r)
    processor = llava_processor(tok, r["image_size"], r["patch"])
    model = llava_model(tok, image_size=r["image_size"], patch=r["patch"], vision_hidden=r["vision_hidden"],
                        vision_layers=r["vision_layers"], hidden=r["hidden"], layers=r["layers"], heads=r["heads"],
                        kv_heads=r["kv_heads"], intermediate=r["intermediate"], seed=r["seed"])
    tower = model.model.vision_tower
    facts = pretrain_tower(tower, processor.image_processor, steps=r["tower_steps"], batch_size=r["tower_batch"],
                           lr=r["tower_lr"], seed=r["seed"], image_size=r["image_size"], progress=ctx.progress)
    tower.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    report = train_conversations(
        model, processor, lambda i: conversation(i, r["seed"], r["image_size"], r["text_fraction"], r["two_turn"]),
        steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"], warmup=r["warmup"], params=params,
        group_by_length=r.get("group_by_length", 1), progress=ctx.progress, desc="zoo vlm: conversations")
    tower.requires_grad_(True)
    model.save_pretrained(ctx.out)
    processor.save_pretrained(ctx.out)
    held = held_out_answers(model, processor, r["held_out"], r["image_size"], r.get("eval_tokens", 64))
    tc = model.config.text_config
    return {"data": f"{DATA}: fresh vision.scenes conversations every step ({r['steps'] * r['batch_size']} in all; "
                    f"{r['text_fraction']:.0%} natural text without an image, {r['two_turn']:.0%} two-turn)",
            "parameters": parameter_count(model), "final_loss": round(report["loss"], 4),
            "held_out": {**facts, **held},
            "notes": f"LlavaForConditionalGeneration: CLIP tower {r['vision_hidden']} x {r['vision_layers']} on "
                     f"{r['image_size']} px ({(r['image_size'] // r['patch']) ** 2} image tokens), LLaMA "
                     f"{tc.hidden_size} x {tc.num_hidden_layers} (GQA {tc.num_attention_heads}/"
                     f"{tc.num_key_value_heads}), {tc.vocab_size}-token byte-level BPE; "
                     f"{report['tokens']} assistant tokens trained on in {report['seconds']:.0f} s."}


@torch.no_grad()
def held_out_answers(model, processor, n: int, image_size: int, max_new_tokens: int = 64) -> dict:
    """Greedy answers to `n` held-out scene questions: the fraction answered exactly as the data would."""
    from .pipeline import SpeculativeVLM

    svlm = SpeculativeVLM(model, processor, None)
    rows = [conversation(i, HELD_OUT_SEED, image_size, text_fraction=0.0, two_turn=0.0) for i in range(n)]
    out = svlm.generate(prompt=[m[0]["content"][-1]["text"] for _, m in rows], images=[im for im, _ in rows],
                        max_new_tokens=max_new_tokens)
    exact = [t.strip() == m[1]["content"][0]["text"] for t, (_, m) in zip(out.texts, rows)]
    return {"held-out exact answers": round(sum(exact) / len(exact), 3), "held-out questions": n,
            "example": f"Q: {rows[0][1][0]['content'][-1]['text']} A: {out.texts[0].strip()}"}


def load_target(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


# --- drafters -------------------------------------------------------------------------------------------------------
def build_text(ctx: BuildContext) -> dict:
    """A small LLaMA trained on the same conversations with the images removed (it drafts the text it can guess)."""
    from transformers import AutoTokenizer

    from .train.sft import train_conversations
    from .zoo_models import text_lm

    r = ctx.recipe
    tok = AutoTokenizer.from_pretrained(ctx.deps["vlm"])
    model = text_lm(tok, hidden=r["hidden"], layers=r["layers"], heads=r["heads"], kv_heads=r["kv_heads"],
                    intermediate=r["intermediate"], seed=r["seed"])

    def example(i):
        _, messages = conversation(i, r["seed"], 8, r["text_fraction"], 0.0)
        return [], [{**m, "content": [c for c in m["content"] if c["type"] == "text"]} for m in messages]

    report = train_conversations(model, tok, example, steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"],
                                 warmup=r["warmup"], group_by_length=r.get("group_by_length", 1),
                                 progress=ctx.progress, desc="zoo vlm-text")
    model.save_pretrained(ctx.out)
    tok.save_pretrained(ctx.out)
    return {"data": f"{DATA}: the conversations with their images removed", "parameters": parameter_count(model),
            "final_loss": round(report["loss"], 4),
            "held_out": _tau(ctx, lambda target, proc: _text_drafter(target, proc, ctx.out)),
            "notes": f"LlamaForCausalLM {r['hidden']} x {r['layers']}, the target's tokenizer."}


def _text_drafter(target, processor, path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .pipeline import SpeculativeVLM

    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    return SpeculativeVLM(target, processor, lm, drafter_tokenizer=AutoTokenizer.from_pretrained(path))


def build_draft_vlm(ctx: BuildContext) -> dict:
    """MASSV: the target's vision tower (frozen), a new projector and vlm-text's language model, distilled on the
    target's top-k distributions: projector alone first, then projector + LM (`vision.train.vlm_distill`)."""
    from transformers import AutoModelForCausalLM

    from .train.vlm_distill import distill_draft_vlm
    from .zoo_models import llava_model

    r = ctx.recipe
    target, processor = load_target(ctx.deps["vlm"])
    lm = AutoModelForCausalLM.from_pretrained(ctx.deps["vlm-text"])
    vc, lc = target.config.vision_config, lm.config
    draft = llava_model(processor.tokenizer, image_size=vc.image_size, patch=vc.patch_size,
                        vision_hidden=vc.hidden_size, vision_layers=vc.num_hidden_layers, hidden=lc.hidden_size,
                        layers=lc.num_hidden_layers, heads=lc.num_attention_heads, kv_heads=lc.num_key_value_heads,
                        intermediate=lc.intermediate_size, seed=r["seed"])
    draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
    draft.model.language_model.load_state_dict(lm.model.state_dict())
    draft.lm_head.load_state_dict(lm.lm_head.state_dict())
    records = load_records(ctx.deps["vlm-data"], "train")[: r["records"]]
    reports = []
    for phase, steps in (("projector", r["projector_steps"]), ("all", r["steps"])):
        reports.append(distill_draft_vlm(draft, target, processor, records, steps=steps, lr=r["lr"],
                                         batch_size=r["batch_size"], seed=r["seed"], train=phase,
                                         progress=ctx.progress))
    draft.save_pretrained(ctx.out)
    processor.save_pretrained(ctx.out)
    return {"data": f"{len(records)} vlm-data conversations, the target's top-{reports[-1]['topk']} distributions",
            "parameters": parameter_count(draft), "final_loss": round(reports[-1]["loss"], 4),
            "held_out": _tau(ctx, lambda t, p: _vlm_drafter(t, p, ctx.out), target, processor),
            "notes": f"LLaVA {lc.hidden_size} x {lc.num_hidden_layers} with the target's tower; top-1 agreement "
                     f"on training answers {reports[-1]['acceptance']:.3f}."}


def _vlm_drafter(target, processor, path):
    from transformers import AutoModelForImageTextToText

    from .pipeline import SpeculativeVLM

    draft = AutoModelForImageTextToText.from_pretrained(path).eval()
    return SpeculativeVLM(target, processor, draft)


def build_head(ctx: BuildContext) -> dict:
    """An EAGLE-family head trained with `vision.train.train_eagle` (a DFlash drafter with `train_dflash`) on the
    target's features over vlm-data."""
    import tempfile

    from .compressors import build_compressor
    from .drafters import DreamHead, Eagle3Head, EagleHead
    from .train.eagle_trainer import train_eagle

    r = ctx.recipe
    target, processor = load_target(ctx.deps["vlm"])
    tc = target.config.text_config
    taps = _taps(r.get("taps"), tc.num_hidden_layers)
    if r["head"] == "dflash":
        return _build_dflash(ctx, target, processor, taps)
    compressor = None
    if r.get("compressor"):
        compressor = build_compressor({"type": r["compressor"], "dim": tc.hidden_size,
                                       "heads": tc.num_attention_heads, "n_queries": r["n_queries"]})
    with seeded(r["seed"]):
        if r["head"] == "eagle3":  # the serving engines' EAGLE-3 (its own draft vocabulary, exportable)
            head = Eagle3Head(target, taps=taps, draft_vocab=r["draft_vocab"])
        else:
            head = (DreamHead if r["head"] == "dream" else EagleHead)(target, layers=r["layers"], taps=taps,
                                                                      compressor=compressor)
    records = load_records(ctx.deps["vlm-data"], "train")[: r["records"]]
    with tempfile.TemporaryDirectory() as cache:
        report = train_eagle(head, target, processor, records, steps=r["steps"], lr=r["lr"],
                             batch_size=r["batch_size"], loss=r.get("loss"), unroll=r.get("unroll", 1),
                             noise=r.get("noise", 0.0), warmup=r["warmup"], seed=r["seed"], cache_dir=cache,
                             progress=ctx.progress)
    return _head_card(ctx, head, report, target, processor,
                      f"{len(records)} vlm-data conversations, the target's features and top-8 distributions",
                      f"{type(head).__name__} ({head.layers} layer(s){', taps ' + str(head.taps) if taps else ''}"
                      f"{', compressor ' + r['compressor'] if compressor is not None else ''}"
                      + (f", draft vocabulary {head.draft_vocab_size} of {head.target_vocab} covering "
                         f"{report['draft_vocab_coverage']:.3f} of the answer tokens" if r["head"] == "eagle3" else "")
                      + f"); top-1 agreement on training answers {report['acceptance']:.3f}.")


def _head_card(ctx: BuildContext, head, report: dict, target, processor, data: str, notes: str) -> dict:
    """Save a trained drafter head in the build's directory and return its card: parameters, final loss, held-out
    tau through the engine."""
    head.save_pretrained(ctx.out)
    return {"data": data, "parameters": sum(p.numel() for p in head.trainable_parameters()),
            "final_loss": round(report["loss"], 4),
            "held_out": _tau(ctx, lambda t, p: _head_drafter(t, p, ctx.out), target, processor), "notes": notes}


def _build_dflash(ctx: BuildContext, target, processor, taps) -> dict:
    import tempfile

    from .drafters import DFlashHead
    from .train.dflash_trainer import train_dflash

    r = ctx.recipe
    with seeded(r["seed"]):
        head = DFlashHead(target, layers=r["layers"], block_size=r["block_size"], taps=taps)
    records = load_records(ctx.deps["vlm-data"], "train")[: r["records"]]
    with tempfile.TemporaryDirectory() as cache:
        report = train_dflash(head, target, processor, records, steps=r["steps"], lr=r["lr"],
                              batch_size=r["batch_size"], blocks=r["blocks"], warmup=r["warmup"], seed=r["seed"],
                              cache_dir=cache, progress=ctx.progress)
    return _head_card(ctx, head, report, target, processor,
                      f"{len(records)} vlm-data conversations, the target's features at taps {list(head.taps)}",
                      f"DFlashHead ({r['layers']} layer(s), block {r['block_size']}, taps {list(head.taps)}); "
                      f"slot-1 agreement on training answers {report['acceptance']:.3f}.")


def _taps(spec, layers: int):
    if spec is None:
        return None
    return tuple(sorted({max(1, min(layers, round(f * layers))) for f in spec}))


def _head_drafter(target, processor, path):
    from .drafters import load_feature_drafter
    from .pipeline import SpeculativeVLM

    return SpeculativeVLM(target, processor, load_feature_drafter(path, target, tree=4))


@torch.no_grad()
def _tau(ctx: BuildContext, make, target=None, processor=None) -> dict:
    """Greedy chain-4 speculative decoding of the held-out prompts: tau (tokens per target forward). The target
    is loaded unless the build already holds it."""
    if target is None:
        target, processor = load_target(ctx.deps["vlm"])
    svlm = make(target, processor)
    records = load_records(ctx.deps["vlm-data"], "held_out")[: ctx.recipe["eval_records"]]
    taus = []
    for rec in records:
        out = svlm.generate(messages=rec.prompt_messages, images=[str(p) for p in rec.images],
                            max_new_tokens=ctx.recipe.get("eval_tokens", 48))
        taus.append(out.stats.tau)
    return {"tau (greedy, chain of 4, held out)": round(sum(taus) / len(taus), 3), "held-out prompts": len(taus)}


def load(name: str, quick: bool = False, progress: bool = True) -> Path:
    """The directory of a VLM zoo model (built first if not cached)."""
    return zoo().get(name, quick=quick, progress=progress)


# --- recipes --------------------------------------------------------------------------------------------------------
IMAGE = dict(image_size=60, patch=10)
QUICK_IMAGE = dict(image_size=20, patch=10)
HEAD = dict(records=400, batch_size=8, warmup=20, eval_records=12, seed=3)
QUICK_HEAD = dict(records=6, batch_size=2, steps=3, warmup=1, eval_records=2, eval_tokens=6, layers=1)
_HEAD_LOAD = "SpeculativeVLM.from_pretrained('zoo:vlm', drafter='zoo:{}')"
MODELS = [
    ZooModel("vlm-data", "conversations about rendered scenes + natural text, for the drafters", build=build_data,
             recipe=dict(data=DATA, train=400, held_out=40, text_fraction=0.2, seed=7, **IMAGE),
             quick=dict(train=8, held_out=3, **QUICK_IMAGE),
             loads_with="vision.train.data.load_dataset(path / 'train')"),
    ZooModel("vlm", "LLaVA target (CLIP 256x2 on 60 px, LLaMA 512x8) trained on scene chat",
             build=build_vlm,
             recipe=dict(data=DATA, vocab=2048, tokenizer_scenes=3000, vision_hidden=256, vision_layers=2,
                         hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1024, tower_steps=120,
                         tower_batch=64, tower_lr=2e-3, steps=320, batch_size=16, lr=2e-3, warmup=30,
                         group_by_length=8, text_fraction=0.15, two_turn=0.15, held_out=40, seed=0, **IMAGE),
             quick=dict(vocab=400, tokenizer_scenes=50, vision_hidden=32, vision_layers=1, hidden=64, layers=2,
                        heads=2, kv_heads=1, intermediate=128, tower_steps=2, tower_batch=4, steps=3, batch_size=2,
                        warmup=1, group_by_length=2, held_out=2, eval_tokens=6, **QUICK_IMAGE),
             loads_with="SpeculativeVLM.from_pretrained('zoo:vlm', drafter=...)"),
    ZooModel("vlm-text", "text-only LLaMA drafter (256x2) with the target's tokenizer", build=build_text,
             needs=("vlm", "vlm-data"),
             recipe=dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, steps=300, batch_size=16,
                         lr=2e-3, warmup=20, group_by_length=8, text_fraction=0.2, eval_records=12, seed=1),
             quick=dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, steps=3, batch_size=2, warmup=1,
                        group_by_length=1, eval_records=2, eval_tokens=6),
             loads_with=_HEAD_LOAD.format("vlm-text")),
    ZooModel("vlm-draft", "small draft VLM (MASSV-distilled; target's tower, vlm-text's LM)",
             build=build_draft_vlm, needs=("vlm", "vlm-text", "vlm-data"),
             recipe=dict(records=400, projector_steps=60, steps=240, batch_size=4, lr=1e-3, eval_records=12,
                         seed=2),
             quick=dict(records=4, projector_steps=1, steps=2, batch_size=1, eval_records=2, eval_tokens=6),
             loads_with=_HEAD_LOAD.format("vlm-draft")),
    ZooModel("vlm-eagle", "EAGLE-1 head for zoo:vlm", build=build_head, needs=("vlm", "vlm-data"),
             recipe=dict(head="eagle", layers=1, steps=360, lr=1e-3, **HEAD), quick=QUICK_HEAD,
             loads_with=_HEAD_LOAD.format("vlm-eagle")),
    ZooModel("vlm-eagle3", "EAGLE-3 head for zoo:vlm (low/mid/high taps, 1024-token draft vocabulary, training-time "
             "test; exports to vLLM / SGLang)", build=build_head, needs=("vlm", "vlm-data"),
             recipe=dict(head="eagle3", taps=(0.2, 0.5, 1.0), draft_vocab=1024, unroll=3, steps=400, lr=2e-3,
                         **HEAD),
             quick=dict(QUICK_HEAD, unroll=2, draft_vocab=64), loads_with=_HEAD_LOAD.format("vlm-eagle3")),
    ZooModel("vlm-dream", "DREAM head for zoo:vlm (cross-attention to mid features)", build=build_head,
             needs=("vlm", "vlm-data"),
             recipe=dict(head="dream", layers=3, taps=(0.5, 1.0), steps=350, lr=1e-3, **HEAD),
             quick=dict(QUICK_HEAD, layers=3), loads_with=_HEAD_LOAD.format("vlm-dream")),
    ZooModel("vlm-vispec", "ViSpec-style head for zoo:vlm (query compressor, ViSpec losses)", build=build_head,
             needs=("vlm", "vlm-data"),
             recipe=dict(head="eagle", layers=1, compressor="vispec", n_queries=4, loss="vispec", steps=450, lr=1e-3,
                         **HEAD),
             quick=dict(QUICK_HEAD, n_queries=2), loads_with=_HEAD_LOAD.format("vlm-vispec")),
    ZooModel("vlm-dflash", "DFlash block drafter for zoo:vlm (a block of 7 per forward from low/mid/high taps)",
             build=build_head, needs=("vlm", "vlm-data"),
             recipe=dict(head="dflash", layers=2, block_size=8, blocks=8, taps=(0.25, 0.5, 1.0), steps=800, lr=2e-3,
                         **HEAD),
             quick=dict(QUICK_HEAD, block_size=4, blocks=2), loads_with=_HEAD_LOAD.format("vlm-dflash")),
]
VLM_DEMO = ("vlm-data", "vlm", "vlm-eagle")
VLM_BENCH = tuple(m.name for m in MODELS)


def zoo(root: Path | str | None = None) -> Zoo:
    """The VLM zoo over `root` (default: mmspec.zoo.zoo_dir(), i.e. $MMSPEC_ZOO or ~/.cache/mmspec/zoo)."""
    return Zoo(MODELS, root)


def resolve(spec, progress: bool = True):
    """`spec` itself, or the directory of the VLM-zoo model it names ("zoo:NAME" / "zoo:NAME@quick")."""
    from mmspec.zoo import resolve as _resolve

    return _resolve(spec, zoo(), progress=progress)
