"""Build a tiny random EAGLE-3 draft in speculators' format plus a reference file.

Run with the serving venv (see setup_venv.sh):

    .venv-serving/bin/python scripts/serving_check/make_reference_example.py OUT_DIR

writes
    OUT_DIR/draft/            config.json + model.safetensors saved by speculators'
                              own Eagle3DraftModel.save_pretrained
    OUT_DIR/reference.safetensors
                              input_ids (1,T) int64, hidden_states (1,T,3H),
                              position_ids (1,T), logits (1,T,draft_vocab),
                              hidden_out (1,T,H), hidden_normed (1,T,H)

The reference outputs are NOT produced by speculators: `eagle3_step` below is a
plain-torch implementation of one EAGLE-3 draft step written from the format
notes, so a passing check_speculators.py run also confirms those equations
(and it is the shape an mmspec exporter's own reference should have).

--corrupt KIND additionally writes OUT_DIR/draft_corrupt_KIND/ for negative tests:
    rename   layers.0.hidden_norm.weight -> layers.0.hidden_normx.weight
    drop     removes fc.weight
    perturb  adds 1e-2 to norm.weight (keys fine, outputs differ)
    d2t      breaks the d2t/t2d agreement
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=96,
    draft_vocab_size=48,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=256,
)


# --------------------------------------------------------------------------
# Plain-torch EAGLE-3 draft step (single decoder layer, llama-style)
# --------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B,T,hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B,T,hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def eagle3_step(sd: dict, cfg: dict, input_ids, aux_hidden, positions):
    """One draft step. Returns (logits, pre-norm hidden, post-norm hidden).

    sd uses speculators' key names (fc.weight, layers.0.*, norm.weight, lm_head.weight,
    embed_tokens.weight). aux_hidden is the concatenation of the target's aux states.
    """
    H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    p = "layers.0."
    B, T = input_ids.shape

    g = aux_hidden @ sd["fc.weight"].T  # (B,T,H): fc, 3H -> H
    e = sd["embed_tokens.weight"][input_ids]  # (B,T,H)

    residual = g  # norm_before_residual = False
    x = torch.cat([rms_norm(e, sd[p + "input_layernorm.weight"], eps),
                   rms_norm(g, sd[p + "hidden_norm.weight"], eps)], dim=-1)  # (B,T,2H)

    q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, nh, hd).transpose(1, 2)
    k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
    v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
    cos, sin = rope_cos_sin(positions, hd, cfg["rope_theta"])
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    attn = scores.softmax(-1) @ v  # (B,nh,T,hd)
    attn = attn.transpose(1, 2).reshape(B, T, nh * hd) @ sd[p + "self_attn.o_proj.weight"].T

    h = residual + attn
    m = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
    m = (torch.nn.functional.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) @ sd[
        p + "mlp.down_proj.weight"
    ].T
    h = h + m  # pre-norm output: what the next draft step is fed (norm_output=False)
    hn = rms_norm(h, sd["norm.weight"], eps)
    logits = hn @ sd["lm_head.weight"].T  # (B,T,draft_vocab)
    return logits, h, hn


# --------------------------------------------------------------------------
def build_tiny(out: Path, seed: int) -> Path:
    from transformers import LlamaConfig

    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    torch.manual_seed(seed)
    c = TINY
    layer_cfg = LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=1,
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        rms_norm_eps=c["rms_norm_eps"],
        max_position_embeddings=c["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=layer_cfg,
        draft_vocab_size=c["draft_vocab_size"],
        norm_before_residual=False,
        target_hidden_size=None,
        eagle_aux_hidden_state_layer_ids=[1, 2, 3],
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=3)],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path="example-org/tiny-verifier", architectures=["LlamaForCausalLM"]),
        ),
    )
    model = Eagle3DraftModel(config)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.startswith("verifier_"):
                continue
            if name.endswith("norm.weight") or ".norm." in name or name.endswith("layernorm.weight"):
                prm.copy_(1.0 + 0.1 * torch.randn_like(prm))  # non-trivial norm gains
            else:
                prm.copy_(0.2 * torch.randn_like(prm))
    # draft vocabulary: a sorted random subset of the target vocabulary
    ids = torch.randperm(c["vocab_size"])[: c["draft_vocab_size"]].sort().values
    t2d = torch.zeros(c["vocab_size"], dtype=torch.bool)
    t2d[ids] = True
    d2t = ids - torch.arange(c["draft_vocab_size"])
    model.load_vocab_mappings(t2d, d2t)

    draft = out / "draft"
    if draft.exists():
        shutil.rmtree(draft)
    model.save_pretrained(str(draft))
    return draft


def write_reference(draft: Path, ref_path: Path, seed: int, T: int = 12) -> None:
    torch.manual_seed(seed + 1)
    cfg_json = json.loads((draft / "config.json").read_text())
    tl = cfg_json["transformer_layer_config"]
    cfg = dict(TINY)
    cfg.update({k: tl[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps") if k in tl})
    sd = {k: v.float() for k, v in load_file(str(draft / "model.safetensors")).items()}
    H = cfg["hidden_size"]
    input_ids = torch.randint(0, cfg["vocab_size"], (1, T))
    hidden_states = torch.randn(1, T, 3 * H)
    position_ids = torch.arange(T)[None]
    with torch.no_grad():
        logits, h, hn = eagle3_step(sd, cfg, input_ids, hidden_states, position_ids)
    save_file(
        {
            "input_ids": input_ids.contiguous(),
            "hidden_states": hidden_states.contiguous(),
            "position_ids": position_ids.contiguous(),
            "logits": logits.contiguous(),
            "hidden_out": h.contiguous(),
            "hidden_normed": hn.contiguous(),
        },
        str(ref_path),
    )


def corrupt(draft: Path, kind: str) -> Path:
    dst = draft.parent / f"draft_corrupt_{kind}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(draft, dst)
    sd = load_file(str(dst / "model.safetensors"))
    if kind == "rename":
        sd["layers.0.hidden_normx.weight"] = sd.pop("layers.0.hidden_norm.weight")
    elif kind == "drop":
        sd.pop("fc.weight")
    elif kind == "perturb":
        sd["norm.weight"] = sd["norm.weight"] + 1e-2
    elif kind == "d2t":
        sd["d2t"] = sd["d2t"].roll(1)
    else:
        raise SystemExit(f"unknown corruption {kind!r}")
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corrupt", action="append", default=[], choices=["rename", "drop", "perturb", "d2t"])
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=TINY[k])
    a = ap.parse_args()
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
        TINY[k] = getattr(a, k)
    a.out.mkdir(parents=True, exist_ok=True)
    draft = build_tiny(a.out, a.seed)
    write_reference(draft, a.out / "reference.safetensors", a.seed)
    print(f"draft: {draft}\nreference: {a.out / 'reference.safetensors'}")
    for kind in a.corrupt:
        print(f"corrupt ({kind}): {corrupt(draft, kind)}")


if __name__ == "__main__":
    main()
