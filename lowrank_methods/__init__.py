"""The --method choices of train.py, one file each: what it trains, its losses and gradient hooks, the
fills it is tested with (docs/design.md §5). ``METHODS`` maps each --method name to its class."""

from __future__ import annotations

from lowrank_methods.base import Method
from lowrank_methods.baselines import LateFusion, LinearProbe, Unimodal
from lowrank_methods.mie import MIE
from lowrank_methods.mmlora import MMLoRA
from lowrank_methods.ogm_ge import OGMGE
from lowrank_methods.u2a import U2A

METHODS: dict[str, type[Method]] = {
    "u2a": U2A, "unimodal": Unimodal, "linear-probe": LinearProbe, "late-fusion": LateFusion,
    "ogm-ge": OGMGE, "mmlora": MMLoRA, "mie": MIE,
}  # fmt: skip

__all__ = ["METHODS", "MIE", "OGMGE", "U2A", "LateFusion", "LinearProbe", "MMLoRA", "Method", "Unimodal"]
