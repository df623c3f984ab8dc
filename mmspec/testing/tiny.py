"""Tiny random LLaMA-family models built from configs, with weights widened so that greedy outputs are diverse.

Default initialisation (std 0.02) makes tiny models repeat one token, which would let equality tests pass vacuously
(ARCHITECTURE.md, Tests). `widen_` redraws every matrix from N(0, std).
"""
from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@torch.no_grad()
def widen_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_llama(seed: int = 0, vocab: int = 96, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               std: float = 0.2, max_positions: int = 1024, dtype=torch.float32) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    widen_(model, std, seed)
    return model.to(dtype).eval()


def tiny_qwen3_5(seed: int = 0, vocab: int = 96, hidden: int = 64, layers: int = 4, std: float = 0.2,
                 interval: int = 2) -> torch.nn.Module:
    """A tiny random Qwen3.5 text model (`Qwen3_5ForCausalLM`): Gated DeltaNet linear-attention layers with a full
    attention layer every `interval` layers (the hybrid layout; Qwen3.5 itself uses 4), widened like `tiny_llama`."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
                            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                            linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=interval,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return widen_(Qwen3_5ForCausalLM(cfg), std, seed).float().eval()


GEMMA4_SHARED = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=16, sliding_window=6,
                     max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def gemma4_text_config(vocab: int = 96, hidden: int = 64, **overrides):
    """`tiny_gemma4`'s text layout as a `Gemma4TextConfig`: 4 layers (sliding, full, sliding, full) whose last two
    read the first two's keys (KV sharing), per-layer inputs of width 8, a sliding window of 6 and the ids of
    `GEMMA4_SHARED`; `overrides` replace any field (a VLM's token ids, its layer count, ...)."""
    from transformers import Gemma4TextConfig

    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
              num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
              hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab, **GEMMA4_SHARED)
    kw.update(overrides)
    return Gemma4TextConfig(**kw)


def tiny_gemma4(seed: int = 0, vocab: int = 96, std: float = 0.2) -> torch.nn.Module:
    """A tiny random Gemma 4 text model (`Gemma4ForCausalLM`): 4 layers (sliding, full, sliding, full) whose last two
    read the first two's keys (KV sharing), per-layer inputs, a sliding window of 6."""
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(gemma4_text_config(vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def tiny_gemma4_assistant(seed: int = 1, vocab: int = 96, backbone: int = 64, *,
                          target: torch.nn.Module | None = None) -> torch.nn.Module:
    """A tiny random `Gemma4AssistantForCausalLM` for `tiny_gemma4` (2 layers, hidden 32, every layer reading the
    target's keys), drafting 3 tokens a round in transformers' own path.

    target: a Gemma 4 model (`Gemma4ForCausalLM`, or a `Gemma4ForConditionalGeneration` such as
    ``vision.testing.tiny_vlm("gemma4").model``) to make the assistant for: its output vocabulary, its text hidden
    size (the assistant's ``backbone_hidden_size``), its sliding window and token ids replace `vocab` / `backbone`
    and `GEMMA4_SHARED`'s."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

    shared = dict(GEMMA4_SHARED)
    if target is not None:
        from mmspec.target import output_vocab, text_config

        tc = text_config(target)
        vocab, backbone = output_vocab(target), int(tc.hidden_size)
        shared.update(sliding_window=tc.sliding_window, pad_token_id=tc.pad_token_id, eos_token_id=tc.eos_token_id,
                      bos_token_id=tc.bos_token_id)
    text = Gemma4TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"],
                            hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, **shared)
    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(Gemma4AssistantConfig(text_config=text, backbone_hidden_size=backbone))
    model.generation_config.num_assistant_tokens = 3
    return model.eval()


def tiny_deepseek_v3(seed: int = 0, vocab: int = 96, std: float = 0.2) -> torch.nn.Module:
    """A tiny random DeepSeek-V3 (MLA attention, a dense then a MoE layer) whose config declares one MTP layer
    (``num_mtp_layers``: transformers' `MtpModel` builds it), widened like `tiny_llama`."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                           num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_mtp_layers=1,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    torch.manual_seed(seed)
    return widen_(DeepseekV3ForCausalLM(cfg), std, seed).eval()


@torch.no_grad()
def save_deepseek_v3_with_mtp(directory, seed: int = 0, std: float = 0.2) -> str:
    """Write a tiny DeepSeek-V3 checkpoint whose MTP layer sits where transformers' `MtpModel.from_pretrained` looks
    for it: 61 main layers (its key pattern names layer 61) and ``model.layers.61.*`` (the MTP decoder block,
    ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``) in the same safetensors file. Returns the directory, for
    ``from_pretrained``; `generate(use_mtp=True)` runs on it."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    layers, hidden = 61, 32
    kw = dict(vocab_size=96, hidden_size=hidden, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=2,
              num_key_value_heads=2, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
              first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8,
              v_head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
    torch.manual_seed(seed)
    full = widen_(DeepseekV3ForCausalLM(DeepseekV3Config(num_hidden_layers=layers + 1, **kw)), std, seed)
    root = Path(directory)
    full.save_pretrained(root)  # layer 61 is written in the checkpoint layout: the MTP decoder block
    weights = load_file(str(root / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    for name in ("enorm", "hnorm", "shared_head.norm"):
        weights[f"model.layers.{layers}.{name}.weight"] = torch.ones(hidden)
    weights[f"model.layers.{layers}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=g) * std
    save_file(weights, str(root / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((root / "config.json").read_text())
    config.update(num_hidden_layers=layers, num_mtp_layers=1)
    (root / "config.json").write_text(json.dumps(config, indent=1))
    return str(root)


@torch.no_grad()
def noisy_copy(model: torch.nn.Module, noise: float, seed: int = 1) -> torch.nn.Module:
    """A drafter that agrees with `model` only sometimes: a copy with Gaussian noise on its output head."""
    draft = copy.deepcopy(model)
    head = draft.get_output_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    head.add_(torch.randn(head.shape, generator=g).to(head) * noise * head.std())
    return draft.eval()


def word_tokenizer(vocab: int = 96):
    """An in-process word-level tokenizer ("w3 w17 ...") for a tiny model of `vocab` ids: 0 pad, 1 bos, 2 eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
