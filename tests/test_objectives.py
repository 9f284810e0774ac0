"""Training objectives against their formulas written out here: the forward processes, the targets, and DiT's
learned-sigma hybrid loss (improved DDPM's variational bound term, checked with scipy's normal distribution)."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from flexisearch.errors import UserError
from flexisearch.models.dit import FlexiDiTConfig
from flexisearch.training.objectives import (
    DDPMObjective,
    FlowObjective,
    Noised,
    objective_for,
)

BETAS = np.linspace(0.0001, 0.02, 1000)  # DiT's linear schedule
ABAR = np.cumprod(1 - BETAS)


def _x0(n: int = 4) -> torch.Tensor:
    """Images on the 8-bit grid in [-1, 1], both edges included (the decoder term treats them apart)."""
    x = torch.randint(0, 256, (n, 2, 3, 3), generator=torch.Generator().manual_seed(1)).float() / 127.5 - 1
    x[0, 0, 0, 0], x[1, 0, 0, 0] = -1.0, 1.0
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_forward_process_and_targets(prediction):
    obj = DDPMObjective(2, False, prediction)
    x0 = _x0()
    gen = torch.Generator().manual_seed(0)
    batch = obj.noised(x0, gen)
    replay = torch.Generator().manual_seed(0)
    steps = torch.randint(1000, (4,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    a = torch.tensor(ABAR[steps.numpy()], dtype=torch.float64).view(-1, 1, 1, 1)
    xt = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    target = noise.double() if prediction == "epsilon" else a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
    assert torch.equal(batch.t, steps.float())
    torch.testing.assert_close(batch.xt.double(), xt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch.target.double(), target, rtol=1e-4, atol=1e-5)
    out = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(obj.losses(out, batch), ((out - batch.target) ** 2).mean((1, 2, 3)))


def test_flow_pair():
    x0 = _x0()
    batch = FlowObjective(2, False).noised(x0, torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    noise, s = torch.randn(x0.shape, generator=replay), torch.rand(4, generator=replay)
    torch.testing.assert_close(batch.xt, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(batch.target, noise - x0)
    torch.testing.assert_close(batch.t, 1000 * s)


def _vb_reference(x0, xt, eps, v, t):
    """L_vb in bits per dimension from improved DDPM (Nichol & Dhariwal 2021), eqs. 10-13 and the discrete
    decoder, in float64 numpy: KL(N(mu~, beta~) || N(mu_theta, Sigma_theta)) for t > 0, -log p(x0 | x1) at t = 0."""
    x0, xt, eps, v = (a.double().numpy() for a in (x0, xt, eps, v))

    def beta_tilde(k):
        return (1 - (ABAR[k - 1] if k > 0 else 1.0)) / (1 - ABAR[k]) * BETAS[k]

    out = []
    for i, ti in enumerate(t.tolist()):
        beta, abar = BETAS[ti], ABAR[ti]
        abar_prev = ABAR[ti - 1] if ti > 0 else 1.0
        beta_tilde_t = beta_tilde(ti) if ti > 0 else beta_tilde(1)  # 0 at t = 0: DiT clips it to t = 1's
        x0_hat = (xt[i] - np.sqrt(1 - abar) * eps[i]) / np.sqrt(abar)
        mu_theta, mu_true = (np.sqrt(abar_prev) * beta / (1 - abar) * x_start
                             + np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * xt[i] for x_start in (x0_hat, x0[i]))
        frac = (v[i] + 1) / 2
        var = np.exp(frac * np.log(beta) + (1 - frac) * np.log(beta_tilde_t))
        if ti > 0:
            nats = np.log(np.sqrt(var) / np.sqrt(beta_tilde_t)) + (beta_tilde_t + (mu_true - mu_theta) ** 2) / (2 * var) - 0.5
        else:
            sd = np.sqrt(var)
            upper, lower = norm.cdf((x0[i] + 1 / 255 - mu_theta) / sd), norm.cdf((x0[i] - 1 / 255 - mu_theta) / sd)
            p = np.where(x0[i] < -0.999, upper, np.where(x0[i] > 0.999, 1 - lower, upper - lower))
            nats = -np.log(np.maximum(p, 1e-12))
        out.append(nats.mean() / np.log(2))
    return torch.tensor(out)


def test_learned_sigma_vb_term_matches_improved_ddpm():
    obj = DDPMObjective(2, True, "epsilon")
    x0 = _x0()
    gen = torch.Generator().manual_seed(3)
    eps, v = torch.randn(4, 2, 3, 3, generator=gen), torch.rand(4, 2, 3, 3, generator=gen) * 2 - 1
    t = torch.tensor([0, 1, 500, 999])
    noise = torch.randn(x0.shape, generator=gen)
    a = torch.tensor(ABAR[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    batch = Noised(x0, xt, t.float(), noise)
    got = obj.vb_bits(eps, v, batch).double()
    torch.testing.assert_close(got, _vb_reference(x0, xt, eps, v, t), rtol=2e-4, atol=1e-6)
    # A perfect epsilon with the true posterior variance (v = -1) has zero KL for t > 0.
    exact = obj.vb_bits(noise, -torch.ones_like(v), batch)
    assert torch.all(exact[1:].abs() < 1e-4) and exact[0] > 0


def test_hybrid_loss_keeps_the_mean_out_of_the_vb_term():
    """DiT's stop-gradient: epsilon channels learn from the MSE only, variance channels from L_vb only."""
    obj = objective_for(FlexiDiTConfig(in_channels=2, learn_sigma=True, prediction="epsilon"))
    batch = obj.noised(_x0(), torch.Generator().manual_seed(0))
    out = torch.randn(4, 4, 3, 3, requires_grad=True)
    obj.losses(out, batch).sum().backward()
    mse_grad = 2 * (out[:, :2] - batch.target) / out[0, :2].numel()
    torch.testing.assert_close(out.grad[:, :2], mse_grad.detach())
    assert out.grad[:, 2:].abs().sum() > 0


def test_objective_comes_from_the_config_and_refuses_unknown_pairs():
    assert isinstance(objective_for(FlexiDiTConfig(in_channels=1, learn_sigma=False, prediction="flow")), FlowObjective)
    assert objective_for(FlexiDiTConfig(learn_sigma=True)).name == "epsilon"
    with pytest.raises(UserError, match="learned sigma"):
        objective_for(FlexiDiTConfig(learn_sigma=True, prediction="flow"))


# ---- the paper's distribution-matching term -----------------------------------------------------

@pytest.mark.parametrize("prediction", ["flow", "epsilon", "v_prediction"])
def test_a_step_with_the_true_target_lands_on_the_forward_process(prediction):
    """Euler (flow) and DDIM (epsilon, v) steps driven by the exact target move x_u to x_u' of the same noise."""
    obj = objective_for(FlexiDiTConfig(in_channels=2, learn_sigma=False, prediction=prediction))
    x0, noise = _x0(), torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    u, u_next = 0.7, 0.45
    x, t = obj.forward_at(x0, noise, u)
    if prediction == "flow":
        assert torch.allclose(x, 0.3 * x0 + 0.7 * noise) and torch.allclose(t, torch.full((4,), 700.0))
        target = noise - x0
    else:
        k = round(0.7 * 999)
        assert torch.equal(t, torch.full((4,), float(k)))
        assert torch.allclose(x, np.sqrt(ABAR[k]) * x0 + np.sqrt(1 - ABAR[k]) * noise, atol=1e-6)
        target = noise if prediction == "epsilon" else np.sqrt(ABAR[k]) * noise - np.sqrt(1 - ABAR[k]) * x0
    want = obj.forward_at(x0, noise, u_next)[0]
    assert torch.allclose(obj.step(target.float(), x, u, u_next), want, atol=1e-5)


def test_mmd_matches_the_unbiased_estimator_written_with_scipy():
    from scipy.spatial.distance import cdist

    from flexisearch.training.objectives import mmd2

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 2, 2, generator=gen), torch.randn(7, 2, 2, generator=gen) + 0.5
    pa, pb = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    pooled = np.concatenate([pa, pb])
    d2 = cdist(pooled, pooled, "sqeuclidean")
    off = np.sort(d2[~np.eye(13, dtype=bool)])
    h = off[(len(off) - 1) // 2]  # the lower median, as torch.median
    k = sum(np.exp(-d2 / (2 * w * w * h)) for w in (0.5, 1.0, 2.0))
    kaa, kbb, kab = k[:6, :6], k[6:, 6:], k[:6, 6:]
    want = ((kaa.sum() - np.trace(kaa)) / 30 + (kbb.sum() - np.trace(kbb)) / 42 - 2 * kab.mean())
    assert abs(float(mmd2(a, b)) - want) < 1e-5
    same = torch.randn(64, 4, generator=gen)
    assert abs(float(mmd2(same[:32], same[32:]))) < float(mmd2(a, b))  # one distribution: about 0


def test_distribution_matching_trains_through_the_weak_and_the_native_step(tiny_model):
    from flexisearch.training.objectives import distribution_matching_loss

    model = tiny_model.train()
    obj = objective_for(model.config)
    x0, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = distribution_matching_loss(model, obj, x0, y, 2, 4, torch.Generator().manual_seed(0))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert loss.isfinite() and grads["x_embedder.residual.4"].abs().sum() > 0  # the weak step
    assert grads["x_embedder.proj.weight"].abs().sum() > 0 and grads["blocks.0.attn.qkv.weight"].abs().sum() > 0
