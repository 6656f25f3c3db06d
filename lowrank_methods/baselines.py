"""The baselines every method is compared with, on the same stage-1 encoders, data and schedule:

unimodal      each stage-1 model alone (nothing trains in stage 2)
linear-probe  frozen encoders; a linear fusion head on concat_m(h_m) trains
late-fusion   every encoder parameter and the fusion head train (full fine-tuning)
"""

from __future__ import annotations

from lowrank_methods.base import Method


class Unimodal(Method):
    title = "unimodal"
    multimodal = False


class LinearProbe(Method):
    title = "linear probe"
    tuning = "frozen"


class LateFusion(Method):
    title = "late fusion"
    tuning = "full"
