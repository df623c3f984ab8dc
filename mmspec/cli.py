"""`mmspec` command line: demo, text generation with a local/hub causal LM, and benchmarks.

Pipelines are imported lazily inside the subcommands that need them (ARCHITECTURE.md: the CLI is the only place
above both pipelines).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import CheckpointError, InvalidInputError, MMSpecError


def _tree_arg(text: str):
    """'4' -> chain of 4; 'full:2,2,1' -> StaticTree.full; 'dynamic:8,6,60' -> DynamicTree(topk, depth, total)."""
    from .tree import DynamicTree, StaticTree

    kind, _, rest = text.partition(":")
    try:
        if not rest:
            return int(kind)
        nums = tuple(int(x) for x in rest.split(","))
        if kind == "full":
            return StaticTree.full(nums)
        if kind == "dynamic":
            return DynamicTree(*nums)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"--tree {text!r}: {e}") from None
    raise argparse.ArgumentTypeError(f"--tree {text!r}: expected K, full:B1,B2,... or dynamic:TOPK,DEPTH,TOTAL")


def all_zoo():
    """Every zoo model of both pipelines (vision.zoo and image_ar.zoo) in one `mmspec.zoo.Zoo`."""
    from image_ar.zoo import MODELS as IMAGE_MODELS  # the CLI is the one place above the pipelines
    from vision.zoo import MODELS as VLM_MODELS

    from .zoo import Zoo

    return Zoo(list(VLM_MODELS) + list(IMAGE_MODELS))


def cmd_zoo(args) -> int:
    """`mmspec zoo list` / `mmspec zoo build [--only NAME ...] [--quick] [--force]` / `mmspec zoo cards`."""
    zoo = all_zoo()
    if args.action == "list":
        print(f"zoo directory: {zoo.root}  (set $MMSPEC_ZOO to move it)\n")
        print(f"{'name':18s} {'built':6s} {'quick':6s} summary")
        for name in zoo.names():
            m = zoo.model(name)
            print(f"{name:18s} {'yes' if zoo.is_built(name) else '-':6s} "
                  f"{'yes' if zoo.is_built(name, quick=True) else '-':6s} {m.summary}")
        return 0
    unknown = [n for n in args.only or [] if n not in zoo.names()]
    if unknown:
        raise InvalidInputError(f"--only {' '.join(unknown)}: not zoo models; valid names: {', '.join(zoo.names())}")
    if args.action == "cards":
        from .zoo import cards_table

        names = zoo.order(args.only) if args.only else zoo.names()
        built = [n for n in names if zoo.is_built(n, quick=args.quick)]
        missing = sorted(set(names) - set(built))
        print(cards_table(zoo.card(n, quick=args.quick) for n in built))
        if missing:
            print(f"\nnot built yet: {', '.join(missing)} (mmspec zoo build --only {' '.join(missing)})")
        return 0
    # build() adds what the named models need; --force rebuilds only the named ones (a rebuilt target would leave
    # the drafters trained against its previous weights behind)
    cards = zoo.build(args.only or None, quick=args.quick, progress=not args.quiet, force=args.force)
    print(f"\n{'name':18s} {'seconds':>8s}  held-out")
    for c in cards:
        held = ", ".join(f"{k} {v}" for k, v in (c.get("held_out") or {}).items() if k != "example")
        print(f"{c['name']:18s} {c.get('training_seconds', 0):8.0f}  {held[:150]}")
    print(f"\nmodel cards: {zoo.root}/<name>/README.md")
    return 0


def cmd_demo(args) -> int:
    """Both pipelines on the zoo: a VLM answers about a bundled image; a LlamaGen draws a grid of classes."""
    from image_ar.demo import run_image_demo, summary_text  # the CLI is the one place above the pipelines (ARCHITECTURE.md)
    from vision.demo import print_summary, run_vlm_demo

    from .zoo import zoo_dir

    tier = "quick zoo (tiny models: the numbers mean nothing)" if args.quick else "zoo"
    print(f"mmspec demo on the {tier}; models are trained on first use and cached in {zoo_dir()}\n")
    out = Path(args.out)
    if args.only in (None, "vlm"):
        vlm = run_vlm_demo(out / "vlm", quick=args.quick, progress=not args.quiet)
        print_summary(vlm)
    if args.only in (None, "image"):
        img = run_image_demo(out / "image", quick=args.quick, progress=not args.quiet)
        if args.quiet:  # with progress on, the image demo prints its own summary
            print(summary_text(img))
    print(f"\nOutputs in {out}/. `mmspec bench vlm|image` compares every method with transformers.")
    return 0


def cmd_generate(args) -> int:
    """Speculative text generation with a causal LM from a local path (or hub id where the hub is reachable)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loop import SpeculativeDecoder

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    kw = dict(trust_remote_code=args.trust_remote_code)

    def load(what: str, path: str, loader, **extra):
        try:
            return loader.from_pretrained(path, **kw, **extra)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"--{what} {path!r} could not be loaded ({type(e).__name__}: {e}); pass a local "
                                  "model directory or a hub id reachable from this machine") from e

    tok = load("target", args.target, AutoTokenizer)
    target = load("target", args.target, AutoModelForCausalLM, dtype=dtype).to(args.device)
    drafter = args.drafter
    if drafter not in (None, "ngram"):
        drafter = load("drafter", drafter, AutoModelForCausalLM, dtype=dtype).to(args.device)
    dec = SpeculativeDecoder(target, drafter, tree=args.tree, compile=args.compile)
    ids = tok(args.prompt)["input_ids"]
    stream = dec.stream([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_token_id, seed=args.seed)
    generated: list[int] = []
    printed = ""
    for event in stream:
        generated.extend(event.tokens)
        text = tok.decode(generated, skip_special_tokens=True)
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    print("\n\n" + stream.output.stats.summary(), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """Speculative VLM chat: stream the answer to a question about images, then the stats (stderr)."""
    import torch

    from vision import SpeculativeVLM  # the CLI is the one place above both pipelines (ARCHITECTURE.md)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    drafter = None if args.drafter == "none" else args.drafter
    svlm = SpeculativeVLM.from_pretrained(args.target, drafter=drafter, dtype=dtype,
                                          device_map=None if args.device == "cpu" else args.device, tree=args.tree,
                                          trust_remote_code=args.trust_remote_code, compile=args.compile)
    chat = svlm.chat(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     top_k=args.top_k, seed=args.seed)
    question, images = args.question, args.image or None
    while question:
        try:
            for piece in chat.stream(question, images=images):
                sys.stdout.write(piece)
                sys.stdout.flush()
            print("\n\n" + chat.last_output.stats.summary(), file=sys.stderr)
        except MMSpecError as e:  # a bad turn is reported; the conversation goes on
            if not args.interactive:
                raise
            print(f"mmspec: error: {type(e).__name__}: {e}", file=sys.stderr)
        if not args.interactive:
            break
        question, images = _next_question()
    return 0


def _next_question() -> tuple[str | None, list | None]:
    """Interactive follow-up: a line of text; `/image PATH` lines attach images to the next question."""
    images = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return None, None
        if line.startswith("/image "):
            images.append(line[len("/image "):].strip())
            continue
        if not line:
            return None, None
        return line, images or None


def cmd_bench(args) -> int:
    if args.compile is not None and args.what not in ("engine", "vlm"):
        raise InvalidInputError(f"--compile applies to `bench engine` and `bench vlm`, not `bench {args.what}` "
                                "(its models decode eagerly)")
    if args.what == "engine":
        import torch

        from .bench import run_engine_benchmark

        if args.layers is not None and len(args.layers) > 1:
            raise SystemExit(f"--layers {' '.join(map(str, args.layers))}: `bench engine` runs one pair (give one "
                             "value); `mmspec bench overhead --layers ...` sweeps several")
        layers = args.layers[0] if args.layers else None
        pair = {k: v for k, v in (("hidden", args.hidden), ("layers", layers), ("vocab", args.vocab))
                if v is not None}
        run_engine_benchmark(out_dir=args.out or "bench_out/engine", new_tokens=args.new_tokens, quick=args.quick,
                             device=args.device, dtype=getattr(torch, args.dtype), pair=pair, compile=args.compile,
                             batch_sizes=tuple(args.batch_sizes))
        return 0
    if args.what == "overhead":
        from .bench_overhead import run_overhead_sweep

        given = {k: v for k, v in (("layers", args.layers), ("hidden", args.hidden)) if v is not None}
        run_overhead_sweep(out_dir=args.out or "bench_out/overhead", new_tokens=args.new_tokens, quick=args.quick,
                           **given)
        return 0
    if args.what == "vlm":
        from vision.bench import run_vlm_benchmark

        temps = tuple(args.temperatures) if args.temperatures else (0.0, 1.0)
        run_vlm_benchmark(out_dir=args.out or "bench_out/vlm", target=args.target or "zoo:vlm",
                          drafters=args.drafter, prompts=args.prompts, new_tokens=min(args.new_tokens, 256),
                          temperatures=temps, repeats=args.repeats, k=args.k, quick=args.quick,
                          n_prompts=args.num_prompts, compile=args.compile)
        return 0
    if args.what in ("image", "continuous"):
        if args.continuous or args.what == "continuous":
            from image_ar.bench_continuous import run_continuous_benchmark

            run_continuous_benchmark(out_dir=args.out or "bench_out/image_continuous", quick=args.quick,
                                     temperature=args.temperature, target=args.target,
                                     drafter=(args.drafter or [None])[0], labels=args.labels, repeats=args.repeats)
            return 0
        from image_ar.bench import run_image_benchmark

        run_image_benchmark(out_dir=args.out or "bench_out/image", quick=args.quick, temperature=args.temperature,
                            target=args.target, vq=args.vq, drafter=(args.drafter or [None])[0], labels=args.labels,
                            repeats=args.repeats)
        return 0
    if args.what == "native":
        from vision.bench_native import run_native_benchmark

        run_native_benchmark(out_dir=args.out or "bench_out/native", new_tokens=16 if args.quick else args.new_tokens,
                             repeats=1 if args.quick else args.repeats, progress=not args.quick)
        return 0
    if args.what == "compress":
        from vision.bench import run_compression_benchmark

        run_compression_benchmark(out_dir=args.out or "bench_out/compress", steps=20 if args.quick else 100,
                                  repeats=1 if args.quick else 3)
        return 0
    raise SystemExit(f"unknown benchmark {args.what!r}")


def _compile_value(text: str):
    values = {"auto": None, "on": True, "off": False}
    if text.strip().lower() not in values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, on or off")
    return values[text.strip().lower()]


def add_compile_flag(parser) -> None:
    """`--compile auto|on|off` (args.compile: None / True / False), the API's `compile=` (`mmspec.compile`)."""
    parser.add_argument("--compile", type=_compile_value, default=None, metavar="{auto,on,off}",
                        help="decode over a static cache with compiled forwards (CUDA graphs on GPU); auto (default) "
                             "= on for CUDA. Compile time is reported apart from decode time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmspec", description="Lossless speculative decoding for VLMs and visual AR "
                                "image generators.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="both pipelines on the zoo: a VLM answers about a bundled image, a LlamaGen "
                          "draws a grid; speedup, tau and losslessness of each (trains the zoo on first use)")
    demo.add_argument("--quick", action="store_true", help="the quick zoo (tiny models, a minute; numbers mean "
                      "nothing)")
    demo.add_argument("--only", choices=["vlm", "image"], default=None, help="run one pipeline's part")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    zoo = sub.add_parser("zoo", help="the model zoo: trained offline on first use, cached under $MMSPEC_ZOO "
                         "(default ~/.cache/mmspec/zoo)")
    zoo.add_argument("action", choices=["list", "build", "cards"],
                     help="list: what the zoo has; build: train what is missing; cards: the built models' cards as "
                          "one Markdown table")
    zoo.add_argument("--only", nargs="+", metavar="NAME", help="build these models (and what they need)")
    zoo.add_argument("--quick", action="store_true", help="the quick variants (tiny, seconds; for tests)")
    zoo.add_argument("--force", action="store_true", help="rebuild the --only models even if cached (not what "
                     "they need; rebuild a target's drafters with it)")
    zoo.add_argument("--quiet", action="store_true", help="no progress bars")
    zoo.set_defaults(func=cmd_zoo)

    gen = sub.add_parser("generate", help="speculative text generation with a causal LM (path or id)")
    gen.add_argument("--target", required=True, help="model path or id (AutoModelForCausalLM)")
    gen.add_argument("--drafter", default="ngram", help="draft model path/id sharing the tokenizer, or 'ngram'")
    gen.add_argument("--tree", type=_tree_arg, default=4, help="K | full:B1,B2,.. | dynamic:TOPK,DEPTH,TOTAL")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    add_compile_flag(gen)
    gen.add_argument("prompt")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="ask a VLM about images, speculatively (stock transformers VLM, path or id)")
    chat.add_argument("--target", required=True, help="VLM path or id (AutoModelForImageTextToText + AutoProcessor)")
    chat.add_argument("--drafter", default="ngram",
                      help="small VLM or text LM path/id sharing the tokenizer, a feature-drafter directory, 'ngram', "
                      "'mtp' (the target's own MTP layers, read from its checkpoint), 'assistant' (Gemma 4's "
                      "assistant at '<target>-assistant'), a Gemma 4 assistant path, or 'none' (target only)")
    chat.add_argument("--image", action="append", help="image file (repeat for several images)")
    chat.add_argument("--tree", type=_tree_arg, default=4, help="K | full:B1,B2,.. | dynamic:TOPK,DEPTH,TOTAL")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    chat.add_argument("--device", default="cpu")
    chat.add_argument("--interactive", "-i", action="store_true",
                      help="keep chatting: read follow-ups from stdin ('/image PATH' attaches an image)")
    chat.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    add_compile_flag(chat)
    chat.add_argument("question")
    chat.set_defaults(func=cmd_chat)

    # train-drafter's options live with the VLM pipeline (vision.train.cli), parsed only when the command runs
    train = sub.add_parser("train-drafter", add_help=False,
                           help="train an EAGLE drafter head for a VLM target (mmspec train-drafter --help)")
    train.set_defaults(func=cmd_train_drafter)

    exp = sub.add_parser("export-drafter", help="write an EAGLE-3 drafter in the layout vLLM (speculators) or "
                         "SGLang loads")
    exp.add_argument("head", help="the drafter directory (mmspec train-drafter --head eagle3 --out ...)")
    exp.add_argument("--format", required=True, choices=["speculators", "sglang"])
    exp.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    exp.add_argument("--target", help="the target it was trained for (default: the path its checkpoint records)")
    exp.add_argument("--speculative-tokens", type=int, default=3, help="speculators: draft tokens per step")
    exp.add_argument("--verifier", help="the target's name or path the engine will load (default: --target)")
    exp.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    exp.set_defaults(func=cmd_export_drafter)

    _add_image_parser(sub)
    train_img = sub.add_parser("train-image-head", add_help=False,
                               help="train an EAGLE-style head drafter for a LlamaGen (mmspec train-image-head --help)")
    train_img.set_defaults(func=cmd_train_image_head)

    bench = sub.add_parser("bench", help="benchmarks that print and save tables (JSON + Markdown)")
    bench.add_argument("what", choices=["engine", "overhead", "vlm", "native", "compress", "image", "continuous"])
    bench.add_argument("--out", default=None, help="output folder (default bench_out/<what>)")
    bench.add_argument("--target", default=None, help="vlm / image / continuous: a model path or zoo:NAME (default: "
                       "the zoo's)")
    bench.add_argument("--drafter", action="append", default=None, help="vlm: a drafter path, zoo:NAME or ngram "
                       "(repeat for several; default: every zoo drafter); image / continuous: one drafter")
    bench.add_argument("--vq", default=None, help="image: the VQ tokenizer path or zoo:NAME (default zoo:vq)")
    bench.add_argument("--prompts", default=None, help="vlm: a JSONL file of {\"prompt\", \"images\"} lines or a "
                       "dataset directory (default: held-out zoo questions)")
    bench.add_argument("--labels", default=None, help="image / continuous: a file with one class label per line")
    bench.add_argument("--num-prompts", type=int, default=8, help="vlm: zoo prompts to run (default 8)")
    bench.add_argument("--temperatures", type=float, nargs="+", default=None, help="vlm: default 0 1")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median; default 3)")
    bench.add_argument("-k", type=int, default=4, help="vlm: drafted tokens per step (chain; default 4)")
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--quick", action="store_true", help="a small run (for smoke tests)")
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    bench.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    bench.add_argument("--temperature", type=float, default=1.0, help="image: sampling temperature (0 = greedy)")
    bench.add_argument("--continuous", action="store_true",
                       help="image: the continuous-token AR (target-only vs CSpD) instead of LlamaGen")
    bench.add_argument("--hidden", type=int, default=None, help="hidden size of the benchmark pair (default 256)")
    bench.add_argument("--vocab", type=int, default=None, help="engine: vocabulary of the benchmark pair "
                       "(default 512)")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="engine: batch sizes of the "
                       "mmspec rows (default 1 4)")
    bench.add_argument("--layers", type=int, nargs="+", default=None,
                       help="target layers of the benchmark pair (engine: one value, default 4; overhead: the depths "
                            "to sweep, default 4 8 12)")
    add_compile_flag(bench)  # engine: adds compiled twins of the mmspec rows; vlm: our rows compiled
    bench.set_defaults(func=cmd_bench)
    return p


def cmd_export_drafter(args) -> int:
    from vision.export import cmd_export_drafter as run  # the CLI is the one place above the pipelines

    return run(args)


def cmd_train_drafter(args) -> int:
    import argparse as _argparse

    from vision.train.cli import add_parser  # the CLI is the one place above the pipelines (ARCHITECTURE.md)

    parser = _argparse.ArgumentParser(prog="mmspec")
    add_parser(parser.add_subparsers(dest="command", required=True))
    inner = parser.parse_args(["train-drafter", *args.rest])
    return inner.func(inner)


def _add_image_parser(sub) -> None:
    img = sub.add_parser("image", help="generate images with a visual AR model, speculatively (LlamaGen + VQ, or a "
                         "continuous-token ContinuousAR + VAE with CSpD)")
    img.add_argument("--target", required=True, help="LlamaGen directory (save_pretrained) or reference .pt file, "
                     "or a ContinuousAR directory")
    img.add_argument("--grid-size", type=int, default=None,
                     help="tokens per side for reference .pt targets (16: 256 px, 24: 384 px); directories know it")
    img.add_argument("--vq", "--vae", dest="vq", required=True,
                     help="VQ tokenizer directory or LlamaGen VQ reference checkpoint; for continuous targets the VAE "
                     "(diffusers AutoencoderKL directory, or an LDM/MAR KL .ckpt)")
    img.add_argument("--drafter", default=None,
                     help="'jacobi' (SJD, no model; the default for discrete targets), 'none' (plain decoding; the "
                     "default for continuous targets), or a head / LlamaGen / ContinuousAR checkpoint path")
    img.add_argument("--class-label", type=int, nargs="+", required=True, help="one or more class labels")
    img.add_argument("--num-images", type=int, default=1, help="images per class label")
    img.add_argument("--acceptance", choices=["lossless", "lantern", "gsd", "cspd"], default="lossless",
                     help="lossless (exact; CSpD on continuous targets), lantern / gsd (LOSSY), cspd (continuous)")
    img.add_argument("--guidance-schedule", choices=["constant", "linear"], default=None,
                     help="continuous targets: CFG scale per token, constant or MAR's linear ramp")
    img.add_argument("--prefill-ratio", type=float, default=None,
                     help="continuous targets: fraction of each image's first tokens made by the target alone (CSpD)")
    img.add_argument("--lantern-delta", type=float, default=None)
    img.add_argument("--lantern-lambda", type=float, default=None)
    img.add_argument("--lantern-k", type=int, default=None)
    img.add_argument("--tv-budget", type=float, default=None, help="per-position output TV budget (relaxed rules)")
    img.add_argument("--guidance-scale", type=float, default=4.0)
    img.add_argument("--temperature", type=float, default=1.0)
    img.add_argument("--top-k", type=int, default=2000)
    img.add_argument("--top-p", type=float, default=1.0)
    img.add_argument("--tree", "--draft-tokens", dest="tree", type=int, default=None,
                     help="tokens drafted per step (default 4 for head / model drafters, 15 for SJD); --draft-tokens "
                          "is its old name")
    img.add_argument("--window", type=int, default=None, help="SJD window = the pending token + --tree (old form)")
    img.add_argument("--seed", type=int, default=0)
    img.add_argument("--device", default="cpu")
    img.add_argument("--out", default="out.png")
    add_compile_flag(img)
    img.set_defaults(func=cmd_image)


def cmd_image(args) -> int:
    from image_ar.cli import run_image  # the CLI is the one place above the pipelines (ARCHITECTURE.md)

    return run_image(args)


def cmd_train_image_head(args) -> int:
    from image_ar.train import main as train_main

    return train_main(args.rest, prog="mmspec train-image-head")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in ("train-drafter", "train-image-head") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.func(args)
    except MMSpecError as e:
        print(f"mmspec: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
