"""Policy/value networks: IMPALA-CNN for pixel observations (the authors' agent.py; README "Fidelity"), an MLP for vector ones."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from learners.config import PRECISIONS


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x
        x = self.conv0(torch.relu(x))
        x = self.conv1(torch.relu(x))
        return x + inputs


class ConvSequence(nn.Module):
    """conv3x3 -> maxpool 3/2 -> 2 residual blocks."""

    def __init__(self, in_shape: tuple[int, int, int], out_channels: int):
        super().__init__()
        self.in_shape = in_shape
        self.out_channels = out_channels
        self.conv = nn.Conv2d(in_shape[0], out_channels, kernel_size=3, padding=1)
        self.res_block0 = ResidualBlock(out_channels)
        self.res_block1 = ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = self.res_block0(x)
        return self.res_block1(x)

    def output_shape(self) -> tuple[int, int, int]:
        _, h, w = self.in_shape
        return self.out_channels, (h + 1) // 2, (w + 1) // 2


class ImpalaEncoder(nn.Module):
    """uint8 HWC frames -> 256 features."""

    def __init__(self, obs_shape: tuple[int, int, int], channels: tuple[int, ...] = (16, 32, 32), features: int = 256):
        super().__init__()
        h, w, c = obs_shape
        shape = (c, h, w)
        stages = []
        for out_channels in channels:
            stage = ConvSequence(shape, out_channels)
            shape = stage.output_shape()
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        # PyTorch's default init, as the authors' model (agent.py): orthogonal sqrt(2) makes the initial features
        # ~2.3x larger on real frames, which changes the early KL and entropy terms.
        self.fc = nn.Linear(int(np.prod(shape)), features)
        self.out_features = features

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.permute(0, 3, 1, 2).float() / 255.0  # scale on the fly: rollouts stay uint8
        x = self.stages(x)
        x = torch.relu(torch.flatten(x, start_dim=1))
        return torch.relu(self.fc(x))


class MlpEncoder(nn.Module):
    def __init__(self, obs_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
        )
        self.out_features = hidden

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float())


class Agent(nn.Module):
    """Encoder -> policy logits and state value.

    With precision bf16 the encoder (nearly all the compute) runs under bfloat16 autocast, on CPU as on CUDA; the
    weights, their gradients and Adam's state stay fp32, and the two small heads run in fp32 on fp32 features, so
    log-probabilities and values keep fp32 resolution for the PPO ratio and the value loss."""

    def __init__(self, encoder: nn.Module, num_actions: int, precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.encoder = encoder
        self.actor = layer_init(nn.Linear(encoder.out_features, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(encoder.out_features, 1), std=1.0)
        self.precision = precision

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(obs.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            hidden = self.encoder(obs)
        return hidden.float()

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.features(obs)
        return self.actor(hidden), self.critic(hidden).squeeze(-1)

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.features(obs))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): without it PyTorch's CPU convolutions take
    a slow reference path in bf16 (measured ~10x slower than fp32 on an AVX2-only EPYC)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def warn_if_emulated_bf16(precision: str, device: str, who: str) -> None:
    if precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
        logging.getLogger("mdpo").warning(
            "%s: --precision bf16 on a CPU without AVX512-BF16/AMX runs the network far slower than fp32; "
            "use --precision fp32 here (bf16 pays on GPUs and on CPUs with native bf16)", who)


def make_agent(obs_shape: tuple[int, ...], obs_dtype: str, num_actions: int, precision: str = "fp32") -> Agent:
    """IMPALA-CNN for uint8 images (H, W, C), MLP for flat vectors."""
    if len(obs_shape) == 3 and np.dtype(obs_dtype) == np.uint8:
        return Agent(ImpalaEncoder(tuple(obs_shape)), num_actions, precision)
    if len(obs_shape) == 1:
        return Agent(MlpEncoder(obs_shape[0]), num_actions, precision)
    raise ValueError(f"no network for observations of shape {obs_shape} and dtype {obs_dtype}: "
                     "expected uint8 images (H, W, C) or flat vectors (D,)")


def sample_actions(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One action per row of logits, drawn with `generator` (rollouts and evaluation reproduce from their seed)."""
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
