"""Training objectives, one per prediction type a model config can name: never silently another.

  flow          rectified flow: x_t = (1 - s) x0 + s noise, target noise - x0, model timestep 1000 s.
  epsilon       DDPM (DiT's linear betas, the same noise schedule the ddpm/ddim solvers sample with):
                target the noise; with learned sigma, DiT's hybrid loss adds improved DDPM's variational
                bound term on the variance channels, the mean held fixed (stop-gradient on epsilon).
  v_prediction  DDPM forward process, target v = sqrt(abar) noise - sqrt(1 - abar) x0.

`Objective.noised` draws a training pair; `Objective.losses` gives one loss per sample, so a batch
split across patch sizes (shared-weight flexify) averages exactly like one batch. `distillation_loss` is
LoRA flexify's loss, the same for every objective. `distribution_matching_loss` is the paper's optional
bootstrapped term against exposure bias: the model's own weak-then-native steps, matched by MMD to the
forward process (`Objective.forward_at` / `Objective.step`: the noise level u in [0, 1] of each objective).
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

    def forward_at(self, x0: torch.Tensor, noise: torch.Tensor, u: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_u ~ q(x_u | x0) for this noise, the model's timestep) at noise level u (0: data, 1: pure noise)."""
        raise NotImplementedError

    def step(self, out: torch.Tensor, x: torch.Tensor, u: float, u_next: float) -> torch.Tensor:
        """One deterministic solver step (Euler for flow, DDIM for DDPM models) from level u to u_next."""
        raise NotImplementedError


class FlowObjective(Objective):
    name = "flow"

    def noised(self, x0: torch.Tensor, gen: torch.Generator) -> Noised:
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        s = torch.rand(x0.shape[0], generator=gen).to(x0.device)
        per_sample = s.view(-1, *(1,) * (x0.dim() - 1))  # images (N, C, H, W) and videos (N, C, T, H, W)
        xt = (1 - per_sample) * x0 + per_sample * noise
        return Noised(x0, xt, s * 1000, noise - x0)

    def forward_at(self, x0: torch.Tensor, noise: torch.Tensor, u: float) -> tuple[torch.Tensor, torch.Tensor]:
        return (1 - u) * x0 + u * noise, torch.full((len(x0),), 1000 * u, device=x0.device)

    def step(self, out: torch.Tensor, x: torch.Tensor, u: float, u_next: float) -> torch.Tensor:
        return x + (u_next - u) * out[:, :self.channels].float()


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

    def _index(self, u: float) -> int:
        return round(u * (len(self.abar) - 1))

    def forward_at(self, x0: torch.Tensor, noise: torch.Tensor, u: float) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._index(u)
        abar = float(self.abar[k])
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise, torch.full((len(x0),), float(k), device=x0.device)

    def step(self, out: torch.Tensor, x: torch.Tensor, u: float, u_next: float) -> torch.Tensor:
        a, a_next = float(self.abar[self._index(u)]), float(self.abar[self._index(u_next)])
        pred = out[:, :self.channels].float()
        eps = pred if self.name == "epsilon" else a**0.5 * pred + (1 - a) ** 0.5 * x  # v -> epsilon
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps

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


def mmd2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased squared MMD between the rows of a and b (each flattened), Gaussian kernels at 0.5, 1 and 2 times
    the (lower) median pairwise distance of the pooled rows (no gradient through the bandwidth)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    d2 = torch.cdist(torch.cat([a, b]), torch.cat([a, b])).pow(2)
    n, m = len(a), len(b)
    off = ~torch.eye(n + m, dtype=torch.bool, device=d2.device)
    h = d2.detach()[off].median().clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (2 * w * w * h)) for w in (0.5, 1.0, 2.0))
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    return ((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
            - 2 * kab.mean())


def distribution_matching_loss(model: torch.nn.Module, objective: Objective, x0: torch.Tensor, y: torch.Tensor,
                               native: int, weak: int, gen: torch.Generator, span: float = 0.2) -> torch.Tensor:
    """The paper's bootstrapped distribution matching against exposure bias: from x_u1 ~ q(x_u1 | x0) (one level
    u1 for the batch), a weak step to u1 - span/2 and a native step to u2 = u1 - span (the model's own steps,
    gradients through both), matched by MMD (mmd2) to fresh draws of q(x_u2 | x0) for the same x0."""
    u1 = span + (1 - span) * float(torch.rand(1, generator=gen))
    mid, u2 = u1 - span / 2, u1 - span
    start, fresh = (torch.randn(x0.shape, generator=gen).to(x0.device) for _ in range(2))
    x, t = objective.forward_at(x0, start, u1)
    x = objective.step(model(x, t, y, weak), x, u1, mid)
    t_mid = objective.forward_at(x0, start, mid)[1]
    x = objective.step(model(x, t_mid, y, native), x, mid, u2)
    return mmd2(x, objective.forward_at(x0, fresh, u2)[0])


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


__all__ = ["DDPMObjective", "FlowObjective", "Noised", "Objective", "distillation_loss", "distribution_matching_loss",
           "mmd2", "objective_for"]
