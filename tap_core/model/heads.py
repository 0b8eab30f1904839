"""Task heads (``head.<task>`` components): pooled features (B, D) -> task output."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationHead(nn.Module):
    """MLP classifier -> logits (B, num_labels)."""

    def __init__(self, width: int, num_labels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, num_labels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden(self.norm(z))))


class ImageDecoderHead(nn.Module):
    """Pooled features -> an image (B, 3, S, S) in [0, 1]: linear seed map + two 2x up-convolutions."""

    def __init__(self, width: int, image_size: int, channels: int = 32):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size {image_size} must be divisible by 4 for the image decoder")
        self.channels = channels
        self.seed_size = image_size // 4
        self.seed = nn.Linear(width, channels * self.seed_size**2)
        self.up1 = nn.ConvTranspose2d(channels, channels // 2, kernel_size=4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(channels // 2, 3, kernel_size=4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.seed(z).view(-1, self.channels, self.seed_size, self.seed_size)
        x = F.gelu(self.up1(F.gelu(x)))
        return torch.sigmoid(self.up2(x))


class TextDecoderHead(nn.Module):
    """Position queries conditioned on the pooled features -> vocabulary logits (B, T, V).

    Non-autoregressive: each of ``max_len`` learned position queries is offset by
    a projection of the pooled features, the positions attend to each other, and
    the result is scored by cosine similarity (times a learned scale) against the
    backbone's frozen, normalised word embeddings: the full tokenizer vocabulary at
    the cost of a D x H matrix, not a D x V one. The sequence ends at the first [SEP].
    """

    def __init__(self, width: int, max_len: int, output_embeddings: torch.Tensor, num_heads: int):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.condition = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm_out = nn.LayerNorm(width)
        self.to_embedding = nn.Linear(width, output_embeddings.shape[1])
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.vocab_bias = nn.Parameter(torch.zeros(output_embeddings.shape[0]))
        # Frozen and shared with the backbone: a plain attribute, so it is no parameter or buffer of this head.
        self.__dict__["output_embeddings"] = output_embeddings

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.positions.unsqueeze(0) + self.condition(z).unsqueeze(1)
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        h = h + self.ffn(self.norm2(h))
        e = F.normalize(self.to_embedding(self.norm_out(h)), dim=-1) * self.log_scale.exp()
        return F.linear(e, self.output_embeddings, self.vocab_bias)  # one fused matmul + bias over the vocabulary
