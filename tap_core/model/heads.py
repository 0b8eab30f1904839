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


# AdamW moves every parameter by about the learning rate per step, whatever its gradient's scale; the canvas
# is a logit per pixel that must travel several units (grey -> white background), so it is stored divided by
# this gain: in effect a learning rate CANVAS_GAIN times higher for the canvas alone.
CANVAS_GAIN = 32.0


class ImageDecoderHead(nn.Module):
    """Pooled features -> an image (B, 3, S, S) in [0, 1].

    A linear map to a small seed grid (at most 8x8), then 2x transposed
    convolutions, halving the channels each time, added to a learned per-pixel
    *canvas* before the sigmoid. Its size grows with log(S), not S^2 (the canvas
    is 3 x S x S): a 224x224 decoder from width 768 has ~5M parameters, not ~80M.
    The canvas learns the typical image in a few steps (every pixel gets its own
    gradient), so the convolutions spend their steps on what differs per image.
    """

    def __init__(self, width: int, image_size: int):
        super().__init__()
        ups = max(2, math.ceil(math.log2(image_size / 8)))
        if image_size % (1 << ups):
            raise ValueError(f"image_size {image_size} must be divisible by {1 << ups} for the image decoder")
        self.seed_size = image_size >> ups
        self.channels = min(128, 8 << ups)
        self.seed = nn.Linear(width, self.channels * self.seed_size**2)
        layers: list[nn.Module] = []
        channels = self.channels
        for i in range(ups):
            out = 3 if i == ups - 1 else max(channels // 2, 8)
            layers.append(nn.ConvTranspose2d(channels, out, kernel_size=4, stride=2, padding=1))
            if i < ups - 1:
                layers.append(nn.GELU())
            channels = out
        self.up = nn.Sequential(*layers)
        self.canvas = nn.Parameter(torch.zeros(3, image_size, image_size))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.seed(z).view(-1, self.channels, self.seed_size, self.seed_size)
        return torch.sigmoid(self.up(F.gelu(x)) + CANVAS_GAIN * self.canvas)


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

    def forward(self, z: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V); with a boolean ``positions`` mask (B, T), only those rows: (N, V).

        Training only needs the target positions (an answer is often 1-2 of 8), and the
        vocabulary projection is the head's most expensive step.
        """
        h = self.positions.unsqueeze(0) + self.condition(z).unsqueeze(1)
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        h = h + self.ffn(self.norm2(h))
        if positions is not None:
            h = h[positions]
        e = F.normalize(self.to_embedding(self.norm_out(h)), dim=-1) * self.log_scale.exp()
        return F.linear(e, self.output_embeddings, self.vocab_bias)  # one fused matmul + bias over the vocabulary
