"""EAGLE-3 drafters in the layouts serving engines load: export a trained `Eagle3Head`, and read published drafters.

Two layouts, one set of tensors (a one-layer EAGLE-3 draft; `vision.drafters.eagle3`):

* ``speculators`` (what vLLM loads natively, the `speculators` package's format): ``config.json`` with
  ``speculators_model_type: "eagle3"``, the decoder layer's own config (``transformer_layer_config``, a LLaMA layer),
  ``draft_vocab_size``, ``eagle_aux_hidden_state_layer_ids`` (the target's hidden-state indices, ascending) and
  ``speculators_config`` (greedy proposals of ``speculative_tokens``, the verifier's ``name_or_path``); weights
  ``embed_tokens``, ``fc``, ``layers.0.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``.
* ``sglang`` (SGLang's ``LlamaForCausalLMEagle3``, also the layout of the EAGLE-3 checkpoints the EAGLE authors
  publish): a flat LLaMA config with ``architectures: ["LlamaForCausalLMEagle3"]``, ``draft_vocab_size`` and
  ``eagle_config.eagle_aux_hidden_state_layer_ids`` (SGLang counts these from 0 for the first layer's output, one
  less than the hidden-state index); weights ``midlayer.*`` instead of ``layers.0.*``.

Both write ``norm_before_residual`` / ``norm_output`` as mmspec's head computes them (false), and the aux states in
ascending layer order (an Eagle3Head keeps its taps so). The
target's embedding is written too (both engines substitute the target's own; speculators needs one present).
An EAGLE-3 head of a Qwen-VL target numbers its pairs as the target does (M-RoPE), so its export carries the
target's ``mrope_section`` (and ``mrope_interleaved``) in ``rope_scaling`` (SGLang) and in the layer's
``rope_parameters`` (speculators); other heads export 1-D RoPE at the target's base.

What the layouts cannot hold is refused, never dropped: EAGLE-1 / MSD / DREAM heads, compressors (the engines feed
every image position to the drafter), several decoder layers. Checkpoints are read from safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mmspec.checkpoint import read_safetensors
from mmspec.errors import CheckpointError, IncompatibleModelsError, InvalidInputError, UnsupportedModelError
from mmspec.target import text_config

FORMATS = ("speculators", "sglang")
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose format this writes


def exportable(head) -> None:
    """Raise UnsupportedModelError naming what a serving layout cannot hold in `head`."""
    from vision.drafters import Eagle3Head

    if not isinstance(head, Eagle3Head):
        kind = type(head).__name__
        why = {"DreamHead": "its cross-attention over the target's intermediate features",
               "EagleHead": "its EAGLE-1 fusion (fc over [embedding; feature] into a plain LLaMA layer)",
               "DFlashHead": "its block decoding", "MtpHead": "the target's own MTP layer (it ships in the target's "
                                                             "checkpoint)"}.get(kind, "its architecture")
        raise UnsupportedModelError(f"this {kind} cannot be exported to vLLM / SGLang's EAGLE-3 layout: {why} has no "
                                    "place there; train an EAGLE-3 head (mmspec train-drafter --head eagle3)")


def _rope(head) -> dict:
    """The head's RoPE as the engines read it: the base, and a Qwen-VL head's M-RoPE sections."""
    rope = {"rope_type": "default", "rope_theta": float(head.config.rope_parameters["rope_theta"])}  # the target's
    return {**rope, **head.mrope} if head.mrope is not None else rope


def _layer_config(head) -> dict:
    c = head.config
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "num_hidden_layers": 1,
            "rms_norm_eps": c.rms_norm_eps, "hidden_act": "silu", "vocab_size": head.target_vocab,
            "max_position_embeddings": c.max_position_embeddings, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "rope_parameters": _rope(head)}


def _weights(head, target, layer_prefix: str) -> dict[str, torch.Tensor]:
    out = {"embed_tokens.weight": target.get_input_embeddings().weight.detach(), "fc.weight": head.fc.weight.detach(),
           "norm.weight": head.norm.weight.detach(), "lm_head.weight": head.lm_head.weight.detach()}
    out.update({f"{layer_prefix}.{k}": v.detach() for k, v in head.midlayer.state_dict().items()})
    if head.draft_vocab_size != head.target_vocab:
        out.update(d2t=head.d2t.detach(), t2d=head.t2d.detach())
    return {k: v.contiguous().cpu() for k, v in out.items()}


def export_drafter(head, target: nn.Module, fmt: str, out_dir, *, speculative_tokens: int = 3,
                   verifier: str | None = None) -> Path:
    """Write `head` (an Eagle3Head trained for `target`) to `out_dir` in layout `fmt` ("speculators" | "sglang").
    verifier: the target's name or path recorded for the engine (default: where the target was loaded from)."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise InvalidInputError(f"format {fmt!r}: valid formats are {FORMATS}")
    if not isinstance(speculative_tokens, int) or speculative_tokens < 1:
        raise InvalidInputError(f"speculative_tokens={speculative_tokens!r}: must be a positive integer")
    exportable(head)
    aux, dtype = list(head.taps), str(head.fc.weight.dtype)[6:]  # taps: ascending hidden-state indices
    name = verifier or str(getattr(target.config, "name_or_path", "") or "")
    layer = _layer_config(head)
    if fmt == "speculators":
        config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                  "speculators_version": SPECULATORS_VERSION, "draft_vocab_size": head.draft_vocab_size,
                  "target_hidden_size": None, "eagle_aux_hidden_state_layer_ids": aux,
                  "norm_before_residual": False, "norm_before_fc": False, "fc_norm": False, "norm_output": False,
                  "embed_requires_grad": False, "tie_word_embeddings": False, "dtype": dtype,
                  "transformer_layer_config": layer,
                  "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                         "proposal_methods": [{"proposal_type": "greedy", "accept_tolerance": 0.0,
                                                               "speculative_tokens": speculative_tokens,
                                                               "verifier_accept_k": 1}],
                                         "verifier": {"name_or_path": name,
                                                      "architectures": [type(target).__name__]}}}
        weights = _weights(head, target, "layers.0")
    else:
        config = {**layer, "architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": head.draft_vocab_size,
                  "rope_theta": layer["rope_parameters"]["rope_theta"],
                  "rope_scaling": layer["rope_parameters"] if head.mrope is not None else None,
                  "torch_dtype": dtype, "target_hidden_size": head.config.hidden_size,
                  "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux],
                                   "use_aux_hidden_state": True},
                  "mmspec": {"verifier": name, "target_model_type": getattr(text_config(target), "model_type", None)}}
        weights = _weights(head, target, "midlayer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# --- import ---------------------------------------------------------------------------------------------------------
def serving_layout(directory) -> str | None:
    """"speculators", "sglang" (also the EAGLE authors' layout) or None, from `directory`/config.json."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if cfg.get("speculators_model_type") == "eagle3":
        return "speculators"
    if "LlamaForCausalLMEagle3" in (cfg.get("architectures") or []):
        return "sglang"
    return None


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = (f" ({', '.join(pickled)} are pickles, which mmspec never loads: convert them to safetensors "
                "in a trusted environment)") if pickled else ""
        raise CheckpointError(f"{str(directory)!r} has no safetensors weights{hint}")
    weights = {}
    for f in files:
        weights.update(read_safetensors(f, "drafter checkpoint"))
    return weights


def load_serving_drafter(directory, target: nn.Module):
    """An Eagle3Head for `target` from a directory in the speculators or SGLang / EAGLE layout."""
    from vision.drafters import Eagle3Head

    directory = Path(directory)
    layout = serving_layout(directory)
    if layout is None:
        raise CheckpointError(f"{str(directory)!r} is not an EAGLE-3 drafter in the speculators or SGLang layout "
                              "(its config.json has neither speculators_model_type 'eagle3' nor architectures "
                              "['LlamaForCausalLMEagle3'])")
    cfg = json.loads((directory / "config.json").read_text())
    num_layers = int(text_config(target).num_hidden_layers)
    layer = cfg.get("transformer_layer_config", {}) if layout == "speculators" else cfg
    if int(layer.get("num_hidden_layers", 1)) != 1:
        raise UnsupportedModelError(f"{str(directory)!r} has {layer.get('num_hidden_layers')} draft layers; mmspec's "
                                    "EAGLE-3 head has one")
    if layout == "speculators":
        aux = cfg.get("eagle_aux_hidden_state_layer_ids")
    else:
        ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        aux = [i + 1 for i in ids] if ids else None
    aux = sorted(aux) if aux else [2, num_layers // 2, num_layers - 3]  # the engines' shared default
    if any(not 0 <= i <= num_layers for i in aux):
        raise CheckpointError(f"{str(directory)!r} reads hidden states {aux}; the target has {num_layers + 1} "
                              f"(0 .. {num_layers})")
    weights = _read_weights(directory)
    rename = {"layers.0.": "midlayer."} if layout == "speculators" else {"model.midlayer.": "midlayer.",
                                                                         "model.": ""}
    mapped = {}
    for k, v in weights.items():
        for old, new in rename.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        mapped[k] = v
    mapped.pop("embed_tokens.weight", None)  # the target's embedding is used (as both engines do)
    vocab = int(target.get_output_embeddings().weight.shape[0])
    n = int(cfg.get("draft_vocab_size") or vocab)
    if n > vocab:
        raise CheckpointError(f"{str(directory)!r}: draft_vocab_size {n} is larger than the target's vocabulary "
                              f"({vocab})")
    if n == vocab and "d2t" not in mapped:
        mapped["d2t"] = torch.zeros(n, dtype=torch.long)
        mapped["t2d"] = torch.ones(n, dtype=torch.bool)
    elif "d2t" not in mapped:
        raise CheckpointError(f"{str(directory)!r}: a draft vocabulary of {n} < {vocab} needs the 'd2t' tensor")
    for key in ("fc.weight", "lm_head.weight", "norm.weight"):
        if key not in mapped:
            raise CheckpointError(f"{str(directory)!r} has no {key!r} tensor")
    want = len(aux) * int(text_config(target).hidden_size)
    if mapped["fc.weight"].shape[1] != want:
        raise CheckpointError(f"{str(directory)!r}: fc.weight reads {mapped['fc.weight'].shape[1]} features, but "
                              f"{len(aux)} hidden states of this target are {want}")
    rope = layer.get("rope_parameters") or layer.get("rope_scaling") or {}
    mrope = bool(isinstance(rope, dict) and rope.get("mrope_section"))
    if mrope and (getattr(text_config(target), "rope_parameters", None) or {}).get("mrope_section") is None:
        raise IncompatibleModelsError(f"{str(directory)!r} is an M-RoPE drafter (mrope_section), but "
                                      f"{type(target).__name__} does not use M-RoPE")
    head = Eagle3Head.from_weights(target, tuple(aux), mapped, str(directory), mrope=mrope)
    head.source_layout = layout
    return head


@torch.no_grad()
def reference_step(head, input_ids: torch.Tensor, taps: torch.Tensor) -> dict[str, torch.Tensor]:
    """One draft step of `head` for checking an export against another implementation: the inputs (token ids
    (1, T), the target's tapped hidden states (1, T, k*H) in ascending layer order) and the head's outputs: logits
    over the draft vocabulary, the layer's output fed back (``hidden_out``) and its final norm (``hidden_normed``)."""
    out = head(input_ids, taps, use_cache=False)
    h = out.hidden_states[0]
    normed = head.norm(h)
    return {"input_ids": input_ids.cpu(), "hidden_states": taps.cpu(), "logits": head.lm_head(normed).cpu(),
            "hidden_out": h.cpu(), "hidden_normed": normed.cpu(),
            "embed_tokens.weight": head._shared[0].weight.detach().cpu()}


# --- CLI ------------------------------------------------------------------------------------------------------------
def cmd_export_drafter(args) -> int:
    """``mmspec export-drafter HEAD --format speculators|sglang --out DIR [--target T]``."""
    import sys

    from mmspec.checks import check_local_path
    from vision.drafters import load_feature_drafter

    if args.format not in FORMATS:
        raise InvalidInputError(f"--format {args.format!r}: valid formats are {FORMATS}")
    head_dir = Path(args.head)
    if args.target is not None:
        check_local_path(args.target, "--target")  # before anything loads; never a hub lookup
    if not (head_dir / "config.json").is_file():
        raise CheckpointError(f"{str(head_dir)!r} holds no drafter (no config.json); pass the --out directory of "
                              "mmspec train-drafter")
    target_path = args.target
    if target_path is None:
        raw = json.loads((head_dir / "config.json").read_text())
        target_path = raw.get("target_path") if isinstance(raw, dict) else None
        if not target_path:
            raise InvalidInputError(f"{str(head_dir)!r} does not record its target's path; pass --target")
    target = _load_target(target_path, args.trust_remote_code)
    head = load_feature_drafter(head_dir, target).head
    out = export_drafter(head, target, args.format, args.out, speculative_tokens=args.speculative_tokens,
                         verifier=args.verifier or target_path)
    print(json.dumps({"format": args.format, "out": str(out), "draft_vocab_size": head.draft_vocab_size,
                      "target_vocab_size": head.target_vocab,
                      "files": sorted(p.name for p in out.iterdir())}, indent=2))
    print(f"exported {str(head_dir)!r} to {str(out)!r} ({args.format})", file=sys.stderr)
    return 0


def _load_target(path, trust_remote_code: bool = False) -> nn.Module:
    """The target by path or id: a VLM (AutoModelForImageTextToText), else a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from mmspec.checkpoint import load_pretrained

    cfg = load_pretrained(AutoConfig, path, "--target", trust_remote_code=trust_remote_code)
    cls = AutoModelForImageTextToText if hasattr(cfg, "vision_config") else AutoModelForCausalLM
    return load_pretrained(cls, path, "--target", trust_remote_code=trust_remote_code).eval()
