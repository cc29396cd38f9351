"""APQ-DM timestep-group search over a quantized UNet (Wang et al., CVPR 2024, Eq. 6-7).

Every activation quantizer gets G candidate (scale, zero-point) sets and per-timestep logits; during the
search its output is sum_g softmax(logits_t)_g Q_g(x), and the whole UNet minimises

    J = mean_batch ||target - eps_q(x_t, t)||^2  +  lambda * mean_(quantizers, samples) H(softmax(logits_t))

by Adam over the logits and log-scales (the UNet's own weights stay frozen). The squared norm is summed
over a sample's values, as the paper writes it; the entropy is averaged over quantizers so that lambda
means the same for a small and a large UNet. Afterwards g(t) = argmax_g softmax(logits_t)_g replaces each
quantizer's map, and its learned scales its table. Batches may mix timesteps (per-sample group lookup).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusers_ptq import distributed
from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.config import GroupSearchConfig
from diffusers_ptq.gradsum import GradientSum
from diffusers_ptq.initialise import (
    act_quantizers,
    initialise_activations,
    observe_activations,
    set_quant_state,
)
from diffusers_ptq.optim import adam
from diffusers_ptq.quantizers.activation import distinct_step_timesteps, nearest_step_group_map
from diffusers_ptq.search import soft_groups
from diffusers_ptq.search.group_init import init_from_ranges
from diffusers_ptq.search.soft_groups import SoftGroupMixer
from diffusers_ptq.search.targets import prediction


class Targets(Protocol):
    def prepare(self, data: CalibrationSet) -> None: ...

    def batch(
        self,
        data: CalibrationSet,
        index: torch.Tensor,
        generator: torch.Generator,
        keep: torch.Tensor | None = None,
    ) -> tuple[dict[str, Any], torch.Tensor]: ...


def default_lr(act_bits: int) -> float:
    """The paper's learning rate: 5e-3 for 8-bit activations, 3e-3 below."""
    return 5e-3 if act_bits >= 8 else 3e-3


class GroupSearch:
    """Search the timestep -> group maps of every activation quantizer of an installed, quantized UNet.

    Use: `start(data)` (initial candidates and soft assignment), `fit(data, targets, epochs)` (any number
    of times, e.g. between active-selection rounds), `step_entropy()`, then `finish()`.
    """

    def __init__(
        self,
        unet: nn.Module,
        config: GroupSearchConfig,
        step_timesteps: torch.Tensor,
        num_train_timesteps: int,
        *,
        act_bits: int,
        batch_size: int,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.unet, self.config, self.progress = unet, config, progress
        self.batch_size, self.seed = batch_size, seed
        self.quantizers = act_quantizers(unet)
        if not self.quantizers:
            raise ValueError("group_search.enabled=True but the UNet has no activation quantizer to search")
        # One logit row per distinct timestep of the schedule; every training timestep uses its nearest row.
        self.row_of = nearest_step_group_map(num_train_timesteps, step_timesteps)
        self.row_timesteps = distinct_step_timesteps(num_train_timesteps, step_timesteps)
        rounded = step_timesteps.double().round().clamp(0, num_train_timesteps - 1).long()
        self.step_rows = self.row_of[rounded]
        self.lr = config.lr if config.lr is not None else default_lr(act_bits)
        self.generator = torch.Generator().manual_seed(seed)
        self.seen_rows = torch.zeros(len(self.row_timesteps), dtype=torch.bool)
        self.mixers: list[SoftGroupMixer] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch_losses: list[float] = []
        self.gradients: GradientSum | None = None  # data-parallel under a process group
        self.started = False

    @torch.no_grad()
    def start(self, data: CalibrationSet) -> None:
        """Initialise the G candidates of every quantizer from `data` and attach the soft assignment."""
        if self.config.init == "ranges":
            observers = observe_activations(
                self.unet, data, self.batch_size, self.row_of, self.seed, self.progress
            )
            gen = torch.Generator().manual_seed(self.seed)
            init_rows = [
                init_from_ranges(q, observers[q], self.row_of, self.row_timesteps, gen)
                for q in self.quantizers
            ]
        else:
            initialise_activations(self.unet, data, self.batch_size, self.seed, self.progress)
            init_rows = [q.group_map.cpu()[self.row_timesteps] for q in self.quantizers]
        for q, rows in zip(self.quantizers, init_rows):
            mixer = SoftGroupMixer(q, self.row_of, rows, self.config.init_logit)
            soft_groups.attach(q, mixer)
            self.mixers.append(mixer)
        params = [p for m in self.mixers for p in m.parameters()]
        self.optimizer = adam([{"params": params}], lr=self.lr)
        if distributed.world_size() > 1:
            self.gradients = GradientSum(params, "group search: a training step")
        self.started = True

    def _local(self, count: int) -> torch.Tensor | None:
        """Positions of a global batch of `count` rows this rank runs (contiguous, as even as possible);
        None without a process group (all of them)."""
        if self.gradients is None:
            return None
        part = distributed.own_share(count, allow_empty=True)
        return torch.arange(part.start, part.stop)

    def _lr_at(self, it: int, total: int, decay: bool) -> float:
        if not decay:
            return self.lr
        lo = min(self.config.lr_min, self.lr)  # the paper's default lr (None) may lie below a custom lr_min
        return lo + (self.lr - lo) * 0.5 * (1 + math.cos(math.pi * it / max(total, 1)))

    def fit(self, data: CalibrationSet, targets: Targets, epochs: int, *, decay: bool = True) -> None:
        """`epochs` passes over `data` in shuffled batches (cosine-decayed learning rate when `decay`)."""
        if not self.started:
            raise RuntimeError("GroupSearch.fit() before start()")
        n = len(data)
        bs = min(self.config.batch_size, n)
        per_epoch = math.ceil(n / bs)
        total = epochs * per_epoch
        if total == 0:
            return
        targets.prepare(data)
        set_quant_state(self.unet, weights=True, acts=True)  # the mixers run inside enabled quantizers
        frozen = [(p, p.requires_grad) for p in self.unet.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        it = 0
        try:
            with (
                torch.enable_grad(),
                tqdm(total=total, desc="group search", disable=not self.progress) as bar,
            ):
                for _ in range(epochs):
                    perm = torch.randperm(n, generator=self.generator)
                    epoch_loss = 0.0
                    for start in range(0, n, bs):
                        index = perm[start : start + bs]
                        loss, entropy = self._step(data, targets, index, self._lr_at(it, total, decay))
                        epoch_loss += loss * len(index)
                        it += 1
                        bar.set_postfix(loss=f"{loss:.4g}", entropy=f"{entropy:.3f}")
                        bar.update()
                    self.epoch_losses.append(epoch_loss / n)
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)

    def _step(
        self, data: CalibrationSet, targets: Targets, index: torch.Tensor, lr: float
    ) -> tuple[float, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        keep = self._local(len(index))
        self.optimizer.zero_grad(set_to_none=True)
        # Under a process group each rank runs its part of the global batch, its loss weighted by the
        # part's share (the sum over ranks is one process's loss), and the gradients are summed.
        stats, error = torch.zeros(2), None
        try:
            kwargs, target = targets.batch(data, index, self.generator, keep)
            if keep is None or len(keep):
                stats = self._loss(kwargs, target, 1.0 if keep is None else len(keep) / len(index))
        except Exception as err:
            if self.gradients is None:
                raise
            error = err
        if self.gradients is not None:
            self.gradients.step(error, also=(stats,))
        self.optimizer.step()
        self.seen_rows[self.row_of[data.train_timesteps[index]]] = True
        return float(stats[0]), float(stats[1])

    def _loss(self, kwargs: dict[str, Any], target: torch.Tensor, share: float) -> torch.Tensor:
        """Forward and backward of J on one batch (`share` of the global batch); (MSE, entropy) weighted
        by `share`."""
        for m in self.mixers:
            m.last_entropy = None
        pred = prediction(self.unet(**kwargs)).float()
        mse = (pred - target.float()).pow(2).flatten(1).sum(dim=1).mean() * share
        entropies = [m.last_entropy for m in self.mixers if m.last_entropy is not None]
        entropy = (torch.stack(entropies).mean() if entropies else pred.new_zeros(())) * share
        loss = mse + self.config.entropy_weight * entropy
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the group search loss became {float(loss)}; lower group_search.lr or check the "
                "calibration data"
            )
        loss.backward()
        return torch.stack([mse.detach(), entropy.detach()]).float().cpu()

    def step_entropy(self) -> torch.Tensor:
        """H(sigma_t) at every sampling step of the schedule, averaged over the quantizers."""
        rows = torch.stack([m.row_entropy().cpu() for m in self.mixers]).mean(dim=0)
        return rows[self.step_rows]

    @torch.no_grad()
    def finish(self, data: CalibrationSet | None = None) -> dict[str, Any]:
        """Write the hard maps and learned scales, detach the soft assignment; return a summary."""
        entropy = self.step_entropy() if self.mixers else torch.zeros(0)
        for q, m in zip(self.quantizers, self.mixers):
            m.harden(q, self.seen_rows)
            soft_groups.detach(q)
        self.mixers, self.optimizer = [], None
        if self.config.refit_scales and data is not None:
            with warnings.catch_warnings():
                # Groups the search left without timesteps borrow a neighbour's scale; no step uses them.
                warnings.simplefilter("ignore", UserWarning)
                initialise_activations(self.unet, data, self.batch_size, self.seed, self.progress)
        used = [
            len(torch.unique(q.group_map[self.row_timesteps.to(q.group_map.device)])) for q in self.quantizers
        ]
        return {
            "lr": self.lr,
            "epoch_losses": list(self.epoch_losses),
            "final_step_entropy": entropy.tolist(),
            "mean_groups_used": sum(used) / len(used),
        }

    def abort(self) -> None:
        """Detach the soft assignment without writing anything (the caller restores the UNet)."""
        for q in self.quantizers:
            soft_groups.detach(q)
        self.mixers, self.optimizer = [], None
