"""`mmspec` command line: demo, text generation with a local/hub causal LM, and benchmarks.

Pipelines are imported lazily inside the subcommands that need them (ARCHITECTURE.md: the CLI is the only place
above both pipelines).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import InvalidInputError, MMSpecError


def _tree_text(text: str) -> str:
    """argparse type of --tree: the text, checked (`_tree_arg` turns it into the shape when the command runs)."""
    _tree_arg(text)
    return text


def _tree_arg(text: str):
    """'4' -> chain of 4; 'full:2,2,1' -> StaticTree.full; 'dynamic:8,6,60' -> DynamicTree(topk, depth, total)."""
    from .tree import DynamicTree, StaticTree

    kind, _, rest = text.partition(":")
    try:
        if not rest:
            k = int(kind)
            if k < 1:
                raise ValueError("a chain needs K >= 1")
            return k
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


DTYPES = ("float32", "bfloat16", "float16")
ACCEPTANCE = ("auto", "greedy", "point_mass", "speculative", "typical")  # auto: the lossless rule for the mode


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def check_generation_args(args) -> None:
    """Every `generate` / `chat` argument known up front, before any model loads (one rule: mmspec.checks)."""
    from .checks import check_device, check_local_path, check_max_new_tokens, check_sampling, check_seed

    check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    check_sampling(args.temperature, args.top_k, args.top_p)
    check_seed(args.seed, "--seed")
    check_device(args.device)
    if getattr(args, "json", None) and Path(args.json).is_dir():
        raise InvalidInputError(f"--json {args.json!r} is a directory; give a file name (e.g. stats.json)")
    if args.drafter == "ngram" and not isinstance(args.tree, int) and not getattr(args.tree, "is_chain", False):
        raise InvalidInputError(f"--tree {args.tree_text}: the n-gram drafter drafts chains only; give --tree K, "
                                "or a model / feature drafter with --drafter for a tree")
    check_local_path(args.target, "--target")
    if args.drafter not in ("ngram", "none", "mtp", "assistant"):
        check_local_path(args.drafter, "--drafter")


def _quiet_loading(quiet: bool) -> None:
    """--quiet: no progress bars while transformers loads or writes models either."""
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _generation_bar(args, what: str = "generating", total: int | None = -1):
    """A progress bar on stderr over the tokens of one answer: it appears once the answer takes more than 2 s and
    stdout is not a terminal (there the streamed text is the progress), and never with --quiet."""
    from tqdm.auto import tqdm

    return tqdm(total=args.max_new_tokens if total == -1 else total, desc=what, unit="tok", delay=2.0, leave=False, file=sys.stderr,
                disable=args.quiet or sys.stdout.isatty())


def _settings(args) -> dict:
    """The settings that reproduce a run, for --json (paths as given, the tree as written)."""
    keep = ("target", "drafter", "tree_text", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "dtype",
            "device", "compile", "system", "acceptance", "image")
    out = {k: getattr(args, k) for k in keep if hasattr(args, k)}
    if "tree_text" in out:
        out["tree"] = out.pop("tree_text")
    return out


def _write_json(args, turns: list[dict]) -> None:
    import json

    if not getattr(args, "json", None):
        return
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": args.command, "settings": _settings(args), "turns": turns}, indent=2))


def cmd_generate(args) -> int:
    """Speculative text generation with a causal LM from a local path (or hub id where the hub is reachable)."""
    check_generation_args(args)
    _quiet_loading(args.quiet)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import load_pretrained
    from .loop import SpeculativeDecoder

    if not args.prompt.strip():
        raise InvalidInputError("prompt '': give a non-empty prompt")
    kw = dict(trust_remote_code=args.trust_remote_code)
    dtype = _torch_dtype(args.dtype)
    tok = load_pretrained(AutoTokenizer, args.target, "--target", **kw)
    target = load_pretrained(AutoModelForCausalLM, args.target, "--target", dtype=dtype, **kw).to(args.device)
    drafter = {"ngram": "ngram", "none": None}.get(args.drafter, args.drafter)
    if drafter not in (None, "ngram"):
        drafter = load_pretrained(AutoModelForCausalLM, drafter, "--drafter", dtype=dtype, **kw).to(args.device)
    acceptance = None if args.acceptance == "auto" else args.acceptance
    dec = SpeculativeDecoder(target, drafter, tree=args.tree, compile=args.compile, acceptance=acceptance)
    ids = tok(args.prompt)["input_ids"]
    stream = dec.stream([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_token_id, seed=args.seed)
    generated: list[int] = []
    printed = ""
    with _generation_bar(args) as bar:
        for event in stream:
            generated.extend(event.tokens)
            bar.update(len(event.tokens))
            text = tok.decode(generated, skip_special_tokens=True)
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    print()
    stats = stream.output.stats
    print("\n" + stats.summary(), file=sys.stderr)
    _write_json(args, [{"prompt": args.prompt, "answer": printed, "token_ids": generated,
                        "finish_reason": stream.output.finish_reasons[0], "stats": stats.as_dict()}])
    return 0


def cmd_chat(args) -> int:
    """Speculative VLM chat: stream the answer to a question about images, then the stats (stderr)."""
    if not args.question.strip():
        raise InvalidInputError("question '': give a non-empty question (with -i, the first one)")
    check_generation_args(args)
    _quiet_loading(args.quiet)
    from vision import SpeculativeVLM  # the CLI is the one place above both pipelines (ARCHITECTURE.md)

    drafter = None if args.drafter == "none" else args.drafter
    acceptance = None if args.acceptance == "auto" else args.acceptance
    svlm = SpeculativeVLM.from_pretrained(args.target, drafter=drafter, dtype=_torch_dtype(args.dtype),
                                          device_map=None if args.device == "cpu" else args.device, tree=args.tree,
                                          acceptance=acceptance, trust_remote_code=args.trust_remote_code,
                                          compile=args.compile)
    chat = svlm.chat(system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    question, images = args.question, args.image or None
    turns: list[dict] = []
    while question:
        try:
            with _generation_bar(args, "answering", total=None) as bar:
                for piece in chat.stream(question, images=images):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    bar.update(1)  # text pieces (about one per token) and the time so far
            out = chat.last_output
            sys.stdout.write("\n")  # every answer ends its line: a piped transcript keeps turns apart
            sys.stdout.flush()
            print("\n" + out.stats.summary(), file=sys.stderr)
            turns.append({"question": question, "images": [str(i) for i in images or []], "answer": out.text,
                          "token_ids": out.token_ids, "finish_reason": out.finish_reasons[0],
                          "stats": out.stats.as_dict()})
            _write_json(args, turns)
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
        try:  # the "> " prompt only for a person at a terminal: a piped stdout holds the answers alone
            line = input("> " if sys.stdin.isatty() else "").strip()
        except EOFError:
            return None, None
        if line.startswith("/image "):
            images.append(line[len("/image "):].strip())
            continue
        if not line:
            return None, None
        return line, images or None


# The options each benchmark reads; any other one given is refused rather than ignored (bench's options default to
# None, so "given" is "not None"). --quick sets its own sizes, so the size options are refused beside it.
BENCH_READS = {
    "engine": {"new_tokens", "num_prompts", "repeats", "device", "dtype", "hidden", "vocab", "batch_sizes", "layers",
               "compile"},
    "overhead": {"new_tokens", "num_prompts", "repeats", "hidden", "layers"},
    "vlm": {"target", "drafter", "prompts", "num_prompts", "temperatures", "repeats", "k", "new_tokens", "compile"},
    "native": {"new_tokens", "repeats"},
    "compress": {"repeats"},
    "image": {"target", "vq", "drafter", "labels", "repeats", "temperature", "continuous"},
    "continuous": {"target", "drafter", "labels", "repeats", "temperature"},
}
QUICK_SETS = {"engine": {"new_tokens", "num_prompts", "repeats", "batch_sizes"},
              "overhead": {"new_tokens", "num_prompts", "repeats", "layers", "hidden"},
              "vlm": {"new_tokens", "num_prompts", "repeats"}, "native": {"new_tokens", "repeats"},
              "compress": {"repeats"}}
NEW_TOKENS = 128  # --new-tokens when not given (engine, overhead, vlm, native)


def _flag(name: str) -> str:
    return "-k" if name == "k" else "--" + name.replace("_", "-")


def check_bench_args(args) -> None:
    """Refuse options the chosen benchmark does not read, --quick beside a size it overrides, an unavailable
    --device, and sizes that are not positive — before anything is built or loaded."""
    from .checks import check_device, check_number

    reads = BENCH_READS[args.what]
    given = [k for k in sorted(set().union(*BENCH_READS.values())) if getattr(args, k, None) not in (None, False)]
    ignored = [k for k in given if k not in reads]
    if ignored:
        what = " ".join(_flag(k) for k in ignored)
        hint = " (`bench engine` runs on any device and dtype; the other benchmarks run float32 on the CPU)" if \
            {"device", "dtype"} & set(ignored) else ""
        raise InvalidInputError(f"{what}: not an option of `bench {args.what}`, which reads "
                                f"{', '.join(_flag(k) for k in sorted(reads)) or 'only --out and --quick'}{hint}")
    if args.quick:
        clash = [k for k in given if k in QUICK_SETS.get(args.what, ())]
        if clash:
            raise InvalidInputError(f"--quick sets its own sizes; drop {' '.join(_flag(k) for k in clash)} or --quick")
    for k in ("new_tokens", "num_prompts", "repeats", "k", "hidden", "vocab"):
        if getattr(args, k, None) is not None:
            check_number(getattr(args, k), _flag(k), low=1, integer=True, error=InvalidInputError)
    for k in ("batch_sizes", "layers"):
        for v in getattr(args, k, None) or []:
            check_number(v, _flag(k), low=1, integer=True, error=InvalidInputError)
    if args.device is not None:
        check_device(args.device)
    if args.what == "engine" and args.layers is not None and len(args.layers) > 1:
        raise InvalidInputError(f"--layers {' '.join(map(str, args.layers))}: `bench engine` runs one pair (give one "
                                "value); `mmspec bench overhead --layers ...` sweeps several")


def _given(args, **names) -> dict:
    """{parameter: value} for the options given (keys: the function's parameter names, values: option names)."""
    return {param: getattr(args, opt) for param, opt in names.items() if getattr(args, opt, None) is not None}


def cmd_bench(args) -> int:
    if args.compile is not None and args.what not in ("engine", "vlm"):
        raise InvalidInputError(f"--compile applies to `bench engine` and `bench vlm`, not `bench {args.what}` "
                                "(its models decode eagerly)")
    check_bench_args(args)
    if args.new_tokens is None and not args.quick:
        args.new_tokens = NEW_TOKENS
    if args.what == "engine":
        import torch

        from .bench import run_engine_benchmark

        pair = {k: v for k, v in (("hidden", args.hidden), ("layers", args.layers and args.layers[0]),
                                  ("vocab", args.vocab)) if v is not None}
        extra = _given(args, new_tokens="new_tokens", n_prompts="num_prompts", repeats="repeats")
        if args.batch_sizes:
            extra["batch_sizes"] = tuple(args.batch_sizes)
        run_engine_benchmark(out_dir=args.out or "bench_out/engine", quick=args.quick, device=args.device or "cpu",
                             dtype=getattr(torch, args.dtype or "float32"), pair=pair, compile=args.compile, **extra)
        return 0
    if args.what == "overhead":
        from .bench_overhead import run_overhead_sweep

        run_overhead_sweep(out_dir=args.out or "bench_out/overhead", quick=args.quick,
                           **_given(args, new_tokens="new_tokens", n_prompts="num_prompts", repeats="repeats",
                                    layers="layers", hidden="hidden"))
        return 0
    if args.what == "vlm":
        from vision.bench import run_vlm_benchmark

        temps = tuple(args.temperatures) if args.temperatures else (0.0, 1.0)
        run_vlm_benchmark(out_dir=args.out or "bench_out/vlm", target=args.target or "zoo:vlm",
                          drafters=args.drafter, prompts=args.prompts, temperatures=temps, quick=args.quick,
                          compile=args.compile, **_given(args, new_tokens="new_tokens", n_prompts="num_prompts",
                                                         repeats="repeats", k="k"))
        return 0
    if args.what in ("image", "continuous"):
        extra = _given(args, repeats="repeats", temperature="temperature")
        if args.continuous or args.what == "continuous":
            from image_ar.bench_continuous import run_continuous_benchmark

            run_continuous_benchmark(out_dir=args.out or "bench_out/image_continuous", quick=args.quick,
                                     target=args.target, drafter=(args.drafter or [None])[0], labels=args.labels,
                                     **extra)
            return 0
        from image_ar.bench import run_image_benchmark

        run_image_benchmark(out_dir=args.out or "bench_out/image", quick=args.quick, target=args.target, vq=args.vq,
                            drafter=(args.drafter or [None])[0], labels=args.labels, **extra)
        return 0
    if args.what == "native":
        from vision.bench_native import run_native_benchmark

        run_native_benchmark(out_dir=args.out or "bench_out/native", new_tokens=16 if args.quick else
                             args.new_tokens, repeats=1 if args.quick else (args.repeats or 3),
                             progress=not args.quick)
        return 0
    from vision.bench import run_compression_benchmark  # compress

    run_compression_benchmark(out_dir=args.out or "bench_out/compress", steps=20 if args.quick else 100,
                              repeats=1 if args.quick else (args.repeats or 3))
    return 0


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


def add_generation_flags(parser, max_new_tokens: int) -> None:
    """The decoding options `generate` and `chat` share (the Python API's arguments of the same names)."""
    parser.add_argument("--tree", type=_tree_text, default="4",
                        help="draft shape: K (a chain, default 4) | full:B1,B2,.. | dynamic:TOPK,DEPTH,TOTAL "
                             "(trees need a model or feature drafter)")
    parser.add_argument("--acceptance", choices=ACCEPTANCE, default="auto",
                        help="acceptance rule: auto (default: the lossless rule for the sampling mode), greedy, "
                             "point_mass, speculative (lossless) or typical (Medusa's, LOSSY)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"most tokens per answer (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    add_compile_flag(parser)
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the settings, answers and stats (every GenerationStats field) as JSON")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (model loading, and generation when stdout is not a terminal)")


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `mmspec: error: <command>: <message> (see <command> --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"mmspec: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mmspec", description="Lossless speculative decoding for VLMs and visual AR "
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
    gen.add_argument("--target", required=True, help="model path or hub id (AutoModelForCausalLM); a path that "
                     "does not exist is an error, never a hub lookup")
    gen.add_argument("--drafter", default="ngram", help="draft model path/id sharing the tokenizer, 'ngram' "
                     "(default) or 'none' (target only)")
    add_generation_flags(gen, max_new_tokens=128)
    gen.add_argument("prompt", help="the prompt (not empty)")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="ask a VLM about images, speculatively (stock transformers VLM, path or id)")
    chat.add_argument("--target", required=True, help="VLM path or hub id (AutoModelForImageTextToText + "
                      "AutoProcessor); a path that does not exist is an error, never a hub lookup")
    chat.add_argument("--drafter", default="ngram",
                      help="small VLM or text LM path/id sharing the tokenizer, a feature-drafter directory, 'ngram', "
                      "'mtp' (the target's own MTP layers, read from its checkpoint), 'assistant' (Gemma 4's "
                      "assistant at '<target>-assistant'), a Gemma 4 assistant path, or 'none' (target only)")
    chat.add_argument("--image", action="append", help="image file (repeat for several images)")
    chat.add_argument("--system", default=None, help="a system message opening the conversation")
    add_generation_flags(chat, max_new_tokens=256)
    chat.add_argument("--interactive", "-i", action="store_true",
                      help="keep chatting: read follow-ups from stdin ('/image PATH' attaches an image; an empty "
                           "line or end of input ends the chat)")
    chat.add_argument("question", help="the first question (not empty)")
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

    bench = sub.add_parser("bench", help="benchmarks that print and save tables (JSON + Markdown)",
                           description="Each benchmark reads only its own options (shown in brackets); any other "
                           "option given is refused.")
    bench.add_argument("what", choices=["engine", "overhead", "vlm", "native", "compress", "image", "continuous"])
    bench.add_argument("--out", default=None, help="output folder (default bench_out/<what>)")
    bench.add_argument("--quick", action="store_true", help="a small run (for smoke tests; sets its own sizes)")
    bench.add_argument("--target", default=None, help="[vlm, image, continuous] a model path or zoo:NAME (default: "
                       "the zoo's)")
    bench.add_argument("--drafter", action="append", default=None, help="[vlm] a drafter path, zoo:NAME or ngram "
                       "(repeat for several; default: every zoo drafter); [image, continuous] one drafter")
    bench.add_argument("--vq", default=None, help="[image] the VQ tokenizer path or zoo:NAME (default zoo:vq)")
    bench.add_argument("--prompts", default=None, help="[vlm] a JSONL file of {\"prompt\", \"images\"} lines or a "
                       "dataset directory (default: held-out zoo questions)")
    bench.add_argument("--labels", default=None, help="[image, continuous] a file with one class label per line")
    bench.add_argument("--num-prompts", type=int, default=None, help="[engine, overhead, vlm] prompts to run "
                       "(default 8)")
    bench.add_argument("--temperatures", type=float, nargs="+", default=None, help="[vlm] default 0 1")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per method (median; default 3)")
    bench.add_argument("-k", type=int, default=None, help="[vlm] drafted tokens per step (chain; default 4)")
    bench.add_argument("--new-tokens", type=int, default=None, help=f"[engine, overhead, vlm, native] most new "
                       f"tokens per prompt (default {NEW_TOKENS})")
    bench.add_argument("--device", default=None, help="[engine] cpu (default), cuda, cuda:1, ...")
    bench.add_argument("--dtype", choices=DTYPES, default=None, help="[engine] default float32")
    bench.add_argument("--temperature", type=float, default=None, help="[image, continuous] sampling temperature "
                       "(0 = greedy; default 1)")
    bench.add_argument("--continuous", action="store_true",
                       help="[image] the continuous-token AR (target-only vs CSpD) instead of LlamaGen")
    bench.add_argument("--hidden", type=int, default=None, help="[engine, overhead] hidden size of the benchmark "
                       "pair (default 256)")
    bench.add_argument("--vocab", type=int, default=None, help="[engine] vocabulary of the benchmark pair "
                       "(default 512)")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="[engine] batch sizes of the "
                       "mmspec rows (default 1 4)")
    bench.add_argument("--layers", type=int, nargs="+", default=None,
                       help="[engine, overhead] target layers of the benchmark pair (engine: one value, default 4; "
                            "overhead: the depths to sweep, default 4 8 12)")
    add_compile_flag(bench)  # [engine] adds compiled twins of the mmspec rows; [vlm] our rows compiled
    bench.set_defaults(func=cmd_bench)
    return p


def cmd_export_drafter(args) -> int:
    from vision.export import cmd_export_drafter as run  # the CLI is the one place above the pipelines

    return run(args)


def cmd_train_drafter(args) -> int:
    import argparse as _argparse

    from vision.train.cli import add_parser  # the CLI is the one place above the pipelines (ARCHITECTURE.md)

    parser = Parser(prog="mmspec")
    add_parser(parser.add_subparsers(dest="command", required=True))
    inner = parser.parse_args(["train-drafter", *args.rest])
    return inner.func(inner)


def _add_image_parser(sub) -> None:
    img = sub.add_parser("image", help="generate images with a visual AR model, speculatively (LlamaGen + VQ, or a "
                         "continuous-token ContinuousAR + VAE with CSpD)")
    img.add_argument("--target", required=True, help="LlamaGen directory (save_pretrained) or reference .pt file, "
                     "or a ContinuousAR directory (or zoo:NAME)")
    img.add_argument("--grid-size", type=int, default=None,
                     help="tokens per side for reference .pt targets (16: 256 px, 24: 384 px); directories record "
                     "their own (a different value is refused)")
    img.add_argument("--vq", "--vae", dest="vq", required=True,
                     help="VQ tokenizer directory or LlamaGen VQ reference checkpoint; for continuous targets the VAE "
                     "(diffusers AutoencoderKL directory, or an LDM/MAR KL .ckpt)")
    img.add_argument("--drafter", default=None,
                     help="'jacobi' (SJD, no model; the default for discrete targets), 'none' (plain decoding; the "
                     "default for continuous targets), or a head / LlamaGen / ContinuousAR checkpoint path")
    img.add_argument("--class-label", type=int, nargs="+", required=True, help="one or more class labels")
    img.add_argument("--num-images", type=int, default=1, help="images per class label (default 1)")
    img.add_argument("--acceptance", choices=["lossless", "lantern", "gsd", "cspd"], default="lossless",
                     help="lossless (exact; CSpD on continuous targets), lantern / gsd (LOSSY), cspd (continuous)")
    img.add_argument("--guidance-schedule", choices=["constant", "linear"], default=None,
                     help="continuous targets: CFG scale per token, constant or MAR's linear ramp")
    img.add_argument("--prefill-ratio", type=float, default=None,
                     help="continuous targets with a drafter: fraction of each image's first tokens made by the "
                     "target alone (CSpD)")
    img.add_argument("--lantern-delta", type=float, default=None,
                     help="--acceptance lantern: LANTERN's bound on borrowed mass, in [0, 1] (default 0.1)")
    img.add_argument("--lantern-lambda", type=float, default=None,
                     help="--acceptance lantern: LANTERN++'s bound relative to p(x), >= 1 (instead of --lantern-delta)")
    img.add_argument("--lantern-k", type=int, default=None,
                     help="--acceptance lantern: neighbours relaxed over (default 1000, 10 with --lantern-lambda)")
    img.add_argument("--tv-budget", type=float, default=None,
                     help="--acceptance lantern / gsd: per-position output TV budget, in [0, 1]")
    img.add_argument("--guidance-scale", type=float, default=None,
                     help="CFG scale >= 0 (default: the target's, 4.0 for a LlamaGen with a null class)")
    img.add_argument("--temperature", type=float, default=1.0, help="sampling temperature >= 0 (0 = greedy; "
                     "continuous targets: > 0, it scales the diffusion noise); default 1")
    img.add_argument("--top-k", type=int, default=None,
                     help="discrete targets: top-k (default 2000, LlamaGen's; 0 = off)")
    img.add_argument("--top-p", type=float, default=1.0, help="discrete targets: top-p in (0, 1] (default 1 = off)")
    img.add_argument("--tree", "--draft-tokens", dest="tree", type=int, default=None,
                     help="tokens drafted per step (default 4 for head / model drafters, 15 for SJD); --draft-tokens "
                          "is its old name")
    img.add_argument("--window", type=int, default=None, help="SJD window = the pending token + --tree (old form)")
    img.add_argument("--seed", type=int, default=0, help="random seed (default 0); recorded in <out>.json")
    img.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="weights' dtype of the target, drafter and VAE (default float32)")
    img.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    img.add_argument("--out", default="out.png",
                     help="image file (.png, .jpg, .webp, ...; default out.png); <out>.json gets the stats and settings")
    img.add_argument("--quiet", action="store_true", help="no progress bars")
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
    if args.command in ("generate", "chat"):
        args.tree_text, args.tree = args.tree, _tree_arg(args.tree)
    try:
        return args.func(args)
    except MMSpecError as e:  # a user error: one line, exit code 2, no traceback
        print(f"mmspec: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmmspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
