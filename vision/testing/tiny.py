"""Tiny random VLMs of every supported family, built offline from stock transformers classes (no hub).

Each builder (one per family, `FAMILIES`) assembles what `from_pretrained` would load for a real checkpoint, at toy
size:

* a **tokenizer** (`_tokenizer`): a byte-level BPE trained in-process on a fixed word list (638 ids; any string
  round-trips through the byte alphabet) plus the family's special tokens (image placeholder, BOS/EOS, turn markers,
  <row_i_col_j>, <img> ...) appended as special tokens, so ids are deterministic and every marker is one id;
* the family's own **image processor** at small sizes and its own **processor class**, with a short Jinja chat
  template in the spirit of the real checkpoint's (on the processor and on the tokenizer);
* the family's own **config and model classes** (e.g. `LlavaConfig(vision_config=CLIPVisionConfig(...),
  text_config=LlamaConfig(...))`): text hidden 64 x 2 layers (Gemma 4: 2 more, KV-shared), vision hidden 32 x 2
  layers. The text `vocab_size` equals `len(tokenizer)` exactly and the config's image/boi/eoi ids are read from the
  tokenizer.

Image placeholder tokens per image (default `image_size` test images; most families depend on the image's size):

    llava 16 (fixed) | llava_next 24 (anyres: 2x2 base + 4x4 grid + 4 newlines; 14 for 48x24)
    llava_onevision 24 single-image anyres, 5 per image with a nested multi-image list [[a, b]]
    qwen2_vl / qwen2_5_vl / qwen3_vl 16 (32 px, patch 4, merge 2; 4..16 by size) | gemma3 16 | paligemma 16 (fixed)
    idefics3 / smolvlm 20 (2x2 tiles + global, 4 each, plus <fake_token_around_image>/<row_i_col_j>/<global-img>)
    internvl 20 (2x2 tiles + thumbnail, 4 each, between <img> and </img>)
    gemma4 64 (resized to a budget of 70: 8x8 for a square image of any size; 55 for 48x24), between boi and eoi

Random tiny models at default init (std 0.02) repeat one token and ignore the image, which would make equality
tests pass vacuously (ARCHITECTURE.md, Tests). `_widen` therefore redraws every >=2-D parameter outside the vision
tower (language model, LM head, multimodal projector/connector) from N(0, std) with a `torch.Generator` seeded by
`seed`; the vision tower (including Qwen's patch merger, which lives in it) keeps its default init, drawn under
`torch.manual_seed(seed)` inside `fork_rng` so the caller's RNG is untouched (Gemma 4's patch embedder excepted:
see `_gemma4`). Gemma-based families (gemma3, paligemma, gemma4) scale embeddings by sqrt(hidden) and saturate: their
weights are drawn with `std * GEMMA_STD_SCALE`, and their embeddings are untied from the LM head (tied, the current
token's own embedding wins the argmax and greedy output repeats its input), as are InternVL's (tied by default on
the hub).

`draft_vlm` is the same family with one text layer and a 1-layer, 16-wide vision tower; image geometry does not
depend on widths, so target and draft share the processor's ids and placeholder counts and take identical `inputs`.
`text_drafter` is a tiny `LlamaForCausalLM` whose vocab_size equals the target's text vocab_size (== len(tokenizer)).

Notes for adapters (checked against transformers 5.23 with these models):

* Processor outputs: llava {input_ids, attention_mask, pixel_values}; llava_next + image_sizes (pixel_values
  (n, 5, 3, H, W)); llava_onevision + image_sizes, batch_num_images; qwen* + mm_token_type_ids (always, also
  text-only), image_grid_thw, pixel_values flattened to (patches, 3*2*4*4); idefics3/smolvlm + pixel_attention_mask
  (pixel_values (1, tiles, 3, H, W)); gemma3 + token_type_ids; paligemma + token_type_ids and labels (drop labels);
  internvl pixel_values (tiles, 3, H, W); gemma4 + mm_token_type_ids (1 on image soft tokens), pixel_values
  (images, 280, 48) (patches, padded to the budget) and image_position_ids (images, 280, 2).
* Qwen: the prefill needs `mm_token_type_ids` (qwen2_vl/qwen3_vl raise without it, qwen2_5_vl silently computes
  wrong M-RoPE positions). Prefill stores `model.model.rope_deltas` (stateful); later tokens sit at text position
  + rope_deltas on all 3 rows. Explicit `position_ids` must be (3, B, q) = M-RoPE rows, or (4, B, q) with row 0 the
  plain text position (what `generate` passes); a 2-D (B, q) tensor is broadcast to 3 rows WITHOUT the delta (wrong).
  A decode step with a full-length 2-D attention_mask and no position_ids crashes (positions built from the whole
  mask): pass position_ids, or no mask.
* Gemma3: `token_type_ids` (1 on image soft tokens) are needed at prefill (bidirectional attention inside each
  image); `generate` drops them after prefill. Layers alternate sliding (window 512, never reached in tests) and
  full attention, so DynamicCache holds DynamicSlidingWindowLayer layers.
* Gemma 4: `mm_token_type_ids` make an image's soft tokens attend to each other in the SLIDING layers only (full
  layers stay causal), at prefill; `generate` drops them after it. Image ids in a later text block embed as pad (its
  forward masks them), as in `generate`. The KV-shared layers read the keys their store layer wrote in this forward
  (the cache holds the store layers' keys only), so a block's shared layers see exactly what the mask allows.
* PaliGemma: position_ids are 1-based (arange + 1). Prefix-LM: image + prompt attend bidirectionally at prefill;
  `use_bidirectional_attention` is True on the text config, so a cache-less forward over prompt + generated tokens
  is only right with token_type_ids (0 prefix, 1 suffix). Text-only prompts are refused by the processor.
* All families: a cached chunk of q tokens with an explicit 4-D bool (B, 1, q, past + q) or additive float mask
  and explicit positions reproduces sequential decoding (tree verification works). `Cache.crop(n)` takes a
  NEGATIVE n (tokens to remove) in this transformers version; a positive length raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, ProcessorMixin

GEMMA_STD_SCALE = 0.25  # Gemma multiplies embeddings by sqrt(hidden): N(0, 0.2) saturates, N(0, 0.05) does not

# Words the BPE is trained on: every one becomes a single token, any other text falls back to byte pieces.
_WORDS = (
    "the a an of to and in is it that on for with as this at by from be are was what which who how where why "
    "image picture photo describe color shape red green blue yellow black white orange purple cat dog bird tree "
    "sky sun car house person man woman child left right top bottom center small large big one two three four five "
    "there here see look show tell me you I we they can do does not yes no please answer question user assistant "
    "system model caption USER ASSISTANT What User Assistant How Describe Is You helpful detect many count text read "
    "write about its their some any all each more most very"
).split()


@dataclass
class TinyVLM:
    family: str
    model: PreTrainedModel  # fp32, eval()
    processor: ProcessorMixin  # the family's own processor class
    image_size: int  # a good test image side in pixels


# ----------------------------------------------------------------------------------------------------------- helpers
def _bpe_json() -> str:
    """The base byte-level BPE as JSON (training on a fixed corpus is deterministic and takes ~25 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def _tokenizer(specials: list[str], bos: str, eos: str, pad: str, named: dict[str, str] | None = None,
               template: str | None = None):
    """A fast tokenizer: the shared BPE + `specials` (one id each, in order) + named model-specific tokens.

    `named` maps attribute names to tokens (e.g. {"image_token": "<image>"}) so `tok.image_token` and
    `tok.image_token_id` exist, as on the real checkpoints' tokenizers. BOS is not added automatically: the chat
    templates write it where the real ones do.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer.from_str(_bpe_json())
    named = dict(named or {})
    ordered = list(dict.fromkeys([pad, bos, eos, *specials, *named.values()]))
    tok = PreTrainedTokenizerFast(tokenizer_object=base, bos_token=bos, eos_token=eos, pad_token=pad,
                                  extra_special_tokens=named or None)
    tok.add_special_tokens({"extra_special_tokens": ordered}, replace_extra_special_tokens=False)
    if template is not None:
        tok.chat_template = template
    return tok


def _ids(tok, *tokens: str) -> list[int]:
    out = tok.convert_tokens_to_ids(list(tokens))
    if None in out or (tok.unk_token_id is not None and tok.unk_token_id in out):
        raise ValueError(f"tokens {tokens} are not all in the tiny vocabulary: {out}")
    return out


def _llama_text(tok, hidden: int, layers: int, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False, **extra)


def _vision_kw(hidden: int, layers: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2)


@torch.no_grad()
def _widen(model: PreTrainedModel, std: float, seed: int) -> None:
    """Redraw every >=2-D weight outside the vision tower (language model, LM head, projector) from N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    tower = _vision_tower(model)
    vision = {id(p) for p in tower.parameters()} if tower is not None else set()
    for p in model.parameters():  # a tied LM head is visited once
        if p.dim() >= 2 and id(p) not in vision:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _vision_tower(model: PreTrainedModel) -> torch.nn.Module | None:
    for name in ("vision_tower", "visual", "vision_model"):
        if hasattr(model.model, name):
            return getattr(model.model, name)
    return None  # a text-only model


def _finish(family: str, model_cls, config, processor, image_size: int, seed: int, std: float) -> TinyVLM:
    config._attn_implementation = "sdpa"
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):  # the vision tower's default init, deterministic in `seed`
        torch.manual_seed(seed)
        model = model_cls(config)
    _widen(model, std, seed)
    return TinyVLM(family, model.float().eval(), processor, image_size)


# ---------------------------------------------------------------------------------------------------------- families
# Each builder: (seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM.

_LLAVA_TEMPLATE = (  # llava-1.5-hf: "USER: <image>\n{text} ASSISTANT: {reply}</s>"
    "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% if m['content'] is string %}{{ m['content'] + ' ' }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _llava(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tok = _tokenizer([], "<s>", "</s>", "<unk>", {"image_token": "<image>"}, _LLAVA_TEMPLATE)
    side, patch = 16, 4  # 4x4 patches (+CLS, dropped by the "default" strategy) -> 16 placeholders
    vision = CLIPVisionConfig(image_size=side, patch_size=patch, **_vision_kw(vision_hidden, vision_layers))
    config = LlavaConfig(vision_config=vision, text_config=_llama_text(tok, hidden, text_layers),
                         image_token_index=tok.image_token_id, image_seq_length=(side // patch) ** 2,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(images, tok, patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE)
    return _finish("llava", LlavaForConditionalGeneration, config, processor, 32, seed, std)


# Mistral and Gemma have no system turn: a system message is folded into the first user turn, as in their templates.
_FOLD_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] if messages[0]['content'] is string"
    " else messages[0]['content'][0]['text'] %}{% set prefix = sys + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
)
_MISTRAL_TEMPLATE = (  # llava-v1.6-mistral-7b-hf: "[INST] <image>\n{text} [/INST]{reply}</s>"
    "{{ bos_token }}" + _FOLD_SYSTEM + "{% for m in turns %}{% if m['role'] == 'user' %}{{ '[INST] ' }}{% endif %}"
    "{% if loop.first %}{{ prefix }}{% endif %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{% if m['role'] == 'user' %}{{ ' [/INST]' }}{% else %}{{ eos_token }}{% endif %}{% endfor %}"
)


def _llava_next(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    tok = _tokenizer(["[INST]", "[/INST]"], "<s>", "</s>", "<unk>", {"image_token": "<image>"}, _MISTRAL_TEMPLATE)
    side, patch = 16, 8  # base view 2x2 patches; a 32x32 image picks the 32x32 grid: 4 + 4x4 + 4 newlines = 24
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    vision = CLIPVisionConfig(image_size=side, patch_size=patch, **_vision_kw(vision_hidden, vision_layers))
    config = LlavaNextConfig(vision_config=vision, text_config=_llama_text(tok, hidden, text_layers),
                             image_token_index=tok.image_token_id, image_grid_pinpoints=pinpoints,
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
    images = LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                     image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(images, tok, patch_size=patch, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=_MISTRAL_TEMPLATE)
    return _finish("llava_next", LlavaNextForConditionalGeneration, config, processor, 32, seed, std)


def _chatml(system: str | None, image: str, video: str | None = None, newline_after_image: bool = False) -> str:
    """A ChatML template (Qwen, OneVision, InternVL): <|im_start|>role\\n...<|im_end|>\\n."""
    sep = "\n" if newline_after_image else ""
    head = (f"{{% if messages[0]['role'] != 'system' %}}{{{{ '<|im_start|>system\\n{system}<|im_end|>\\n' }}}}"
            "{% endif %}") if system else ""
    return (
        head + "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        f"{{% if c['type'] == 'image' %}}{{{{ {image!r} + {sep!r} }}}}"
        + (f"{{% elif c['type'] == 'video' %}}{{{{ {video!r} + {sep!r} }}}}" if video else "")
        + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


_CHATML = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def _llava_onevision(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              Qwen2Config, SiglipVisionConfig)

    template = _chatml("You are a helpful assistant.", "<image>", "<video>", newline_after_image=True)
    tok = _tokenizer(_CHATML, "<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                     {"image_token": "<image>", "video_token": "<video>"}, template)
    side, patch = 16, 8  # 2x2 features per view; anyres grid + newlines on one image, 2x2 + 1 newline on several
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    vision = SiglipVisionConfig(image_size=side, patch_size=patch, **_vision_kw(vision_hidden, vision_layers))
    text = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                                  video_token_index=tok.video_token_id, image_grid_pinpoints=pinpoints,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1)
    size = {"height": side, "width": side}
    images = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints)
    videos = LlavaOnevisionVideoProcessor(size=size)
    processor = LlavaOnevisionProcessor(images, tok, videos, num_image_tokens=(side // patch) ** 2,
                                        vision_feature_select_strategy="full", chat_template=template)
    return _finish("llava_onevision", LlavaOnevisionForConditionalGeneration, config, processor, 32, seed, std)


_QWEN_SPECIALS = [*_CHATML, "<|vision_start|>", "<|vision_end|>"]
_QWEN_IMAGE, _QWEN_VIDEO = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"


def _qwen_processing(processor_cls, videos_cls, system: str | None):
    """Tokenizer + processor shared by the Qwen-VL families: patch 4, merge 2 -> a 32x32 image is 16 tokens."""
    from transformers import Qwen2VLImageProcessor

    template = _chatml(system, _QWEN_IMAGE, _QWEN_VIDEO)
    tok = _tokenizer(_QWEN_SPECIALS, "<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                     {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}, template)
    geometry = dict(patch_size=4, merge_size=2, temporal_patch_size=2,
                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})  # pixels: 4..16 tokens per image
    return processor_cls(Qwen2VLImageProcessor(**geometry), tok, videos_cls(**geometry), chat_template=template)


def _qwen_ids(tok) -> dict:
    start, end = _ids(tok, "<|vision_start|>", "<|vision_end|>")
    return dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                vision_start_token_id=start, vision_end_token_id=end)


def _qwen_text(tok, hidden, layers, qwen3: bool = False) -> dict:
    half = hidden // 4 // 2  # rotary frequencies per head, split over (t, h, w) as in the real checkpoints
    hw = half * 5 // 16 if qwen3 else (half - half // 4) // 2  # 64 -> [24, 20, 20] (Qwen3), [16, 24, 24] (Qwen2)
    section = [half - 2 * hw, hw, hw] if qwen3 else [half // 4, hw, half - half // 4 - hw]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    extra = {"head_dim": hidden // 4} if qwen3 else {}
    if qwen3:
        rope["mrope_interleaved"] = True
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_parameters=rope,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def _qwen2_vl(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor

    processor = _qwen_processing(Qwen2VLProcessor, Qwen2VLVideoProcessor, "You are a helpful assistant.")
    tok = processor.tokenizer
    vision = dict(depth=vision_layers, embed_dim=vision_hidden, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=_qwen_text(tok, hidden, text_layers), vision_config=vision,
                           **_qwen_ids(tok))
    return _finish("qwen2_vl", Qwen2VLForConditionalGeneration, config, processor, 32, seed, std)


def _qwen2_5_vl(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLVideoProcessor)

    processor = _qwen_processing(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, "You are a helpful assistant.")
    tok = processor.tokenizer
    vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  window_size=16, fullatt_block_indexes=[vision_layers - 1])  # window: 2x2 merged tokens
    config = Qwen2_5_VLConfig(text_config=_qwen_text(tok, hidden, text_layers), vision_config=vision,
                              **_qwen_ids(tok))
    return _finish("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, config, processor, 32, seed, std)


def _qwen3_vl(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    processor = _qwen_processing(Qwen3VLProcessor, Qwen3VLVideoProcessor, None)
    tok = processor.tokenizer
    vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])  # learned 8x8 grid, resampled per image
    config = Qwen3VLConfig(text_config=_qwen_text(tok, hidden, text_layers, qwen3=True), vision_config=vision,
                           **_qwen_ids(tok))
    return _finish("qwen3_vl", Qwen3VLForConditionalGeneration, config, processor, 32, seed, std)


def _qwen3_5(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    """Qwen3.5: Qwen3-VL's processor and M-RoPE, a text model of Gated DeltaNet linear-attention layers with full
    attention every second layer (the real checkpoints: every fourth)."""
    from transformers import (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor,
                              Qwen3VLVideoProcessor)

    processor = _qwen_processing(Qwen3VLProcessor, Qwen3VLVideoProcessor, None)
    tok = processor.tokenizer
    text = dict(_qwen_text(tok, hidden, text_layers, qwen3=True), partial_rotary_factor=1.0,
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, full_attention_interval=2)
    vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=64)
    config = Qwen3_5Config(text_config=text, vision_config=vision, **_qwen_ids(tok))
    return _finish("qwen3_5", Qwen3_5ForConditionalGeneration, config, processor, 32, seed, std)


def _idefics_template(bos: str) -> str:
    """Idefics3 / SmolVLM: "User:<image>{text}<end_of_utterance>\\nAssistant: {reply}<end_of_utterance>\\n"."""
    return (
        bos + "{% for m in messages %}{{ m['role'] | capitalize }}"
        "{% if m['content'] is string %}{{ ': ' + m['content'] }}{% else %}"
        "{% if m['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<end_of_utterance>\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


_IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
                     *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]


def _idefics3(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, Idefics3VisionConfig)

    template = _idefics_template("<|begin_of_text|>")
    tok = _tokenizer(_IDEFICS_SPECIALS, "<|begin_of_text|>", "<end_of_utterance>", "<|end_of_text|>",
                     template=template)
    side, patch, scale = 16, 4, 2  # a tile is 4x4 patches, pixel-shuffled 2x -> 4 tokens; 32px image = 2x2 + global
    vision = Idefics3VisionConfig(image_size=side, patch_size=patch, **_vision_kw(vision_hidden, vision_layers))
    config = Idefics3Config(vision_config=vision, text_config=_llama_text(tok, hidden, text_layers),
                            image_token_id=_ids(tok, "<image>")[0], scale_factor=scale)
    images = Idefics3ImageProcessor(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side})
    processor = Idefics3Processor(images, tok, image_seq_len=(side // patch) ** 2 // scale**2, chat_template=template)
    return _finish("idefics3", Idefics3ForConditionalGeneration, config, processor, 32, seed, std)


def _smolvlm(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor,
                              SmolVLMProcessor, SmolVLMVideoProcessor, SmolVLMVisionConfig)

    template = _idefics_template("<|im_start|>")
    tok = _tokenizer(["<|im_start|>", "<video>", *_IDEFICS_SPECIALS], "<|im_start|>", "<end_of_utterance>",
                     "<|im_end|>", template=template)
    side, patch, scale = 32, 4, 4  # a tile is 8x8 patches, pixel-shuffled 4x -> 4 tokens; 64px image = 2x2 + global
    vision = SmolVLMVisionConfig(image_size=side, patch_size=patch, **_vision_kw(vision_hidden, vision_layers))
    config = SmolVLMConfig(vision_config=vision, text_config=_llama_text(tok, hidden, text_layers),
                           image_token_id=_ids(tok, "<image>")[0], scale_factor=scale)
    sizes = dict(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side})
    videos = SmolVLMVideoProcessor(**sizes, video_sampling={"max_frames": 4, "fps": 1, "video_size": sizes["size"]})
    processor = SmolVLMProcessor(SmolVLMImageProcessor(**sizes), tok, videos,
                                 image_seq_len=(side // patch) ** 2 // scale**2, chat_template=template)
    return _finish("smolvlm", SmolVLMForConditionalGeneration, config, processor, 64, seed, std)


# gemma-3-it: "<bos><start_of_turn>user\n<start_of_image>{text}<end_of_turn>\n<start_of_turn>model\n{reply}..."
_GEMMA_TEMPLATE = (
    "{{ bos_token }}" + _FOLD_SYSTEM + "{% for m in turns %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if loop.first %}{{ prefix }}{% endif %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _gemma3(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>", named, _GEMMA_TEMPLATE)
    side, patch, tokens = 32, 4, 16  # 8x8 patches, average-pooled 2x2 -> 16 soft tokens per image, always
    vision = SiglipVisionConfig(image_size=side, patch_size=patch, **_vision_kw(vision_hidden, vision_layers))
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, max_position_embeddings=2048,
                            sliding_window=512, layer_types=(["sliding_attention", "full_attention"] * 4)[:text_layers],
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            tie_word_embeddings=False)  # tied + sqrt(d) embeddings: greedy repeats its input
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                          boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                          image_token_index=tok.image_token_id, tie_word_embeddings=False)
    images = Gemma3ImageProcessor(size={"height": side, "width": side}, do_pan_and_scan=False)
    processor = Gemma3Processor(images, tok, chat_template=_GEMMA_TEMPLATE, image_seq_length=tokens)
    return _finish("gemma3", Gemma3ForConditionalGeneration, config, processor, 32, seed, std * GEMMA_STD_SCALE)


# gemma-4-it: "<bos><|turn>user\n<|image|>{text}<turn|>\n<|turn>model\n{reply}<turn|>\n"; the processor expands each
# <|image|> to <|image> + n x <|image|> + <image|> (boi, soft tokens, eoi).
_GEMMA4_TEMPLATE = (
    "{{ bos_token }}" + _FOLD_SYSTEM + "{% for m in turns %}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if loop.first %}{{ prefix }}{% endif %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<turn|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)
_GEMMA4_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                  "video_token": "<|video|>", "audio_token": "<|audio|>", "boa_token": "<|audio>",
                  "eoa_token": "<audio|>"}  # the processor reads every one (audio too, even for images)


def _gemma4(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    """Gemma 4: `mmspec.testing.tiny_gemma4`'s text layout (window 6, per-layer inputs): `text_layers` layers with
    keys of their own (sliding, full, ...) followed by as many KV-shared layers reading them, 4 layers by default, so
    a `Gemma4AssistantForCausalLM` finds a store layer of each type (`mmspec.testing.tiny_gemma4_assistant(
    target=...)`); one full-attention layer for text_layers=1 (the draft VLM). Bidirectional attention among an
    image's soft tokens in the sliding layers (``use_bidirectional_attention="vision"``, as the larger checkpoints)
    and a Gemma 4 vision tower (patch 4, 2x2 pooling).

    Gemma4ImageProcessor resizes every image to fill a budget of at least 70 soft tokens (its smallest allowed
    `max_soft_tokens`), so a square image is 8 x 8 = 64 soft tokens whatever its size. The patch embedder's position
    table starts as ones, which swamps the pixels at default init: it and the input projection are redrawn."""
    from transformers import (Gemma4AudioFeatureExtractor, Gemma4Config, Gemma4ForConditionalGeneration,
                              Gemma4ImageProcessor, Gemma4Processor, Gemma4VideoProcessor, Gemma4VisionConfig)

    from mmspec.testing.tiny import gemma4_text_config

    tok = _tokenizer(["<|turn>", "<turn|>"], "<bos>", "<eos>", "<pad>", _GEMMA4_TOKENS, _GEMMA4_TEMPLATE)
    geometry = dict(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)
    processor = Gemma4Processor(Gemma4AudioFeatureExtractor(), Gemma4ImageProcessor(**geometry), tok,
                                Gemma4VideoProcessor(**geometry, num_frames=2), chat_template=_GEMMA4_TEMPLATE,
                                image_seq_length=64)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    types = ["sliding_attention", "full_attention"] * text_layers if text_layers >= 2 else ["full_attention"]
    text = gemma4_text_config(len(tok), hidden, num_hidden_layers=len(types), layer_types=types,
                              num_kv_shared_layers=len(types) - text_layers, use_bidirectional_attention="vision",
                              tie_word_embeddings=False, **ids)
    vision = Gemma4VisionConfig(**_vision_kw(vision_hidden, vision_layers), num_key_value_heads=2,
                                head_dim=vision_hidden // 2, patch_size=4, pooling_kernel_size=2,
                                position_embedding_size=160)  # patches per side: 16 for a square image, < 160 always
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=tok.image_token_id,
                          boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id,
                          video_token_id=tok.video_token_id, audio_token_id=tok.audio_token_id,
                          boa_token_id=tok.boa_token_id, eoa_token_index=tok.eoa_token_id, tie_word_embeddings=False)
    vlm = _finish("gemma4", Gemma4ForConditionalGeneration, config, processor, 32, seed, std * GEMMA_STD_SCALE)
    embedder = vlm.model.model.vision_tower.patch_embedder
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (embedder.input_proj.weight, embedder.position_embedding_table):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return vlm


# PaliGemma has no chat template on the hub: a prompt is "<image>...<image>" + task prefix, and the processor inserts
# BOS after the last image and appends "\n" (prefix-LM: image + prefix attend bidirectionally, see token_type_ids).
# This template renders that convention: every image first, then the turns' texts joined by "\n".
_PALIGEMMA_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is not string %}{% for c in m['content'] if c['type'] == 'image' %}"
    "{{ '<image>' }}{% endfor %}{% endif %}{% endfor %}{% for m in messages %}{% if not loop.first %}{{ '\n' }}"
    "{% endif %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}"
)


def _paligemma(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    tok = _tokenizer([], "<bos>", "<eos>", "<pad>", {"image_token": "<image>"}, _PALIGEMMA_TEMPLATE)
    side, patch = 16, 4  # 4x4 patches -> 16 image tokens per image
    images = SiglipImageProcessor(size={"height": side, "width": side})
    images.image_seq_length = (side // patch) ** 2
    processor = PaliGemmaProcessor(images, tok, chat_template=_PALIGEMMA_TEMPLATE)  # adds 1152 <locXXXX>/<segXXX>
    vision = SiglipVisionConfig(image_size=side, patch_size=patch, **_vision_kw(vision_hidden, vision_layers))
    text = GemmaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden // 4, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                             projection_dim=hidden, hidden_size=hidden, vocab_size=len(tok), tie_word_embeddings=False)
    return _finish("paligemma", PaliGemmaForConditionalGeneration, config, processor, 32, seed,
                   std * GEMMA_STD_SCALE)


def _internvl(seed, text_layers, hidden, std, vision_hidden, vision_layers) -> TinyVLM:
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor, InternVLVisionConfig, Qwen2Config)

    template = _chatml(None, "<IMG_CONTEXT>", "<video>", newline_after_image=True)
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _tokenizer(_CHATML, "<|endoftext|>", "<|im_end|>", "<|endoftext|>", named, template)
    side, patch = 16, 4  # a tile is 4x4 patches, pixel-shuffled 0.5 -> 4 tokens; 32px image = 2x2 tiles + thumbnail
    vision = InternVLVisionConfig(image_size=side, patch_size=patch, **_vision_kw(vision_hidden, vision_layers))
    text = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    per_tile = (side // patch) ** 2 // 4
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                            image_seq_length=per_tile, downsample_ratio=0.5, vision_feature_layer=-1,
                            tie_word_embeddings=False)
    images = GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=True, max_patches=4)
    videos = InternVLVideoProcessor(size={"height": side, "width": side})
    processor = InternVLProcessor(images, tok, videos, image_seq_length=per_tile, chat_template=template)
    return _finish("internvl", InternVLForConditionalGeneration, config, processor, 32, seed, std)


# ----------------------------------------------------------------------------------------------------------- public
FAMILIES: dict[str, Callable[..., TinyVLM]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "gemma3": _gemma3,
    "paligemma": _paligemma,
    "internvl": _internvl,
    "gemma4": _gemma4,
}

TEXT_ONLY_FAMILIES = tuple(f for f in FAMILIES if f != "paligemma")  # PaliGemmaProcessor requires images
# Hybrid linear-attention families: targets only (a draft model with recurrent layers is refused), so kept apart
# from FAMILIES, whose every member also serves as a draft VLM in the tests.
HYBRID_FAMILIES: dict[str, Callable[..., TinyVLM]] = {"qwen3_5": _qwen3_5}


def tiny_vlm(family: str, seed: int = 0, *, text_layers: int = 2, hidden: int = 64, std: float = 0.2,
             vision_hidden: int = 32, vision_layers: int = 2) -> TinyVLM:
    """A tiny random `family` VLM with its processor (see module docstring). Deterministic in `seed`.

    `hidden` must be a multiple of 16 and >= 32 (4 heads; Qwen's M-RoPE splits head_dim / 2 over t, h, w).
    `vision_hidden` / `vision_layers` size the vision tower; they never change the number of image tokens.
    """
    builders = {**FAMILIES, **HYBRID_FAMILIES}
    if family not in builders:
        raise ValueError(f"unknown VLM family {family!r}; valid families: {sorted(builders)}")
    if hidden % 16 or hidden < 32:
        raise ValueError(f"hidden={hidden}: must be a multiple of 16 and >= 32 (4 heads with head_dim >= 8)")
    return builders[family](seed, text_layers, hidden, std, vision_hidden, vision_layers)


def draft_vlm(family: str, seed: int = 1, **kw) -> TinyVLM:
    """A smaller `family` VLM (1 text layer, 1-layer 16-wide vision tower) with the target's processor and vocabulary.

    Image geometry (patch sizes, grids, placeholder counts) is the family's, not a function of the widths, so the
    target's `inputs` are valid for the draft unchanged.
    """
    kw = {"text_layers": 1, "vision_hidden": 16, "vision_layers": 1, **kw}
    return tiny_vlm(family, seed, **kw)


def text_drafter(family: str, seed: int = 2, *, hidden: int = 32, layers: int = 1, std: float = 0.2
                 ) -> LlamaForCausalLM:
    """A tiny text-only LLaMA for `family` whose vocab_size equals the target's text vocab_size (== len(tokenizer)).

    Every id the target's processor emits (image placeholders included) is a valid input id, and the drafter's
    logits have the target's width, so its proposals need no id mapping.
    """
    target = tiny_vlm(family, 0, text_layers=1, vision_hidden=16, vision_layers=1)
    vocab = target.model.get_output_embeddings().out_features
    tok = target.processor.tokenizer
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    _widen(model, std, seed)
    return model.float().eval()


def test_image(seed: int = 0, size: int | None = None) -> Image.Image:
    """A deterministic random RGB image: an 8x8 grid of random colours, `size` (default 32) pixels square.

    Blocks rather than pixel noise, so that resizing to each family's resolution keeps images distinguishable.
    """
    size = 32 if size is None else size
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8)  # (H, W, C)
    return Image.fromarray(cells.numpy()).resize((size, size), Image.NEAREST)


test_image.__test__ = False  # not a pytest test, despite the name
