"""Check an exported EAGLE-3 draft against speculators' own Eagle3DraftModel.

Run with the serving venv (scripts/serving_check/setup_venv.sh), not the project's:

    .venv-serving/bin/python scripts/serving_check/check_speculators.py DIR REF.safetensors

DIR  a speculators-format draft: config.json (speculators_model_type "eagle3")
     and model.safetensors (or a sharded model.safetensors.index.json).
REF  a safetensors file written by mmspec from its own head:
       input_ids      (1,T) int64       token fed at each draft position
       hidden_states  (1,T,k*H_t)       concatenated target aux hidden states
       position_ids   (1,T) int64       optional (default 0..T-1); a (3,1,T)
                                        M-RoPE grid is accepted only when its
                                        three rows agree (text-only positions)
       logits         (1,T,draft_vocab) optional, head output over the draft vocab
       hidden_out     (1,T,H)           optional, pre-norm layer output (the state
                                        fed back at the next draft step; post-norm
                                        when the config sets norm_output)
       hidden_normed  (1,T,H)           optional, post final-norm hidden
       embed_tokens.weight (V,H)        optional, used when DIR has no embedding
     At least one of logits / hidden_out / hidden_normed must be present.

What it does
  1. validates config.json fields that vLLM's speculators loader needs;
  2. compares the tensor names, shapes and dtypes in DIR with the state dict of
     speculators' Eagle3DraftModel built from that config (on the meta device):
     any missing, unexpected or mis-shaped weight fails the check;
  3. checks d2t/t2d agree (target id of draft index i = i + d2t[i] = i-th True of t2d);
  4. loads DIR with Eagle3DraftModel.from_pretrained and runs one draft step
     (ttt_steps=1) on REF's inputs, capturing logits / hidden states with forward
     hooks, and compares them with REF (max abs diff <= --tol x max(1, max |REF|), fp32 on CPU);
  5. prints a one-line JSON verdict on stdout (details go to stderr).
Exit status: 0 pass, 1 fail, 2 bad invocation.

Offline verifier. Eagle3DraftModel.from_pretrained resolves the verifier named in
speculators_config.verifier.name_or_path: it reads its config (layer count,
hidden size) and loads embed_tokens / lm_head / final norm from its safetensors
for any of those the draft lacks. To stay offline this script points the
verifier at a stub directory it writes to a temp folder: a config.json made from
transformer_layer_config (plus --verifier-num-layers) and a model.safetensors
holding model.embed_tokens.weight (from DIR, else REF's embed_tokens.weight, else
--embed-from) and a unit model.norm.weight. Weights present in DIR take
precedence over the stub (speculators only fills weights that are still NaN), so
the check exercises the draft's own embedding and lm_head. --verifier PATH uses a
real local verifier directory instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

SUPPORTED_LAYER_TYPES_VLLM = ("llama", "qwen3")  # vllm transformers_utils/configs/speculators/algos.py


def log(msg: str) -> None:
    print(f"[check_speculators] {msg}", file=sys.stderr)


def read_checkpoint_meta(d: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype string) for every tensor in DIR's safetensors files."""
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for fname in files:
        path = d / fname
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def read_checkpoint_tensors(d: Path, names: list[str]) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"] if index.exists() else None
    out = {}
    for n in names:
        fname = wm[n] if wm else "model.safetensors"
        with safe_open(str(d / fname), framework="pt") as f:
            out[n] = f.get_tensor(n)
    return out


def validate_config(cfg: dict, errors: list[str], warnings: list[str]) -> None:
    if cfg.get("speculators_model_type") != "eagle3":
        errors.append(f"config: speculators_model_type is {cfg.get('speculators_model_type')!r}, expected 'eagle3'")
    tl = cfg.get("transformer_layer_config")
    if not isinstance(tl, dict):
        errors.append("config: transformer_layer_config missing or not an object")
        tl = {}
    mt = tl.get("model_type", "llama")
    if mt not in SUPPORTED_LAYER_TYPES_VLLM:
        errors.append(f"config: transformer_layer_config.model_type {mt!r} not in {SUPPORTED_LAYER_TYPES_VLLM} (vLLM)")
    if tl.get("num_hidden_layers", 1) != 1:
        warnings.append(f"config: num_hidden_layers={tl.get('num_hidden_layers')} (SGLang and most tooling expect 1)")
    sc = cfg.get("speculators_config") or {}
    try:
        n_spec = sc["proposal_methods"][0]["speculative_tokens"]
        if not isinstance(n_spec, int) or n_spec < 1:
            errors.append(f"config: speculative_tokens must be a positive int, got {n_spec!r}")
    except (KeyError, IndexError, TypeError):
        errors.append("config: speculators_config.proposal_methods[0].speculative_tokens missing")
    if sc.get("default_proposal_method") not in [m.get("proposal_type") for m in sc.get("proposal_methods", []) if isinstance(m, dict)]:
        errors.append("config: default_proposal_method must equal one proposal_methods[].proposal_type")
    ver = sc.get("verifier") or {}
    vpath = ver.get("name_or_path")
    if not isinstance(vpath, str) or not vpath:
        errors.append("config: speculators_config.verifier.name_or_path must be a non-empty string")
    elif vpath.startswith(("/", ".", "~")) or os.path.exists(vpath):
        warnings.append(
            "config: verifier.name_or_path looks like a local path; `vllm serve DIR` only auto-resolves a hub repo id "
            "(local verifiers need --model TARGET --speculative-config '{\"model\": DIR, ...}')"
        )
    if "architectures" not in ver:
        errors.append("config: speculators_config.verifier.architectures missing")
    if not isinstance(cfg.get("draft_vocab_size"), int):
        errors.append("config: draft_vocab_size missing or not an int")
    if "norm_before_residual" not in cfg:
        warnings.append("config: norm_before_residual absent; speculators defaults to false but vLLM's loader to true")
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        if cfg.get(flag):
            warnings.append(f"config: {flag}=true (an EAGLE-3 variant; SGLang/vLLM support it, check the layout)")
    ths = cfg.get("target_hidden_size")
    if ths is not None and ths != tl.get("hidden_size"):
        warnings.append(
            f"config: target_hidden_size={ths} != hidden_size={tl.get('hidden_size')}; speculators' Eagle3DraftModel "
            "sizes fc from hidden_size only"
        )


def make_stub_verifier(tmp: Path, cfg: dict, embed: torch.Tensor, num_layers: int) -> Path:
    tl = dict(cfg["transformer_layer_config"])
    tl["num_hidden_layers"] = num_layers
    tl["architectures"] = (cfg.get("speculators_config", {}).get("verifier", {}) or {}).get("architectures") or [
        "LlamaForCausalLM"
    ]
    tl.setdefault("model_type", "llama")
    (tmp / "config.json").write_text(json.dumps(tl, indent=1))
    H = embed.shape[1]
    save_file(
        {"model.embed_tokens.weight": embed.contiguous(), "model.norm.weight": torch.ones(H, dtype=embed.dtype)},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return tmp


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max().item()) if a.numel() else 0.0


def main() -> int:  # noqa: C901, PLR0912, PLR0915
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("ref", type=Path)
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs diff allowed, times max(1, the reference's "
                    "largest magnitude) (default 1e-4)")
    ap.add_argument("--embed-from", type=Path, help="safetensors file with embed_tokens.weight or model.embed_tokens.weight")
    ap.add_argument("--verifier", type=Path, help="a real local verifier directory instead of the stub")
    ap.add_argument("--verifier-num-layers", type=int, help="layer count written to the stub verifier config")
    ap.add_argument("--attn-impl", default="eager", choices=["eager", "sdpa", "simple_flex_attention"])
    a = ap.parse_args()

    import importlib.metadata as md

    import transformers

    verdict: dict = {
        "ok": False,
        "dir": str(a.dir),
        "ref": str(a.ref),
        "tol": a.tol,
        "versions": {
            "speculators": md.version("speculators"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "missing": [],
        "unexpected": [],
        "shape_mismatch": [],
        "max_abs_diff": {},
        "errors": [],
        "warnings": [],
    }
    errors: list[str] = verdict["errors"]
    warnings: list[str] = verdict["warnings"]

    def finish() -> int:
        verdict["ok"] = not errors
        for w in warnings:
            log(f"warning: {w}")
        for e in errors:
            log(f"FAIL: {e}")
        log("PASS" if verdict["ok"] else "FAIL")
        print(json.dumps(verdict, sort_keys=True))
        return 0 if verdict["ok"] else 1

    cfg_path = a.dir / "config.json"
    if not cfg_path.is_file() or not a.ref.is_file():
        print(json.dumps({"ok": False, "errors": [f"missing {cfg_path} or {a.ref}"]}))
        return 2

    # ---- 1. config ------------------------------------------------------
    cfg = json.loads(cfg_path.read_text())
    validate_config(cfg, errors, warnings)
    verdict["verifier"] = ((cfg.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
    if errors:
        return finish()

    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    config = Eagle3SpeculatorConfig.from_pretrained(str(a.dir))
    config.transformer_layer_config._attn_implementation = a.attn_impl  # noqa: SLF001

    # ---- 2. names / shapes / dtypes vs speculators' own module tree ----
    with torch.device("meta"):
        meta_model = Eagle3DraftModel(config)
    skip = set(Eagle3DraftModel._keys_to_ignore_on_save or [])  # noqa: SLF001  verifier_* (training only)
    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items() if k not in skip}
    expected_dtype = {k: v.dtype for k, v in meta_model.state_dict().items() if k not in skip}
    use_draft_vocab = bool(meta_model.use_draft_vocab)
    del meta_model
    try:
        found = read_checkpoint_meta(a.dir)
    except Exception as e:  # noqa: BLE001
        errors.append(f"weights: cannot read safetensors in {a.dir}: {e}")
        return finish()
    verdict["weights"] = {k: list(s) for k, (s, _) in sorted(found.items())}

    optional = {"embed_tokens.weight"}  # vLLM/SGLang take the target's embedding when absent
    missing = sorted(k for k in expected if k not in found and k not in optional)
    unexpected = sorted(k for k in found if k not in expected)
    mism = sorted(f"{k}: file {list(found[k][0])} vs model {list(expected[k])}" for k in expected if k in found and found[k][0] != expected[k])
    verdict.update(missing=missing, unexpected=unexpected, shape_mismatch=mism)
    if missing:
        errors.append(f"weights: missing {missing}")
    if unexpected:
        errors.append(f"weights: unexpected {unexpected} (vLLM's loader rejects unknown names)")
    if mism:
        errors.append(f"weights: shape mismatch {mism}")
    for k, want in (("d2t", "I64"), ("t2d", "BOOL")):
        if k in found and found[k][1] != want:
            errors.append(f"weights: {k} dtype {found[k][1]}, expected {want}")
    if "d2t" in expected_dtype and not use_draft_vocab:
        warnings.append("d2t/t2d present although draft_vocab_size equals the target vocab")
    if errors:
        return finish()

    # ---- 3. vocabulary mapping --------------------------------------------
    if use_draft_vocab:
        vm = read_checkpoint_tensors(a.dir, ["d2t", "t2d"])
        d2t, t2d = vm["d2t"].long(), vm["t2d"].bool()
        target_ids = torch.arange(d2t.numel()) + d2t
        V = t2d.numel()
        if int(t2d.sum()) != d2t.numel():
            errors.append(f"vocab: t2d has {int(t2d.sum())} true entries, draft_vocab_size is {d2t.numel()}")
        elif target_ids.min() < 0 or target_ids.max() >= V:
            errors.append("vocab: i + d2t[i] falls outside the target vocabulary")
        elif not torch.equal(torch.nonzero(t2d).flatten(), target_ids):
            errors.append("vocab: i + d2t[i] is not the i-th true index of t2d (mapping inconsistent or unsorted)")
        if errors:
            return finish()

    # ---- reference --------------------------------------------------------
    ref = load_file(str(a.ref))
    for k in ("input_ids", "hidden_states"):
        if k not in ref:
            errors.append(f"reference: {k} missing")
    targets = [k for k in ("logits", "hidden_out", "hidden_normed") if k in ref]
    if not targets:
        errors.append("reference: none of logits / hidden_out / hidden_normed present")
    if errors:
        return finish()

    # ---- embedding source for the stub verifier --------------------------
    embed = None
    if "embed_tokens.weight" in found:
        embed_src = "draft"
        embed = read_checkpoint_tensors(a.dir, ["embed_tokens.weight"])["embed_tokens.weight"]
    elif "embed_tokens.weight" in ref:
        embed_src, embed = "reference", ref["embed_tokens.weight"]
    elif a.embed_from is not None:
        e = load_file(str(a.embed_from))
        key = next((k for k in ("embed_tokens.weight", "model.embed_tokens.weight") if k in e), None)
        if key is None:
            errors.append(f"--embed-from {a.embed_from} has no embed_tokens.weight / model.embed_tokens.weight")
            return finish()
        embed_src, embed = str(a.embed_from), e[key]
    elif a.verifier is not None:
        embed_src = str(a.verifier)
    else:
        errors.append("embedding: DIR has no embed_tokens.weight; put it in REF or pass --embed-from / --verifier")
        return finish()
    verdict["embedding_from"] = embed_src
    if embed is not None and tuple(embed.shape) != expected["embed_tokens.weight"]:
        errors.append(f"embedding: shape {list(embed.shape)} != {list(expected['embed_tokens.weight'])}")
        return finish()

    # ---- 4. load with speculators and run one draft step -----------------
    with tempfile.TemporaryDirectory(prefix="stub-verifier-") as tmp:
        if a.verifier is not None:
            vdir = a.verifier
        else:
            ids = cfg.get("eagle_aux_hidden_state_layer_ids") or []
            n_layers = a.verifier_num_layers or max([*ids, 31]) + 1
            vdir = make_stub_verifier(Path(tmp), cfg, embed.float(), n_layers)
        config.speculators_config.verifier.name_or_path = str(vdir)
        try:
            model = Eagle3DraftModel.from_pretrained(str(a.dir), config=config, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            errors.append(f"load: Eagle3DraftModel.from_pretrained failed: {type(e).__name__}: {e}")
            return finish()
    model.eval()

    if "embed_tokens.weight" not in found:
        # The draft has no embedding of its own: speculators is meant to fill it from
        # the verifier (it checks for the NaN it initialises the weight with). With
        # speculators 0.9.0 + transformers 5.19 that sentinel does not survive
        # from_pretrained, so the weight can stay uninitialised memory. Install the
        # embedding we were given and say so.
        if embed is None:
            from speculators.utils.loading import load_model_layers

            embed = load_model_layers(["embed_tokens.weight"], str(a.verifier))["embed_tokens.weight"]
        if not torch.equal(model.embed_tokens.weight.detach(), embed.float()):
            warnings.append(
                "speculators did not take embed_tokens from the verifier (left uninitialised by from_pretrained); "
                f"installed the embedding from {embed_src} for the forward check"
            )
            with torch.no_grad():
                model.embed_tokens.weight.copy_(embed.float())

    nan = sorted(n for n, p in model.named_parameters() if not n.startswith("verifier_") and torch.isnan(p).any())
    if nan:
        errors.append(f"load: parameters left uninitialised (NaN) after loading: {nan}")
        return finish()

    input_ids = ref["input_ids"].long()
    hs = ref["hidden_states"].float()
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if hs.dim() == 2:
        hs = hs[None]
    T = input_ids.shape[1]
    if hs.shape[:2] != (1, T) or hs.shape[-1] != model.fc.in_features:
        errors.append(f"reference: hidden_states shape {list(hs.shape)}, expected [1, {T}, {model.fc.in_features}]")
    if input_ids.min() < 0 or input_ids.max() >= model.embed_tokens.num_embeddings:
        errors.append("reference: input_ids outside the target vocabulary")
    pos = ref.get("position_ids")
    if pos is None:
        pos = torch.arange(T)[None]
    else:
        pos = pos.long()
        if pos.dim() == 3:  # (3,1,T) M-RoPE grid
            if not (torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])):
                errors.append("reference: M-RoPE positions with distinct t/h/w rows; speculators' draft uses 1-D RoPE")
            pos = pos[0]
        if pos.dim() == 1:
            pos = pos[None]
    if errors:
        return finish()

    captured: dict[str, torch.Tensor] = {}
    hooks = [
        model.lm_head.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o.detach())),
        model.layers[-1].register_forward_hook(
            lambda m, i, o: captured.__setitem__("prenorm", (o[0] if isinstance(o, tuple) else o).detach())
        ),
        model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("normed", o.detach())),
    ]
    try:
        with torch.no_grad():
            draft_tokens = model(
                hidden_states=hs,
                input_ids=input_ids,
                document_ids=torch.zeros(1, T, dtype=torch.long),
                position_ids=pos,
                ttt_steps=1,
            )
    except Exception as e:  # noqa: BLE001
        errors.append(f"forward: {type(e).__name__}: {e}")
        return finish()
    finally:
        for h in hooks:
            h.remove()

    fed_back = captured["normed"] if model.config.norm_output else captured["prenorm"]
    got = {"logits": captured["logits"], "hidden_out": fed_back, "hidden_normed": captured["normed"]}
    for k in targets:
        r = ref[k].float()
        if r.dim() == got[k].dim() - 1:
            r = r[None]
        if tuple(r.shape) != tuple(got[k].shape):
            errors.append(f"compare: {k} shape {list(r.shape)} vs speculators {list(got[k].shape)}")
            continue
        d = max_abs(got[k], r)
        scale = max(1.0, float(r.abs().max()))  # fp32 rounding grows with the values' magnitude
        verdict["max_abs_diff"][k] = d
        verdict.setdefault("max_rel_diff", {})[k] = d / scale
        log(f"{k}: max |speculators - ref| = {d:.3e} (ref max |x| = {scale:.3e})")
        if not d <= a.tol * scale:
            errors.append(f"compare: {k} max abs diff {d:.3e} > tol {a.tol:g} x max(1, max |ref|) = {a.tol * scale:.3e}")
    if "logits" in ref:
        ref_arg = ref["logits"].reshape(-1, ref["logits"].shape[-1]).argmax(-1)
        got_arg = draft_tokens[0].reshape(-1)
        verdict["argmax_agree"] = float((ref_arg == got_arg).float().mean())
    if use_draft_vocab:
        verdict["draft_tokens_as_target_ids"] = (draft_tokens[0] + model.d2t[draft_tokens[0]]).reshape(-1).tolist()[:16]
    return finish()


if __name__ == "__main__":
    sys.exit(main())
