"""LLaVA in plain PyTorch: a CLIP ViT encoder, a projector, a LLaMA/Vicuna decoder with a
KV cache, hand-written LoRA with named adapters, and scalar heads.

    pixels -> CLIP ViT (up to layer `vision_select_layer`, CLS dropped) -> projector
           -> written into the <image> token positions of the prompt -> LLaMA -> logits

Loading and saving weights in every checkpoint layout lives in checkpoint.py.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(Exception):
    """A checkpoint or model config that cannot be used. str() is one line naming the file and
    the key (checkpoint.py raises it while loading; ModelConfig while checking its fields)."""


def eos_ids_ok(ids):
    """An eos_token_id: one integer, or a non-empty list of them (any of which ends an answer)."""
    return type(ids) is int or (isinstance(ids, (list, tuple)) and len(ids) > 0
                                and all(type(x) is int for x in ids))


@dataclass
class ModelConfig:
    # vision tower (CLIP ViT)
    image_size: int = 336                 # input resolution in pixels
    patch_size: int = 14                  # ViT patch size (224/14 -> 256 tokens, 336/14 -> 576)
    vision_hidden: int = 1024             # CLIP width
    vision_intermediate: int = 4096       # CLIP MLP width
    vision_layers: int = 24               # CLIP layers in the checkpoint (built: to the selected)
    vision_heads: int = 16                # CLIP attention heads
    vision_select_layer: int = -2         # hidden_states index LLaVA reads (-2: second-to-last);
    # a list (llava-hf's vision_feature_layer [-2, -5]): those layers' features side by side
    vision_select_feature: str = "patch"  # 'patch' drops CLS (LLaVA default), 'cls_patch' keeps it
    vision_eps: float = 1e-5              # CLIP LayerNorm epsilon
    # projector
    projector: str = "mlp2x_gelu"         # 'linear' (LLaVA-1, LLaVA-RLHF), 'mlp2x_gelu' (LLaVA-1.5)
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
    image_token_id: int = 32000           # marks image-feature slots (llava-hf <image>; LLaVA -200)
    pad_token_id: int = 32001             # padding id
    bos_token_id: int = 1                 # <s>
    eos_token_id: int = 2                 # </s> (or a list: any of them ends an answer)

    def __post_init__(self):
        sizes = ("image_size", "patch_size", "vision_hidden", "vision_intermediate",
                 "vision_layers", "vision_heads", "vocab_size", "hidden", "intermediate", "layers",
                 "heads", "kv_heads", "max_position")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise CheckpointError(f"config: field '{name}': must be a positive integer, got "
                                      f"{value!r}")
        for name in ("vision_eps", "rms_eps", "rope_theta"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise CheckpointError(f"config: field '{name}': must be a finite number > 0, got "
                                      f"{value!r}")
        if not eos_ids_ok(self.eos_token_id):
            raise CheckpointError(f"config: field 'eos_token_id': expected an integer or a "
                                  f"non-empty list of integers, got {self.eos_token_id!r:.40}")
        for name in ("bos_token_id", "eos_token_id"):  # (pad may name a row no one looks up)
            value = getattr(self, name)  # (eos: one id or a list, any of which ends an answer)
            for x in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(x, int) and x >= self.vocab_size:
                    raise CheckpointError(f"config: field '{name}': {x} is beyond the "
                                          f"{self.vocab_size} embedding rows (vocab_size)")
        if not isinstance(self.head_dim, int) or self.head_dim < 0:  # (a negative one: a torch
            # error deep in the model's construction)
            raise CheckpointError(f"config: field 'head_dim': must be 0 (hidden // heads) or a "
                                  f"positive integer, got {self.head_dim!r}")
        if self.head_dim == 0:
            self.head_dim = self.hidden // self.heads
        if self.projector not in ("linear", "mlp2x_gelu"):
            raise CheckpointError("config: field 'projector': unknown projector "
                                  f"'{self.projector}' (linear or mlp2x_gelu)")
        if self.vision_select_feature not in ("patch", "cls_patch"):
            raise CheckpointError("config: field 'vision_select_feature': "
                                  f"'{self.vision_select_feature}' (patch or cls_patch)")
        if self.heads % self.kv_heads:
            raise CheckpointError(f"config: heads {self.heads} is not a multiple of kv_heads "
                                  f"{self.kv_heads}")
        if self.vision_hidden % self.vision_heads:  # (CLIP's head width is hidden / heads)
            raise CheckpointError(f"config: field 'vision_heads': {self.vision_heads} does not "
                                  f"divide vision_hidden {self.vision_hidden}")
        s = self.vision_select_layer  # (a bool is an int to Python, not a layer)
        one = type(s) is int
        if not one and not (isinstance(s, (list, tuple)) and s and all(type(x) is int for x in s)):
            raise CheckpointError("config: field 'vision_select_layer': an integer or a non-empty "
                                  f"list of integers, got {s!r:.40}")
        self.vision_select_layer = s if one else list(s)
        self.vision_layers_run  # checked here, where the loader names the file (not mid-load)

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self):
        return self.num_patches + (self.vision_select_feature == "cls_patch")

    @property
    def vision_select_indexes(self):
        """The hidden_states read, counted from 0: hidden_states[0] is the embedding output (after
        pre_layrnorm), hidden_states[k] the output of layer k."""
        s = self.vision_select_layer
        picks = [s] if type(s) is int else s
        out = [self.vision_layers + 1 + p if p < 0 else p for p in picks]
        for p, n in zip(picks, out):
            if not 0 <= n <= self.vision_layers:
                raise CheckpointError(f"config: field 'vision_select_layer': {p} is out of range "
                                      f"for {self.vision_layers} layers")
        return out

    @property
    def vision_layers_run(self):
        return max(self.vision_select_indexes)  # later layers are never built

    @property
    def vision_feature_dim(self):
        return self.vision_hidden * len(self.vision_select_indexes)  # the projector's input width


PRESETS = {
    # tests: milliseconds per step
    "tiny": dict(image_size=48, patch_size=16, vision_hidden=32, vision_intermediate=64,
                 vision_layers=2, vision_heads=2, projector="mlp2x_gelu", vocab_size=512, hidden=32,
                 intermediate=64, layers=2, heads=4, kv_heads=2, max_position=512),
    # the CPU demo on the Shapes world: 16 px patches aligned with the 3x3 grid cells
    "shapes": dict(image_size=48, patch_size=16, vision_hidden=128, vision_intermediate=512,
                   vision_layers=3, vision_heads=4, projector="mlp2x_gelu", vocab_size=512,
                   hidden=128, intermediate=384, layers=3, heads=4, kv_heads=4, max_position=512,
                   rope_theta=1e6),
    # benchmarks on a CPU: big enough that matmuls dominate
    "bench": dict(image_size=112, patch_size=14, vision_hidden=256, vision_intermediate=1024,
                  vision_layers=3, vision_heads=4, projector="mlp2x_gelu", vocab_size=32064,
                  hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=8, max_position=1024),
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
            # B = 0: a new adapter changes nothing
            self.B[name] = nn.Parameter(torch.zeros(size, r, dtype=torch.float32))


def merged_weight(weight, scale, bounds, *pairs):
    """W + s B A, slice by slice (rows a:b of W get s B_i A_i): a new tensor, W is untouched."""
    merged = weight.detach().clone()
    for (a, b), A, B in zip(bounds, pairs[0::2], pairs[1::2]):
        merged[a:b].addmm_(B.detach(), A.detach(), alpha=scale)
    return merged


class MergedLoRA(torch.autograd.Function):
    """y = (W + s B A) x + bias for a frozen W: the same function as W x + s B (A x), as one matmul
    forward and one for the input gradient (the LoRA term rides in the merged weight), instead of
    three plus an add and a cat each way. Gradients of A and B as autograd would take them:
    dB_i = s g_i^T (A_i x), dA_i = s (g_i B_i)^T x, g_i the output gradient of slice i.
    outputs: None (one output), or the (start, end) rows of each of several outputs (q, k, v
    apart: no split of the output, and no cat of its gradients). The merged weight is made again
    in backward rather than saved: a saved copy per layer would double a large model's weights."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, outputs, bounds, *pairs):
        merged = merged_weight(weight, scale, bounds, *pairs)
        ctx.save_for_backward(x, weight, *pairs)
        ctx.scale, ctx.bounds, ctx.outputs = scale, bounds, outputs
        if outputs is None:
            return F.linear(x, merged, bias)
        return tuple(F.linear(x, merged[a:b], None if bias is None else bias[a:b])
                     for a, b in outputs)

    @staticmethod
    def backward(ctx, *grads):
        x, weight, *pairs = ctx.saved_tensors
        merged = merged_weight(weight, ctx.scale, ctx.bounds, *pairs)
        outputs = ctx.outputs or ((0, merged.shape[0]),)
        x2 = x.reshape(-1, x.shape[-1])
        g2 = [g.reshape(-1, g.shape[-1]) for g in grads]

        def rows(a, b):  # the gradient of output rows a:b
            for (start, end), g in zip(outputs, g2):
                if start <= a and b <= end:
                    return g[:, a - start:b - start]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g2[0] @ merged[outputs[0][0]:outputs[0][1]]
            for (a, b), g in zip(outputs[1:], g2[1:]):
                dx.addmm_(g, merged[a:b])
            dx = dx.view(x.shape)
        if not any(ctx.needs_input_grad[6:]):  # a frozen adapter: the input gradient alone
            return (dx, None, None, None, None, None, *[None] * len(pairs))
        As, Bs = pairs[0::2], pairs[1::2]
        # A x and (g B)^T x for every slice at once (one matmul each, not one per slice)
        u = x2 @ (As[0] if len(As) == 1 else torch.cat(As)).t()
        gB = [rows(a, b) @ B for (a, b), B in zip(ctx.bounds, Bs)]
        dA = ((gB[0] if len(gB) == 1 else torch.cat(gB, 1)).t() @ x2).mul_(ctx.scale)
        grads = []
        for i, ((a, b), A) in enumerate(zip(ctx.bounds, As)):
            r = A.shape[0]
            grads += [dA[i * r:(i + 1) * r], (rows(a, b).t() @ u[:, i * r:(i + 1) * r])
                      .mul_(ctx.scale)]
        return (dx, None, None, None, None, None, *grads)


PACK_MIN_ROWS, PACK_MIN_NUMEL = 4, 1 << 19  # where prepack pays (below)
PACK_MAX_TOTAL = 1 << 28  # entries packed per generate call at most (1 GiB of fp32 copies)


def prepack(weight, rows):
    """oneDNN's copy of an fp32 CPU weight laid out for matmuls of `rows` input rows, or None where
    it does not pay (measured on a 2-core CPU, one thread: at 4-8 rows a weight of >= 0.5M entries
    runs 1.6-2.2x faster packed than with F.linear (the 32k x 512 lm_head: 3.2 ms, not 7.2);
    smaller ones, or 2 rows, run slower, its fixed cost is ~15 us) or cannot (another device or
    dtype, no oneDNN). The same matmul up to float rounding (another order of the sums)."""
    if rows < PACK_MIN_ROWS or weight.numel() < PACK_MIN_NUMEL:
        return None
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")):
        return None
    try:
        return mkldnn._reorder_linear_weight(weight.detach(), rows)
    except RuntimeError:  # a build or CPU whose oneDNN cannot pack: plain F.linear
        return None


def packed_linear(x, packed, bias):
    """F.linear(x, W, bias) with W as prepack made it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


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
        # while decoding (fuse_lora): (merged weight,), or (A, B, scale) on a bf16 base
        self.fused_lora = None

    def forward(self, x):
        adapter = self.lora[self.active] if self.active in self.lora else None
        if adapter is None:
            return F.linear(x, self.weight, self.bias)
        if self.mergeable(adapter, x):
            return MergedLoRA.apply(x, self.weight, self.bias, adapter.scale, None,
                                    *self.lora_pairs(adapter))
        y = F.linear(x, self.weight, self.bias)
        names = [n for n in self.slices if n in adapter.A]
        A = adapter.A[names[0]] if len(names) == 1 else torch.cat([adapter.A[n] for n in names])
        # LoRA math in fp32 even on a bf16 base, where FSDP's mixed precision hands it bf16
        # weights, and under bf16 autocast (which cast its matmuls back to bf16)
        with torch.autocast(x.device.type, enabled=False):
            A, xd = A.float(), adapter.dropout(x).float()
            # A x for every slice in one matmul, scaled
            u = (xd @ A.t() * adapter.scale).chunk(len(names), dim=-1)
            parts = []
            for n, size in self.slices.items():  # untargeted slices (e.g. k of q,k,v) add zeros
                if n in adapter.A:
                    parts.append(u[names.index(n)] @ adapter.B[n].float().t())
                else:
                    parts.append(xd.new_zeros(*xd.shape[:-1], size))
            delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y + delta.to(y.dtype)

    def forward_slices(self, x):
        """forward(x) split into its named slices (q, k, v): with a merged adapter each comes from
        its own matmul, so no gradient is ever concatenated."""
        adapter = self.lora[self.active] if self.active in self.lora else None
        if adapter is None or not self.mergeable(adapter, x):
            return self(x).split(list(self.slices.values()), -1)
        outputs = tuple(self.slice_range(n) for n in self.slices)
        return MergedLoRA.apply(x, self.weight, self.bias, adapter.scale, outputs,
                                *self.lora_pairs(adapter))

    def mergeable(self, adapter, x):
        """Whether W x + s B A x may run as (W + s B A) x (MergedLoRA): an fp32 frozen base (a bf16
        base would round the LoRA term away), no dropout between x and A, not compiled, and no
        autocast (which would run the merged matmul in bf16, rounding the LoRA term away too; and
        its backward got bf16 gradients against the fp32 merged weight: a dtype error)."""
        no_dropout = isinstance(adapter.dropout, nn.Identity) or not adapter.dropout.training
        frozen = not self.weight.requires_grad and (self.bias is None or
                                                    not self.bias.requires_grad)
        # (compiled, as the decode step: the plain path, which the compiler fuses; the merged one
        # would make W + s B A again at every call, a copy of the weight per token)
        return (no_dropout and frozen and self.weight.dtype == torch.float32
                and x.dtype == torch.float32 and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled(x.device.type))

    def lora_pairs(self, adapter):
        """(slice bounds, A_1, B_1, A_2, B_2, ...) of the slices the adapter targets."""
        names = [n for n in self.slices if n in adapter.A]
        pairs = [tuple(self.slice_range(n) for n in names)]
        for n in names:
            pairs += [adapter.A[n], adapter.B[n]]
        return pairs

    def fuse_lora(self, rows=0):
        """For decoding, the active adapter merged into the weight once per generate call
        (merged_weight, as forward), so a step is one matmul per linear; on a bf16 base, where
        it cannot merge, two matrices: A of every targeted slice stacked, and B block-diagonal
        (zero rows for untargeted slices), so W x + s B A x is two matmuls, not one per slice.
        On an fp32 CPU weight where prepack pays for `rows` rows: that one matrix (merged, or the
        base alone) prepacked for oneDNN. None when forward must run instead (dropout active, or
        no adapter and nothing to pack). Returns the number of entries packed (0: none)."""
        self.fused_lora = None
        adapter = self.lora[self.active] if self.active in self.lora else None
        dropout_on = adapter is not None and not isinstance(adapter.dropout, nn.Identity)
        if dropout_on and adapter.training:
            return 0
        if adapter is None or self.weight.dtype == torch.float32:
            with torch.no_grad():
                weight = (self.weight if adapter is None else
                          merged_weight(self.weight, adapter.scale, *self.lora_pairs(adapter)))
            packed = prepack(weight, rows)
            if packed is not None:
                self.fused_lora = ("packed", packed)
                return weight.numel()
            if adapter is not None:
                self.fused_lora = ("merged", weight)
            return 0
        names = [n for n in self.slices if n in adapter.A]
        r = adapter.A[names[0]].shape[0]
        B = adapter.B[names[0]].new_zeros(sum(self.slices.values()), r * len(names))
        for n in names:
            a, b = self.slice_range(n)
            j = names.index(n)
            B[a:b, j * r:(j + 1) * r] = adapter.B[n]
        A = torch.cat([adapter.A[n] for n in names])
        self.fused_lora = ("two", A.detach(), B.detach(), adapter.scale)
        return 0

    def decode(self, x):
        if self.fused_lora is None:
            return self(x)
        kind, *mats = self.fused_lora
        if kind == "packed":
            return packed_linear(x, mats[0], self.bias)
        if kind == "merged":
            return F.linear(x, mats[0], self.bias)
        A, B, scale = mats
        y = F.linear(x, self.weight, self.bias)
        return y + ((x.float() @ A.float().t() * scale) @ B.float().t()).to(y.dtype)

    @torch.no_grad()
    def weight_with(self, name):
        """W + (alpha/r) B A for adapter `name`, slice by slice: a new tensor, the layer untouched
        (merge_adapter writes it in; export_llava_hf writes it out)."""
        # (in fp32, rounded once to the weight's dtype: on a bf16 base adding a rounded change to
        # a rounded weight lost more of it)
        w = self.weight.detach().float().clone()
        ad = self.lora[name]
        for s in ad.A:
            a, b = self.slice_range(s)
            w[a:b] += ad.scale * ad.B[s].float() @ ad.A[s].float()
        return w.to(self.weight.dtype)

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
        heads = (p(x).view(B, T, self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (h.transpose(1, 2) for h in heads)
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
        self.patch_embedding = nn.Conv2d(3, c.vision_hidden, c.patch_size, stride=c.patch_size,
                                         bias=False)
        self.position_embedding = _embedding(c.num_patches + 1, c.vision_hidden)

    def forward(self, pixels):
        grid = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, C, h, w)
        patches = grid.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(c) for _ in range(c.vision_layers_run))


class CLIPVision(nn.Module):
    """CLIP ViT returning hidden_states[select_layer] (several: side by side) without CLS; later
    layers are never built."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embeddings = CLIPEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.vision_hidden, eps=c.vision_eps)  # sic, as in CLIP
        self.encoder = CLIPEncoder(c)

    def forward(self, pixels):
        x = self.pre_layrnorm(self.embeddings(pixels))
        picks = self.c.vision_select_indexes
        states = {0: x}
        for k, layer in enumerate(self.encoder.layers, 1):
            x = layer(x)
            if k in picks:
                states[k] = x
        # several layers: their features side by side (transformers' LlavaModel concatenates)
        x = torch.cat([states[k] for k in picks], dim=-1) if len(picks) > 1 else states[picks[0]]
        return x[:, 1:] if self.c.vision_select_feature == "patch" else x


class Projector(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.kind = c.projector
        self.linear_1 = nn.Linear(c.vision_feature_dim, c.hidden)
        if c.projector == "mlp2x_gelu":
            self.linear_2 = nn.Linear(c.hidden, c.hidden)

    def forward(self, x):
        x = self.linear_1(x.to(self.linear_1.weight.dtype))  # (fp32 when it trains on bf16 CLIP)
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(F.gelu(x))  # exact (erf) GELU, as LLaVA-1.5
        return x


# ----------------------------------------------------------------------------------------
# LLaMA decoder
# ----------------------------------------------------------------------------------------

class FrozenRMSNorm(torch.autograd.Function):
    """weight * x / rms(x) (fp32) with a frozen weight, and its input gradient in four passes
    over x rather than autograd's ten: dx = r (w g - x r^2 mean(w g x)), r = 1 / rms(x)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (x * r)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        wg = grad * weight
        dot = (wg * x).mean(-1, keepdim=True)
        return r * (wg - x * (r * r * dot)), None, None


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and x.requires_grad and not self.weight.requires_grad:
            return FrozenRMSNorm.apply(x, self.weight, self.eps)  # LoRA training
        if x.dtype == torch.float32:  # the same formula as below, as one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()  # statistics in fp32, as LLaMA
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(c, position_ids, dtype):
    """cos and signed sin, (B, 1, T, head_dim), for RoPE at the given positions (computed in fp32).
    rotate_half(x) = cat(-x2, x1) = roll(x, head_dim/2) * [-1.., +1..]: the sign is folded into sin
    here, once per forward, so that apply_rope needs no negation and no cat."""
    even = torch.arange(0, c.head_dim, 2, device=position_ids.device).float()
    inv_freq = 1.0 / (c.rope_theta ** (even / c.head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    cos_full = torch.cat([cos, cos], -1).to(dtype)[:, None]
    signed_sin = torch.cat([-sin, sin], -1).to(dtype)[:, None]
    return cos_full, signed_sin


def take_positions(t, keep, dim):
    """The positions `keep` of t along its time axis `dim`: a slice (the same columns in every
    row), or a (B, K) tensor of column indices per row."""
    if isinstance(keep, slice):
        return t[(slice(None),) * dim + (keep,)]
    shape = (keep.shape[0],) + (1,) * (dim - 1) + (keep.shape[1],) + (1,) * (t.dim() - dim - 1)
    size = t.shape[:dim] + keep.shape[1:] + t.shape[dim + 1:]
    return t.gather(dim, keep.view(shape).expand(size))


def apply_rope(x, cos, sin):
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)  # x cos + rotate_half(x) sin


class KVCache:
    """Preallocated keys/values for incremental decoding: (B, kv_heads, max_len, head_dim) per
    layer. Zero-filled: the static decode step attends over all max_len slots with the unwritten
    ones masked (weight exactly 0), and 0 * garbage could be NaN."""

    def __init__(self, c, batch, max_len, device, dtype):
        shape = (batch, c.kv_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.layers)]
        self.length = 0  # positions filled so far (advanced by the model after each forward)


class DecodeState:
    """Everything the one-token decode step reads or writes, so that a step allocates no positions,
    masks or cache and every tensor keeps its shape (what torch.compile and CUDA graphs need). Step
    i writes its key/value into cache slot prompt_len + i and attends over all slots: key_bias is 0
    on real keys written so far, -inf on padding and on slots not written yet. Made for a batch,
    cache length and number of new-token positions; `start` fills it in place for a prompt, so a
    compiled step can run over one state call after call (the same tensors: CUDA graphs replay on
    the addresses they were captured with)."""

    def __init__(self, c, batch, cache_len, new_len, device, dtype):
        self.cache = KVCache(c, batch, cache_len, device, dtype)
        # fp32, as the scores
        self.key_bias = torch.empty((batch, 1, 1, cache_len), device=device)
        self.cos = torch.empty((batch, 1, new_len, c.head_dim), device=device, dtype=dtype)
        self.sin = torch.empty_like(self.cos)
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # i, advanced in place
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # prompt_len + i
        self.written = 0  # slots written before this step (a number, for eager steps)
        self.used = False  # started before (its cache holds a call's keys and values)
        self.key = (c, batch, cache_len, new_len, str(device), dtype)

    def start(self, prompt_mask, prompt_len):
        """Ready for a prompt of prompt_len tokens (left-padded where prompt_mask has 0s) whose
        keys and values the prefill writes next."""
        c, B = self.key[0], self.key_bias.shape[0]
        self.cache.length = 0
        if self.used:  # a compiled step reads every slot: none may hold an earlier call's inf
            for t in self.cache.k + self.cache.v:  # (masked, it weighs 0, but 0 x inf is NaN)
                t.zero_()
        self.used = True
        self.key_bias.fill_(float("-inf"))
        if prompt_mask is None:
            self.key_bias[..., :prompt_len] = 0
            first = torch.full((B, 1), prompt_len, device=self.slot.device)
        else:  # left padding: pads stay masked; a row's first new token sits after its real tokens
            self.key_bias[..., :prompt_len].masked_fill_(prompt_mask.bool()[:, None, None], 0)
            first = prompt_mask.sum(-1, keepdim=True)
        # (B, N) RoPE positions
        positions = first + torch.arange(self.cos.shape[2], device=self.slot.device)
        cos, sin = rope_cos_sin(c, positions, self.cos.dtype)  # (B, 1, N, head_dim)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.step.zero_()
        self.slot.fill_(prompt_len)
        self.written = prompt_len

    def advance(self):
        self.step += 1
        self.slot += 1
        self.written += 1


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
        self.qkv_proj = LoRALinear(c.hidden, {"q": q, "k": kv, "v": kv})  # HF q/k/v stacked
        self.o_proj = LoRALinear(q, {"o": c.hidden})

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0, seq_lens=None, keep=None):
        """keep (see take_positions): only these query positions come out (the keys and values
        are every position's)."""
        c, (B, T, _) = self.c, x.shape
        q, k, v = self.qkv_proj.forward_slices(x)
        q = apply_rope(q.view(B, T, c.heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        if cache is not None:
            start = cache.length
            cache.k[layer_idx][:, :, start:start + T] = k
            cache.v[layer_idx][:, :, start:start + T] = v
            k, v = cache.k[layer_idx][:, :, :start + T], cache.v[layer_idx][:, :, :start + T]
        gqa = c.heads != c.kv_heads
        if keep is not None:  # the kept queries, each seeing the keys its row of the mask allows
            q = take_positions(q, keep, 2)
            if mask is None:
                cols = torch.arange(T, device=x.device)
                rows = cols[keep][None] if isinstance(keep, slice) else keep
                mask = (cols <= rows[..., None])[:, None]
            else:
                mask = take_positions(mask.expand(B, -1, -1, -1), keep, 2)
        if seq_lens is not None:  # packed sequences: causal attention within each one, never across
            parts = zip(q.split(seq_lens, 2), k.split(seq_lens, 2), v.split(seq_lens, 2))
            y = torch.cat([F.scaled_dot_product_attention(a, b, d, is_causal=True, enable_gqa=gqa)
                           for a, b, d in parts], 2)
        # no padding: the fast causal kernel (one new query sees every cached key: no mask)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, q.shape[2], -1))

    def decode(self, x, cos, sin, k_cache, v_cache, slot, key_bias, n=None):
        """One new token per row (x: B, 1, hidden): its key/value written into `slot` of the static
        cache, attention over every slot (or the first n) with key_bias as the mask. Query head h
        reads key/value head h // (heads / kv_heads), as SDPA's enable_gqa.
        softmax(q k^T / sqrt(d) + bias) v in fp32."""
        c, B = self.c, x.shape[0]
        q, k, v = self.qkv_proj.decode(x).split([c.heads * c.head_dim, c.kv_heads * c.head_dim,
                                                 c.kv_heads * c.head_dim], -1)
        q = apply_rope(q.view(B, 1, c.heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, 1, c.kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        # (.to: under torch.autocast v comes out bf16, k fp32 from the fp32 RoPE tables, the
        # cache is the model's dtype; the prefill's slice assignment casts the same way)
        k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
        v = v.view(B, 1, c.kv_heads, c.head_dim).transpose(1, 2)
        v_cache.index_copy_(2, slot, v.to(v_cache.dtype))
        if n is not None:
            k_cache, v_cache, key_bias = k_cache[:, :, :n], v_cache[:, :, :n], key_bias[..., :n]
        # query heads grouped by kv head
        q = q.reshape(B, c.kv_heads, c.heads // c.kv_heads, c.head_dim)
        scores = (q @ k_cache.transpose(-1, -2)).float() * c.head_dim ** -0.5 + key_bias
        # (B, kv_heads, group, head_dim)
        y = torch.softmax(scores, -1).to(v_cache.dtype) @ v_cache
        return self.o_proj.decode(y.reshape(B, 1, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.inter = c.intermediate
        # HF gate/up stacked
        self.gate_up_proj = LoRALinear(c.hidden, {"gate": c.intermediate, "up": c.intermediate})
        self.down_proj = LoRALinear(c.intermediate, {"down": c.hidden})

    def forward(self, x):
        gate, up = self.gate_up_proj.forward_slices(x)
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

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0, seq_lens=None, keep=None):
        h = self.input_layernorm(x)
        y = self.self_attn(h, cos, sin, mask, cache, layer_idx, seq_lens, keep)
        # keep: the residual stream at the kept positions alone from here on
        x = (x if keep is None else take_positions(x, keep, 1)) + y
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, k_cache, v_cache, slot, key_bias, n=None):
        h = self.input_layernorm(x)
        x = x + self.self_attn.decode(h, cos, sin, k_cache, v_cache, slot, key_bias, n)
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

    def forward(self, h):  # (fp32 weights too: FSDP's mixed precision hands bf16 ones)
        return F.linear(h.float(), self.weight.float(), self.bias.float()).squeeze(-1)


@dataclass
class GenerateOutput:
    tokens: torch.Tensor    # (B, L) new tokens; after EOS: pad
    # (B, L) log p(token) under the sampling temperature and any repetition penalty (0 after
    # EOS), or None
    logprobs: torch.Tensor
    lengths: torch.Tensor   # (B,) new tokens up to and including EOS
    finished: torch.Tensor  # (B,) True where EOS was produced
    # (B, L) entropy of softmax(logits / temperature) at each new token (0 after EOS), or None
    entropy: torch.Tensor = None


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
        self.packed_head = None  # the lm_head prepacked while decoding (fused_lora)
        self.heads = nn.ModuleDict()     # scalar heads by name ('reward', 'value')
        self.adapters = {}               # adapter name -> dict(r, alpha, dropout, targets)
        self.active_adapter = None
        # base weights changed since loading (a merge, or a part set to train): they are no longer
        # the files the model came from (export_peft_adapter then writes its own base)
        self.base_edited = False
        self.gradient_checkpointing = False
        # FSDP (distributed.shard_model): every rank must run the same collectives, so a micro-batch
        # without an image runs the tower too (on a blank image, its features weighted 0)
        self.encode_every_batch = False
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
            # std 1 (CLIP's own init uses 0.02): trained from scratch on Shapes, positions must
            # stand out against the patch content at pre_layrnorm, or "where" is lost and
            # per-cell colours blur.
            nn.init.normal_(m.position_embedding.weight, std=1.0)

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            choices = ", ".join(PRESETS)
            raise CheckpointError(f"unknown model preset '{name}' (choose from {choices})")
        return cls(ModelConfig(**{**PRESETS[name], **overrides}))

    # -- forward ------------------------------------------------------------------------

    def encode_images(self, pixel_values):
        """(N, 3, H, W) normalised pixels -> (N, num_image_tokens, hidden) projected features."""
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            # (another size failed deep inside CLIP, or, up to a patch larger, had its edge cut
            # off without a word; transformers' CLIP refuses it too)
            raise ValueError(f"pixel_values: expected (images, 3, {size}, {size}), got shape "
                             f"{tuple(pixel_values.shape)}")
        return self.projector(self.vision_tower(pixel_values))

    def embed(self, input_ids, pixel_values=None, image_features=None):
        """Token embeddings with the image features written into the image-token positions."""
        c = self.config
        is_image = input_ids == c.image_token_id
        try:
            x = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        except IndexError:  # (torch's "index out of range in self" named no argument; looked
            # for once it failed, so the training path pays no check; on CUDA it is a device
            # assert, which generate's check_token_ids comes before)
            raise ValueError(token_ids_error(input_ids, c) or "input_ids: out of range") \
                from None
        n_img = int(is_image.sum())
        given = image_features if image_features is not None else pixel_values
        if n_img == 0 and given is not None and len(given):  # (the images were left unread
            # without a word: an answer from the text alone; transformers refuses it too)
            raise ValueError("images given (pixel_values or image_features), but input_ids "
                             f"hold no image token (config.image_token_id {c.image_token_id})")
        if n_img == 0 and self.encode_every_batch and image_features is None:
            # (LLaVA's own trainer gives a text-only record a zero image for the same reason)
            dtype = next(self.vision_tower.parameters()).dtype
            blank = torch.zeros(1, 3, c.image_size, c.image_size, device=x.device, dtype=dtype)
            return x + 0 * self.encode_images(blank).sum().to(x.dtype)
        if n_img == 0:
            return x
        if image_features is None:
            if pixel_values is None:
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            image_features = self.encode_images(pixel_values)
        if image_features.shape[0] * image_features.shape[1] != n_img:
            n_images, n_features = image_features.shape[:2]
            raise ValueError(f"{n_img} image tokens in input_ids, but {n_images} images x "
                             f"{n_features} features")
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
        # a padding query would see no key at all (NaN in SDPA): let it see itself; its output is
        # ignored
        return (k_pos <= q_pos) & (key_ok | (k_pos == q_pos))

    def backbone(self, x, attention_mask=None, position_ids=None, cache=None, seq_lens=None,
                 keep=None):
        """Run the decoder on embeddings x (B, T, hidden); returns the final normed hidden states.
        seq_lens: x is one row of sequences packed end to end (these lengths), each attending to
        itself only, with its own positions from 0: the outputs of the padded batch, without the
        padding. keep (a slice of columns, or a (B, K) tensor of column indices per row): only the
        hidden states at these positions are returned, and the last layer computes its queries,
        output projection and MLP for them alone (every earlier position still gives its key and
        value): the same numbers as the full pass, indexed, for less work."""
        c, (B, T, _) = self.config, x.shape
        if keep is not None and (seq_lens is not None or (cache is not None and cache.length)):
            raise ValueError("keep: not with packed input or a KV cache already filled")
        past = cache.length if cache is not None else 0
        if seq_lens is not None:
            if B != 1 or sum(seq_lens) != T or attention_mask is not None or cache is not None:
                raise ValueError(f"packed input: one row of sum(seq_lens) = {sum(seq_lens)} "
                                 f"tokens, no mask or cache (got {B} x {T})")
            position_ids = torch.cat([torch.arange(n, device=x.device) for n in seq_lens])[None]
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
            else:  # left padding: a sequence's first real token is position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
        cos, sin = rope_cos_sin(c, position_ids, x.dtype)
        mask = self._attention_mask(attention_mask, T, past, x.device)
        last = len(self.language_model.layers) - 1
        for i, layer in enumerate(self.language_model.layers):
            layer_keep = keep if i == last else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, i, seq_lens,
                                                      layer_keep, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, seq_lens, layer_keep)
        if cache is not None:
            cache.length += T
        return self.language_model.norm(x)

    def head_weight(self):
        return (self.language_model.embed_tokens if self.lm_head is None else self.lm_head).weight

    def logits(self, hidden):
        if self.packed_head is not None:  # decoding (fused_lora)
            return packed_linear(hidden, self.packed_head, None)
        return F.linear(hidden, self.head_weight())

    def forward(self, pixel_values, input_ids, attention_mask=None, position_ids=None,
                return_hidden=False, image_features=None, seq_lens=None, keep=None):
        """Logits (B, T, vocab), or the last hidden states (B, T, hidden) with return_hidden=True.
        input_ids holds config.image_token_id num_image_tokens times per image. seq_lens: input_ids
        is one row of sequences packed end to end (data.pack); keep: only these positions come out
        (B, K, ...), computed with less work; both: see backbone."""
        check_inputs(input_ids, attention_mask)
        x = self.embed(input_ids, pixel_values, image_features)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: use the fused causal path
        h = self.backbone(x, attention_mask, position_ids, seq_lens=seq_lens, keep=keep)
        return h if return_hidden else self.logits(h)

    # -- generation ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, attention_mask=None, max_new_tokens=64,
                 temperature=0.0, top_p=1.0, eos_token_id=None, pad_token_id=None, generator=None,
                 return_logprobs=False, image_features=None, num_beams=1, length_penalty=1.0,
                 compile=False, return_entropy=False, repetition_penalty=1.0):
        """Batched decoding with a static KV cache. Prompts are left-padded (attention_mask 0 on
        pads). temperature 0 = greedy. eos_token_id: one id or a list (any ends a row; < 0: none
        does). Sampling draws from `generator` (a torch.Generator, or a
        list of one per row: each row's tokens then depend on its own stream alone) when given, so
        a run can be resumed with the same random stream. num_beams > 1: beam search (see
        beam_search). compile=True runs the one-token step through torch.compile (inductor; a CUDA
        graph on CUDA) over a static state kept on the model (decode_state), its lengths rounded
        up to COMPILE_BUCKET whatever the prompt's length within them: compiled for the first
        shape, and once more, for all, when another comes (automatic dynamic shapes); the state
        and its cache stay allocated on the model between calls; the same tokens as eager
        decoding up to float rounding. return_entropy:
        also the entropy of each step's distribution (with return_logprobs: what PPO's rollout
        needs from its policy, without a second pass). repetition_penalty p != 1: each token
        generated so far has its logit (beam search: log-prob) divided by p where positive,
        multiplied where negative, before temperature and top-p (transformers'
        RepetitionPenaltyLogitsProcessor as generate(inputs_embeds=...) applies it, which is how
        VIGC's LAVIS model calls it: the prompt's tokens are not penalised; in a left-padded
        batch each row's generated tokens all are, where transformers 5 leaves a padded row's
        first pad-count ones out); return_logprobs are then the penalised distribution's, as
        transformers' output_scores. Returns GenerateOutput."""
        c = self.config
        check_inputs(input_ids, attention_mask)
        if input_ids.shape[1] == 0:  # (it failed inside a reshape of the prefill)
            raise ValueError("input_ids: an empty prompt (0 tokens); generate continues a prompt "
                             "of at least one token (a BOS)")
        # once per call (one host sync; the steps' ids are its own), before CUDA's device assert
        outside = token_ids_error(input_ids, c)
        if outside:
            raise ValueError(outside)
        if max_new_tokens < 0:  # (a tensor of negative size, deep inside the cache)
            raise ValueError(f"max_new_tokens: must be 0 or more, got {max_new_tokens}")
        # as transformers' logits processors refuse them: a penalty of 0 divided the seen tokens'
        # logits by 0 (inf: they were the likeliest), a negative one flipped their signs; a NaN
        # temperature or top_p raised from inside torch.multinomial
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {repetition_penalty}")
        if math.isnan(temperature):
            raise ValueError("temperature: must be a number (0: greedy), got nan")
        if not 0 <= top_p:  # (NaN too)
            raise ValueError(f"top_p: must be 0 or more (0: the likeliest token), got {top_p}")
        eos = c.eos_token_id if eos_token_id is None else eos_token_id
        # one id or several (transformers' eos_token_id list, or a tensor of them, which it takes
        # too and was a TypeError here): any of them ends a row; < 0: none
        eos = torch.as_tensor(eos, dtype=torch.long, device=input_ids.device).reshape(-1)
        pad = c.pad_token_id if pad_token_id is None else pad_token_id
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded:  # a row padded on the right answered from its padding (the prefill reads the
            # last column) without a word; transformers warns of it. (All-padding rows stay
            # allowed.)
            real = attention_mask.bool()
            if bool((real.any(-1) & ~real[:, -1]).any()):
                raise ValueError("attention_mask: a row ends in padding; generate takes prompts "
                                 "padded on the left (a tokenizer's padding_side='left')")
        if num_beams > 1:
            return self.beam_search(pixel_values, input_ids, attention_mask, max_new_tokens,
                                    num_beams, eos, pad, image_features, length_penalty,
                                    repetition_penalty)
        B, T = input_ids.shape
        if isinstance(generator, (list, tuple)) and len(generator) != B:  # (a shape error from
            # inside sampling, at the first token)
            raise ValueError(f"generator: a list of {len(generator)} generators for {B} rows "
                             "(one per row)")
        dev = input_ids.device
        # no padding (the usual case): SDPA's causal kernel for the prompt
        prompt_mask = attention_mask if padded else None
        x = self.embed(input_ids, pixel_values, image_features)
        state = self.decode_state(B, T, max_new_tokens, dev, x.dtype, compile)
        state.start(prompt_mask, T)
        # prefill: the prompt in one pass, the last layer's queries and MLP at the last position
        # alone (every position's key and value go to the cache)
        h = self.backbone(x, prompt_mask, cache=state.cache, keep=slice(T - 1, T))
        logits = self.logits(h[:, -1]).float()
        step = compiled_decode_step() if compile else LLaVA.decode_step
        tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
        logps = torch.zeros(B, max_new_tokens, device=dev) if return_logprobs else None
        entropy = torch.zeros(B, max_new_tokens, device=dev) if return_entropy else None
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        can_end = bool((eos >= 0).any())
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
        # compiled: inductor fuses the plain LoRA path itself
        with self.fused_lora(not compile, rows=B):
            for i in range(max_new_tokens):
                if repetition_penalty != 1.0:
                    logits = penalize_repeats(logits, tokens[:, :i], repetition_penalty)
                if temperature <= 0 and not (return_logprobs or return_entropy):
                    tok, lp = logits.argmax(-1), None  # greedy: no log_softmax over the vocabulary
                elif return_entropy:
                    tok, lp, ent = sample_token(logits, temperature, top_p, generator, True)
                    entropy[:, i] = ent.masked_fill_(done, 0.0)
                else:
                    tok, lp = sample_token(logits, temperature, top_p, generator)
                tok.masked_fill_(done, pad)
                tokens[:, i] = tok
                if return_logprobs:
                    logps[:, i] = lp.masked_fill_(done, 0.0)
                newly = (tok == eos if len(eos) == 1 else torch.isin(tok, eos)) & ~done
                lengths.masked_fill_(newly, i + 1)
                done |= newly
                # no EOS (-1): no sync per token
                if i == max_new_tokens - 1 or (can_end and bool(done.all())):
                    break
                logits = step(self, tok, state)
                state.advance()
        return GenerateOutput(tokens, logps, lengths, done, entropy)

    def decode_state(self, batch, prompt_len, max_new_tokens, device, dtype, compile=False):
        """A DecodeState for this call. Eager: made for it, of its exact lengths. compile: lengths
        rounded up to COMPILE_BUCKET, and the last one kept on the model and used again while the
        rounded shape holds, so that prompts of other lengths reuse its compiled step and CUDA
        graph; it holds its cache's memory until a call of another shape replaces it."""
        if not compile:
            return DecodeState(self.config, batch, prompt_len + max_new_tokens, max_new_tokens,
                               device, dtype)
        up = lambda n: -(-n // COMPILE_BUCKET) * COMPILE_BUCKET
        new_len = up(max_new_tokens)
        key = (self.config, batch, up(prompt_len + max_new_tokens), new_len, str(device), dtype)
        old = getattr(self, "_static_decode", None)
        # (a state made under torch.inference_mode() cannot be written outside it)
        made_for_inference = old is not None and old.key_bias.is_inference()
        if old is None or old.key != key or made_for_inference and \
                not torch.is_inference_mode_enabled():
            self._static_decode = None  # (freed before the next one is made)
            state = DecodeState(*key[:4], device, dtype)
            for t in (*state.cache.k, *state.cache.v, state.key_bias, state.cos, state.sin,
                      state.step, state.slot):
                torch._dynamo.mark_static_address(t)
            self._static_decode = state
        return self._static_decode

    def decode_step(self, tokens, state):
        """fp32 logits (B, vocab) for one new token per row (tokens: B), reading and writing the
        static cache of `state` (a DecodeState): nothing is allocated but activations, no shape
        changes."""
        # the new token's key is visible from this step on
        state.key_bias.index_fill_(-1, state.slot, 0.0)
        cos, sin = state.cos.index_select(2, state.step), state.sin.index_select(2, state.step)
        x = self.language_model.embed_tokens(tokens[:, None])
        # eager: attention reads the slots written so far (the rest weigh exactly 0); compiled:
        # every slot, so that shapes never change
        n = None if torch.compiler.is_compiling() else state.written + 1
        for i, layer in enumerate(self.language_model.layers):
            k_cache, v_cache = state.cache.k[i], state.cache.v[i]
            x = layer.decode(x, cos, sin, k_cache, v_cache, state.slot, state.key_bias, n)
        return self.logits(self.language_model.norm(x)[:, 0]).float()

    @contextmanager
    def fused_lora(self, on=True, rows=0):
        """While decoding: the active adapter of every adapted linear merged into its weight
        (LoRALinear.fuse_lora), and the lm_head and decoder matrices prepacked for `rows` rows
        where that pays (prepack), made once per generate call from the current weights. The
        packed copies are extra memory: at most PACK_MAX_TOTAL entries in all, lm_head first."""
        linears = [lin for _, lin in self.lora_linears()]
        # (under torch.autocast: none, so that decoding computes as the autocast forward does; a
        # merged weight cast to bf16 would round the LoRA term away, and a packed one skips it)
        on = on and not torch.is_autocast_enabled(self.head_weight().device.type)
        try:
            left = PACK_MAX_TOTAL
            head = self.head_weight()
            self.packed_head = prepack(head, rows) if on and head.numel() <= left else None
            left -= head.numel() if self.packed_head is not None else 0
            for lin in linears if on else ():
                left -= lin.fuse_lora(rows if lin.weight.numel() <= left else 0)
            yield
        finally:
            for lin in linears:
                lin.fused_lora = None
            self.packed_head = None

    @torch.no_grad()
    def beam_search(self, pixel_values, input_ids, attention_mask, max_new_tokens, num_beams, eos,
                    pad, image_features=None, length_penalty=1.0, repetition_penalty=1.0):
        """Beam search as transformers' GenerationMixin._beam_search with its defaults
        (early_stopping False, no sampling, one returned sequence). Per step, over K beams x vocab:
        keep the 2K best running sums of log-probs; those ending in EOS (or at the length limit)
        that rank in the top K become finished hypotheses scored sum / generated_length **
        length_penalty, the best K finished kept; the best K not ending become the next beams. Stops
        when every continuation ends, or when K hypotheses are finished and the best running sum /
        current length cannot beat the worst of them. Returns the best finished hypothesis per
        prompt (logprobs None). eos: a tensor of EOS ids."""
        c, K = self.config, num_beams
        B, T = input_ids.shape
        dev, N = input_ids.device, max_new_tokens
        if N == 0:  # no new token, as the greedy path answers (the argmax below had no column)
            none = torch.zeros(B, dtype=torch.long, device=dev)
            tokens = torch.full((B, 0), pad, dtype=torch.long, device=dev)
            return GenerateOutput(tokens, None, none, none.bool())
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        feats = None if image_features is None else image_features.repeat_interleave(K, 0)
        ids = input_ids.repeat_interleave(K, 0)
        mask = None
        # beams of a prompt share its mask
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = torch.ones(B * K, T + N, dtype=torch.long, device=dev)
            mask[:, :T] = attention_mask.repeat_interleave(K, 0)
        x = self.embed(ids, None, feats)
        cache = KVCache(c, B * K, T + N, dev, x.dtype)
        h = self.backbone(x, None if mask is None else mask[:, :T], cache=cache)
        logits = self.logits(h[:, -1]).float()
        if mask is None:
            next_pos = torch.full((B * K, 1), T, device=dev)
        else:  # left padding: the next position is the number of real prompt tokens
            next_pos = mask[:, :T].sum(-1, keepdim=True)
        n_keep = max(2, 1 + len(eos)) * K  # (as transformers: a beam per EOS id may end)
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

        def take(t, idx):  # t[b, idx[b, j]] for every b, j, whatever t's trailing dims
            trailing = [1] * (t.dim() - 2)
            return t.gather(1, idx.view(*idx.shape, *trailing).expand(*idx.shape, *t.shape[2:]))
        for i in range(N):
            V = logits.shape[-1]
            logp = torch.log_softmax(logits, -1)
            if repetition_penalty != 1.0:  # (transformers: on the log-probs, in beam search)
                logp = penalize_repeats(logp, run_tokens.view(B * K, N)[:, :i], repetition_penalty)
            logp = logp.view(B, K, V)
            total = (logp + run_scores[:, :, None]).view(B, K * V)
            top_lp, top_idx = total.topk(n_keep)
            src, tok = top_idx // V, top_idx % V
            cand = take(run_tokens, src).clone()
            cand[:, :, i] = tok
            ends = torch.isin(tok, eos) | (i == N - 1)  # EOS, or the length limit: both finish
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
            worst = fin_scores.min(1, keepdim=True).values
            worst_done = torch.where(fin_done, worst, torch.full_like(fin_scores, big))
            improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
            if bool(ends.all()) or not bool(improvable.any()):
                break
            # each new beam continues the cache of the beam it came from
            rows = (run_src + offset).view(-1)
            for layer in range(c.layers):
                cache.k[layer], cache.v[layer] = cache.k[layer][rows], cache.v[layer][rows]
            x = self.language_model.embed_tokens(run_tokens[:, :, i].reshape(-1, 1))
            step_mask = None if mask is None else mask[:, :T + i + 1]
            h = self.backbone(x, step_mask, position_ids=next_pos + i, cache=cache)
            logits = self.logits(h[:, -1]).float()
        tokens = fin_tokens[:, 0]
        is_eos = torch.isin(tokens, eos)
        finished = is_eos.any(-1)
        to_eos = is_eos.float().argmax(-1) + 1
        lengths = torch.where(finished, to_eos, torch.full_like(finished, N, dtype=torch.long))
        tokens = tokens.masked_fill(torch.arange(N, device=dev)[None] >= lengths[:, None], pad)
        return GenerateOutput(tokens, None, lengths, finished)

    # -- LoRA adapters and heads --------------------------------------------------------

    def lora_linears(self):
        """(layer index, LoRALinear) for every adapted linear of the decoder."""
        for i, layer in enumerate(self.language_model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                yield i, lin

    def add_adapter(self, name, r=64, alpha=16, dropout=0.0, targets=LORA_TARGETS, layers=None):
        """A new LoRA adapter (A kaiming-uniform, B zero) on the chosen projections
        (q,k,v,o,gate,up,down) of every decoder layer, or, with `layers` ({target: [layer
        index, ...]}), of those layers only (a PEFT adapter's layers_to_transform)."""
        targets = tuple(t.removesuffix("_proj") for t in targets)
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad} (choose from {', '.join(LORA_TARGETS)})")
        check_name("adapter", name)
        if name in self.adapters:
            raise ValueError(f"adapter '{name}' exists already")
        n = self.config.layers
        if layers is not None:
            layers = {t.removesuffix("_proj"): sorted(set(ids)) for t, ids in layers.items()}
            outside = [t for t in layers if t not in targets]
            if outside:
                raise ValueError(f"layers given for {outside[0]!r}, which is not a target")
            wrong = [i for ids in layers.values() for i in ids if not 0 <= i < n]
            if wrong:
                raise ValueError(f"layer {wrong[0]} does not exist (this model has {n} layers)")
        for i, lin in self.lora_linears():
            chosen = {s: size for s, size in lin.slices.items() if s in targets
                      and (layers is None or i in layers.get(s, ()))}
            if chosen:
                adapter = LoRAAdapter(lin.weight.shape[1], chosen, r, alpha, dropout)
                # (in the model's mode: a new module trains, so in an eval-mode model its dropout
                # would draw at every call)
                lin.lora[name] = adapter.to(lin.weight.device).train(lin.training)
        self.adapters[name] = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets))
        if layers is not None:
            self.adapters[name]["layers"] = layers
        return name

    def set_adapter(self, name):
        """Make `name` the active adapter (None: the frozen base alone)."""
        if name is not None:
            self.check_adapter(name)
        self.active_adapter = name
        for _, lin in self.lora_linears():
            lin.active = name

    def check_adapter(self, name):
        """A clear error for a name that is not an adapter (delete, merge and copy raised a bare
        KeyError, and a failed merge had already marked the base as edited)."""
        if name not in self.adapters:
            raise ValueError(f"no adapter '{name}' (have: {', '.join(self.adapters) or 'none'})")

    @contextmanager
    def use_adapter(self, name):
        previous = self.active_adapter
        self.set_adapter(name)
        try:
            yield self
        finally:
            self.set_adapter(previous)

    def no_adapter(self):
        """Context in which no adapter is active: the reference policy, with no second copy of the
        weights."""
        return self.use_adapter(None)

    def copy_adapter(self, src, dst):
        """A new adapter `dst` initialised from `src` (PPO's value model starts from the reward
        adapter)."""
        self.check_adapter(src)
        cfg = self.adapters[src]
        self.add_adapter(dst, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["targets"],
                         cfg.get("layers"))
        with torch.no_grad():
            for _, lin in self.lora_linears():
                if src in lin.lora:
                    for p_dst, p_src in zip(lin.lora[dst].parameters(), lin.lora[src].parameters()):
                        p_dst.copy_(p_src)

    def delete_adapter(self, name):
        self.check_adapter(name)
        for _, lin in self.lora_linears():
            if name in lin.lora:
                del lin.lora[name]
        self.adapters.pop(name)
        if self.active_adapter == name:
            self.set_adapter(None)

    @torch.no_grad()
    def merge_adapter(self, name):
        """W += (alpha/r) B A for every slice the adapter targets, then drop the adapter."""
        self.check_adapter(name)
        self.base_edited = True
        for _, lin in self.lora_linears():
            if name in lin.lora:
                lin.weight.copy_(lin.weight_with(name))
        self.delete_adapter(name)

    def add_head(self, name):
        check_name("head", name)
        if name in self.heads:  # (a trained head was replaced by a fresh one without a word)
            raise ValueError(f"head '{name}' exists already")
        self.heads[name] = ScalarHead(self.config.hidden).to(self.language_model.norm.weight.device)
        return self.heads[name]

    def adapter_parameters(self, name):
        adapted = [lin for _, lin in self.lora_linears() if name in lin.lora]
        return [p for lin in adapted for p in lin.lora[name].parameters()]

    def set_trainable(self, adapters=(), heads=(), vision=False, projector=False, language=False):
        """requires_grad only on what trains: the named adapters and heads, and optionally whole
        parts."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.base_edited |= vision or projector or language
        for part, on in ((self.vision_tower, vision), (self.projector, projector)):
            for p in part.parameters():
                p.requires_grad_(on)
        if language:
            for n, p in self.named_parameters():
                in_language = n.startswith("language_model.") or n.startswith("lm_head.")
                if in_language and ".lora." not in n:
                    p.requires_grad_(True)
        for a in adapters:
            for p in self.adapter_parameters(a):
                p.requires_grad_(True)
        for h in heads:
            for p in self.heads[h].parameters():
                p.requires_grad_(True)

    def cast_base(self, dtype, keep_trained=False):
        """Base weights to dtype (e.g. bf16); LoRA parameters and heads stay fp32, and with
        keep_trained every parameter that trains (a LoRA run's projector: in bf16 an AdamW step of
        2e-5 on a weight of 0.02 is below half its last bit, so most updates were lost; LLaVA's
        DeepSpeed keeps fp32 masters). Without it a full fine-tune trains in pure bf16 (README's
        memory table)."""
        for n, p in self.named_parameters():
            if keep_trained and p.requires_grad:  # (loaded fp32: checkpoint.py's projector)
                p.data = p.data.float()
            elif ".lora." not in n and not n.startswith("heads."):
                p.data = p.data.to(dtype)
        return self

    # -- the public model API (../shared/DESIGN.md) ------------------------------------------------
    # Checkpoint layouts live in checkpoint.py (other tools' formats in interop.py), which import
    # this module: these methods import them when called. The stages call checkpoint.* and
    # interop.* directly; outside tools keep the familiar names.

    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=None, device=None, adapters=True):
        """Any supported layout (ours, llava-hf, original LLaVA, CLIP + LLaMA, PEFT adapter dir);
        adapters=False: the base alone, without the checkpoint's adapters and heads."""
        import checkpoint
        return checkpoint.load_checkpoint(path, vision_tower=vision_tower, dtype=dtype,
                                          device=device, adapters=adapters)

    def save_pretrained(self, path, base=None, extra_config=None):
        """Our checkpoint layout: config.json, model.safetensors or adapters.safetensors."""
        import checkpoint
        checkpoint.save_checkpoint_files(self, path, base=base, extra_config=extra_config)

    def load_adapters(self, path, name="default"):
        """The adapters and heads of another checkpoint of this base, or a PEFT LoRA directory."""
        import checkpoint
        checkpoint.load_adapters(self, path, name=name)

    def export_hf(self, path, tokenizer=None, template=None, merge=True):
        """A directory transformers' LlavaForConditionalGeneration.from_pretrained loads (the active
        adapter merged in; merge=False: the base alone; template: default, the one it was trained
        with)."""
        import interop
        interop.export_llava_hf(self, path, tokenizer=tokenizer, template=template,
                                merge=merge)

    def export_peft(self, path, adapter, base=None):
        """Adapter `adapter` as a PEFT LoRA directory (peft.PeftModel.from_pretrained loads it)."""
        import interop
        interop.export_peft_adapter(self, path, adapter, base=base)


def check_name(kind, name):
    """An adapter's or head's name: a key of the modules that hold them (torch raised a KeyError
    or TypeError from inside nn.ModuleDict for '', 'a.b' or a number), and of the saved keys
    (adapter.NAME.layers...: a '.' would split them elsewhere)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{kind} name {name!r}: expected a non-empty string without '.'")
    if hasattr(nn.ModuleDict(), name):  # ('keys', 'update', 'training': torch's KeyError)
        raise ValueError(f"{kind} name {name!r}: the name of an attribute of the modules that "
                         "hold them; pick another")


def check_inputs(input_ids, attention_mask):
    """input_ids (batch, length) and an attention_mask of the same shape, or one line naming the
    argument: a longer mask was read from its first columns without a word (other positions,
    other logits), and a shorter one or 1-D ids failed deep inside attention."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected (batch, length), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)}, but input_ids has "
                         f"{tuple(input_ids.shape)}")


def token_ids_error(input_ids, config):
    """None when every id in input_ids is a row of the embedding (or the image token); else one
    line naming the first that is not and the vocabulary: torch said "index out of range in self"
    (on CUDA a device-side assert that ends the process's use of the GPU)."""
    outside = (input_ids < 0) | (input_ids >= config.vocab_size)
    outside &= input_ids != config.image_token_id
    if not bool(outside.any()):
        return None
    row, col = (int(i) for i in outside.nonzero()[0])
    return (f"input_ids: id {int(input_ids[row, col])} at row {row}, position {col} is outside "
            f"the vocabulary (0 to {config.vocab_size - 1}, and the image token "
            f"{config.image_token_id}): a tokenizer of another model?")


_COMPILED_DECODE = []
# compiled decoding: cache lengths and new-token tables are rounded up to a multiple of this, so
# that prompts and answer limits of other lengths run one compiled step
COMPILE_BUCKET = 64


def compiled_decode_step():
    """LLaVA.decode_step through torch.compile, made on first use: inductor, and on CUDA with
    mode='reduce-overhead' (a CUDA graph per shape, replayed). The step's state tensors (the KV
    cache, key bias, RoPE tables, step and slot counters) are marked static: they keep their
    addresses from call to call (LLaVA.decode_state), so writing the cache in place does not keep
    the graph from being captured. The first shape compiles a static graph; another batch size or
    rounded length, one for any (torch's automatic dynamic shapes)."""
    if not _COMPILED_DECODE:
        mode = "reduce-overhead" if torch.cuda.is_available() else None
        # (dynamic=None: a second batch size compiles a graph for every batch size, where static
        # shapes compiled each again, and past torch's recompile limit of 8 decoded eagerly)
        _COMPILED_DECODE.append(torch.compile(LLaVA.decode_step, dynamic=None, mode=mode))
    return _COMPILED_DECODE[0]


def penalize_repeats(scores, seen, penalty):
    """scores (rows, vocab) with each row's `seen` tokens (rows, n) made less likely: a positive
    score divided by `penalty`, a negative one multiplied (CTRL, arXiv 1909.05858; transformers'
    RepetitionPenaltyLogitsProcessor). A token seen twice is penalised once."""
    if seen.shape[1] == 0:
        return scores
    s = scores.gather(1, seen)
    return scores.scatter(1, seen, torch.where(s < 0, s * penalty, s / penalty))


def tempered_log_softmax(logits, temperature):
    """log softmax(logits / temperature), the row's largest logit taken out first: the same
    function, and a tiny temperature (1e-40) no longer overflows to inf - inf = NaN."""
    return torch.log_softmax((logits - logits.amax(-1, keepdim=True).detach()) / temperature, -1)


def entropy_of(logp):
    """-sum p log p over the last axis; a token of probability 0 (log p = -inf) adds 0."""
    return -(logp.exp() * logp).nan_to_num(0.0).sum(-1)


def sample_token(logits, temperature=0.0, top_p=1.0, generator=None, with_entropy=False):
    """Next token from (B, vocab) fp32 logits, and its log-prob under softmax(logits / temperature)
    (the untruncated distribution, which is what PPO's ratios use); with_entropy: and that
    distribution's entropy, -sum p log p (temperature 0: of softmax(logits))."""
    if temperature <= 0:
        tok = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1)
        lp = logp.gather(-1, tok[:, None])[:, 0]
        return (tok, lp, entropy_of(logp)) if with_entropy else (tok, lp)
    logp = tempered_log_softmax(logits, temperature)
    probs = logp.exp()
    entropy = entropy_of(logp) if with_entropy else None
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        # the most likely token always stays, as transformers' TopPLogitsWarper keeps it: top_p 0
        # is greedy there, and here every token was dropped (multinomial raised on all zeros)
        if top_p <= 0:  # (for top_p > 0 the first entry's cumsum less itself is exactly 0)
            drop[..., 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    if isinstance(generator, (list, tuple)):  # a stream per row: a row's draws are its own
        tok = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    else:
        tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    lp = logp.gather(-1, tok[:, None])[:, 0]
    return (tok, lp, entropy) if with_entropy else (tok, lp)
