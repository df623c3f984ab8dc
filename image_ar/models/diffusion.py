"""Gaussian diffusion for one continuous token: the DDPM schedule MAR's diffusion head samples with.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Nichol & Dhariwal 2021, "Improved Denoising Diffusion
Probabilistic Models" (cosine schedule, learned variance interpolated between beta_t and the posterior variance,
timestep respacing); MAR (Li et al. 2024, arXiv:2406.11838) uses 1000 training steps, the cosine schedule, learned
sigma and 100 respaced sampling steps.

Every sampling step here is an explicit Gaussian transition ``x_{s-1} ~ N(mean_s(x_s), sigma_s^2 I)`` with
``sigma_s = temperature * exp(logvar_s / 2)``, and every random draw can be supplied from outside (``x_T`` and one
noise vector per step). That is what lets two models walk the *same* trajectory and what makes the trajectory's
density computable (``trajectory_log_prob``), the basis of CSpD (ALGORITHMS.md section 6).

One deliberate difference from the reference sampler (guided-diffusion's ``p_sample_loop``): the last step
(``t = 0``) adds noise at the model's own variance there instead of returning the mean. A deterministic last step
makes the token a function of ``x_1`` that differs between two models, so no draft token could ever be accepted as
is; with the noisy last step every token is the endpoint of a Gaussian chain. The extra noise is small (its std is
``exp(logvar_0 / 2)``, about 0.02-0.05 for the cosine schedule at 100 steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmspec.errors import InvalidInputError

SCHEDULES = ("cosine", "linear")


def make_betas(schedule: str, steps: int) -> torch.Tensor:
    """beta_t for t = 0..steps-1 (float64): Nichol & Dhariwal's cosine schedule or DDPM's linear one (scaled to
    the number of steps)."""
    if schedule == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    if schedule == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                             for i in range(steps)], dtype=torch.float64)
    raise InvalidInputError(f"noise_schedule={schedule!r}: expected one of {SCHEDULES}")


def respaced_steps(train_steps: int, sampling_steps: int) -> list[int]:
    """Evenly spaced original timesteps kept for sampling (guided-diffusion's space_timesteps with one section)."""
    if not (isinstance(sampling_steps, int) and 1 <= sampling_steps <= train_steps):
        raise InvalidInputError(f"sampling_steps={sampling_steps!r}: must be an int in [1, {train_steps}]")
    if sampling_steps == 1:
        return [0]
    stride = (train_steps - 1) / (sampling_steps - 1)
    return sorted({round(i * stride) for i in range(sampling_steps)})


@dataclass
class Trajectory:
    """A sampled denoising chain for a batch of tokens.

    states: (B, S + 1, C) = x_T, ..., x_0 (the token is ``states[:, -1]``). log_prob: (B,) log density of the chain
    given x_T under the model that sampled it (sum over steps of the Gaussian transition log densities)."""

    states: torch.Tensor
    log_prob: torch.Tensor

    @property
    def tokens(self) -> torch.Tensor:
        return self.states[:, -1]


class GaussianDiffusion:
    """A respaced DDPM over C-dim vectors with a learned-range variance (the model outputs [eps, v])."""

    def __init__(self, train_steps: int = 1000, sampling_steps: int = 100, noise_schedule: str = "cosine"):
        self.train_steps, self.noise_schedule = train_steps, noise_schedule
        base = make_betas(noise_schedule, train_steps)
        self.train = _Coefficients(base)
        self.timesteps = respaced_steps(train_steps, sampling_steps)  # original index of each sampling step
        abar = torch.cumprod(1 - base, 0)[self.timesteps]
        self.sample = _Coefficients(1 - abar / torch.cat([abar.new_ones(1), abar[:-1]]))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def model_timesteps(self, device=None) -> torch.Tensor:
        """(S,) the original timestep the model sees at sampling step s (s = 0 is the last step taken)."""
        return torch.tensor(self.timesteps, dtype=torch.long, device=device)

    # --- one reverse step ---------------------------------------------------------------------------------------
    def mean_logvar(self, model_out: torch.Tensor, x: torch.Tensor, step: torch.Tensor,
                    coeffs: "_Coefficients | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse-step Gaussian from the model output (..., 2C) = [eps, v] at x (..., C) and step index (...,):
        mean (..., C) and log variance (..., C) (diagonal: the head predicts one v per channel)."""
        c = coeffs or self.sample
        eps, v = model_out.float().chunk(2, dim=-1)
        g = lambda t: t.to(x.device, torch.float32)[step].unsqueeze(-1)  # noqa: E731
        x0 = g(c.sqrt_recip_abar) * x - g(c.sqrt_recipm1_abar) * eps
        mean = g(c.coef1) * x0 + g(c.coef2) * x
        frac = (v + 1) / 2
        logvar = frac * g(c.log_beta) + (1 - frac) * g(c.log_post_var)
        return mean, logvar

    # --- sampling -----------------------------------------------------------------------------------------------
    def sample_loop(self, eps_fn, x_T: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0) -> Trajectory:
        """Denoise x_T (B, C) with per-step noise (B, S, C) (noise[:, i] is used at the i-th step taken).

        eps_fn(x (B, C), t (B,) original timesteps) -> model output (B, 2C) (guidance already applied)."""
        b, s = x_T.shape[0], self.num_steps
        if noise.shape != (b, s, x_T.shape[1]):
            raise InvalidInputError(f"noise must be (B, S, C) = ({b}, {s}, {x_T.shape[1]}); got {tuple(noise.shape)}")
        x, states, logp = x_T.float(), [x_T.float()], x_T.new_zeros(b, dtype=torch.float32)
        times = self.model_timesteps(x_T.device)
        for i, step in enumerate(reversed(range(s))):
            idx = torch.full((b,), step, dtype=torch.long, device=x.device)
            mean, logvar = self.mean_logvar(eps_fn(x, times[idx]), x, idx)
            std = temperature * torch.exp(0.5 * logvar)
            x = mean + std * noise[:, i]
            logp = logp + gaussian_log_prob_std(noise[:, i], std)
            states.append(x)
        return Trajectory(torch.stack(states, 1), logp)

    def trajectory_log_prob(self, eps_fn, states: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log density (B,) of given chains (B, S + 1, C) under a model, conditional on x_T: every step's Gaussian
        evaluated at the next state, all steps in one batched model call."""
        b, s1, c = states.shape
        s = s1 - 1
        if s != self.num_steps:
            raise InvalidInputError(f"trajectories have {s} steps; this schedule samples with {self.num_steps}")
        step = torch.arange(s - 1, -1, -1, device=states.device).repeat(b)  # (B*S,) step index of each transition
        x = states[:, :-1].reshape(b * s, c)
        mean, logvar = self.mean_logvar(eps_fn(x, self.model_timesteps(states.device)[step]), x, step)
        std = temperature * torch.exp(0.5 * logvar)
        return gaussian_log_prob(states[:, 1:].reshape(b * s, c), mean, std).view(b, s).sum(1)

    # --- training -----------------------------------------------------------------------------------------------
    def training_loss(self, model_fn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,): eps MSE + the variational bound term for the variance (Nichol & Dhariwal's hybrid
        loss; the bound sees the mean through a stop-gradient). model_fn(x_t, t) -> (B, 2C)."""
        c = self.train
        g = lambda v: v.to(x0.device, torch.float32)[t].unsqueeze(-1)  # noqa: E731
        x_t = g(c.sqrt_abar) * x0 + g(c.sqrt_1m_abar) * noise
        out = model_fn(x_t, t)
        eps, v = out.float().chunk(2, dim=-1)
        mse = ((eps - noise) ** 2).mean(-1)
        mean, logvar = self.mean_logvar(torch.cat([eps.detach(), v], -1), x_t, t, coeffs=c)
        true_mean = g(c.coef1) * x0 + g(c.coef2) * x_t
        kl = normal_kl(true_mean, g(c.log_post_var), mean, logvar).mean(-1)
        nll = -gaussian_log_prob(x0, mean, torch.exp(0.5 * logvar)) / x0.shape[-1]
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        return mse + vb


class _Coefficients:
    """Per-step constants of a DDPM with the given betas (float64 maths, stored as float32)."""

    def __init__(self, betas: torch.Tensor):
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        f = lambda t: t.float()  # noqa: E731
        self.betas = f(betas)
        self.log_beta = f(torch.log(betas))
        self.sqrt_abar, self.sqrt_1m_abar = f(abar.sqrt()), f((1 - abar).sqrt())
        self.sqrt_recip_abar, self.sqrt_recipm1_abar = f((1 / abar).sqrt()), f((1 / abar - 1).sqrt())
        # log of the posterior variance, clipped at t = 0 (where it is 0) to its value at t = 1
        self.log_post_var = f(torch.log(torch.cat([post_var[1:2], post_var[1:]]) if len(betas) > 1 else betas))
        self.coef1 = f(betas * abar_prev.sqrt() / (1 - abar))
        self.coef2 = f((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(std^2)) summed over the last dim; std broadcasts ((..., 1) for isotropic)."""
    return gaussian_log_prob_std((x - mean) / std, std)


def gaussian_log_prob_std(z: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log density of x = mean + std * z at that x, from the standardised residual z: sum over the last dim."""
    std = std.expand_as(z)
    return (-0.5 * z.pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))
