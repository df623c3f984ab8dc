"""The diffusion head and its sampler: trajectory densities against a direct Gaussian computation, external noise,
guidance, respacing and training."""
import math

import pytest
import torch
from torch.distributions import Normal

from image_ar.models.diffusion import GaussianDiffusion, make_betas, respaced_steps
from image_ar.models.diffusion_head import TokenDiffusion
from mmspec.errors import InvalidInputError


def random_head(token_dim=3, z=5, steps=6, seed=0, scale_out=0.05):
    torch.manual_seed(seed)
    head = TokenDiffusion(token_dim, z, width=16, depth=2, train_steps=100, sampling_steps=steps,
                          noise_schedule="linear")
    with torch.no_grad():  # AdaLN-Zero init outputs zeros: give every layer random weights
        for p in head.parameters():
            p.normal_(0, scale_out)
    return head


def direct_log_prob(head, z, states, temperature=1.0):
    """Step by step with torch.distributions and the reference formulas written out (no batching tricks)."""
    d = head.diffusion
    c = d.sample
    total = torch.zeros(states.shape[0], dtype=torch.float64)
    for j in range(d.num_steps):
        step = d.num_steps - 1 - j
        x = states[:, j]
        t = torch.full((len(x),), d.timesteps[step], dtype=torch.long)
        eps, v = head.net(x, t, z).double().chunk(2, -1)
        abar = torch.cumprod(1 - c.betas.double(), 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        x0 = (x.double() - (1 - abar[step]).sqrt() * eps) / abar[step].sqrt()
        beta = c.betas.double()[step]
        mean = (beta * abar_prev[step].sqrt() / (1 - abar[step])) * x0 + \
               ((1 - abar_prev[step]) * (1 - beta).sqrt() / (1 - abar[step])) * x.double()
        post = c.betas.double() * (1 - abar_prev) / (1 - abar)
        min_log = math.log(post[1] if step == 0 else post[step])
        logvar = (v + 1) / 2 * math.log(beta) + (1 - (v + 1) / 2) * min_log
        std = temperature * torch.exp(0.5 * logvar)
        total += Normal(mean, std).log_prob(states[:, j + 1].double()).sum(-1)
    return total


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trajectory_density_matches_direct_gaussian(temperature):
    head = random_head()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 5, generator=g)
    x_T, noise = torch.randn(4, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    traj = head.sample(z, x_T, noise, temperature=temperature)
    want = direct_log_prob(head, z, traj.states, temperature)
    assert traj.states.shape == (4, 7, 3) and torch.equal(traj.states[:, 0], x_T)
    torch.testing.assert_close(traj.log_prob.double(), want, rtol=1e-3, atol=5e-3)
    torch.testing.assert_close(head.log_prob(z, traj.states, temperature).double(), want, rtol=1e-3, atol=5e-3)
    # another model's density of the same chain is a different number (the test can fail)
    other = random_head(seed=3)
    assert not torch.allclose(other.log_prob(z, traj.states, temperature).double(), want, atol=1e-2)


def test_external_noise_reproduces_the_chain_and_fresh_noise_changes_it():
    head = random_head()
    g = torch.Generator().manual_seed(2)
    z, x_T, noise = torch.randn(2, 5, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 6, 3, generator=g)
    a, b = head.sample(z, x_T, noise), head.sample(z, x_T, noise)
    assert torch.equal(a.states, b.states)
    c = head.sample(z, x_T, torch.randn(2, 6, 3, generator=g))
    assert not torch.allclose(a.tokens, c.tokens)


def test_guidance_is_on_eps_at_the_same_x_with_the_conditional_variance():
    head = random_head()
    g = torch.Generator().manual_seed(4)
    zc, zu = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    x, t = torch.randn(3, 3, generator=g), torch.tensor([0, 10, 99])
    out = head.eps_fn(torch.cat([zc, zu], -1), 2.5)(x, t)
    ec, vc = head.net(x, t, zc).chunk(2, -1)
    eu, _ = head.net(x, t, zu).chunk(2, -1)
    torch.testing.assert_close(out, torch.cat([eu + 2.5 * (ec - eu), vc], -1))
    per_row = head.eps_fn(torch.cat([zc, zu], -1), torch.tensor([1.0, 2.5, 4.0]))(x, t)
    torch.testing.assert_close(per_row[1], out[1])
    torch.testing.assert_close(per_row[0], head.net(x, t, zc)[0])
    with pytest.raises(InvalidInputError, match="channels"):
        head.eps_fn(torch.randn(3, 7))


def test_guided_density_matches_sampling():
    head = random_head()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 10, generator=g)
    scale = torch.tensor([1.5, 3.0, 1.0])
    traj = head.sample(z, torch.randn(3, 3, generator=g), torch.randn(3, 6, 3, generator=g), scale=scale)
    torch.testing.assert_close(head.log_prob(z, traj.states, scale=scale), traj.log_prob, rtol=1e-3, atol=5e-3)


def test_schedules_and_respacing():
    b = make_betas("cosine", 1000)
    assert b.shape == (1000,) and float(b.max()) <= 0.999 and float(b.min()) > 0
    assert respaced_steps(1000, 100)[:3] == [0, 10, 20] and respaced_steps(1000, 100)[-1] == 999
    assert len(respaced_steps(1000, 100)) == 100
    d = GaussianDiffusion(1000, 1000)
    torch.testing.assert_close(d.sample.betas, d.train.betas)  # no respacing: the same chain
    d10 = GaussianDiffusion(1000, 10)
    abar = torch.cumprod(1 - d.train.betas.double(), 0)[d10.timesteps]
    torch.testing.assert_close(torch.cumprod(1 - d10.sample.betas.double(), 0), abar, rtol=1e-5, atol=1e-7)
    for bad in (0, 1001, 2.5):
        with pytest.raises(InvalidInputError, match="sampling_steps"):
            GaussianDiffusion(1000, bad)
    with pytest.raises(InvalidInputError, match="noise_schedule"):
        GaussianDiffusion(1000, 10, "quadratic")


def test_training_reduces_the_loss_on_a_two_cluster_target():
    torch.manual_seed(0)
    head = TokenDiffusion(2, 4, width=32, depth=2, train_steps=100, sampling_steps=20, noise_schedule="linear")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)

    def batch():
        lab = torch.randint(0, 2, (256,), generator=g)
        z = torch.nn.functional.one_hot(lab, 4).float()
        x0 = torch.where(lab[:, None] == 0, torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0]))
        return z, x0 + 0.05 * torch.randn(256, 2, generator=g)

    z, x0 = batch()
    with torch.no_grad():
        first = float(head.loss(z, x0, torch.Generator().manual_seed(9)))
    for _ in range(400):
        z, x0 = batch()
        loss = head.loss(z, x0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z, x0 = batch()
    with torch.no_grad():
        assert float(head.loss(z, x0, torch.Generator().manual_seed(9))) < 0.5 * first
    z = torch.nn.functional.one_hot(torch.zeros(200, dtype=torch.long), 4).float()
    out = head.sample(z, torch.randn(200, 2, generator=g), torch.randn(200, 20, 2, generator=g)).tokens
    assert (out - torch.tensor([1.0, -1.0])).norm(dim=-1).median() < 0.3  # samples land on the class's cluster
