"""Differentially private training (DP-SGD) as an option of `fit`, through Opacus.

`make_private` turns the prepared model and optimizer of a run into a `DPTrainer`: Opacus'
`GradSampleModule` hooks every trainable leaf module and computes per-example gradients (nn.Linear and
nn.Embedding with Opacus' own samplers; our custom `Norm` (RMSNorm/LayerNorm) and anything else through
Opacus' functorch fallback, which vmaps the module's own forward, so no sampler has to be written);
`DPOptimizer` clips each example's gradient to `max_grad_norm`, sums, adds Gaussian noise of std
noise_multiplier * max_grad_norm and divides by the expected batch size; the accountant (RDP or PRV) counts
what each step spends. The noise multiplier is calibrated with Opacus' `get_noise_multiplier` so that
train.max_steps steps at the sample rate reach the target epsilon; the epsilon actually spent (fewer steps
spend less) is logged with the metrics, saved in the checkpoint meta and printed at the end.

Decisions:
- The loss is a per-example mean: each example's loss is the mean over its own counted tokens, and the
  batch loss the mean over examples, which is the reduction Opacus' "mean" mode undoes (it multiplies the
  captured gradients by the batch size). The task's own token-weighted mean would make one example's
  gradient depend on how many tokens the others have.
- The fused loss (model/loss.py) is bypassed: it computes lm_head's gradient inside one autograd Function,
  where no module hook sees it, so the lm_head (or the tied embedding) would get no per-example gradient.
  Under DP the logits go through `model.logits` (an ordinary lm_head call) and `F.cross_entropy`; this
  stores the (B, T, V) logits, which small models afford.
- Sampling is Poisson, as the accountant's guarantee assumes: each step includes every training example
  independently with probability q = batch_size / N (a variable batch; an empty one still takes a noisy
  step). Our ordinary loaders draw a fixed-size batch with replacement, which the accountant does not
  cover, so DP replaces them. The example unit is an SFT example for sft tasks (the docstring task
  included), and for lm tasks one of the N = (tokens - 1) // block_size non-overlapping block_size windows
  of the train split: the guarantee is per window, and a document spanning k windows has group privacy k.
- Refused (one clear error from TrainConfig.validate or here): several processes (DDP/FSDP), gradient
  accumulation (the Poisson batch is the step's batch), bf16/fp16, torch.compile, Muon, the classify task.
  train.grad_clip does not apply: DP clips per example instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from yuyan.data.tasks import IGNORE, LMTask, SFTTask, collate_sft
from yuyan.errors import UserError
from yuyan.train.config import PrivacySection, TrainConfig
from yuyan.train.optim import set_lr


def _opacus():
    try:
        import opacus
    except ImportError:
        raise UserError(
            "differential privacy needs Opacus: pip install 'yuyan[privacy]' (or pip install opacus)"
        ) from None
    return opacus


# ---------------------------------------------------------------------------------------------- sampling


class PoissonSampler:
    """Draws the training batches of a DP run: every example of the train split is in a batch with
    probability `sample_rate`, independently (torch.rand over the N examples from the run's generator, so a
    resumed run draws what the uninterrupted run would have)."""

    def __init__(self, task, batch_size: int):
        if isinstance(task, SFTTask):  # the docstring task is one too
            self.n, self.unit = len(task.train), "SFT example"
        elif isinstance(task, LMTask):
            self.tokens = task.shards.array("train")
            self.block = task.block_size
            self.n, self.unit = (len(self.tokens) - 1) // self.block, f"window of {self.block} tokens"
        else:
            raise UserError("DP training supports the lm and sft tasks (not classify)")
        self.task = task
        if self.n < 2 * batch_size:
            raise UserError(
                f"DP needs at least twice the batch size of training examples: {self.n} {self.unit}s for "
                f"batch size {batch_size}; lower train.batch_size or add data"
            )
        self.sample_rate = batch_size / self.n

    def draw(self, generator: torch.Generator) -> dict[str, torch.Tensor] | None:
        """The next Poisson batch (None when it came out empty)."""
        idx = (torch.rand(self.n, generator=generator) < self.sample_rate).nonzero()[:, 0].tolist()
        if not idx:
            return None
        if isinstance(self.task, SFTTask):
            return collate_sft([self.task.train[i] for i in idx], self.task.pad_id)
        rows = np.stack([self.tokens[i * self.block : i * self.block + self.block + 1] for i in idx])
        t = torch.from_numpy(rows.astype(np.int64))
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}


# ---------------------------------------------------------------------------------------------- the loss


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over examples of each example's mean next-token loss over its counted (non -100) tokens,
    with unfused logits (see the module docstring). An example with no counted token contributes 0."""
    x, y = batch["input_ids"], batch["labels"]
    z = model.logits(model.hidden(x)).float()  # (B, T, V)
    nll = F.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none").view(y.shape)
    count = (y != IGNORE).sum(1).clamp(min=1)
    return (nll.sum(1) / count).mean()


# ---------------------------------------------------------------------------------------------- the trainer


@dataclass
class DPTrainer:
    """A run's DP state: the hooked model, the noisy optimizer, the sampler and the accountant."""

    gsm: nn.Module  # opacus GradSampleModule around the run's model (hooks on its submodules)
    optimizer: torch.optim.Optimizer  # opacus DPOptimizer around the run's optimizer
    sampler: PoissonSampler
    accountant: object
    settings: PrivacySection
    noise_multiplier: float
    steps: int = 0
    _eps_cache: dict = field(default_factory=dict)

    def train_step(
        self,
        model: nn.Module,
        data_gen: torch.Generator,
        device: torch.device,
        lr: float,
        loss_sum: torch.Tensor,
    ) -> int:
        """One DP-SGD step: a Poisson batch, per-example gradients, clip, noise, the optimizer's update, and
        the accountant's count. Returns the step's tokens."""
        set_lr(self.optimizer, lr)
        b = self.sampler.draw(data_gen)
        tokens = 0
        if b is None:  # an empty batch: zero per-example gradients, so the step is noise alone
            for p in self.optimizer.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            b = {k: v.to(device) for k, v in b.items()}
            tokens = b["input_ids"].numel()
            loss = per_example_loss(model, b)
            with warnings.catch_warnings():  # the token ids need no gradient; Opacus' hooks are fine without
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            loss_sum += loss.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sampler.sample_rate)
        self.steps += 1
        return tokens

    def epsilon(self) -> float:
        """The epsilon spent so far at the configured delta (0 before the first step)."""
        if self.steps == 0:
            return 0.0
        if self.steps not in self._eps_cache:
            with warnings.catch_warnings():  # a short run's optimal RDP order is the largest: a looser bound
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                eps = float(self.accountant.get_epsilon(delta=self.settings.delta))
            self._eps_cache = {self.steps: eps}
        return self._eps_cache[self.steps]

    def report(self) -> dict:
        """What the checkpoint meta and the run's summary record."""
        s = self.settings
        return {
            "epsilon": self.epsilon(),
            "delta": s.delta,
            "target_epsilon": s.epsilon,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": s.max_grad_norm,
            "sample_rate": self.sampler.sample_rate,
            "steps": self.steps,
            "accountant": s.accountant,
            "sampling": "poisson",
            "unit": self.sampler.unit,
            "examples": self.sampler.n,
        }

    def close(self) -> None:
        """Remove Opacus' hooks and per-example gradients from the model (it is the caller's again)."""
        self.gsm._close()


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task,
    cfg: TrainConfig,
    world_size: int,
    steps_done: int,
) -> DPTrainer:
    """Wrap a run's model and optimizer for DP training as cfg.privacy says; `steps_done` is a resumed
    run's step count (the accountant's history is the same noise and sample rate for that many steps)."""
    opacus = _opacus()
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.optimizers import DPOptimizer

    pc, tc = cfg.privacy, cfg.train
    if world_size > 1:
        raise UserError("DP training runs in one process: run it without torchrun (or with one process)")
    sampler = PoissonSampler(task, tc.batch_size)
    sigma = get_noise_multiplier(
        target_epsilon=pc.epsilon,
        target_delta=pc.delta,
        sample_rate=sampler.sample_rate,
        steps=tc.max_steps,
        accountant=pc.accountant,
    )
    # strict=False: the RoPE tables are (non-persistent, per-position) buffers, which mix no examples
    gsm = opacus.GradSampleModule(model, loss_reduction="mean", strict=False)
    dp_opt = DPOptimizer(
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=pc.max_grad_norm,
        expected_batch_size=tc.batch_size,
        loss_reduction="mean",
    )
    accountant = create_accountant(pc.accountant)
    if steps_done > 0:
        accountant.history = [(sigma, sampler.sample_rate, steps_done)]
    return DPTrainer(gsm, dp_opt, sampler, accountant, pc, sigma, steps_done)


def describe(dp: DPTrainer) -> str:
    """One line for the console: the budget, the noise and the sampling."""
    r = dp.report()
    return (
        f"differential privacy: target epsilon {r['target_epsilon']:g} at delta {r['delta']:g}; noise "
        f"multiplier {r['noise_multiplier']:.3f}, clip {r['max_grad_norm']:g}, Poisson sample rate "
        f"{r['sample_rate']:.4g} of {r['examples']:,} ({r['unit']}s), {r['accountant']} accountant"
    )


__all__ = ["DPTrainer", "PoissonSampler", "make_private", "per_example_loss", "describe"]
