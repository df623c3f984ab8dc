"""The VLM part of `mmspec demo`: the zoo's LLaVA answers questions about a bundled image, plainly and speculatively.

    from vision.demo import run_vlm_demo
    summary = run_vlm_demo("demo_out/vlm")          # builds zoo:vlm and its EAGLE head first if they are not cached

Greedy decoding, so the speculative answer must be the plain answer token for token; the demo checks it and reports
the wall-clock speedup (median of alternated repeats, after a warm-up), tau (tokens per target forward) and the
answers. The image ships with the package (`vision/assets/scene.png`, drawn by `vision.scenes`).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

ASSET = Path(__file__).parent / "assets" / "scene.png"
QUESTIONS = ("Describe the image in detail.", "What does the text say?", "How many shapes are there?")
DRAFTER = "vlm-eagle"  # the drafter the demo shows: it needs only the target, so a first run trains little


def demo_image():
    from PIL import Image

    return Image.open(ASSET).convert("RGB")


def run_vlm_demo(out_dir="demo_out/vlm", quick: bool = False, progress: bool = True, drafter: str = DRAFTER,
                 repeats: int = 3, max_new_tokens: int = 96) -> dict:
    """Answer QUESTIONS about the bundled image with zoo:vlm, without and with `drafter`; returns a summary dict."""
    from .pipeline import SpeculativeVLM, load_drafter
    from .zoo import load, load_target

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load_target(load("vlm", quick=quick, progress=progress))
    spec, extra = load_drafter(str(load(drafter, quick=quick, progress=progress)), model, tree=4)
    plain, fast = SpeculativeVLM(model, processor, None), SpeculativeVLM(model, processor, spec, **extra)
    image = demo_image()
    image.resize((240, 240)).save(out / "image.png")
    rows = []
    for q in QUESTIONS:
        kw = dict(images=[image], prompt=q, max_new_tokens=max_new_tokens)
        plain.generate(**kw)  # warm-up, untimed
        fast.generate(**kw)
        times = {"plain": [], "spec": []}
        outs = {}
        for _ in range(1 if quick else repeats):
            for name, svlm in (("plain", plain), ("spec", fast)):
                t0 = time.perf_counter()
                outs[name] = svlm.generate(**kw)
                times[name].append(time.perf_counter() - t0)
        p, s = outs["plain"], outs["spec"]
        rows.append({"question": q, "answer": p.text.strip(), "speculative_answer": s.text.strip(),
                     "tokens": len(p.token_ids), "identical": p.token_ids == s.token_ids, "tau": s.stats.tau,
                     "plain_s": statistics.median(times["plain"]), "speculative_s": statistics.median(times["spec"])})
    plain_s, spec_s = sum(r["plain_s"] for r in rows), sum(r["speculative_s"] for r in rows)
    summary = {"target": "zoo:vlm" + ("@quick" if quick else ""), "drafter": f"zoo:{drafter}" + ("@quick" if quick else ""), "image": str(
        out / "image.png"), "rows": rows, "speedup": plain_s / spec_s,
        "tau": statistics.mean(r["tau"] for r in rows), "identical": all(r["identical"] for r in rows)}
    (out / "vlm_demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(s: dict) -> None:
    print(f"\nVLM chat — {s['target']} (LLaVA), drafter {s['drafter']}, greedy; image: {s['image']}")
    for r in s["rows"]:
        print(f"  Q: {r['question']}\n  A: {r['answer']}")
        print(f"     {r['tokens']} tokens, plain {r['plain_s'] * 1e3:.0f} ms, speculative {r['speculative_s'] * 1e3:.0f} "
              f"ms ({r['plain_s'] / r['speculative_s']:.2f}x), tau {r['tau']:.2f}, identical: "
              f"{'yes' if r['identical'] else 'NO'}")
    print(f"  => {s['speedup']:.2f}x faster than plain decoding, tau {s['tau']:.2f}, output identical: "
          f"{'yes' if s['identical'] else 'NO'} (lossless)")
