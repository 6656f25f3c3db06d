"""MIE / IGM (modal-aware interactive enhancement, IJCAI-25; code njustkmg/IJCAI25-IGM; docs/design.md §5).

Encoders of one width share one classifier head (SharedHeadEnsemble). Training is a list of stages that
alternate over the modalities, --stage-epochs each (--epochs in all), each a fit of modality l's encoder
and the head on head(E_l(x_l)) from the best weights so far with a fresh optimiser. Per step:

1. SAM in the forward phase: g = ∇L(θ); ε = ρ_l · g / ‖g‖ per tensor (ρ_l: --sam-rho); the step's
   gradient is (1 − μ) ∇L(θ) + μ ∇L(θ + ε), μ = --sam-mix, taken at θ + ε and applied to the restored θ.
2. Gradient modification in the backward phase: from the second stage on, each head Linear layer's
   weight gradient G (out, in) ← G · T(k) (igm_projection) of the modality k of the stage before, from
   its best model over the training set.

Encoders train through LoRA, or whole with --full. As in the published code, each step trains on mixup
of the stage's inputs (α = 1: λ ~ U(0, 1); --no-mixup turns it off), see ``mixup_pairs``."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lowrank_methods.base import Method, adapt_encoders
from lowrank_train.checkpoint import seed_everything
from lowrank_train.data import Batch, batches
from lowrank_train.loop import Scale, Stage
from lowrank_util.errors import ConfigError
from models.multimodal import FusionOutput, UnimodalClassifier, width_projection
from models.transformer import TransformerEncoder


def mixup_pairs(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup's (λ, partner) of a batch from its step draws (B, 2) (lowrank_train.data.step_draws): λ ~ U(0, 1)
    = Beta(1, 1), the published α = 1, and a random permutation of the batch; the step trains on
    x̃ = λ x + (1 − λ) x[partner] with loss λ L(x̃, y) + (1 − λ) L(x̃, y[partner]). Drawn from (seed, epoch,
    step), so SAM's two passes see one mixed batch and a resumed run mixes as the first did."""
    return draws[0, 0], draws[:, 1].argsort()


class SharedHeadEnsemble(nn.Module):
    """Encoders sharing one classifier head, each modality classified on its own:

        z_m = P_m(h_m)  (B, D);   logits_m = head(z_m)  (B, C);   prediction = log( mean over m of softmax(logits_m) )

    D is the widest encoder's width; P_m is the identity for an encoder of width D and a linear map, trained
    with modality m, for a narrower one (the published code's encoders share one width). Missing modality m
    (``missing`` (B, M) bool): "zero-input" classifies E_m(0), "zero-feature" head(0); either joins the
    mean like a present modality. Mask Tokens do not apply."""

    fills = ("zero-input", "zero-feature")

    def __init__(self, encoders: Mapping[str, TransformerEncoder], num_classes: int) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ConfigError(f"MIE needs at least two encoders, got {list(encoders)}")
        widths = {m: encoder.config.hidden_size for m, encoder in encoders.items()}
        self.modalities = tuple(encoders)
        self.encoders = nn.ModuleDict(encoders)
        shared = max(widths.values())
        self.to_shared = nn.ModuleDict({m: width_projection(width, shared) for m, width in widths.items()})
        self.head = nn.Linear(shared, num_classes)

    def modality_logits(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """head(P_m(E_m(x)[class feature])) (B, C): what one modality's training stage optimises."""
        return self.head(self.to_shared[modality](self.encoders[modality](x)[1]))

    def forward(
        self, inputs: Mapping[str, torch.Tensor], missing: torch.Tensor | None = None, fill: str = "zero-input"
    ) -> FusionOutput:
        """inputs: modality → batch (B, ...); missing (B, M) bool, True = absent (None: all present)."""
        first = inputs[self.modalities[0]]
        present = torch.ones(len(first), len(self.modalities), dtype=torch.bool, device=first.device)
        if missing is not None:
            present = ~missing
        features = {}
        for i, m in enumerate(self.modalities):
            keep = present[:, i].view(-1, *[1] * (inputs[m].ndim - 1))
            features[m] = self.encoders[m](inputs[m] * keep)[1]
        return FusionOutput(self.fill_logits(features, {}, present, fill), features, {}, present)

    def fill_logits(
        self,
        features: Mapping[str, torch.Tensor],
        generated: Mapping[str, torch.Tensor],
        present: torch.Tensor,
        fill: str,
    ) -> torch.Tensor:
        """The ensemble's log-probabilities (B, C) on a forward's ``features`` (of the zeroed inputs where a
        modality is missing) and ``present``, filled in by ``fill`` (``generated``: unused, no Mask Tokens)."""
        if fill not in self.fills:
            raise ValueError(f"fill must be one of {self.fills}, got {fill!r}")
        probabilities = []
        for i, m in enumerate(self.modalities):
            shared = self.to_shared[m](features[m])
            if fill == "zero-feature":
                shared = shared * present[:, i, None]
            probabilities.append(self.head(shared).softmax(1))
        return torch.stack(probabilities).mean(0).log()


def igm_projection(second_moment: torch.Tensor, tau: float) -> torch.Tensor:
    """IGM's gradient modification T(k) (in, in) from Σ z̄ z̄ᵀ (in, in) of modality k's head inputs:

        Σ z̄ z̄ᵀ = V diag(λ) Vᵀ,   T(k) = V · diag(exp(−τ (λ − λmin) / (λmax − λmin))) · Vᵀ

    symmetric, eigenvalues in [e^{−τ}, 1]: the directions modality k's features use most are damped most
    (all equal: T = I)."""
    eigenvalues, vectors = torch.linalg.eigh(second_moment.double())
    span = eigenvalues.max() - eigenvalues.min()
    scaled = (eigenvalues - eigenvalues.min()) / span if span > 0 else torch.zeros_like(eigenvalues)
    t = (vectors * torch.exp(-tau * scaled)) @ vectors.T
    return ((t + t.T) / 2).to(second_moment.dtype)


class MIE(Method):
    title = "MIE"
    fills = SharedHeadEnsemble.fills
    multilabel = False  # the ensemble averages softmax probabilities
    stage: str  # the modality trained now
    projections: dict[nn.Linear, torch.Tensor]  # head layer → T(k) of the previous stage's modality

    def build(
        self, unimodal: dict[str, UnimodalClassifier], num_classes: int, device: torch.device
    ) -> SharedHeadEnsemble:
        unknown = set(unimodal) - self.config.rho().keys()
        if unknown:
            raise ConfigError(f"--sam-rho {self.config.sam_rho!r} gives no ρ for {sorted(unknown)}")
        seed_everything(self.config.seed)
        model = SharedHeadEnsemble({m: copy.deepcopy(u.encoder) for m, u in unimodal.items()}, num_classes)
        adapt_encoders(model.encoders, self.config, "full" if self.config.full else "lora")
        self.model, self.stage, self.projections = model.to(device), model.modalities[0], {}
        return self.model

    def stages(self, train: Dataset) -> list[Stage]:
        """Stage i trains modality i mod M (its encoder and the head) for --stage-epochs (the last: what is
        left of --epochs), resuming from state-stage{i+1}.pt; from the second on, with T(k) of the
        modality before, measured on the ``train`` data."""
        modalities, each = self.model.modalities, self.config.stage_epochs
        count = math.ceil(self.config.epochs / each)
        stages = []
        for i in range(count):
            modality = modalities[i % len(modalities)]
            trained = ("head.", f"encoders.{modality}.", f"to_shared.{modality}.")  # parameter name prefixes
            stages.append(
                Stage(
                    name=f"MIE stage {i + 1}/{count} [{modality}]",
                    epochs=min(each, self.config.epochs - i * each),
                    number=i + 1,
                    checkpoint=f"state-stage{i + 1}.pt",
                    trains=lambda name, trained=trained: name.startswith(trained),
                    begin=partial(self.begin_stage, i, train),
                )
            )
        return stages

    def begin_stage(self, i: int, train: Dataset) -> None:
        """Train modality i mod M next, with T(k) of the modality k of stage i − 1 (none in stage 0)."""
        modalities = self.model.modalities
        previous, self.stage = modalities[(i - 1) % len(modalities)], modalities[i % len(modalities)]
        self.projections = self.head_projections(previous, train) if i else {}

    def loss(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the stage's modality alone, on the samples that have it; on mixup of them
        (--mixup) where its inputs are real-valued (token ids are not mixed)."""
        inputs, labels, draws = batch[self.stage], batch["label"], batch["draws"]
        if "present" in batch:
            has = batch["present"][:, self.model.modalities.index(self.stage)]
            inputs, labels, draws = inputs[has], labels[has], draws[has]
            if not len(labels):  # no sample of this batch has the modality: a zero loss with a gradient
                return self.model.head.weight.sum() * 0.0
        if not (self.config.mixup and inputs.is_floating_point()):
            return F.cross_entropy(self.model.modality_logits(self.stage, inputs), labels)
        lam, partner = mixup_pairs(draws)
        logits = self.model.modality_logits(self.stage, lam * inputs + (1 - lam) * inputs[partner])
        return lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[partner])

    def backward(self, batch: Batch, scale: Scale) -> torch.Tensor:
        """SAM's mixed gradient (1 − μ) ∇L(θ) + μ ∇L(θ + ε); the weights are θ again on return."""
        mix, rho = self.config.sam_mix, self.config.rho()[self.stage]
        with self.config.autocast(batch["label"].device):
            clean = self.loss(batch)
        scale((1 - mix) * clean).backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        origin = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                norm = p.grad.norm()
                if norm > 0:
                    p.add_(p.grad / norm, alpha=rho)  # ε = ρ g/‖g‖ (p.grad is g scaled by 1 − μ)
        with self.config.autocast(batch["label"].device):
            perturbed = self.loss(batch)
        scale(mix * perturbed).backward()
        with torch.no_grad():
            for p, weight in zip(params, origin, strict=True):
                p.copy_(weight)
        return ((1 - mix) * clean + mix * perturbed).detach()

    @torch.no_grad()
    def modify_gradients(self) -> None:
        for layer, t in self.projections.items():
            if layer.weight.grad is not None:
                layer.weight.grad = layer.weight.grad @ t

    @torch.no_grad()
    def head_projections(self, modality: str, data: Dataset) -> dict[nn.Linear, torch.Tensor]:
        """T(modality) of every head Linear layer, from Σ over the batches of z̄ z̄ᵀ, z̄ (1, in) the batch-mean
        input of the layer when the model classifies ``modality``'s training data."""
        device = self.model.head.weight.device
        layers = [layer for layer in self.model.head.modules() if isinstance(layer, nn.Linear)]
        sums = {layer: torch.zeros(layer.in_features, layer.in_features, device=device) for layer in layers}

        def accumulate(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            mean = inputs[0].float().mean(0, keepdim=True)  # z̄ (1, in)
            sums[layer] += mean.T @ mean

        hooks = [layer.register_forward_hook(accumulate) for layer in layers]
        self.model.eval()
        try:
            for batch in batches(data, self.config):
                self.model.modality_logits(modality, batch[modality].to(device))
        finally:
            for hook in hooks:
                hook.remove()
        return {layer: igm_projection(total, self.config.igm_tau) for layer, total in sums.items()}
