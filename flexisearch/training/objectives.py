"""Training objectives, one per prediction type a model config can name: never silently another.

  flow          rectified flow: x_t = (1 - s) x0 + s noise, target noise - x0, model timestep 1000 s.
  epsilon       DDPM (DiT's linear betas, the same noise schedule the ddpm/ddim solvers sample with):
                target the noise; with learned sigma, DiT's hybrid loss adds improved DDPM's variational
                bound term on the variance channels, the mean held fixed (stop-gradient on epsilon).
  v_prediction  DDPM forward process, target v = sqrt(abar) noise - sqrt(1 - abar) x0.

`Objective.noised` draws a training pair; `Objective.losses` gives one loss per sample, so a batch
split across patch sizes (shared-weight flexify) averages exactly like one batch. `distillation_loss` is
LoRA flexify's loss, the same for every objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..sampling.generate import make_scheduler


@dataclass
class Noised:
    """A training batch after the forward process: the model input, its timestep and what it should predict."""

    x0: torch.Tensor
    xt: torch.Tensor
    t: torch.Tensor  # what the model is called with (DDPM: integer steps 0..999 as floats; flow: 1000 s)
    target: torch.Tensor

    def select(self, rows: torch.Tensor | slice) -> Noised:
        return Noised(self.x0[rows], self.xt[rows], self.t[rows], self.target[rows])

    def to(self, device: torch.device | str) -> Noised:
        return Noised(self.x0.to(device), self.xt.to(device), self.t.to(device), self.target.to(device))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


class Objective:
    """What a model of a given prediction type is trained to output."""

    name: str

    def __init__(self, channels: int, learn_sigma: bool):
        self.channels = channels
        self.learn_sigma = learn_sigma

    def noised(self, x0: torch.Tensor, gen: torch.Generator) -> Noised:
        raise NotImplementedError

    def losses(self, out: torch.Tensor, batch: Noised) -> torch.Tensor:
        """Per-sample loss of the model output `out` (all its channels) on batch."""
        return _mean_flat((out[:, :self.channels].float() - batch.target) ** 2)


class FlowObjective(Objective):
    name = "flow"

    def noised(self, x0: torch.Tensor, gen: torch.Generator) -> Noised:
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        s = torch.rand(x0.shape[0], generator=gen).to(x0.device)
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        return Noised(x0, xt, s * 1000, noise - x0)


class DDPMObjective(Objective):
    """Epsilon or v targets on DiT's 1000-step linear-beta forward process (diffusers' DDPMScheduler)."""

    def __init__(self, channels: int, learn_sigma: bool, prediction: str):
        super().__init__(channels, learn_sigma)
        self.name = prediction
        self.scheduler = make_scheduler("ddpm", "epsilon")  # the forward process: betas only
        abar = self.scheduler.alphas_cumprod.double()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.betas = 1 - abar / abar_prev
        self.abar = abar
        post_var = self.betas * (1 - abar_prev) / (1 - abar)
        # Improved DDPM clips the posterior variance at t=0 (where it is 0) to its value at t=1.
        self.post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.post_coef_x0 = self.betas * abar_prev.sqrt() / (1 - abar)
        self.post_coef_xt = (1 - abar_prev) * (1 - self.betas).sqrt() / (1 - abar)

    def noised(self, x0: torch.Tensor, gen: torch.Generator) -> Noised:
        steps = torch.randint(len(self.abar), (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        xt = self.scheduler.add_noise(x0, noise, steps)
        target = noise if self.name == "epsilon" else self.scheduler.get_velocity(x0, noise, steps)
        return Noised(x0, xt, steps.to(x0.device).float(), target)

    def losses(self, out: torch.Tensor, batch: Noised) -> torch.Tensor:
        mse = super().losses(out, batch)
        if not self.learn_sigma:
            return mse
        return mse + self.vb_bits(out[:, :self.channels].detach(), out[:, self.channels:], batch)

    def vb_bits(self, eps: torch.Tensor, var_values: torch.Tensor, batch: Noised) -> torch.Tensor:
        """Improved DDPM's L_vb term (bits per dimension) for a learned-range variance, as DiT trains it:
        KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL at t = 0."""
        t = batch.t.long().cpu()
        shape = (-1,) + (1,) * (eps.dim() - 1)

        def at(table: torch.Tensor) -> torch.Tensor:
            return table[t].to(eps.device, torch.float64).view(shape)

        x0, xt, eps = batch.x0.double(), batch.xt.double(), eps.double()
        true_mean = at(self.post_coef_x0) * x0 + at(self.post_coef_xt) * xt
        true_log_var = at(self.post_log_var)
        x0_pred = (xt - at((1 - self.abar).sqrt()) * eps) / at(self.abar.sqrt())
        mean = at(self.post_coef_x0) * x0_pred + at(self.post_coef_xt) * xt
        frac = (var_values.double() + 1) / 2
        log_var = frac * at(self.betas.log()) + (1 - frac) * true_log_var
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        bits = torch.where(t.to(eps.device).view(shape) == 0, nll, kl)
        return (_mean_flat(bits) / math.log(2.0)).to(var_values.dtype)


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) for data in [-1, 1] quantised to 256 bins, under N(mean, exp(log_scale)^2) (improved DDPM)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def distillation_loss(model: torch.nn.Module, batch: Noised, y: torch.Tensor, native: int, weak: int) -> torch.Tensor:
    """LoRA flexify's loss: the weak-size prediction against the frozen native one, every output channel (a
    learned variance too), so the student learns the teacher's whole output."""
    with torch.no_grad():
        teacher = model(batch.xt, batch.t, y, native)
    return ((model(batch.xt, batch.t, y, weak) - teacher) ** 2).mean()


def objective_for(config: object) -> Objective:
    """The objective a model config names (fields prediction, in_channels, learn_sigma)."""
    prediction, learn_sigma, channels = config.prediction, config.learn_sigma, config.in_channels
    if learn_sigma and prediction != "epsilon":
        raise UserError(f"model config: learned sigma with prediction {prediction!r} has no known training "
                        "objective (DiT's hybrid loss is defined for epsilon)")
    if prediction == "flow":
        return FlowObjective(channels, learn_sigma)
    if prediction in ("epsilon", "v_prediction"):
        return DDPMObjective(channels, learn_sigma, prediction)
    raise UserError(f"model config: field 'prediction' is {prediction!r}, expected epsilon, v_prediction or flow")


__all__ = ["DDPMObjective", "FlowObjective", "Noised", "Objective", "distillation_loss", "objective_for"]
