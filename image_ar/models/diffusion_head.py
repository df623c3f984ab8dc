"""MAR's per-token diffusion head: a small MLP with AdaLN blocks that models p(x | z) for one continuous token.

Li et al. 2024, "Autoregressive Image Generation without Vector Quantization" (arXiv:2406.11838), section 3 and the
reference's ``models/diffloss.py`` (``SimpleMLPAdaLN``): the noisy token x goes through ``input_proj``, the
condition is ``time_embed(t) + cond_embed(z)``, residual blocks modulate a LayerNorm with (shift, scale, gate) from
the condition (Peebles & Xie 2023, DiT's AdaLN-Zero), and the final layer predicts [eps, v] (2C channels: noise and
the learned variance's interpolation value). Parameter names follow the reference, so ``diffloss.net.*`` of a MAR
checkpoint loads into :class:`DiffusionHead` as is.

:class:`TokenDiffusion` pairs the head with the respaced DDPM (:mod:`.diffusion`) and adds classifier-free guidance
on eps: the head runs on [z_cond; z_uncond] at the *same* x and the guided eps is ``u + s (c - u)``; the variance is
the conditional half's. (MAR's own sampler lets the unconditional half follow its own noisy chain; that makes the
conditional chain depend on a hidden second chain, so its density would not be computable. Ours is a Markov chain
in x alone.)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mmspec.errors import InvalidInputError

from .diffusion import GaussianDiffusion, Trajectory


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (integer) timestep -> MLP (the reference's layout: cos half, then sin half)."""

    def __init__(self, channels: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiffusionHead(nn.Module):
    """forward(x (N, C), t (N,), z (N, Z)) -> (N, 2C) = [eps, v] (the reference's SimpleMLPAdaLN)."""

    def __init__(self, in_channels: int, model_channels: int, z_channels: int, num_res_blocks: int):
        super().__init__()
        self.in_channels, self.z_channels = in_channels, z_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, 2 * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, N(0, 0.02) timestep MLP, zero AdaLN modulations and output (AdaLN-Zero, as MAR)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x.to(self.input_proj.weight.dtype))
        y = self.time_embed(t) + self.cond_embed(z.to(h.dtype))
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y).float()


class TokenDiffusion(nn.Module):
    """The head (``net``) plus its sampler: sample tokens, score trajectories, training loss.

    Conditions ``z`` are (B, Z) without guidance or (B, 2Z) = [cond | uncond] with it; ``scale`` is a float or a
    (B,) tensor of per-token guidance scales (MAR's linear CFG schedule gives each position its own).
    """

    def __init__(self, token_dim: int, z_channels: int, width: int, depth: int, train_steps: int = 1000,
                 sampling_steps: int = 100, noise_schedule: str = "cosine"):
        super().__init__()
        self.net = DiffusionHead(token_dim, width, z_channels, depth)
        self.diffusion = GaussianDiffusion(train_steps, sampling_steps, noise_schedule)

    @property
    def token_dim(self) -> int:
        return self.net.in_channels

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_steps

    def set_sampling_steps(self, steps: int) -> None:
        d = self.diffusion
        self.diffusion = GaussianDiffusion(d.train_steps, steps, d.noise_schedule)

    def eps_fn(self, z: torch.Tensor, scale=1.0):
        """The guided model output as a function of (x, t), for rows of z (N, Z or 2Z)."""
        zdim = self.net.z_channels
        if z.shape[-1] not in (zdim, 2 * zdim):
            raise InvalidInputError(f"head condition has {z.shape[-1]} channels; expected {zdim} (or {2 * zdim} = "
                                    "[cond | uncond] with guidance)")
        if z.shape[-1] == zdim:
            return lambda x, t: self.net(x, t, z)
        zc, zu = z[:, :zdim], z[:, zdim:]
        s = torch.as_tensor(scale, dtype=torch.float32, device=z.device).reshape(-1, 1)

        def guided(x, t):
            out = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([zc, zu]))
            (eps_c, v), (eps_u, _) = (h.chunk(2, dim=-1) for h in out.chunk(2))
            return torch.cat([eps_u + s * (eps_c - eps_u), v], dim=-1)

        return guided

    @torch.no_grad()
    def sample(self, z: torch.Tensor, x_T: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0,
               scale=1.0) -> Trajectory:
        """Denoise one token per row of z from x_T (N, C) with per-step noise (N, S, C)."""
        return self.diffusion.sample_loop(self.eps_fn(z, scale), x_T, noise, temperature)

    @torch.no_grad()
    def log_prob(self, z: torch.Tensor, states: torch.Tensor, temperature: float = 1.0, scale=1.0) -> torch.Tensor:
        """(N,) log density of chains (N, S + 1, C) given x_T under this head with conditions z (N, ...)."""
        s = states.shape[1] - 1
        per = torch.as_tensor(scale, dtype=torch.float32, device=z.device).reshape(-1)
        per = per.expand(len(z)) if per.numel() == 1 else per
        fn = self.eps_fn(z.repeat_interleave(s, 0), per.repeat_interleave(s, 0))
        return self.diffusion.trajectory_log_prob(fn, states, temperature)

    def loss(self, z: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean training loss for tokens x0 (N, C) under conditions z (N, Z): random timestep and noise per row."""
        n = x0.shape[0]
        dev = x0.device
        t = torch.randint(0, self.diffusion.train_steps, (n,), generator=generator, device=dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev)
        return self.diffusion.training_loss(lambda x, tt: self.net(x, tt, z), x0, t, noise).mean()
