"""A small Vision Transformer (Dosovitskiy et al. 2021) for 32x32 images.

Patch embedding is a strided ``Conv2d`` (4x4 patches give 64 tokens), followed by a
learnable class token and position embedding, ``depth`` pre-norm transformer
blocks and a final LayerNorm; the class token is classified by a linear ``head``.

The modules are written for structured pruning: :class:`Attention` keeps its
shape in the ``num_heads`` / ``head_dim`` attributes and its forward derives every
size from them, so a pruner may remove heads (or head channels) from ``qkv`` and
``proj`` and update those attributes. The softmax scale is stored in ``scale``
(``head_dim ** -0.5`` of the unpruned model) and is deliberately left unchanged by
such pruning. The forward passes avoid tensor unpacking so the whole model is
traceable with ``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.models.registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection.

    ``qkv`` outputs ``[q | k | v]``, each block laid out head-major
    (``num_heads`` groups of ``head_dim`` channels); ``proj`` maps the
    concatenated heads back to the embedding dimension.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[0], x.shape[1]
        inner = self.num_heads * self.head_dim
        # (B, N, 3*H*D) -> (3, B, H, N, D)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, inner)
        return self.proj(out)


class Mlp(nn.Module):
    """Two-layer feed-forward network: ``fc1`` -> ``act`` (GELU) -> ``fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, max(1, int(round(dim * mlp_ratio))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Vision Transformer with a class token, for small images.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input image.
        image_size: side of the (square) input image.
        patch_size: side of the square patches; must divide ``image_size``.
        dim: embedding dimension.
        depth: number of transformer blocks.
        heads: attention heads per block; must divide ``dim``.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model(
    "vit_tiny",
    family="vit",
    input_size=(3, 32, 32),
    tiny_kwargs={"dim": 32, "depth": 2, "heads": 2},
)
def vit_tiny(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    patch_size: int = 4,
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: float = 2.0,
):
    """Small Vision Transformer for 32x32 images (4x4 patches, dim 192, 6 blocks, 3 heads)."""
    return VisionTransformer(num_classes, in_channels, image_size, patch_size, dim, depth, heads, mlp_ratio)
