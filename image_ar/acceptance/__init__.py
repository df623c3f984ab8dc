"""Relaxed (LOSSY) acceptance rules for visual-AR speculative decoding, with the engine's kernel signature.

``lantern(...)`` (LANTERN / LANTERN++), ``gsd(...)`` (Grouped Speculative Decoding) return kernels
``accept(draft, p, *, generator=None, coin=None) -> RelaxedVerdict`` marked ``lossless = False``, usable by
``mmspec``'s decode loop as a plug-in acceptance rule. :mod:`.budget` measures the output drift of any rule and adds a
per-position TV budget (``tv_budget=``); :mod:`.neighbours` builds LANTERN's latent neighbourhoods from a VQ codebook.
:mod:`.cspd` is the exception: the *exact* rule for continuous tokens (CSpD), imported from its module.
"""
from .budget import (
    RelaxedVerdict,
    enumerate_verdicts,
    first_token_distribution,
    output_distribution,
    output_tv,
    tv_distance,
)
from .gsd import gsd, gsd_acceptance, gsd_output_distribution
from .lantern import lantern, lantern_acceptance, lantern_output_distribution, lantern_relaxed_target
from .neighbours import codebook_hash, latent_neighbours, squared_distance

__all__ = [
    "RelaxedVerdict", "enumerate_verdicts", "first_token_distribution", "output_distribution", "output_tv",
    "tv_distance", "gsd", "gsd_acceptance", "gsd_output_distribution", "lantern", "lantern_acceptance",
    "lantern_output_distribution", "lantern_relaxed_target", "codebook_hash", "latent_neighbours",
    "squared_distance",
]
