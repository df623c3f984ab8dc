"""Training feature drafters (EAGLE, EAGLE-3, MSD, ViSpec, DREAM heads, with their compressors; DFlash block drafters)
and MASSV draft VLMs on a target's own answers: data, features, losses, trainers.

    records = self_distill(model, processor, images, prompts, "data/")      # or load_dataset("data/")
    train, held = split(records, held_out=0.1)
    head = EagleHead(model)         # or EagleHead(model, taps=...), DreamHead(model, compressor=AttentionPrune(0.25))
    report = train_eagle(head, model, processor, train, steps=2000, lr=1e-4, out_dir="eagle/", unroll=3)
    evaluate_tau(head, model, processor, held)                               # {"tau": ..., "alpha": [...]}
    head = DFlashHead(model, block_size=8)                                   # DFlash: a block per forward
    train_dflash(head, model, processor, train, steps=2000, lr=1e-3, out_dir="dflash/")
    evaluate_dflash(head, model, processor, held)

Command line: ``mmspec train-drafter`` (`cli.add_parser`).
"""
from .data import Record, load_dataset, save_dataset, self_distill, split
from .dflash_trainer import evaluate_dflash, fit_dflash, lm_example, train_dflash
from .eagle_trainer import evaluate_tau, train_eagle
from .features import Example, FeatureStore, OnlineFeatures, make_example, precompute
from .vlm_distill import distill_draft_vlm, evaluate_draft_tau

__all__ = ["Record", "load_dataset", "save_dataset", "self_distill", "split", "train_eagle", "evaluate_tau",
           "Example", "FeatureStore", "OnlineFeatures", "make_example", "precompute", "distill_draft_vlm",
           "evaluate_draft_tau", "train_dflash", "fit_dflash", "lm_example",
           "evaluate_dflash"]
