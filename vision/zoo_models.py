"""Building the zoo's VLMs from nothing: a tokenizer trained on the zoo's text, LLaVA's processor and model classes.

The zoo VLM is a stock `LlavaForConditionalGeneration` (CLIP vision tower, two-layer projector, LLaMA language
model), so everything that loads a LLaVA checkpoint loads it (`AutoModelForImageTextToText.from_pretrained`,
`AutoProcessor.from_pretrained`). Its tokenizer is a byte-level BPE trained in-process on the scene conversations and
the natural text of `vision.scenes` (deterministic), with LLaVA-1.5's special tokens and a chat template in its
style: ``USER: <image>\\n{question} ASSISTANT: {answer}</s>``.
"""
from __future__ import annotations

import random

from mmspec.zoo import seeded

from .scenes import passages, scene_example, text_conversation

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "image": "<image>"}


def tokenizer_corpus(scenes: int = 3000, seed: int = 0) -> list[str]:
    """The text the BPE is trained on: scene questions and answers, and the natural-text passages."""
    rng = random.Random(seed)
    out = []
    for i in range(scenes):
        _, q, a, _ = scene_example(seed * 1_000_003 + i, size=8)
        out += [q, a]
    for p in passages():
        out += list(text_conversation(p, rng))
    return out


def train_tokenizer(vocab_size: int, corpus: list[str]):
    """A byte-level BPE fast tokenizer (any string round-trips) with LLaVA's special tokens and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    specials = list(SPECIALS.values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    base.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=base, bos_token=SPECIALS["bos"], eos_token=SPECIALS["eos"],
                                  pad_token=SPECIALS["pad"], extra_special_tokens={"image_token": SPECIALS["image"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llava_processor(tok, image_size: int, patch: int):
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(images, tok, patch_size=patch, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def llava_model(tok, *, image_size: int, patch: int, vision_hidden: int, vision_layers: int, hidden: int,
                layers: int, heads: int, kv_heads: int, intermediate: int, seed: int, max_positions: int = 1024):
    """A randomly initialised LlavaForConditionalGeneration sized by the arguments (deterministic in `seed`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=max(1, vision_hidden // 64))
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                         image_seq_length=(image_size // patch) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    with seeded(seed):
        model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model.float().eval()


def text_lm(tok, *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, seed: int,
            max_positions: int = 1024):
    """A randomly initialised LlamaForCausalLM with the zoo tokenizer's vocabulary (a text-only drafter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with seeded(seed):
        model = LlamaForCausalLM(config)
    return model.float().eval()
