"""LLaVA in plain PyTorch: a CLIP ViT encoder, a projector, a LLaMA/Vicuna decoder with a
KV cache, hand-written LoRA with named adapters, scalar heads, and checkpoint import/export.

    pixels -> CLIP ViT (up to layer `vision_select_layer`, CLS dropped) -> projector
           -> written into the <image> token positions of the prompt -> LLaMA -> logits

No transformers import here: weights load by explicit key mapping (see `_canonical_key`).
"""
import copy
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_NAME, FORMAT_VERSION = "factalign", 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used. str() is one line naming the file and the key."""


@dataclass
class ModelConfig:
    # vision tower (CLIP ViT)
    image_size: int = 336                 # input resolution in pixels
    patch_size: int = 14                  # ViT patch size (224/14 -> 256 tokens, 336/14 -> 576)
    vision_hidden: int = 1024             # CLIP width
    vision_intermediate: int = 4096       # CLIP MLP width
    vision_layers: int = 24               # layers in the CLIP checkpoint (only those up to the selected one are built)
    vision_heads: int = 16                # CLIP attention heads
    vision_select_layer: int = -2         # hidden_states index LLaVA reads (-2: output of the second-to-last layer)
    vision_select_feature: str = "patch"  # 'patch' drops CLS (LLaVA default), 'cls_patch' keeps it
    vision_eps: float = 1e-5              # CLIP LayerNorm epsilon
    # projector
    projector: str = "mlp2x_gelu"         # 'linear' (LLaVA-1, LLaVA-RLHF) or 'mlp2x_gelu' (LLaVA-1.5)
    # language model (LLaMA / Vicuna)
    vocab_size: int = 32064               # embedding rows
    hidden: int = 4096                    # model width
    intermediate: int = 11008             # SwiGLU width
    layers: int = 32                      # decoder layers
    heads: int = 32                       # query heads
    kv_heads: int = 32                    # key/value heads (< heads: grouped-query attention)
    head_dim: int = 0                     # 0 -> hidden // heads
    rms_eps: float = 1e-5                 # RMSNorm epsilon
    rope_theta: float = 10000.0           # RoPE base
    max_position: int = 4096              # longest sequence the model is meant for
    tie_embeddings: bool = False          # lm_head shares embed_tokens
    # special token ids
    image_token_id: int = 32000           # id that marks image-feature positions (llava-hf: <image>; original LLaVA: -200)
    pad_token_id: int = 32001             # padding id
    bos_token_id: int = 1                 # <s>
    eos_token_id: int = 2                 # </s>

    def __post_init__(self):
        for name in ("image_size", "patch_size", "vision_hidden", "vision_intermediate", "vision_layers", "vision_heads",
                     "vocab_size", "hidden", "intermediate", "layers", "heads", "kv_heads", "max_position"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CheckpointError(f"config: field '{name}': must be a positive integer, got {getattr(self, name)!r}")
        for name in ("vision_eps", "rms_eps", "rope_theta"):
            if not 0 < getattr(self, name) < float("inf"):
                raise CheckpointError(f"config: field '{name}': must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):  # (pad may name a row a caller never looks up)
            if isinstance(getattr(self, name), int) and getattr(self, name) >= self.vocab_size:
                raise CheckpointError(f"config: field '{name}': {getattr(self, name)} is beyond the {self.vocab_size} "
                                      "embedding rows (vocab_size)")
        if self.head_dim == 0:
            self.head_dim = self.hidden // self.heads
        if self.projector not in ("linear", "mlp2x_gelu"):
            raise CheckpointError(f"config: field 'projector': unknown projector '{self.projector}' (linear or mlp2x_gelu)")
        if self.vision_select_feature not in ("patch", "cls_patch"):
            raise CheckpointError(f"config: field 'vision_select_feature': '{self.vision_select_feature}' (patch or cls_patch)")
        if self.heads % self.kv_heads:
            raise CheckpointError(f"config: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self):
        return self.num_patches + (self.vision_select_feature == "cls_patch")

    @property
    def vision_layers_run(self):
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k
        s = self.vision_select_layer
        n = self.vision_layers + 1 + s if s < 0 else s
        if not 0 <= n <= self.vision_layers:
            raise CheckpointError(f"config: vision_select_layer {s} is out of range for {self.vision_layers} layers")
        return n


PRESETS = {
    # tests: milliseconds per step
    "tiny": dict(image_size=48, patch_size=16, vision_hidden=32, vision_intermediate=64, vision_layers=2,
                 vision_heads=2, projector="mlp2x_gelu", vocab_size=512, hidden=32, intermediate=64, layers=2,
                 heads=4, kv_heads=2, max_position=512),
    # the CPU demo on the Shapes world: 16 px patches aligned with the 3x3 grid cells
    "shapes": dict(image_size=48, patch_size=16, vision_hidden=128, vision_intermediate=512, vision_layers=3,
                   vision_heads=4, projector="mlp2x_gelu", vocab_size=512, hidden=128, intermediate=384, layers=3,
                   heads=4, kv_heads=4, max_position=512, rope_theta=1e6),
    # benchmarks on a CPU: big enough that matmuls dominate
    "bench": dict(image_size=112, patch_size=14, vision_hidden=256, vision_intermediate=1024, vision_layers=3,
                  vision_heads=4, projector="mlp2x_gelu", vocab_size=32064, hidden=512, intermediate=1408, layers=4,
                  heads=8, kv_heads=8, max_position=1024),
    # real dimensions (random weights), for benchmarks: CLIP ViT-L/14-336 + Vicuna-7B / 13B
    "llava-7b": dict(),
    "llava-13b": dict(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40),
}


# ----------------------------------------------------------------------------------------
# LoRA: W x + (alpha/r) * B(A(dropout(x))), several named adapters on one frozen base
# ----------------------------------------------------------------------------------------

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _embedding(n, dim):
    # an explicit weight skips nn.Embedding's own init, which under torch.device("meta") costs
    # seconds (a lazy torch import); LLaVA._init_weights initialises it on a real device
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


class LoRAAdapter(nn.Module):
    """One adapter's low-rank pairs for the output slices of one (possibly fused) linear."""

    def __init__(self, in_features, slice_sizes, r, alpha, dropout):
        super().__init__()
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, size in slice_sizes.items():
            a = torch.empty(r, in_features, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear / PEFT initialise A
            self.A[name] = nn.Parameter(a)
            self.B[name] = nn.Parameter(torch.zeros(size, r, dtype=torch.float32))  # B = 0: a new adapter changes nothing


class LoRALinear(nn.Module):
    """A linear layer whose output is the concatenation of named slices (a fused q|k|v or
    gate|up projection stores the HF matrices stacked). Adapters may target any subset of
    the slices; `active` names the adapter in use (None: the frozen base alone)."""

    def __init__(self, in_features, slices, bias=False):
        super().__init__()
        self.slices = dict(slices)  # name -> output size, in order
        out = sum(self.slices.values())
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None
        self.lora = nn.ModuleDict()
        self.active = None
        self.fused_lora = None  # (A, B, scale) of the active adapter while decoding (fuse_lora)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        adapter = self.lora[self.active] if self.active in self.lora else None
        if adapter is None:
            return y
        xd = adapter.dropout(x).to(torch.float32)  # LoRA math in fp32 even on a bf16 base
        names = [n for n in self.slices if n in adapter.A]
        A = adapter.A[names[0]] if len(names) == 1 else torch.cat([adapter.A[n] for n in names])
        u = (xd @ A.t() * adapter.scale).chunk(len(names), dim=-1)  # A x for every slice in one matmul, scaled
        parts = [u[names.index(n)] @ adapter.B[n].t() if n in adapter.A else xd.new_zeros(*xd.shape[:-1], size)
                 for n, size in self.slices.items()]
        return y + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(y.dtype)

    def fuse_lora(self):
        """For decoding, the active adapter as two matrices: A of every targeted slice stacked, and B
        block-diagonal (zero rows for untargeted slices), so W x + s B A x is two matmuls, not one per
        slice. The same products as forward (plus exact zeros). None when forward must run instead
        (no adapter, or dropout active)."""
        self.fused_lora = None
        adapter = self.lora[self.active] if self.active in self.lora else None
        if adapter is None or (adapter.training and not isinstance(adapter.dropout, nn.Identity)):
            return
        names = [n for n in self.slices if n in adapter.A]
        r = adapter.A[names[0]].shape[0]
        B = adapter.B[names[0]].new_zeros(sum(self.slices.values()), r * len(names))
        for n in names:
            a, b = self.slice_range(n)
            j = names.index(n)
            B[a:b, j * r:(j + 1) * r] = adapter.B[n]
        self.fused_lora = (torch.cat([adapter.A[n] for n in names]).detach(), B.detach(), adapter.scale)

    def decode(self, x):
        fused = self.fused_lora
        if fused is None:
            return self(x)
        A, B, scale = fused
        y = F.linear(x, self.weight, self.bias)
        return y + ((x.to(torch.float32) @ A.t() * scale) @ B.t()).to(y.dtype)

    def slice_range(self, name):
        start = 0
        for n, size in self.slices.items():
            if n == name:
                return start, start + size
            start += size
        raise KeyError(name)


# ----------------------------------------------------------------------------------------
# CLIP vision tower
# ----------------------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.vision_heads
        self.q_proj = nn.Linear(c.vision_hidden, c.vision_hidden)
        self.k_proj = nn.Linear(c.vision_hidden, c.vision_hidden)
        self.v_proj = nn.Linear(c.vision_hidden, c.vision_hidden)
        self.out_proj = nn.Linear(c.vision_hidden, c.vision_hidden)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c.vision_hidden, c.vision_intermediate)
        self.fc2 = nn.Linear(c.vision_intermediate, c.vision_hidden)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class CLIPLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.vision_hidden, eps=c.vision_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.vision_hidden, eps=c.vision_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.vision_hidden))
        self.patch_embedding = nn.Conv2d(3, c.vision_hidden, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = _embedding(c.num_patches + 1, c.vision_hidden)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(c) for _ in range(c.vision_layers_run))


class CLIPVision(nn.Module):
    """CLIP ViT returning hidden_states[select_layer] without CLS; later layers are never built."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embeddings = CLIPEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.vision_hidden, eps=c.vision_eps)  # sic, as in CLIP
        self.encoder = CLIPEncoder(c)

    def forward(self, pixels):
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:] if self.c.vision_select_feature == "patch" else x


class Projector(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.kind = c.projector
        self.linear_1 = nn.Linear(c.vision_hidden, c.hidden)
        if c.projector == "mlp2x_gelu":
            self.linear_2 = nn.Linear(c.hidden, c.hidden)

    def forward(self, x):
        x = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(F.gelu(x))  # exact (erf) GELU, as LLaVA-1.5
        return x


# ----------------------------------------------------------------------------------------
# LLaMA decoder
# ----------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()  # statistics in fp32, as LLaMA
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(c, position_ids, dtype):
    """cos and signed sin, (B, 1, T, head_dim), for RoPE at the given positions (computed in fp32).
    rotate_half(x) = cat(-x2, x1) = roll(x, head_dim/2) * [-1.., +1..]: the sign is folded into sin
    here, once per forward, so that apply_rope needs no negation and no cat."""
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=position_ids.device).float() / c.head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1).to(dtype)[:, None], torch.cat([-sin, sin], -1).to(dtype)[:, None]


def apply_rope(x, cos, sin):
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)  # x cos + rotate_half(x) sin


class KVCache:
    """Preallocated keys/values for incremental decoding: (B, kv_heads, max_len, head_dim) per layer.
    Zero-filled: the static decode step attends over all max_len slots with the unwritten ones masked
    (weight exactly 0), and 0 * garbage could be NaN."""

    def __init__(self, c, batch, max_len, device, dtype):
        shape = (batch, c.kv_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.layers)]
        self.length = 0  # positions filled so far (advanced by the model after each forward)


class DecodeState:
    """Everything the one-token decode step reads or writes, made once per generate call, so that a step
    allocates no positions, masks or cache and every tensor keeps its shape (what torch.compile and CUDA
    graphs need). Step i writes its key/value into cache slot prompt_len + i and attends over all slots:
    key_bias is 0 on real keys written so far, -inf on padding and on slots not written yet."""

    def __init__(self, c, cache, prompt_mask, prompt_len, max_new_tokens, dtype):
        k0 = cache.k[0]
        B, dev = k0.shape[0], k0.device
        self.cache = cache
        self.key_bias = torch.full((B, 1, 1, k0.shape[2]), float("-inf"), device=dev)  # fp32, as the scores
        if prompt_mask is None:
            self.key_bias[..., :prompt_len] = 0
            first = torch.full((B, 1), prompt_len, device=dev)
        else:  # left padding: pads stay masked; a row's first new token sits after its real tokens
            self.key_bias[..., :prompt_len].masked_fill_(prompt_mask.bool()[:, None, None], 0)
            first = prompt_mask.sum(-1, keepdim=True)
        positions = first + torch.arange(max_new_tokens, device=dev)  # (B, N) RoPE positions, made once
        self.cos, self.sin = rope_cos_sin(c, positions, dtype)          # (B, 1, N, head_dim)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)        # i, advanced in place
        self.slot = torch.full((1,), prompt_len, dtype=torch.long, device=dev)  # prompt_len + i

    def advance(self):
        self.step += 1
        self.slot += 1


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
        self.qkv_proj = LoRALinear(c.hidden, {"q": q, "k": kv, "v": kv})  # HF q/k/v stacked
        self.o_proj = LoRALinear(q, {"o": c.hidden})

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0, seq_lens=None):
        c, (B, T, _) = self.c, x.shape
        q, k, v = self.qkv_proj(x).split([c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], -1)
        q = apply_rope(q.view(B, T, c.heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        if cache is not None:
            start = cache.length
            cache.k[layer_idx][:, :, start:start + T] = k
            cache.v[layer_idx][:, :, start:start + T] = v
            k, v = cache.k[layer_idx][:, :, :start + T], cache.v[layer_idx][:, :, :start + T]
        gqa = c.heads != c.kv_heads
        if seq_lens is not None:  # packed sequences: causal attention within each one, never across
            parts = zip(q.split(seq_lens, 2), k.split(seq_lens, 2), v.split(seq_lens, 2))
            y = torch.cat([F.scaled_dot_product_attention(a, b, d, is_causal=True, enable_gqa=gqa)
                           for a, b, d in parts], 2)
        elif mask is None:  # no padding: the fast causal kernel (one new query sees every cached key: no mask)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def decode(self, x, cos, sin, k_cache, v_cache, slot, key_bias):
        """One new token per row (x: B, 1, hidden): its key/value written into `slot` of the static
        cache, attention over every slot with key_bias as the mask. Query head h reads key/value head
        h // (heads / kv_heads), as SDPA's enable_gqa. softmax(q k^T / sqrt(d) + bias) v in fp32."""
        c, B = self.c, x.shape[0]
        q, k, v = self.qkv_proj.decode(x).split([c.heads * c.head_dim, c.kv_heads * c.head_dim,
                                                 c.kv_heads * c.head_dim], -1)
        q = apply_rope(q.view(B, 1, c.heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, 1, c.kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        k_cache.index_copy_(2, slot, k)
        v_cache.index_copy_(2, slot, v.view(B, 1, c.kv_heads, c.head_dim).transpose(1, 2))
        q = q.reshape(B, c.kv_heads, c.heads // c.kv_heads, c.head_dim)  # query heads grouped by kv head
        scores = (q @ k_cache.transpose(-1, -2)).float() * c.head_dim ** -0.5 + key_bias
        y = torch.softmax(scores, -1).to(v_cache.dtype) @ v_cache     # (B, kv_heads, group, head_dim)
        return self.o_proj.decode(y.reshape(B, 1, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.inter = c.intermediate
        self.gate_up_proj = LoRALinear(c.hidden, {"gate": c.intermediate, "up": c.intermediate})  # HF gate/up stacked
        self.down_proj = LoRALinear(c.intermediate, {"down": c.hidden})

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU

    def decode(self, x):
        gate, up = self.gate_up_proj.decode(x).split(self.inter, dim=-1)
        return self.down_proj.decode(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.rms_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.rms_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0, seq_lens=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx, seq_lens)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, k_cache, v_cache, slot, key_bias):
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, k_cache, v_cache, slot, key_bias)
        return x + self.mlp.decode(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = _embedding(c.vocab_size, c.hidden)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.rms_eps)


class ScalarHead(nn.Module):
    """Reward / value head: one number per position from the last hidden state (fp32)."""

    def __init__(self, hidden):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden))  # zero init: a new value head predicts 0
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, h):
        return F.linear(h.float(), self.weight, self.bias).squeeze(-1)


@dataclass
class GenerateOutput:
    tokens: torch.Tensor    # (B, L) new tokens; after EOS: pad
    logprobs: torch.Tensor  # (B, L) log p(token) under the sampling temperature (0 after EOS), or None
    lengths: torch.Tensor   # (B,) new tokens up to and including EOS
    finished: torch.Tensor  # (B,) True where EOS was produced


# ----------------------------------------------------------------------------------------
# LLaVA
# ----------------------------------------------------------------------------------------

class LLaVA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.vision_tower = CLIPVision(c)
        self.projector = Projector(c)
        self.language_model = LlamaModel(c)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.hidden, c.vocab_size, bias=False)
        self.heads = nn.ModuleDict()     # scalar heads by name ('reward', 'value')
        self.adapters = {}               # adapter name -> dict(r, alpha, dropout, targets)
        self.active_adapter = None
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, LoRALinear)):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, CLIPEmbeddings):
            nn.init.normal_(m.class_embedding, std=0.02)
            # std 1 (CLIP's own init uses 0.02): trained from scratch on Shapes, positions must stand out
            # against the patch content at pre_layrnorm, or "where" is lost and per-cell colours blur.
            nn.init.normal_(m.position_embedding.weight, std=1.0)

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise CheckpointError(f"unknown model preset '{name}' (choose from {', '.join(PRESETS)})")
        return cls(ModelConfig(**{**PRESETS[name], **overrides}))

    # -- forward ------------------------------------------------------------------------

    def encode_images(self, pixel_values):
        """(N, 3, H, W) normalised pixels -> (N, num_image_tokens, hidden) projected features."""
        return self.projector(self.vision_tower(pixel_values))

    def embed(self, input_ids, pixel_values=None, image_features=None):
        """Token embeddings with the image features written into the image-token positions."""
        c = self.config
        is_image = input_ids == c.image_token_id
        x = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_img = int(is_image.sum())
        if n_img == 0:
            return x
        if image_features is None:
            if pixel_values is None:
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            image_features = self.encode_images(pixel_values)
        if image_features.shape[0] * image_features.shape[1] != n_img:
            raise ValueError(f"{n_img} image tokens in input_ids, but {image_features.shape[0]} images x "
                             f"{image_features.shape[1]} features")
        return x.masked_scatter(is_image[..., None], image_features.to(x.dtype))

    def _attention_mask(self, attention_mask, T, past, device):
        """Boolean (B, 1, T, past+T) mask: causal and not padding. None when plain causal works."""
        if attention_mask is None and (past == 0 or T == 1):
            return None
        if attention_mask is None:
            attention_mask = torch.ones(1, past + T, dtype=torch.bool, device=device)
        key_ok = attention_mask.bool()[:, None, None, :past + T]
        q_pos = torch.arange(past, past + T, device=device)[:, None]
        k_pos = torch.arange(past + T, device=device)[None, :]
        # a padding query would see no key at all (NaN in SDPA): let it see itself; its output is ignored
        return (k_pos <= q_pos) & (key_ok | (k_pos == q_pos))

    def backbone(self, x, attention_mask=None, position_ids=None, cache=None, seq_lens=None):
        """Run the decoder on embeddings x (B, T, hidden); returns the final normed hidden states.
        seq_lens: x is one row of sequences packed end to end (these lengths), each attending to itself
        only, with its own positions from 0: the outputs of the padded batch, without the padding."""
        c, (B, T, _) = self.config, x.shape
        past = cache.length if cache is not None else 0
        if seq_lens is not None:
            if B != 1 or sum(seq_lens) != T or attention_mask is not None or cache is not None:
                raise ValueError(f"packed input: one row of sum(seq_lens) = {sum(seq_lens)} tokens, no mask or "
                                 f"cache (got {B} x {T})")
            position_ids = torch.cat([torch.arange(n, device=x.device) for n in seq_lens])[None]
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
            else:  # left padding: a sequence's first real token is position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
        cos, sin = rope_cos_sin(c, position_ids, x.dtype)
        mask = self._attention_mask(attention_mask, T, past, x.device)
        for i, layer in enumerate(self.language_model.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, i, seq_lens, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, seq_lens)
        if cache is not None:
            cache.length += T
        return self.language_model.norm(x)

    def logits(self, hidden):
        w = self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w)

    def forward(self, pixel_values, input_ids, attention_mask=None, position_ids=None, return_hidden=False,
                image_features=None, seq_lens=None):
        """Logits (B, T, vocab), or the last hidden states (B, T, hidden) with return_hidden=True.
        input_ids holds config.image_token_id num_image_tokens times per image. seq_lens: input_ids is
        one row of sequences packed end to end (data.pack), see backbone."""
        x = self.embed(input_ids, pixel_values, image_features)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: use the fused causal path
        h = self.backbone(x, attention_mask, position_ids, seq_lens=seq_lens)
        return h if return_hidden else self.logits(h)

    # -- generation ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, attention_mask=None, max_new_tokens=64, temperature=0.0, top_p=1.0,
                 eos_token_id=None, pad_token_id=None, generator=None, return_logprobs=False, image_features=None,
                 num_beams=1, length_penalty=1.0, compile=False):
        """Batched decoding with a static KV cache. Prompts are left-padded (attention_mask 0 on pads).
        temperature 0 = greedy. Sampling draws from `generator` (a torch.Generator) when given, so
        a run can be resumed with the same random stream. num_beams > 1: beam search (see beam_search).
        compile=True runs the one-token step through torch.compile (inductor on CPU; CUDA graphs on
        GPU): compiled once per shape, worth it only for long runs. Returns GenerateOutput."""
        c = self.config
        eos = c.eos_token_id if eos_token_id is None else eos_token_id
        pad = c.pad_token_id if pad_token_id is None else pad_token_id
        if num_beams > 1:
            return self.beam_search(pixel_values, input_ids, attention_mask, max_new_tokens, num_beams, eos, pad,
                                    image_features, length_penalty)
        B, T = input_ids.shape
        dev = input_ids.device
        prompt_mask = None  # no padding (the usual case): SDPA's causal kernel for the prompt
        if attention_mask is not None and not bool(attention_mask.all()):
            prompt_mask = attention_mask
        x = self.embed(input_ids, pixel_values, image_features)
        cache = KVCache(c, B, T + max_new_tokens, dev, x.dtype)
        h = self.backbone(x, prompt_mask, cache=cache)  # prefill: the prompt in one pass
        logits = self.logits(h[:, -1]).float()
        state = DecodeState(c, cache, prompt_mask, T, max_new_tokens, x.dtype)
        step = compiled_decode_step() if compile else LLaVA.decode_step
        tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
        logps = torch.zeros(B, max_new_tokens, device=dev) if return_logprobs else None
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
        with self.fused_lora(not compile):  # compiled: inductor fuses the plain LoRA path itself
            for i in range(max_new_tokens):
                if temperature <= 0 and not return_logprobs:
                    tok, lp = logits.argmax(-1), None  # greedy: no log_softmax over the vocabulary
                else:
                    tok, lp = sample_token(logits, temperature, top_p, generator)
                tok.masked_fill_(done, pad)
                tokens[:, i] = tok
                if return_logprobs:
                    logps[:, i] = lp.masked_fill_(done, 0.0)
                newly = (tok == eos) & ~done
                lengths.masked_fill_(newly, i + 1)
                done |= newly
                if i == max_new_tokens - 1 or (eos >= 0 and bool(done.all())):  # no EOS (-1): no sync per token
                    break
                logits = step(self, tok, state)
                state.advance()
        return GenerateOutput(tokens, logps, lengths, done)

    def decode_step(self, tokens, state):
        """fp32 logits (B, vocab) for one new token per row (tokens: B), reading and writing the static
        cache of `state` (a DecodeState): nothing is allocated but activations, no shape changes."""
        state.key_bias.index_fill_(-1, state.slot, 0.0)  # the new token's key is visible from this step on
        cos, sin = state.cos.index_select(2, state.step), state.sin.index_select(2, state.step)
        x = self.language_model.embed_tokens(tokens[:, None])
        for i, layer in enumerate(self.language_model.layers):
            x = layer.decode(x, cos, sin, state.cache.k[i], state.cache.v[i], state.slot, state.key_bias)
        return self.logits(self.language_model.norm(x)[:, 0]).float()

    @contextmanager
    def fused_lora(self, on=True):
        """While decoding: the active adapter of every adapted linear as two matrices (LoRALinear.fuse_lora),
        made once per generate call from the current weights."""
        linears = [lin for _, lin in self.lora_linears()]
        try:
            for lin in linears if on else ():
                lin.fuse_lora()
            yield
        finally:
            for lin in linears:
                lin.fused_lora = None

    @torch.no_grad()
    def beam_search(self, pixel_values, input_ids, attention_mask, max_new_tokens, num_beams, eos, pad,
                    image_features=None, length_penalty=1.0):
        """Beam search as transformers' GenerationMixin._beam_search with its defaults (early_stopping False,
        no sampling, one returned sequence). Per step, over K beams x vocab: keep the 2K best running
        sums of log-probs; those ending in EOS (or at the length limit) that rank in the top K become
        finished hypotheses scored sum / generated_length ** length_penalty, the best K finished kept;
        the best K not ending become the next beams. Stops when every continuation ends, or when K
        hypotheses are finished and the best running sum / current length cannot beat the worst of them.
        Returns the best finished hypothesis per prompt (logprobs None)."""
        c, K = self.config, num_beams
        B, T = input_ids.shape
        dev, N = input_ids.device, max_new_tokens
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        feats = None if image_features is None else image_features.repeat_interleave(K, 0)
        ids = input_ids.repeat_interleave(K, 0)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # beams of a prompt share its mask
            mask = torch.ones(B * K, T + N, dtype=torch.long, device=dev)
            mask[:, :T] = attention_mask.repeat_interleave(K, 0)
        x = self.embed(ids, None, feats)
        cache = KVCache(c, B * K, T + N, dev, x.dtype)
        h = self.backbone(x, None if mask is None else mask[:, :T], cache=cache)
        logits = self.logits(h[:, -1]).float()
        next_pos = torch.full((B * K, 1), T, device=dev) if mask is None else mask[:, :T].sum(-1, keepdim=True)
        n_keep = 2 * K  # transformers: max(2, 1 + number of EOS ids) * num_beams
        top_k_mask = torch.arange(n_keep, device=dev) < K
        big = -1.0e9
        run_tokens = torch.full((B, K, N), pad, dtype=torch.long, device=dev)
        run_scores = torch.zeros(B, K, device=dev)
        run_scores[:, 1:] = big  # at first every beam is the prompt: only beam 0 may expand
        fin_tokens = torch.full((B, K, N), pad, dtype=torch.long, device=dev)
        fin_scores = torch.full((B, K), big, device=dev)
        fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
        offset = torch.arange(B, device=dev)[:, None] * K
        take = lambda t, idx: t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))
        for i in range(N):
            V = logits.shape[-1]
            total = (torch.log_softmax(logits, -1).view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
            top_lp, top_idx = total.topk(n_keep)
            src, tok = top_idx // V, top_idx % V
            cand = take(run_tokens, src).clone()
            cand[:, :, i] = tok
            ends = (tok == eos) | (i == N - 1)  # EOS, or the length limit: both finish a hypothesis
            live = top_lp + ends.float() * big
            nxt = live.topk(K).indices
            run_tokens, run_scores, run_src = take(cand, nxt), take(live, nxt), take(src, nxt)
            new = top_lp / (i + 1) ** length_penalty  # generated length, the EOS included
            just = ends & top_k_mask[None]
            new = new + (~improvable).float() * big + (~just).float() * big
            merged = torch.cat([fin_scores, new], 1).topk(K).indices
            fin_tokens = take(torch.cat([fin_tokens, cand], 1), merged)
            fin_scores = take(torch.cat([fin_scores, new], 1), merged)
            fin_done = take(torch.cat([fin_done, just], 1), merged)
            best_running = run_scores[:, :1] / (i + 1) ** length_penalty
            worst_done = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, big))
            improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
            if bool(ends.all()) or not bool(improvable.any()):
                break
            rows = (run_src + offset).view(-1)  # each new beam continues the cache of the beam it came from
            for layer in range(c.layers):
                cache.k[layer], cache.v[layer] = cache.k[layer][rows], cache.v[layer][rows]
            h = self.backbone(self.language_model.embed_tokens(run_tokens[:, :, i].reshape(-1, 1)),
                              None if mask is None else mask[:, :T + i + 1], position_ids=next_pos + i, cache=cache)
            logits = self.logits(h[:, -1]).float()
        tokens = fin_tokens[:, 0]
        is_eos = tokens == eos
        finished = is_eos.any(-1)
        lengths = torch.where(finished, is_eos.float().argmax(-1) + 1, torch.full_like(finished, N, dtype=torch.long))
        tokens = tokens.masked_fill(torch.arange(N, device=dev)[None] >= lengths[:, None], pad)
        return GenerateOutput(tokens, None, lengths, finished)

    # -- LoRA adapters and heads --------------------------------------------------------

    def lora_linears(self):
        """(layer index, LoRALinear) for every adapted linear of the decoder."""
        for i, layer in enumerate(self.language_model.layers):
            for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                yield i, lin

    def add_adapter(self, name, r=64, alpha=16, dropout=0.0, targets=LORA_TARGETS):
        """A new LoRA adapter (A kaiming-uniform, B zero) on the chosen projections (q,k,v,o,gate,up,down)."""
        targets = tuple(t.removesuffix("_proj") for t in targets)
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad} (choose from {', '.join(LORA_TARGETS)})")
        if name in self.adapters:
            raise ValueError(f"adapter '{name}' exists already")
        for _, lin in self.lora_linears():
            chosen = {s: size for s, size in lin.slices.items() if s in targets}
            if chosen:
                lin.lora[name] = LoRAAdapter(lin.weight.shape[1], chosen, r, alpha, dropout).to(lin.weight.device)
        self.adapters[name] = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets))
        return name

    def set_adapter(self, name):
        """Make `name` the active adapter (None: the frozen base alone)."""
        if name is not None and name not in self.adapters:
            raise ValueError(f"no adapter '{name}' (have: {', '.join(self.adapters) or 'none'})")
        self.active_adapter = name
        for _, lin in self.lora_linears():
            lin.active = name

    @contextmanager
    def use_adapter(self, name):
        previous = self.active_adapter
        self.set_adapter(name)
        try:
            yield self
        finally:
            self.set_adapter(previous)

    def no_adapter(self):
        """Context in which no adapter is active: the reference policy, with no second copy of the weights."""
        return self.use_adapter(None)

    def copy_adapter(self, src, dst):
        """A new adapter `dst` initialised from `src` (PPO's value model starts from the reward adapter)."""
        cfg = self.adapters[src]
        self.add_adapter(dst, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["targets"])
        with torch.no_grad():
            for _, lin in self.lora_linears():
                if src in lin.lora:
                    for p_dst, p_src in zip(lin.lora[dst].parameters(), lin.lora[src].parameters()):
                        p_dst.copy_(p_src)

    def delete_adapter(self, name):
        for _, lin in self.lora_linears():
            if name in lin.lora:
                del lin.lora[name]
        self.adapters.pop(name)
        if self.active_adapter == name:
            self.set_adapter(None)

    @torch.no_grad()
    def merge_adapter(self, name):
        """W += (alpha/r) B A for every slice the adapter targets, then drop the adapter."""
        for _, lin in self.lora_linears():
            if name in lin.lora:
                ad = lin.lora[name]
                for s in ad.A:
                    a, b = lin.slice_range(s)
                    lin.weight[a:b] += (ad.scale * ad.B[s] @ ad.A[s]).to(lin.weight.dtype)
        self.delete_adapter(name)

    def add_head(self, name):
        self.heads[name] = ScalarHead(self.config.hidden).to(self.language_model.norm.weight.device)
        return self.heads[name]

    def adapter_parameters(self, name):
        return [p for _, lin in self.lora_linears() if name in lin.lora for p in lin.lora[name].parameters()]

    def set_trainable(self, adapters=(), heads=(), vision=False, projector=False, language=False):
        """requires_grad only on what trains: the named adapters and heads, and optionally whole parts."""
        for p in self.parameters():
            p.requires_grad_(False)
        for part, on in ((self.vision_tower, vision), (self.projector, projector)):
            for p in part.parameters():
                p.requires_grad_(on)
        if language:
            for n, p in self.named_parameters():
                if (n.startswith("language_model.") or n.startswith("lm_head.")) and ".lora." not in n:
                    p.requires_grad_(True)
        for a in adapters:
            for p in self.adapter_parameters(a):
                p.requires_grad_(True)
        for h in heads:
            for p in self.heads[h].parameters():
                p.requires_grad_(True)

    def cast_base(self, dtype):
        """Base weights to dtype (e.g. bf16); LoRA parameters and heads stay fp32."""
        for n, p in self.named_parameters():
            if ".lora." not in n and not n.startswith("heads."):
                p.data = p.data.to(dtype)
        return self

    # -- checkpoints (implemented below) --------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=None, device=None, adapters=True):
        return load_checkpoint(path, vision_tower=vision_tower, dtype=dtype, device=device, adapters=adapters)

    def save_pretrained(self, path, base=None, extra_config=None):
        save_checkpoint_files(self, path, base=base, extra_config=extra_config)

    def load_adapters(self, path, name="default"):
        """Add the LoRA adapters and heads saved in another checkpoint of this same base (PPO puts the
        reward model's adapter and head next to the policy's on one copy of the base weights), or a PEFT
        LoRA adapter directory trained on this base (added as adapter `name`, not made active)."""
        path = resolve_checkpoint(str(path))
        if is_peft_dir(path):
            if name in self.adapters:
                raise CheckpointError(f"{path}: adapter '{name}' exists already in this model")
            load_peft_adapter(self, path, name)
            return
        cfg = _read_json(os.path.join(path, "config.json"))
        if cfg.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{path}: adapters load only from factalign checkpoints")
        clash = sorted((set(cfg.get("adapters", {})) & set(self.adapters)) | (set(cfg.get("heads", [])) & set(self.heads)))
        if clash:
            raise CheckpointError(f"{path}: adapter/head '{clash[0]}' exists already in this model")
        active = self.active_adapter
        _load_adapters(self, path, cfg, None, only_new=True)
        self.set_adapter(active)

    def export_hf(self, path, tokenizer=None, template="vicuna_v1"):
        export_llava_hf(self, path, tokenizer, template)

    def export_peft(self, path, adapter, base=None):
        export_peft_adapter(self, path, adapter, base)


_COMPILED_DECODE = []


def compiled_decode_step():
    """LLaVA.decode_step through torch.compile, made on first use (inductor on CPU; on CUDA with
    mode='reduce-overhead', i.e. CUDA graphs). Static shapes: a new batch size or length compiles again."""
    if not _COMPILED_DECODE:
        mode = "reduce-overhead" if torch.cuda.is_available() else None
        _COMPILED_DECODE.append(torch.compile(LLaVA.decode_step, dynamic=False, mode=mode))
    return _COMPILED_DECODE[0]


def sample_token(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next token from (B, vocab) fp32 logits, and its log-prob under softmax(logits / temperature)
    (the untruncated distribution, which is what PPO's ratios use)."""
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


# ----------------------------------------------------------------------------------------
# Checkpoints: key mapping between our modules and every layout users have
# ----------------------------------------------------------------------------------------
# Our names mirror HF's except that q/k/v and gate/up are stored fused in memory. On disk we
# always write the llava-hf hub layout (unfused), so any tool that reads llava-hf reads ours.

def _canonical_key(key):
    """Map a checkpoint key from any supported layout to (part, name):
    part in {'vision', 'projector', 'text', 'lm_head'} and name relative to that part, or None to ignore."""
    k = key
    for p in ("model.vision_tower.vision_tower.", "model.vision_tower.", "model.language_model.",
              "model.multi_modal_projector."):
        if k.startswith(p):  # transformers 5 in-memory names / original LLaVA's nested tower
            k = k[len("model."):] if p != "model.vision_tower.vision_tower." else "vision_tower." + k[len(p):]
            break
    if k.startswith("vision_tower."):
        k = k[len("vision_tower."):]
    if k.startswith("vision_model."):
        return "vision", k[len("vision_model."):]
    if k.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
        return "vision", k  # transformers 5 save_pretrained: vision_tower.embeddings.* (no vision_model.)
    if k.startswith("multi_modal_projector."):
        return "projector", k[len("multi_modal_projector."):]
    if k.startswith("model.mm_projector."):  # original LLaVA: Linear, or Sequential(Linear, GELU, Linear)
        rest = k[len("model.mm_projector."):]
        rest = {"0.": "linear_1.", "2.": "linear_2."}.get(rest[:2], "linear_1.") + rest.split(".")[-1]
        return "projector", rest
    if k.startswith("language_model.lm_head.") or k.startswith("lm_head."):
        return "lm_head", k.split("lm_head.", 1)[1]
    if k.startswith("language_model.model."):
        return "text", k[len("language_model.model."):]
    if k.startswith("language_model."):
        return "text", k[len("language_model."):]
    if k.startswith("model."):
        return "text", k[len("model."):]
    if k.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale")):
        return None, None  # the text half of a full CLIPModel
    return "unknown", key


def _our_targets(c):
    """Our parameter name -> list of (part, canonical name) it is made of (several: stacked in order)."""
    t = {}
    t["vision_tower.embeddings.class_embedding"] = [("vision", "embeddings.class_embedding")]
    t["vision_tower.embeddings.patch_embedding.weight"] = [("vision", "embeddings.patch_embedding.weight")]
    t["vision_tower.embeddings.position_embedding.weight"] = [("vision", "embeddings.position_embedding.weight")]
    for w in ("weight", "bias"):
        t[f"vision_tower.pre_layrnorm.{w}"] = [("vision", f"pre_layrnorm.{w}")]
    for i in range(c.vision_layers_run):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            for w in ("weight", "bias"):
                t[f"vision_tower.encoder.layers.{i}.{m}.{w}"] = [("vision", f"encoder.layers.{i}.{m}.{w}")]
    for lin in ("linear_1", "linear_2") if c.projector == "mlp2x_gelu" else ("linear_1",):
        for w in ("weight", "bias"):
            t[f"projector.{lin}.{w}"] = [("projector", f"{lin}.{w}")]
    t["language_model.embed_tokens.weight"] = [("text", "embed_tokens.weight")]
    for i in range(c.layers):
        p = f"layers.{i}."
        t[f"language_model.{p}self_attn.qkv_proj.weight"] = [("text", p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        t[f"language_model.{p}self_attn.o_proj.weight"] = [("text", p + "self_attn.o_proj.weight")]
        t[f"language_model.{p}mlp.gate_up_proj.weight"] = [("text", p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
        t[f"language_model.{p}mlp.down_proj.weight"] = [("text", p + "mlp.down_proj.weight")]
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[f"language_model.{p}{n}.weight"] = [("text", p + f"{n}.weight")]
    t["language_model.norm.weight"] = [("text", "norm.weight")]
    if not c.tie_embeddings:
        t["lm_head.weight"] = [("lm_head", "weight")]
    return t


HUB_PREFIX = {"vision": "vision_tower.vision_model.", "projector": "multi_modal_projector.",
              "text": "language_model.model.", "lm_head": "language_model.lm_head."}


class TensorSource:
    """Lazy access to the tensors of one or more weight files, by canonical (part, name)."""

    def __init__(self):
        self.where = {}   # (part, name) -> (file, original key)
        self.handles = {}

    def add_dir(self, path, only_parts=None):
        files = _weight_files(path)
        for f in files:
            for key in self._keys(f):
                part, name = _canonical_key(key)
                if part is None or (only_parts and part not in only_parts):
                    continue
                if part == "unknown":
                    raise CheckpointError(f"{f}: key '{key}' is not part of a LLaVA model (another architecture?)")
                self.where[(part, name)] = (f, key)
        return files

    def _keys(self, f):
        return list(self._handle(f).keys())

    def _handle(self, f):
        if f not in self.handles:
            try:
                if f.endswith(".safetensors"):
                    from safetensors import safe_open
                    self.handles[f] = safe_open(f, framework="pt", device="cpu")
                else:
                    self.handles[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read weights (truncated or corrupt file?): "
                                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return self.handles[f]

    def has(self, part, name):
        return (part, name) in self.where

    def get(self, part, name):
        f, key = self.where[(part, name)]
        h = self._handle(f)
        try:
            return h.get_tensor(key) if f.endswith(".safetensors") else h[key]
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor '{key}' (truncated or corrupt file?): {e}")

    def shape(self, part, name):
        f, key = self.where[(part, name)]
        h = self._handle(f)
        return tuple(h.get_slice(key).get_shape()) if f.endswith(".safetensors") else tuple(h[key].shape)

    def key(self, part, name):
        f, key = self.where[(part, name)]
        return f"{f}: key '{key}'"


def _weight_files(path):
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    names = sorted(os.listdir(path))
    st = [n for n in names if n.endswith(".safetensors") and n not in ("adapters.safetensors", "adapter_model.safetensors")]
    pt = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    files = st or pt
    if not files:
        raise CheckpointError(f"{path}: no weights found (model.safetensors, model-*.safetensors or pytorch_model*.bin)")
    return [os.path.join(path, n) for n in files]


def _read_json(path):
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})")
    if not isinstance(obj, dict):  # every checkpoint JSON file we read is an object
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _get(d, key, default):
    v = d.get(key)
    return default if v is None else v


def _text_fields(t):
    """LLaMA config fields -> ours, with transformers' LlamaConfig defaults for absent fields
    (hub configs list only what differs from those defaults)."""
    if t.get("rope_scaling") not in (None, {}) and t["rope_scaling"].get("rope_type", t["rope_scaling"].get("type")) not in (None, "default"):
        raise CheckpointError(f"config: rope_scaling {t['rope_scaling']} is not supported")
    heads = _get(t, "num_attention_heads", 32)
    hidden = _get(t, "hidden_size", 4096)
    rope = t.get("rope_parameters") or {}
    return dict(vocab_size=_get(t, "vocab_size", 32000), hidden=hidden, intermediate=_get(t, "intermediate_size", 11008),
                layers=_get(t, "num_hidden_layers", 32), heads=heads, kv_heads=_get(t, "num_key_value_heads", heads),
                head_dim=_get(t, "head_dim", hidden // heads), rms_eps=_get(t, "rms_norm_eps", 1e-6),
                rope_theta=_get(rope, "rope_theta", _get(t, "rope_theta", 10000.0)),
                max_position=_get(t, "max_position_embeddings", 2048),
                tie_embeddings=bool(_get(t, "tie_word_embeddings", False)),
                bos_token_id=_get(t, "bos_token_id", 1), eos_token_id=_get(t, "eos_token_id", 2))


def _vision_fields(v):
    """CLIPVisionConfig fields -> ours, with transformers' defaults for absent fields."""
    if _get(v, "hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"config: vision hidden_act '{v['hidden_act']}' is not supported (quick_gelu)")
    return dict(image_size=_get(v, "image_size", 224), patch_size=_get(v, "patch_size", 32),
                vision_hidden=_get(v, "hidden_size", 768), vision_intermediate=_get(v, "intermediate_size", 3072),
                vision_layers=_get(v, "num_hidden_layers", 12), vision_heads=_get(v, "num_attention_heads", 12),
                vision_eps=_get(v, "layer_norm_eps", 1e-5))


def _vision_fields_from_weights(src):
    """Infer the CLIP config from tensor shapes (heads assumed 64-wide, true of OpenAI's CLIP ViTs)."""
    hidden, _, p, _ = src.shape("vision", "embeddings.patch_embedding.weight")
    n_pos = src.shape("vision", "embeddings.position_embedding.weight")[0]
    layers = 1 + max(int(n.split(".")[2]) for (part, n) in src.where if part == "vision" and n.startswith("encoder.layers."))
    if hidden % 64:
        raise CheckpointError(f"{src.key('vision', 'embeddings.patch_embedding.weight')}: cannot infer the CLIP "
                              f"head count for width {hidden}; pass the CLIP directory (--vision_tower DIR)")
    return dict(image_size=int(round(math.sqrt(n_pos - 1))) * p, patch_size=p, vision_hidden=hidden,
                vision_intermediate=src.shape("vision", "encoder.layers.0.mlp.fc1.weight")[0],
                vision_layers=layers, vision_heads=hidden // 64)


def detect_layout(path):
    """'factalign' | 'llava-hf' | 'llava' (original LLaVA / LLaVA-RLHF) | 'llama' | 'clip' | 'run' (a run dir)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not os.path.exists(cfg_path):
        if os.path.isdir(path) and latest_checkpoint(path):
            return "run"
        raise CheckpointError(f"{path}: no config.json (not a checkpoint directory)")
    cfg = _read_json(cfg_path)
    if cfg.get("format") == FORMAT_NAME:
        return "factalign"
    if "format_version" in cfg:  # written by a checkpoint format that is not this one
        raise CheckpointError(f"{cfg_path}: format {cfg.get('format')!r} version {cfg['format_version']!r} is not a "
                              f"{FORMAT_NAME} checkpoint format this code reads")
    mt = cfg.get("model_type", "")
    if mt == "llava" and "text_config" in cfg:
        return "llava-hf"
    if "mm_vision_tower" in cfg or "mm_hidden_size" in cfg or mt in ("llava", "llava_llama"):
        return "llava"
    if mt == "llama":
        return "llama"
    if mt in ("clip", "clip_vision_model"):
        return "clip"
    raise CheckpointError(f"{cfg_path}: unsupported model_type '{mt}' (expected a LLaVA, LLaMA or CLIP checkpoint)")


def latest_checkpoint(run_dir):
    """The newest complete checkpoint-N directory in a run directory (temp dirs are ignored)."""
    if not os.path.isdir(run_dir):
        return None
    steps = [n for n in os.listdir(run_dir) if n.startswith("checkpoint-") and n[11:].isdigit()
             and os.path.exists(os.path.join(run_dir, n, "config.json"))]
    return os.path.join(run_dir, max(steps, key=lambda n: int(n[11:]))) if steps else None


def resolve_checkpoint(path):
    """A checkpoint directory, or a run directory -> its latest checkpoint."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        latest = latest_checkpoint(path)
        if latest:
            return latest
    return path


def _resolve_clip_dir(name, checkpoint):
    """A local CLIP directory: as named, or beside the checkpoint (config names like 'openai/clip-vit-large-patch14-336')."""
    if not name:
        return None
    for cand in (name, os.path.join(os.path.dirname(os.path.abspath(checkpoint)), os.path.basename(name))):
        if os.path.isdir(cand) and os.path.exists(os.path.join(cand, "config.json")):
            return cand
    return None


def load_checkpoint(path, vision_tower=None, dtype=None, device=None, adapters=True):
    """Load a LLaVA from any supported directory layout (see detect_layout). `vision_tower` names a
    CLIP directory when the checkpoint lacks the CLIP weights (original LLaVA, or a bare LLaMA:
    then the projector is freshly initialised: the starting point of SFT)."""
    path = resolve_checkpoint(str(path))
    if is_peft_dir(path):  # a PEFT LoRA adapter: its base (a local directory), then the adapter, active
        model = load_checkpoint(peft_base_dir(path), vision_tower, dtype, device, adapters)
        load_peft_adapter(model, path, "default")
        model.set_adapter("default")
        return model
    layout = detect_layout(path)
    cfg = _read_json(os.path.join(path, "config.json"))
    src = TensorSource()
    fresh_projector = False
    if layout == "factalign":
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}/config.json: format_version {cfg['format_version']} is newer than this "
                                  f"code reads ({FORMAT_VERSION}); update factalign")
        if not isinstance(cfg.get("model"), dict):
            raise CheckpointError(f"{path}/config.json: field 'model': missing or not an object")
        known = {f.name: type(f.default) for f in fields(ModelConfig)}
        unknown = set(cfg["model"]) - set(known)
        if unknown:
            raise CheckpointError(f"{path}/config.json: field 'model': unknown fields {sorted(unknown)}")
        for k, v in cfg["model"].items():  # (an int is a fine float)
            if type(v) is not known[k] and not (known[k] is float and type(v) is int) and known[k] is not type(None):
                raise CheckpointError(f"{path}/config.json: field 'model.{k}': expected {known[k].__name__}, got {v!r}")
        try:
            config = ModelConfig(**cfg["model"])
        except CheckpointError as e:  # "config: field ...": name the file
            raise CheckpointError(f"{path}/{e}") from None
        weights_dir = base_weights_dir(path)
        src.add_dir(weights_dir)
    elif layout == "llava-hf":
        vf = _vision_fields(cfg.get("vision_config") or {})
        strategy = _get(cfg, "vision_feature_select_strategy", "default")
        layer = _get(cfg, "vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise CheckpointError(f"{path}/config.json: vision_feature_layer {layer}: only one layer is supported")
        act = _get(cfg, "projector_hidden_act", "gelu")
        if act not in ("gelu", "linear"):
            raise CheckpointError(f"{path}/config.json: projector_hidden_act '{act}' is not supported (gelu, linear)")
        tf = _text_fields(cfg.get("text_config") or {})
        image_id = cfg.get("image_token_index", cfg.get("image_token_id", 32000))
        pad = _get(cfg, "pad_token_id", _get(cfg.get("text_config") or {}, "pad_token_id", tf["vocab_size"] - 1))
        config = ModelConfig(**vf, **tf, vision_select_layer=layer,
                             vision_select_feature="patch" if strategy == "default" else "cls_patch",
                             projector="mlp2x_gelu" if act == "gelu" else "linear", image_token_id=image_id,
                             pad_token_id=pad)
        src.add_dir(path)
        if act == "linear":  # our export of a one-layer projector: linear_2 is the identity; fold it back
            src = _FoldedLinearProjector(src)
    elif layout in ("llava", "llama"):
        tf = _text_fields(cfg)
        src.add_dir(path)
        has_vision = any(p == "vision" for p, _ in src.where)
        clip_dir = _resolve_clip_dir(vision_tower or cfg.get("mm_vision_tower"), path)
        if clip_dir is not None:  # the CLIP config (and, when absent here, its weights) from the CLIP dir
            clip_cfg = _read_json(os.path.join(clip_dir, "config.json"))
            vf = _vision_fields(clip_cfg.get("vision_config", clip_cfg))
            if vision_tower or not has_vision:
                src.where = {k: v for k, v in src.where.items() if k[0] != "vision"}
                src.add_dir(clip_dir, only_parts={"vision"})
        elif has_vision:
            vf = _vision_fields_from_weights(src)
        else:
            raise CheckpointError(f"{path}: the CLIP weights are not in this checkpoint; pass the local CLIP "
                                  f"directory (--vision_tower DIR; config names '{cfg.get('mm_vision_tower')}')")
        if _get(cfg, "mm_use_im_start_end", False):
            raise CheckpointError(f"{path}/config.json: mm_use_im_start_end true is not supported")
        feature = _get(cfg, "mm_vision_select_feature", "patch")
        projector = _get(cfg, "mm_projector_type", "linear")
        fresh_projector = layout == "llama" or not any(p == "projector" for p, _ in src.where)
        pad = _get(cfg, "pad_token_id", 0)  # LLaVA pads with <unk> (id 0)
        config = ModelConfig(**vf, **tf, vision_select_layer=_get(cfg, "mm_vision_select_layer", -2),
                             vision_select_feature=feature, projector=projector,
                             image_token_id=-200, pad_token_id=pad)  # -200: LLaVA's IMAGE_TOKEN_INDEX
    elif layout == "clip":
        raise CheckpointError(f"{path}: a CLIP checkpoint alone is not a LLaVA; pass a LLaMA or LLaVA directory "
                              f"and this one as the vision tower")
    else:  # unreachable: resolve_checkpoint handled run dirs
        raise CheckpointError(f"{path}: no checkpoint found")
    model = _materialize(config, src, dtype, device, fresh_projector)
    if layout == "factalign" and adapters:
        _load_adapters(model, path, cfg, device)
    model.source_path = path
    return model


class _FoldedLinearProjector:
    """Presents a llava-hf 'linear' projector (linear_1, identity act, linear_2) as one linear:
    W = W2 W1, b = W2 b1 + b2 (exact when linear_2 is the identity our export writes)."""

    def __init__(self, src):
        self.src, self.where = src, src.where

    def has(self, part, name):
        return self.src.has(part, name)

    def get(self, part, name):
        if part == "projector" and name.startswith("linear_1."):
            w2 = self.src.get("projector", "linear_2.weight").float()
            if name.endswith("weight"):
                return w2 @ self.src.get("projector", "linear_1.weight").float()
            return w2 @ self.src.get("projector", "linear_1.bias").float() + self.src.get("projector", "linear_2.bias").float()
        return self.src.get(part, name)

    def shape(self, part, name):
        if part == "projector" and name.startswith("linear_1."):
            return tuple(self.get(part, name).shape)
        return self.src.shape(part, name)

    def key(self, part, name):
        return self.src.key(part, name)


def _materialize(config, src, dtype, device, fresh_projector=False):
    """Build the model on the meta device, then fill each parameter from the source one tensor at
    a time (no second full copy of the weights in RAM)."""
    with torch.device("meta"):
        model = LLaVA(config)
    targets = _our_targets(config)
    wanted = {pn for parts in targets.values() for pn in parts}
    unused_ok = ("post_layernorm.",)
    for part, name in src.where:
        if (part, name) in wanted or part is None:
            continue
        if part == "vision" and (name.startswith(unused_ok) or name.startswith("encoder.layers.") or
                                 name.startswith("embeddings.position_ids")):
            continue  # layers after the selected one, post_layernorm: never used by LLaVA
        if part == "text" and "rotary_emb" in name:
            continue
        if part == "projector" and name.startswith("linear_2.") and config.projector == "linear":
            continue
        if part == "lm_head" and config.tie_embeddings:
            continue
        raise CheckpointError(f"{src.key(part, name)} does not fit this model config (unexpected key)")
    params = dict(model.named_parameters())
    for our_name, parts in targets.items():
        p = params[our_name]
        if our_name.startswith("projector.") and fresh_projector:
            t = torch.empty(p.shape)
            if our_name.endswith("weight"):
                nn.init.normal_(t, std=0.02)
            else:
                nn.init.zeros_(t)
        else:
            for part, name in parts:
                if not src.has(part, name):
                    raise CheckpointError(f"checkpoint is missing key for '{part}' weight '{name}' "
                                          f"(expected by the config; another architecture or a partial file?)")
            expected = _split_shapes(our_name, p.shape, config, len(parts))
            tensors = []
            for (part, name), shp in zip(parts, expected):
                got = tuple(src.shape(part, name))
                if got != tuple(shp):
                    raise CheckpointError(f"{src.key(part, name)} has shape {got} but the config expects {tuple(shp)}")
                tensors.append(src.get(part, name))
            t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)
        t = t.to(dtype=dtype or (t.dtype if t.is_floating_point() else torch.float32), device=device or "cpu")
        _set_param(model, our_name, t)
    return model


def _split_shapes(our_name, shape, c, n):
    if n == 1:
        return [shape]
    if "qkv_proj" in our_name:
        return [(c.heads * c.head_dim, c.hidden), (c.kv_heads * c.head_dim, c.hidden), (c.kv_heads * c.head_dim, c.hidden)]
    return [(c.intermediate, c.hidden), (c.intermediate, c.hidden)]  # gate_up


def _set_param(model, name, tensor):
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[pname] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


def _base_dir(path, base):
    cand = base if os.path.isabs(base) else os.path.normpath(os.path.join(path, base))
    cand = resolve_checkpoint(cand)
    if not os.path.isdir(cand):
        raise CheckpointError(f"{path}/config.json: field 'base': base checkpoint '{base}' not found")
    return cand


def canonical_state(model):
    """Yield (hub-layout key, tensor) for every base weight, q/k/v and gate/up unfused."""
    c = model.config
    params = dict(model.named_parameters())
    for our_name, parts in _our_targets(c).items():
        t = params[our_name].detach()
        sizes = [s[0] for s in _split_shapes(our_name, t.shape, c, len(parts))]
        for (part, name), piece in zip(parts, t.split(sizes, 0) if len(parts) > 1 else [t]):
            yield HUB_PREFIX[part] + name, piece


def _save_safetensors(tensors, file, metadata=None):
    from safetensors.torch import save_file
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, file, metadata=metadata)


def _adapter_state(model):
    state = {}
    for i, lin in model.lora_linears():
        for name, ad in lin.lora.items():
            for s in ad.A:
                key = f"adapter.{name}.layers.{i}.{_module_of(s)}.{s}_proj"
                state[key + ".lora_A.weight"] = ad.A[s].detach()
                state[key + ".lora_B.weight"] = ad.B[s].detach()
    for name, head in model.heads.items():
        state[f"head.{name}.weight"] = head.weight.detach()
        state[f"head.{name}.bias"] = head.bias.detach()
    return state


def _module_of(slice_name):
    return "self_attn" if slice_name in ("q", "k", "v", "o") else "mlp"


def save_checkpoint_files(model, path, base=None, extra_config=None):
    """Write config.json, model.safetensors (unless `base` names a checkpoint holding the frozen base
    weights) and adapters.safetensors (LoRA + heads) into the directory `path`. Callers that need
    atomicity write into a temp directory and rename (common.save_checkpoint does)."""
    os.makedirs(path, exist_ok=True)
    cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": asdict(model.config),
           "adapters": model.adapters, "heads": sorted(model.heads), "active_adapter": model.active_adapter,
           "base": None}
    if base is not None:
        cfg["base"] = os.path.relpath(os.path.abspath(base), os.path.abspath(path))
    else:
        _save_safetensors(dict(canonical_state(model)), os.path.join(path, "model.safetensors"), {"format": "pt"})
    state = _adapter_state(model)
    if state:
        _save_safetensors(state, os.path.join(path, "adapters.safetensors"), {"format": "pt"})
    if extra_config:
        cfg.update(extra_config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def base_weights_dir(path):
    """The directory that holds a checkpoint's base weights (following 'base' pointers), as a real
    path: two checkpoints with the same answer share one frozen base."""
    path = resolve_checkpoint(str(path))
    if detect_layout(path) == "factalign":
        cfg = _read_json(os.path.join(path, "config.json"))
        if cfg.get("base") is not None:
            return base_weights_dir(_base_dir(path, cfg["base"]))
    return os.path.realpath(path)


def _load_adapters(model, path, cfg, device, only_new=False):
    file = os.path.join(path, "adapters.safetensors")
    if not cfg.get("adapters") and not cfg.get("heads"):
        return
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: file not found (config.json lists adapters/heads)")
    try:
        from safetensors.torch import load_file
        state = load_file(file)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read safetensors (truncated or corrupt?): {e}")
    for name, a in cfg.get("adapters", {}).items():
        model.add_adapter(name, a["r"], a["alpha"], a["dropout"], a["targets"])
    for name in cfg.get("heads", []):
        model.add_head(name)
    own = _adapter_state(model)
    if only_new:  # keep the model's own adapters/heads as they are
        own = {k: v for k, v in own.items() if k.split(".")[1] in set(cfg.get("adapters", {})) | set(cfg.get("heads", []))}
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{file}: key '{missing[0]}' is missing")
    with torch.no_grad():
        for k, t in own.items():
            if tuple(state[k].shape) != tuple(t.shape):
                raise CheckpointError(f"{file}: key '{k}' has shape {tuple(state[k].shape)} but the config expects {tuple(t.shape)}")
            t.copy_(state[k])
    if device:
        model.to(device)
    if not only_new:
        model.set_adapter(cfg.get("active_adapter"))


def export_llava_hf(model, path, tokenizer=None, template="vicuna_v1"):
    """A directory that transformers' LlavaForConditionalGeneration.from_pretrained loads (hub layout),
    with the tokenizer, a LlavaProcessor (LLaVA's pad-to-square image processor) and a chat template for
    `template`, so that AutoProcessor.from_pretrained(path) prepares inputs as our tokenization does.
    `tokenizer` defaults to the one saved beside the weights this model was loaded from. An image token
    id < 0 (original LLaVA's -200) becomes a real id: the tokenizer's <image>, or a new token with a new
    embedding row (the mean row, as llava-hf's conversion does).
    A 'linear' projector is written as linear_1 + identity activation + an identity linear_2 (exact);
    CLIP layers after the selected one are never used by LLaVA, so they are written as zeros."""
    c = model.config
    state = dict(canonical_state(model))
    if c.projector == "linear":
        dev = state["multi_modal_projector.linear_1.weight"]
        state["multi_modal_projector.linear_2.weight"] = torch.eye(c.hidden, dtype=dev.dtype)
        state["multi_modal_projector.linear_2.bias"] = torch.zeros(c.hidden, dtype=dev.dtype)
    vdt = state["vision_tower.vision_model.pre_layrnorm.weight"].dtype
    h, m = c.vision_hidden, c.vision_intermediate
    for i in range(c.vision_layers_run, c.vision_layers):
        pre = f"vision_tower.vision_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[pre + f"self_attn.{n}.weight"] = torch.zeros(h, h, dtype=vdt)
            state[pre + f"self_attn.{n}.bias"] = torch.zeros(h, dtype=vdt)
        for n in ("layer_norm1", "layer_norm2"):
            state[pre + f"{n}.weight"] = torch.ones(h, dtype=vdt)
            state[pre + f"{n}.bias"] = torch.zeros(h, dtype=vdt)
        state[pre + "mlp.fc1.weight"], state[pre + "mlp.fc1.bias"] = torch.zeros(m, h, dtype=vdt), torch.zeros(m, dtype=vdt)
        state[pre + "mlp.fc2.weight"], state[pre + "mlp.fc2.bias"] = torch.zeros(h, m, dtype=vdt), torch.zeros(h, dtype=vdt)
    state["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(h, dtype=vdt)
    state["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(h, dtype=vdt)
    tok = tokenizer if tokenizer is not None else _saved_tokenizer(model)
    image_id, vocab, tok = _export_image_token(model, tok, state)
    os.makedirs(path, exist_ok=True)
    _save_safetensors(state, os.path.join(path, "model.safetensors"), {"format": "pt"})
    dtype = str(vdt).replace("torch.", "")
    hf = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": image_id, "image_seq_length": c.num_image_tokens,
        "vision_feature_layer": c.vision_select_layer,
        "vision_feature_select_strategy": "default" if c.vision_select_feature == "patch" else "full",
        "projector_hidden_act": "gelu" if c.projector == "mlp2x_gelu" else "linear",
        "multimodal_projector_bias": True, "pad_token_id": c.pad_token_id, "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": dtype,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": c.vision_hidden,
                          "intermediate_size": c.vision_intermediate, "num_hidden_layers": c.vision_layers,
                          "num_attention_heads": c.vision_heads, "image_size": c.image_size,
                          "patch_size": c.patch_size, "layer_norm_eps": c.vision_eps, "hidden_act": "quick_gelu",
                          "projection_dim": c.vision_hidden},
        "text_config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": c.hidden,
                        "intermediate_size": c.intermediate, "num_hidden_layers": c.layers,
                        "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
                        "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
                        "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
                        "max_position_embeddings": c.max_position, "tie_word_embeddings": c.tie_embeddings,
                        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                        "pad_token_id": c.pad_token_id, "hidden_act": "silu"},
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tok is None:
        print(f"note: {path}: no tokenizer given or saved with the model: weights and config only "
              f"(AutoProcessor needs export_hf(path, tokenizer))", flush=True)
        return
    tok.save_pretrained(path)
    _write_processor(model, path, template)



# LLaVA's image preprocessing (data.CLIP_MEAN / CLIP_STD; pad to square with the mean colour, bicubic)
IMAGE_PROCESSOR = {"image_processor_type": "LlavaImageProcessor", "do_pad": True, "do_resize": True,
                   "resample": 3, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
                   "do_normalize": True, "do_convert_rgb": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _saved_tokenizer(model):
    """The tokenizer saved beside the weights the model was loaded from (our checkpoints and llava-hf
    directories hold one), or None."""
    path = getattr(model, "source_path", None)
    if not path or not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer  # tokenizer files only; weights never go through transformers
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _export_image_token(model, tok, state):
    """(image token id, vocab size, tokenizer) of the export. An id < 0 (original LLaVA's -200, which transformers
    cannot embed) becomes the tokenizer's <image> id, or a new token: then the embedding and lm_head
    grow by the rows it needs, set to the mean row (its logit is the mean logit: never the argmax)."""
    c = model.config
    image_id, vocab = c.image_token_id, c.vocab_size
    have = tok.convert_tokens_to_ids("<image>") if tok is not None and "<image>" in tok.get_vocab() else None
    if image_id >= 0:
        if tok is not None and have != image_id:
            raise ValueError(f"the tokenizer's <image> id is {have} but the model's image_token_id is {image_id}")
        return image_id, vocab, tok
    if have is None and tok is not None:
        from tokenizers import AddedToken
        tok = copy.deepcopy(tok)  # the caller's tokenizer stays as it was
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        have = tok.convert_tokens_to_ids("<image>")
    image_id = have if have is not None else vocab
    grow = max(0, image_id + 1 - vocab)
    keys = ["language_model.model.embed_tokens.weight"]
    keys += [] if c.tie_embeddings else ["language_model.lm_head.weight"]
    for k in keys if grow else []:
        w = state[k]
        state[k] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(grow, -1)])
    return image_id, vocab + grow, tok


def chat_template(template="vicuna_v1"):
    """A Jinja chat template that renders messages exactly as data.render does for `template`:
    "{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:" (image items become
    "<image>\n" before the text, as our prompts put them)."""
    from data import EOS_TEXT, SYSTEM  # the template text lives with the tokenization it must match
    if template not in SYSTEM:
        raise ValueError(f"no chat template for '{template}' (choose from {', '.join(SYSTEM)})")
    return ("{{- " + json.dumps(SYSTEM[template] + " ") + " -}}"
            "{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
            "{%- else -%}{%- set text = namespace(s='') -%}"
            "{%- for item in message['content'] if item['type'] == 'image' -%}"
            "{%- set text.s = text.s + '<image>\\n' -%}{%- endfor -%}"
            "{%- for item in message['content'] if item['type'] == 'text' -%}"
            "{%- set text.s = text.s + item['text'] -%}{%- endfor -%}"
            "{%- set text = text.s -%}{%- endif -%}"
            "{%- if message['role'] == 'user' -%}{{- 'USER: ' + text + ' ' -}}"
            "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text + " + json.dumps(EOS_TEXT) + " -}}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}")


def _write_processor(model, path, template):
    """preprocessor_config.json (LLaVA's pad-to-square), processor_config.json (LlavaProcessor: patch
    size, feature strategy; one CLS token that 'default' drops) and chat_template.jinja."""
    c = model.config
    pre = dict(IMAGE_PROCESSOR, size={"shortest_edge": c.image_size},
               crop_size={"height": c.image_size, "width": c.image_size})
    proc = {"processor_class": "LlavaProcessor", "patch_size": c.patch_size, "num_additional_image_tokens": 1,
            "vision_feature_select_strategy": "default" if c.vision_select_feature == "patch" else "full",
            "image_token": "<image>"}
    for name, obj in (("preprocessor_config.json", pre), ("processor_config.json", proc)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(chat_template(template))
    cfg_path = os.path.join(path, "tokenizer_config.json")  # AutoProcessor reads processor_class here too
    tcfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    with open(cfg_path, "w") as f:
        json.dump(dict(tcfg, processor_class="LlavaProcessor"), f, indent=2)


# ----------------------------------------------------------------------------------------
# PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors), both ways
# ----------------------------------------------------------------------------------------

PEFT_LM_TARGETS = r".*language_model\..*\.({})"  # PEFT full-matches a string target against module names


def export_peft_adapter(model, path, adapter, base=None):
    """A LoRA adapter in PEFT's format, keyed by the module names of transformers'
    LlavaForConditionalGeneration (transformers >= 4.52 / 5), targeting the language model only (a
    regex: bare names like 'q_proj' would also put LoRA on CLIP's q/k/v). `base` is the directory
    transformers loads the base model from (an export_hf directory); default: the llava-hf directory
    this model was loaded from, else `path/base`, written here with export_hf. The config names
    LlavaForConditionalGeneration (PEFT's auto_mapping), so peft.AutoPeftModel.from_pretrained(path)
    loads base and adapter on its own."""
    if adapter not in model.adapters:
        raise ValueError(f"no adapter '{adapter}'")
    a = model.adapters[adapter]
    state = {}
    for i, lin in model.lora_linears():
        if adapter in lin.lora:
            ad = lin.lora[adapter]
            for s in ad.A:
                key = f"base_model.model.model.language_model.layers.{i}.{_module_of(s)}.{s}_proj"
                state[key + ".lora_A.weight"] = ad.A[s].detach()
                state[key + ".lora_B.weight"] = ad.B[s].detach()
    os.makedirs(path, exist_ok=True)
    if base is None:
        src = getattr(model, "source_path", None)
        if src and not is_peft_dir(src) and detect_layout(src) == "llava-hf":
            base = src
        else:
            base = os.path.join(path, "base")
            export_llava_hf(model, base)
    _save_safetensors(state, os.path.join(path, "adapter_model.safetensors"), {"format": "pt"})
    targets = "|".join(f"{t}_proj" for t in a["targets"])
    cfg = {"peft_type": "LORA", "task_type": None, "r": a["r"], "lora_alpha": a["alpha"],
           "lora_dropout": a["dropout"], "target_modules": PEFT_LM_TARGETS.format(targets), "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
           "use_dora": False, "modules_to_save": None, "base_model_name_or_path": os.path.abspath(str(base)),
           "auto_mapping": {"base_model_class": "LlavaForConditionalGeneration",
                            "parent_library": "transformers.models.llava.modeling_llava"}}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def is_peft_dir(path):
    """A PEFT adapter directory (adapter_config.json, no model config.json)."""
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and \
        not os.path.exists(os.path.join(path, "config.json"))


def peft_base_dir(path):
    """The local base directory a PEFT adapter names (as written, else relative to the adapter)."""
    cfg_path = os.path.join(path, "adapter_config.json")
    base = _read_json(cfg_path).get("base_model_name_or_path")
    for cand in (base, os.path.join(path, str(base))) if isinstance(base, str) and base else ():
        if os.path.isdir(cand):
            return cand
    raise CheckpointError(f"{cfg_path}: field 'base_model_name_or_path': {base!r} is not a local directory; "
                          f"load the base model, then model.load_adapters({path!r})")


def load_peft_adapter(model, path, name):
    """Read a PEFT LoRA adapter trained on this model's base (llava-hf in any key layout, or LLaMA keys).
    LoRA on q,k,v,o,gate,up,down of the language model becomes the adapter `name`; LoRA on the vision
    tower, the projector or lm_head is merged into the base weights (W += (alpha/r) B A) with a one-line
    notice: our adapters live on the language model, so those modules have no adapter to hold it."""
    cfg_path = os.path.join(path, "adapter_config.json")
    cfg = _read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: field 'peft_type': {cfg.get('peft_type')!r} (only LORA is read)")
    for field in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(field):
            raise CheckpointError(f"{cfg_path}: field '{field}': true is not supported (plain LoRA only)")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "trainable_token_indices"):
        if cfg.get(field):
            raise CheckpointError(f"{cfg_path}: field '{field}': {cfg[field]!r} is not supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_path}: field 'bias': {cfg['bias']!r} is not supported ('none')")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{cfg_path}: fields 'r' and 'lora_alpha': expected a positive integer and a number")
    files = [f for f in ("adapter_model.safetensors", "adapter_model.bin") if os.path.exists(os.path.join(path, f))]
    if not files:
        raise CheckpointError(f"{path}: no adapter_model.safetensors (or adapter_model.bin)")
    file = os.path.join(path, files[0])
    try:  # adapters are small: read whole
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read the adapter weights (truncated or corrupt?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    text, merged = {}, []
    ours = {parts[0]: n for n, parts in _our_targets(model.config).items() if len(parts) == 1}
    params = dict(model.named_parameters())
    for key in sorted(state):
        if key.endswith(".lora_B.weight"):
            continue
        if not key.endswith(".lora_A.weight"):
            raise CheckpointError(f"{file}: key '{key}' is not a LoRA A/B weight (embedding LoRA or saved modules "
                                  f"are not supported)")
        module = key[:-len(".lora_A.weight")].removeprefix("base_model.model.")
        if key.replace("lora_A", "lora_B") not in state:
            raise CheckpointError(f"{file}: key '{key.replace('lora_A', 'lora_B')}' is missing")
        A, B = state[key].float(), state[key.replace("lora_A", "lora_B")].float()
        part, pname = _canonical_key(module + ".weight")
        m = re.fullmatch(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight", pname or "")
        if part == "text" and m and m[3] in LORA_TARGETS and int(m[1]) < model.config.layers:
            text[int(m[1]), m[3]] = (key, A, B)
            continue
        if part == "vision" and pname.startswith("encoder.layers.") and \
                int(pname.split(".")[2]) >= model.config.vision_layers_run:
            continue  # a CLIP layer after the selected one: never run
        if (part, pname) not in ours or (part == "projector" and model.config.projector == "linear"):
            raise CheckpointError(f"{file}: key '{key}': LoRA on '{module}' does not fit this model")
        w = params[ours[part, pname]]
        if tuple(w.shape) != (B.shape[0], A.shape[1]):
            raise CheckpointError(f"{file}: key '{key}' has shape {tuple(A.shape)} but '{module}' is {tuple(w.shape)}")
        with torch.no_grad():
            w += (alpha / r * B @ A).to(w.dtype)  # W += (alpha/r) B A (LoRA, Hu et al. 2021, eq. 3)
        merged.append(module)
    if merged:
        print(f"note: {path}: LoRA on {len(merged)} vision tower / projector / lm_head modules merged into the "
              f"base weights (factalign's adapters hold language-model LoRA only)", flush=True)
    if not text:
        return
    targets = [t for t in LORA_TARGETS if any(s == t for _, s in text)]
    model.add_adapter(name, r, alpha, float(cfg.get("lora_dropout") or 0.0), targets)
    with torch.no_grad():
        for i, lin in model.lora_linears():
            ad = lin.lora[name] if name in lin.lora else None
            for s in ad.A if ad is not None else ():
                if (i, s) not in text:
                    continue  # a layer PEFT left out (layers_to_transform): B stays 0, no change
                key, A, B = text[i, s]
                if A.shape != ad.A[s].shape or B.shape != ad.B[s].shape:
                    raise CheckpointError(f"{file}: key '{key}' has shape {tuple(A.shape)} / {tuple(B.shape)} but the "
                                          f"model expects {tuple(ad.A[s].shape)} / {tuple(ad.B[s].shape)}")
                ad.A[s].copy_(A)
                ad.B[s].copy_(B)
