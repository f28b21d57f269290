"""Speed and memory of our LLaVA against transformers' LlavaForConditionalGeneration built from
the same weights, in one process, the two alternated, medians over repetitions after a warm-up
(issue 8).

    OMP_NUM_THREADS=1 python bench.py --device cpu   # bench preset (112 px, 64 image tokens), 3 min
    python bench.py --device cuda --model llava-7b --seq 1024 --out runs/bench-gpu
                                                     # Vicuna-7B + CLIP-L shapes, random, bf16
    python bench.py --quick true                     # tiny config, 1 repetition (the test suite)

On a shared CPU, OMP threads spin at barriers while another process holds their core: with load
above the core count, OMP_NUM_THREADS=1 gives stable numbers, 2 threads do not. The report records
threads and load. On a GPU the full fine-tune comparison is skipped when two fully trained copies
cannot fit (7B on 80 GB).

Writes OUT/bench.md (the tables below, printed too) and OUT/bench.json (every number, with device,
versions, date, threads, machine load and config). Before anything is timed, both models must give
the same logits (fp32: max |diff| <= 1e-4, or this script raises), with and without LoRA, and the
same training loss.

Sections
  train     one optimizer step (forward + backward + AdamW) on B x T tokens (image tokens included,
            labels on the last `answer` tokens of each row, loss = mean token CE over the labels):
              lora   ours: LoRA adapter on q,k,v,o,gate,up,down of the frozen base; transformers:
                     the same frozen base with a hand-written LoRA wrapper on its
                     q/k/v/o/gate/up/down Linear modules (W x + s B A x, A and B copied from ours:
                     the same math, fp32 LoRA)
              full   language model + projector trained, CLIP frozen, both sides
            transformers runs as a user would: `model(..., labels=labels, use_cache=False).loss`,
            which computes the logits at every position; ours (sft.lm_loss) only at the
            labelled ones.
  generate  greedy decoding with the KV cache, `new_tokens` tokens (EOS disabled), batch 1 and 8:
            ours `model.generate`, theirs
            `generate(do_sample=False, min_new_tokens=max_new_tokens)`; the tokens are compared
            first (a warning if they differ). tok/s = B * new_tokens / time
            of the whole call (prefill included); decode ms/step = (time(new_tokens) - time(1
            token)) / (new_tokens - 1).
  dpo       ours: one DPO step (dpo.pair_losses: chosen + rejected rows in one pass, LoRA policy,
            the reference = the same model with adapters off) on `dpo_pairs` pairs, backward, AdamW.
  ppo       ours: one PPO iteration on one shared base (policy/reward/value adapters, reward/value
            heads): ppo.rollout of `ppo_prompts` prompts (random images read from PNG files,
            sampling at T=1, policy and reference log-probs, values, RM score of the sampled ids +
            evaluation turn, shaped rewards; a word-per-id tokenizer), GAE, whitening, then one
            epoch of ppo.ppo_update.
  rollout   a PPO rollout's shape at --rollout_model (shapes): greedy decoding of --rollout_batch x
            --rollout_new_tokens against transformers, then a PPO iteration of that size (rollout,
            update apart).
  roles     bytes of parameters + buffers actually allocated (unique storages, by data_ptr) for the
            four PPO roles on one shared base (1 model + 3 adapters + 2 heads) against four
            separate models.
  util      hardware limits measured here: the median rate of a large square matmul in the run's
            dtype (FLOP/s) and of a large tensor copy (bytes/s, read + write counted).

FLOPs of one training step (N_x = parameters in the matmuls of part x; tokens = B*T;
d_q = heads*head_dim):
    (4 + 2*full) * N_decoder * tokens          forward 2, input gradients 2, weight gradients 2
                                               (full only)
  + 6 * N_lora * tokens                        (LoRA only)
  + 12 * layers * d_q * T * tokens             attention scores and values, fwd + bwd, T x T
                                               counted in full
  + (4 + 2*full) * N_lm_head * labelled        the model's loss needs logits at the labelled
                                               positions only
  + (2 + 2*full) * N_projector * image_tokens  forward; weight gradients when trained (CLIP frozen)
  + 2 * N_clip * vision_tokens
  + 4 * clip_layers * clip_hidden * T_img * vision_tokens   (forward only)
  MFU = FLOPs / step time / measured matmul peak (the same FLOPs for both implementations).
Bytes of one decode step = decoder + final norm + lm_head weights, plus K and V of every layer over
the context (mean context over the decode); bandwidth use = bytes/step * steps/s / measured copy
bandwidth.
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import copy
import ctypes
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
from PIL import Image

import checkpoint
import common
import distributed
import interop
import rundir
import dpo
import model as model_lib
import ppo
import sft
from data import IGNORE, ImageCache
from model import LLaVA, PRESETS, ModelConfig


@dataclass
class Config:
    """Speed and memory against transformers' LlavaForConditionalGeneration (same weights, same
    inputs)."""
    out: str = "runs/bench"               # where bench.md and bench.json are written
    device: str = "cpu"                   # cpu or cuda
    dtype: str = "auto"                   # auto (fp32 on cpu, bf16 on cuda), fp32 or bf16
    model: str = "bench"                  # model preset (tiny, bench, llava-7b, llava-13b)
    image_size: int = 0                   # 0: the preset's (bench: 112 px / 14 -> 64 image tokens)
    layers: int = 0                       # decoder layers override (0: the preset's)
    threads: int = 0                      # torch threads (0: as OMP_NUM_THREADS / torch's default)
    batch: int = 8                        # training rows per step
    seq: int = 256                        # tokens per training row, image tokens included
    answer: int = 64                      # labelled (answer) tokens at the end of each row
    lora_r: int = 64                      # LoRA rank (LLaVA-RLHF: 64)
    lora_alpha: int = 16                  # LoRA alpha
    lr: float = 1e-5                      # AdamW lr (small: weights barely move over repetitions)
    train_modes: tuple[str, ...] = ("lora", "full")  # steps compared (full needs 2 copies)
    gen_batches: tuple[int, ...] = (1, 8)  # generation batch sizes
    new_tokens: int = 64                  # generated tokens per sequence
    prompt_text: int = 32                 # text tokens after the image in a generation prompt
    dpo_pairs: int = 4                    # preference pairs per DPO step (2x rows of `seq` tokens)
    ppo_prompts: int = 8                  # prompts per PPO rollout
    ppo_new_tokens: int = 32              # sampled response tokens per prompt
    roles_model: str = "bench"            # preset at which the PPO roles are allocated for real
    rollout_model: str = "shapes"         # preset of the rollout comparison ('': skipped)
    rollout_batch: int = 64               # sequences decoded at once (ppo.py's rollout_batch)
    rollout_new_tokens: int = 48          # new tokens per sequence (ppo.py's max_new_tokens)
    compile_decode: bool = False          # also time ours with generate(compile=True)
    warmup: int = 1                       # untimed repetitions first
    reps: int = 3                         # timed repetitions (medians reported)
    matmul_n: int = 0                     # square matmul side for the peak (0: 2048 cpu, 8192 cuda)
    copy_mib: int = 0                     # MiB copied for the bandwidth (0: 256 cpu, 2048 cuda)
    hf_load: str = "auto"                 # export (via disk), copy (in memory), auto (cpu: export)
    seed: int = 0                         # seed of weights and inputs
    quick: bool = False                   # tiny config, 1 repetition: smoke test (given flags win)
    fsdp: bool = False                    # instead: FSDP2 step time and peak memory (torchrun)
    # allowed values (common.parse_config refuses others in one line; a float must be finite)
    RANGES = dict(device=("cpu", "cuda"), dtype=("auto", "fp32", "bf16"),
                  model=("tiny", "shapes", "bench", "llava-7b", "llava-13b"),
                  image_size="[0, inf)", layers="[0, inf)", threads="[0, inf)", batch="[1, inf)",
                  seq="[2, inf)", answer="[1, inf)", lora_r="[1, inf)", lora_alpha="[1, inf)",
                  lr="(0, inf)", train_modes=("lora", "full"), gen_batches="[1, inf)",
                  # (decode ms/step is the time past the first token: 2 at least)
                  new_tokens="[2, inf)", prompt_text="[1, inf)", dpo_pairs="[1, inf)",
                  ppo_prompts="[1, inf)", ppo_new_tokens="[1, inf)",
                  roles_model=("tiny", "shapes", "bench", "llava-7b", "llava-13b"),
                  warmup="[0, inf)", reps="[1, inf)", matmul_n="[0, inf)", copy_mib="[0, inf)",
                  hf_load=("auto", "export", "copy"), seed=common.SEED_RANGE,
                  rollout_model=("", "tiny", "shapes", "bench", "llava-7b", "llava-13b"),
                  rollout_batch="[1, inf)", rollout_new_tokens="[2, inf)")


QUICK = dict(model="tiny", image_size=0, layers=0, batch=2, seq=32, answer=8, lora_r=4,
             lora_alpha=8, gen_batches=(1, 2), new_tokens=6, prompt_text=4, dpo_pairs=2,
             ppo_prompts=2, ppo_new_tokens=4, roles_model="tiny", rollout_model="tiny",
             rollout_batch=4, rollout_new_tokens=4, warmup=1, reps=1,
             matmul_n=256, copy_mib=8)


class BenchError(AssertionError):
    """The two implementations disagree: nothing they are timed on would be comparable."""


# ----------------------------------------------------------------------------------------
# measuring: clocks, peak memory, hardware limits
# ----------------------------------------------------------------------------------------

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t, out


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim():
    """Give freed heap memory back to the OS (glibc keeps it for reuse), so that RSS follows live
    memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the level at entry. GPU: torch.cuda.max_memory_allocated. CPU: the resident
    set size (/proc/self/statm) polled every millisecond by a thread, after returning freed heap
    memory to the OS."""

    def __init__(self, dev):
        self.dev, self.peak = dev, 0

    def __enter__(self):
        if self.dev.type == "cuda":
            sync(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
        else:
            _trim()
            self.base = self.top = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.top = max(self.top, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            sync(self.dev)
            self.peak = torch.cuda.max_memory_allocated(self.dev) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, _rss()) - self.base
        return False


def race(fns, cfg, dev, measure_memory=True, warmup=None):
    """Run the callables of `fns` (name -> fn) alternately, the order flipped every repetition,
    `warmup` untimed rounds then `reps` timed ones; then one more round each for peak memory (kept
    apart from the timed rounds: returning memory to the OS costs page faults). Returns {name:
    (median s, [times], peak bytes)}."""
    warmup = cfg.warmup if warmup is None else warmup
    times = {k: [] for k in fns}
    for i in range(warmup + cfg.reps):
        for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            dt, _ = timed(fns[k], dev)
            if i >= warmup:
                times[k].append(dt)
    peaks = {}
    for k in fns:
        if measure_memory:
            with PeakMemory(dev) as pm:
                timed(fns[k], dev)
            peaks[k] = pm.peak
        else:
            peaks[k] = None
    return {k: (statistics.median(times[k]), times[k], peaks[k]) for k in fns}


def matmul_peak(n, dtype, dev, reps=7):
    """FLOP/s of an n x n x n matmul, median of `reps` after one warm-up."""
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    ts = [timed(lambda: a @ b, dev)[0] for _ in range(reps + 1)][1:]
    return 2 * n ** 3 / statistics.median(ts)


def copy_bandwidth(mib, dev, reps=7):
    """Bytes/s of copying a large tensor (read + write counted), median of `reps` after one warm-up.
    """
    x = torch.ones(mib * 2 ** 20 // 4, device=dev)
    y = torch.empty_like(x)
    ts = [timed(lambda: y.copy_(x), dev)[0] for _ in range(reps + 1)][1:]
    return 2 * x.nbytes / statistics.median(ts)


def free_bytes(dev):
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            available = next(line for line in f if line.startswith("MemAvailable"))
            return int(available.split()[1]) * 1024
    except (OSError, StopIteration):
        return float("inf")


def machine_load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------
# the two models: ours, and transformers' from the same weights
# ----------------------------------------------------------------------------------------

def model_config(cfg, preset=None):
    over = {}
    if preset is None:
        preset = cfg.model
        if cfg.image_size:
            over["image_size"] = cfg.image_size
        if cfg.layers:
            over["layers"] = cfg.layers
    c = ModelConfig(**{**PRESETS[preset], **over})
    # e.g. 'tiny': ids inside the vocabulary
    if c.image_token_id >= c.vocab_size or c.pad_token_id >= c.vocab_size:
        c = dataclasses.replace(c, image_token_id=c.vocab_size - 1, pad_token_id=c.vocab_size - 2)
    return c


def build_ours(c, dev, dtype, seed):
    """Our model with random weights, built directly on the device in the run's dtype (LoRA and
    heads stay fp32). The rows of lm_head for the image and pad tokens are zeroed: greedy decoding
    never emits them."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            m = LLaVA(c)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        m.lm_head.weight[[c.image_token_id, c.pad_token_id]] = 0
    return m.eval()


def build_theirs(ours, dev, dtype, how, tmp):
    """transformers' LlavaForConditionalGeneration with our base weights (LoRA goes on separately:
    wrap_lora): 'export' = interop.export_llava_hf(ours, dir) then from_pretrained(dir);
    'copy' = built from export_llava_hf's config.json on the device, weights copied in memory (no
    2 x 14 GB round trip through the disk for a 7B model)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    path = os.path.join(tmp, "hf")
    if how == "export":
        interop.export_llava_hf(ours, path, merge=False)
        return LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(dev).eval()
    # export_llava_hf's hub-layout tensors (views of ours) and its config.json; no weight file
    # is written
    captured = {}
    save = interop.save_safetensors
    interop.save_safetensors = lambda tensors, file, metadata=None, made=None: \
        captured.update(tensors)
    try:
        interop.export_llava_hf(ours, path, merge=False)
    finally:
        interop.save_safetensors = save
    with torch.device(dev):
        config = LlavaConfig.from_pretrained(path)
        theirs = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    ours_by_name = {checkpoint.canonical_key(k): v for k, v in captured.items()}
    state, missing = {}, []
    for k in theirs.state_dict():
        v = ours_by_name.get(checkpoint.canonical_key(k))
        if v is None:
            missing.append(k)
        else:
            state[k] = v
    # buffers, not weights
    missing = [k for k in missing if not k.endswith(("position_ids", "inv_freq"))]
    if missing:
        raise BenchError("transformers' model has weights our export does not write: "
                         f"{missing[:5]}")
    theirs.load_state_dict(state, strict=False)
    return theirs.eval()


class HFLoRA(nn.Module):
    """A transformers Linear plus our LoRA math: W x + (alpha/r) B A x, A and B fp32 (as
    model.LoRALinear)."""

    def __init__(self, base, A, B, scale):
        super().__init__()
        self.base, self.scale = base, scale
        self.A, self.B = nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())

    def forward(self, x):
        y = self.base(x)
        return y + ((x.float() @ self.A.t()) @ self.B.t() * self.scale).to(y.dtype)


def hf_layers(theirs):
    return theirs.model.language_model.layers


def wrap_lora(theirs, ours, adapter):
    """Put our adapter's A, B on transformers' q/k/v/o/gate/up/down modules. Returns an undo
    function."""
    undo = []
    for i, lin in ours.lora_linears():
        ad = lin.lora[adapter]
        layer = hf_layers(theirs)[i]
        for s in ad.A:
            parent = layer.self_attn if s in ("q", "k", "v", "o") else layer.mlp
            name = f"{s}_proj"
            base = getattr(parent, name)
            setattr(parent, name, HFLoRA(base, ad.A[s], ad.B[s], ad.scale))
            undo.append((parent, name, base))

    def restore():
        for parent, name, base in undo:
            setattr(parent, name, base)
    return restore


# ----------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------

def text_ids(c, shape, g, dev):
    hi = min(c.image_token_id, c.pad_token_id, c.vocab_size)  # ordinary tokens: never image or pad
    return torch.randint(3, hi, shape, generator=g).to(dev)


def prompt_ids(c, B, text, g, dev):
    """[bos, image tokens, text] for B rows, and their images."""
    bos = torch.full((B, 1), c.bos_token_id)
    image = torch.full((B, c.num_image_tokens), c.image_token_id)
    ids = torch.cat([bos, image, text_ids(c, (B, text), g, "cpu")], 1).to(dev)
    pix = torch.randn(B, 3, c.image_size, c.image_size, generator=g).to(dev)
    return ids, pix


def answer_room(c, T, answer):
    """Text tokens of a row of T (after bos and the image tokens): more than `answer`."""
    text = T - 1 - c.num_image_tokens
    if text < answer + 1:
        raise common.ConfigError(f"--seq {T} leaves {text} text tokens after {c.num_image_tokens} "
                                 f"image tokens; need more than --answer {answer}")
    return text


def train_batch(c, B, T, answer, g, dev):
    """B rows of T tokens: bos, image tokens, text; the last `answer` tokens carry labels."""
    text = answer_room(c, T, answer)
    ids, pix = prompt_ids(c, B, text, g, dev)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -answer:] = ids[:, -answer:]
    return {"input_ids": ids, "labels": labels, "pixel_values": pix,
            "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------------------
# counting: parameters, FLOPs, bytes
# ----------------------------------------------------------------------------------------

def matmul_params(c, r=0, targets=model_lib.LORA_TARGETS):
    """Parameters in the matmuls of each part (the embedding table does no matmul)."""
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    vh = c.vision_hidden
    io = {"q": (c.hidden, q), "k": (c.hidden, kv), "v": (c.hidden, kv), "o": (q, c.hidden),
          "gate": (c.hidden, c.intermediate), "up": (c.hidden, c.intermediate),
          "down": (c.intermediate, c.hidden)}
    second_linear = c.hidden * c.hidden if c.projector == "mlp2x_gelu" else 0
    clip_layer = 4 * vh * vh + 2 * vh * c.vision_intermediate  # q, k, v, out + fc1, fc2
    patch_embedding = 3 * c.patch_size ** 2 * vh
    return dict(decoder=c.layers * sum(i * o for i, o in io.values()),
                lm_head=c.hidden * c.vocab_size,
                lora=c.layers * r * sum(i + o for s, (i, o) in io.items() if s in targets),
                projector=vh * c.hidden + second_linear,
                clip=c.vision_layers_run * clip_layer + patch_embedding)


def train_flops(c, B, T, labelled, full, r):
    """FLOPs of one training step (the formula in the module docstring)."""
    n = matmul_params(c, r)
    tokens, k = B * T, 6 if full else 4
    t_img = c.num_patches + 1  # CLIP runs on the CLS token too
    f = k * n["decoder"] * tokens + 12 * c.layers * c.heads * c.head_dim * T * tokens
    f += 0 if full else 6 * n["lora"] * tokens
    f += k * n["lm_head"] * labelled
    f += (4 if full else 2) * n["projector"] * B * c.num_image_tokens
    f += 2 * n["clip"] * B * t_img + 4 * c.vision_layers_run * c.vision_hidden * t_img * B * t_img
    return f


def decode_bytes(c, B, context, elem):
    """Bytes read by one decode step: the decoder's and lm_head's weights, the norms, and the KV
    cache."""
    n = matmul_params(c)
    weights = (n["decoder"] + n["lm_head"] + (2 * c.layers + 1) * c.hidden) * elem
    return weights + 2 * c.layers * c.kv_heads * c.head_dim * context * B * elem


def allocated_bytes(models):
    """Bytes of parameters + buffers of `models`, each storage counted once (by device and data_ptr;
    on the meta device, where nothing is allocated, by tensor identity)."""
    seen = {}
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_meta:
                seen[("meta", id(t))] = t.numel() * t.element_size()
            else:
                s = t.untyped_storage()
                seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------

def check_parity(ours, theirs, c, dev, exact, autocast, out):
    """The same logits from both models before anything is timed: the base, then with the LoRA
    adapter 'sft' (its B drawn at random so that it changes the output) on ours and the hand-written
    wrapper on theirs."""
    ids, pix = prompt_ids(c, 2, 8, torch.Generator().manual_seed(1), dev)

    def max_diff(what):
        with torch.no_grad(), autocast:
            a = ours(pix, ids).float()
            b = theirs(pixel_values=pix, input_ids=ids).logits.float()
        d = (a - b).abs().max().item()
        # fp32: 1e-4. bf16: the two round differently at every layer, so only a gross error is
        # caught (a wrong weight mapping gives differences of the size of the logits themselves):
        # 5% of the logit range
        limit = 1e-4 if exact else 0.05 * a.abs().max().item()
        if not d <= limit:  # also catches NaN
            raise BenchError(f"{what}: logits differ, max |ours - transformers| = {d:.3g} > "
                             f"{limit:.3g}")
        return d, limit
    out["parity_max_abs_diff"], out["parity_tolerance"] = max_diff("base model")
    with torch.no_grad():
        g = torch.Generator(device=dev).manual_seed(2)
        for p in (p for _, lin in ours.lora_linears() for p in lin.lora["sft"].B.values()):
            p.normal_(0, 0.02, generator=g)
    restore = wrap_lora(theirs, ours, "sft")
    ours.set_adapter("sft")
    try:
        out["parity_lora_max_abs_diff"], _ = max_diff("with LoRA")
    finally:
        ours.set_adapter(None)
        restore()


def train_section(ours, theirs, c, cfg, dev, exact, autocast, peak_flops, out):
    """One AdamW step, LoRA and full fine-tune, ours against transformers (same batch, same loss).
    """
    b = train_batch(c, cfg.batch, cfg.seq, cfg.answer, torch.Generator().manual_seed(3), dev)
    n_lab = int((b["labels"][:, 1:] != IGNORE).sum())

    def ours_loss():
        with autocast:
            return sft.lm_loss(ours, b, n_lab)

    def theirs_loss():
        # as a user would: labels in, mean CE out (logits at every position); no KV cache in
        # training
        with autocast:
            return theirs(pixel_values=b["pixel_values"], input_ids=b["input_ids"],
                          labels=b["labels"], use_cache=False).loss

    def step(loss_fn, opt):
        def run():
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    rows = {}
    for mode in cfg.train_modes:
        if mode not in ("lora", "full"):
            raise common.ConfigError(f"--train_modes {mode}: choose lora and/or full")
        # gradients + AdamW's two states, in the parameters' dtype, for both models
        if mode == "full":
            trained = [p for n, p in ours.named_parameters()
                       if n.startswith(("language_model.", "lm_head.", "projector."))
                       and ".lora." not in n]
            need = 2 * 3 * sum(p.numel() * p.element_size() for p in trained)
            if need > 0.9 * free_bytes(dev):
                print("note: full fine-tune skipped: its gradients and optimizer states for both "
                      f"models need {need / 2 ** 30:.0f} GiB, {free_bytes(dev) / 2 ** 30:.0f} GiB "
                      "free", file=sys.stderr)
                rows["full"] = {"skipped": f"needs {need / 2 ** 30:.0f} GiB for gradients and "
                                           "optimizer states"}
                continue
        restore = lambda: None
        if mode == "lora":
            ours.set_adapter("sft")
            ours.set_trainable(adapters=["sft"])
            restore = wrap_lora(theirs, ours, "sft")
            for n, p in theirs.named_parameters():
                p.requires_grad_(n.endswith((".A", ".B")))
        else:
            ours.set_adapter(None)
            ours.set_trainable(projector=True, language=True)
            for n, p in theirs.named_parameters():
                trained = ("model.language_model.", "lm_head.", "model.multi_modal_projector.")
                p.requires_grad_(n.startswith(trained))
        n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
        if n_ours != n_theirs:
            raise BenchError(f"{mode}: {n_ours} trainable parameters in ours, {n_theirs} in "
                             "transformers'")
        ours.train(), theirs.train()
        with torch.no_grad():
            lo, lt = float(ours_loss()), float(theirs_loss())
        if not abs(lo - lt) <= (1e-4 if exact else 0.05 * abs(lo)):
            raise BenchError(f"{mode}: training loss differs: ours {lo:.6g}, transformers {lt:.6g}")
        steps = {"ours": step(ours_loss, common.make_optimizer(ours, cfg.lr)),
                 "transformers": step(theirs_loss, common.make_optimizer(theirs, cfg.lr))}
        res = race(steps, cfg, dev)
        flops = train_flops(c, cfg.batch, cfg.seq, n_lab, mode == "full", cfg.lora_r)
        rows[mode] = dict(trainable=n_ours, loss_ours=lo, loss_transformers=lt, flops=flops,
                          tokens=cfg.batch * cfg.seq,
                          **{f"{k}_s": v[0] for k, v in res.items()},
                          **{f"{k}_times": v[1] for k, v in res.items()},
                          **{f"{k}_peak_bytes": v[2] for k, v in res.items()},
                          **{f"{k}_mfu": flops / v[0] / peak_flops for k, v in res.items()})
        rows[mode]["ratio"] = rows[mode]["ours_s"] / rows[mode]["transformers_s"]
        del steps  # and with them the optimizers' states
        restore()
        ours.set_adapter(None)
        ours.set_trainable()
        for p in theirs.parameters():
            p.requires_grad_(False)
        ours.eval(), theirs.eval()
        gc.collect()
    out["train"] = rows


def generate_section(ours, theirs, c, cfg, dev, elem, bandwidth, out, key="generate", batches=None,
                     N=None):
    """Greedy decoding with the KV cache: tokens compared first, then timed (whole call, and 1
    token: prefill). --compile_decode: ours with the compiled decode step too ('ours_compiled'; its
    compilation untimed)."""
    rows = {}
    for B in batches or cfg.gen_batches:
        ids, pix = prompt_ids(c, B, cfg.prompt_text, torch.Generator().manual_seed(4 + B), dev)
        P = ids.shape[1]

        def ours_gen(n, compile=False):
            kw = {"compile": True} if compile else {}
            return lambda: ours.generate(pix, ids, None, max_new_tokens=n, eos_token_id=-1,
                                         **kw).tokens

        def theirs_gen(n):  # min_new_tokens = max_new_tokens and no EOS: exactly n tokens, as ours
            mask = torch.ones_like(ids)
            return lambda: theirs.generate(input_ids=ids, pixel_values=pix, attention_mask=mask,
                                           max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           eos_token_id=None, pad_token_id=c.pad_token_id)[:, P:]
        N = N or cfg.new_tokens
        with torch.no_grad():
            a, t = ours_gen(N)(), theirs_gen(N)()
        first = first_difference(a, t)
        same = first is None
        if not same:
            print(f"warning: greedy tokens differ at batch {B} from new token {first} (near-tied "
                  "logits round "
                  f"differently); timings still compare the same amount of work", file=sys.stderr)
        fns = lambda n: {"ours": ours_gen(n), "transformers": theirs_gen(n),
                         **({"ours_compiled": ours_gen(n, True)} if cfg.compile_decode else {})}
        compile_s = first_compiled = None
        if cfg.compile_decode:
            compile_n = timed(fns(N)["ours_compiled"], dev)[0]
            compile_1 = timed(fns(1)["ours_compiled"], dev)[0]
            compile_s = compile_n + compile_1
            first_compiled = first_difference(fns(N)["ours_compiled"](), a)
            same = same and first_compiled is None
            if first_compiled is not None:
                print(f"warning: compiled greedy tokens differ from eager ones at batch {B} from "
                      f"new token {first_compiled}", file=sys.stderr)
        with torch.no_grad():  # the comparison above was the first warm-up round
            full = race(fns(N), cfg, dev, warmup=max(cfg.warmup - 1, 0))
            pre = race(fns(1), cfg, dev, measure_memory=False)
        row = dict(prompt_tokens=P, new_tokens=N, same_tokens=same, first_difference=first,
                   compiled_first_difference=first_compiled, ours_compiled_first_calls_s=compile_s)
        step_bytes = decode_bytes(c, B, P + N / 2, elem)
        for k in full:
            row[f"{k}_s"] = full[k][0]
            row[f"{k}_tok_s"] = B * N / full[k][0]
            row[f"{k}_prefill_s"] = pre[k][0]
            row[f"{k}_decode_ms"] = 1e3 * max(full[k][0] - pre[k][0], 1e-9) / max(N - 1, 1)
            row[f"{k}_bw_util"] = step_bytes / (row[f"{k}_decode_ms"] / 1e3) / bandwidth
            row[f"{k}_peak_bytes"] = full[k][2]
        row["ratio_tok_s"] = row["ours_tok_s"] / row["transformers_tok_s"]
        row["decode_bytes_per_step"] = step_bytes
        rows[str(B)] = row
    out[key] = rows


def first_difference(a, b):
    """The first new-token index where two (B, N) token tensors differ (0 for other shapes);
    None when they are equal."""
    if a.shape != b.shape:
        return 0
    return None if torch.equal(a, b) else int((a != b).any(0).nonzero()[0])


def dpo_section(ours, c, cfg, dev, autocast, out):
    """One DPO step (dpo.pair_losses: chosen and rejected rows in one pass, reference = adapters
    off)."""
    g = torch.Generator().manual_seed(5)
    chosen = train_batch(c, cfg.dpo_pairs, cfg.seq, cfg.answer, g, dev)
    rejected = chosen["input_ids"].clone()
    rejected[:, -cfg.answer:] = text_ids(c, (cfg.dpo_pairs, cfg.answer), g, dev)
    lab_r = torch.full_like(rejected, IGNORE)
    lab_r[:, -cfg.answer:] = rejected[:, -cfg.answer:]
    b = {"input_ids": torch.cat([chosen["input_ids"], rejected]),
         "labels": torch.cat([chosen["labels"], lab_r]),
         "pixel_values": chosen["pixel_values"]}
    dcfg = SimpleNamespace(loss="sigmoid", beta=0.1, label_smoothing=0.0, train_vision=False,
                           train_projector=False, noisy_tokens="own")
    ours.add_adapter("dpo", cfg.lora_r, cfg.lora_alpha)
    ours.set_adapter("dpo")
    ours.set_trainable(adapters=["dpo"])
    opt = common.make_optimizer(ours, cfg.lr)
    ours.train()

    def step():
        with autocast:
            losses, _ = dpo.pair_losses(ours, b, dcfg)
        (losses.sum() / cfg.dpo_pairs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    res = race({"dpo": step}, cfg, dev)["dpo"]
    ours.eval()
    ours.delete_adapter("dpo")
    ours.set_trainable()
    out["dpo"] = dict(pairs=cfg.dpo_pairs, rows=2 * cfg.dpo_pairs, seq=cfg.seq, s=res[0],
                      times=res[1], peak_bytes=res[2])


def word_tokenizer(c):
    """A tokenizer with one made-up word per id of the model's vocabulary ('w7' is id 7) and the
    model's special ids: what ppo.rollout needs on random weights (it decodes the samples and
    tokenizes the reward model's evaluation turn, whose English words all read as <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = {0: "<unk>", c.bos_token_id: "<s>", c.eos_token_id: "</s>", c.pad_token_id: "<pad>"}
    vocab = {special.get(i, f"w{i}"): i for i in range(c.vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def rollout_prompts(ids, image_size, folder, g):
    """ppo.rollout's prompt records for these prompt ids: each with a random image written as a
    PNG (the rollout reads images from files), no captions, a general question (type 1: no
    correctness term) and length_bonus 1."""
    os.makedirs(folder, exist_ok=True)
    records = []
    for i, row in enumerate(ids.cpu()):
        path = os.path.join(folder, f"{i:04d}.png")
        pixels = torch.randint(0, 256, (image_size, image_size, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(path)
        records.append({"input_ids": row, "image": path, "prompt": None, "captions": None,
                        "caption_type": 1, "length_bonus": 1.0})
    return records


def add_roles(m, r, alpha):
    """PPO's four roles on one base: 'policy', 'reward' (+ head), 'value' (a copy of 'reward', +
    head)."""
    m.add_adapter("policy", r, alpha)
    m.add_adapter("reward", r, alpha)
    m.add_head("reward")
    m.copy_adapter("reward", "value")
    m.add_head("value")
    return m


def ppo_section(ours, c, cfg, dev, tmp, out, key="ppo", prompts=None, new_tokens=None, lora=None,
                minibatch=None, epochs=1):
    """One PPO iteration: ppo.rollout of `prompts` prompts (default --ppo_prompts; sampled, T = 1),
    then `epochs` epochs of ppo.ppo_update in minibatches of `minibatch` (default: all prompts, one
    update); rollout and update timed apart. `lora` = (r, alpha) of the three adapters (default
    --lora_r, --lora_alpha)."""
    prompts, new_tokens = prompts or cfg.ppo_prompts, new_tokens or cfg.ppo_new_tokens
    add_roles(ours, *(lora or (cfg.lora_r, cfg.lora_alpha)))
    with torch.no_grad():  # a reward model that is not constant
        g = torch.Generator(device=dev).manual_seed(6)
        reward_b = [p for _, lin in ours.lora_linears() for p in lin.lora["reward"].B.values()]
        for p in reward_b + [ours.heads["reward"].weight]:
            p.normal_(0, 0.02, generator=g)
    ours.set_trainable(adapters=["policy", "value"], heads=["value"])
    pol = ours.adapter_parameters("policy")
    val = ours.adapter_parameters("value") + list(ours.heads["value"].parameters())
    opt = torch.optim.AdamW([{"params": pol}, {"params": val}], lr=cfg.lr)
    g = torch.Generator().manual_seed(7)
    ids, _ = prompt_ids(c, prompts, cfg.prompt_text, g, dev)
    records = rollout_prompts(ids, c.image_size, os.path.join(tmp, f"{key}_images"), g)
    tokenizer, images = word_tokenizer(c), ImageCache(c.image_size)
    # (ppo.py's defaults otherwise; its device and dtype the model's: on a bf16 GPU model the
    # rollout's full policy pass over every row is part of what ppo.py runs)
    bf16 = ours.language_model.embed_tokens.weight.dtype == torch.bfloat16
    pcfg = ppo.Config(max_new_tokens=new_tokens, minibatch_size=minibatch or prompts,
                      ppo_epochs=epochs, rm_input="tokens", out=tmp, seed=cfg.seed,
                      device=dev.type, dtype="bf16" if bf16 else "fp32")
    # (facts, wording, template, prompt_space): a reward model without facts
    rm = (False, "llava-rlhf", "vicuna_v1", False)
    d = distributed.Dist(device=dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    parts = []

    def iteration():
        t0 = time.perf_counter()
        ro = ppo.rollout(ours, ours, tokenizer, records, images, pcfg, rm, pcfg.kl_coef, gen, key)
        rewards = ro["rewards"] * pcfg.reward_scale
        adv, returns = ppo.gae(rewards, ro["values"], pcfg.gamma, pcfg.lam)
        adv = ppo.whiten(adv, ro["rmask"], d)
        sync(dev)
        t1 = time.perf_counter()
        ppo.ppo_update(ours, ours, ro, adv, returns, opt, pol + val, pcfg, d, 0)
        sync(dev)
        parts.append((t1 - t0, time.perf_counter() - t1))
    res = race({"ppo": iteration}, cfg, dev)["ppo"]
    timed_parts = parts[cfg.warmup:cfg.warmup + cfg.reps]
    out[key] = dict(prompts=prompts, new_tokens=new_tokens, s=res[0], times=res[1],
                    peak_bytes=res[2], lora_r=(lora or (cfg.lora_r,))[0],
                    minibatch=pcfg.minibatch_size, epochs=epochs,
                    rollout_s=statistics.median(p[0] for p in timed_parts),
                    update_s=statistics.median(p[1] for p in timed_parts))
    for name in ("policy", "reward", "value"):
        ours.delete_adapter(name)
    for name in ("reward", "value"):
        del ours.heads[name]
    ours.set_trainable()
    ours.eval()


def rollout_section(cfg, dev, dtype, tmp, out):
    """A PPO rollout's shape at --rollout_model (the Shapes demo by default): greedy decoding of
    --rollout_batch sequences x --rollout_new_tokens against transformers (after the same logit
    parity check), then one PPO iteration of that size with ppo.py's defaults (policy LoRA r 16,
    minibatches of half the batch, 2 epochs), rollout and update timed apart."""
    c = model_config(cfg, cfg.rollout_model)
    ours = build_ours(c, dev, dtype, cfg.seed)
    ours.add_adapter("sft", cfg.lora_r, cfg.lora_alpha)
    theirs = build_theirs(ours, dev, dtype, "export" if dev.type == "cpu" else "copy", tmp)
    ours.set_trainable()
    for p in theirs.parameters():
        p.requires_grad_(False)
    autocast = bf16_autocast(dev, dtype)
    parity = {}
    check_parity(ours, theirs, c, dev, dtype == torch.float32, autocast, parity)
    elem = torch.finfo(dtype).bits // 8
    generate_section(ours, theirs, c, cfg, dev, elem, out["hardware"]["bandwidth"], out,
                     key="rollout", batches=(cfg.rollout_batch,), N=cfg.rollout_new_tokens)
    out["rollout_parity"] = parity
    out["rollout_model"] = cfg.rollout_model
    del theirs
    gc.collect()
    ours.delete_adapter("sft")
    # (its failure recorded as its own: the decoding table measured above stays in the report)
    return run_section("rollout_ppo", out, lambda: ppo_section(
        ours, c, cfg, dev, tmp, out, key="rollout_ppo", prompts=cfg.rollout_batch,
        new_tokens=cfg.rollout_new_tokens, lora=(16, 16),
        minibatch=max(cfg.rollout_batch // 2, 1), epochs=2))


def build_plain(c, dev, dtype):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            return LLaVA(c)
    finally:
        torch.set_default_dtype(default)


def roles_section(cfg, c_main, dev, dtype, out):
    """Memory of PPO's four roles: one base with 3 adapters + 2 heads, against 4 separate models.
    Allocated for real at `roles_model` (bytes of unique storages, and the process's memory growth),
    and counted on the meta device at the benchmarked model's shape."""
    def shared(c, d):
        return [add_roles(build_plain(c, d, dtype), cfg.lora_r, cfg.lora_alpha)]

    def four(c, d):
        base = build_plain(c, d, dtype)
        policy = base
        reference, reward, value = (copy.deepcopy(base) for _ in range(3))
        policy.add_adapter("policy", cfg.lora_r, cfg.lora_alpha)
        reward.add_adapter("reward", cfg.lora_r, cfg.lora_alpha)
        reward.add_head("reward")
        value.add_adapter("value", cfg.lora_r, cfg.lora_alpha)
        value.add_head("value")
        return [policy, reference, reward, value]

    def process_bytes():
        if dev.type == "cuda":
            sync(dev)
            return torch.cuda.memory_allocated(dev)
        _trim()
        return _rss()
    c = model_config(cfg, cfg.roles_model)
    res = {"model": cfg.roles_model}
    for name, fn in (("shared", shared), ("four", four)):
        before = process_bytes()
        models = fn(c, dev)
        res[f"{name}_bytes"] = allocated_bytes(models)
        res[f"{name}_process_bytes"] = process_bytes() - before
        del models
        gc.collect()
    res["ratio"] = res["shared_bytes"] / res["four_bytes"]
    res["process_ratio"] = res["shared_process_bytes"] / max(res["four_process_bytes"], 1)
    meta = {"model": model_label(dataclasses.asdict(cfg))}
    for name, fn in (("shared", shared), ("four", four)):
        meta[f"{name}_bytes"] = allocated_bytes(fn(c_main, torch.device("meta")))
    meta["ratio"] = meta["shared_bytes"] / meta["four_bytes"]
    out["roles"] = {"allocated": res, "counted": meta}


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------

def _mb(b):
    return "-" if b is None else f"{b / 2 ** 20:.0f}"


def model_label(config):
    """--model with its --image_size/--layers overrides, as the reports name it."""
    over = [f"{k} {config[k]}" for k in ("image_size", "layers") if config[k]]
    return config["model"] + (f" ({', '.join(over)})" if over else "")


def markdown(r):
    h, t = r["hardware"], r["train"]
    lines = [f"# factalign bench: {model_label(r['config'])} on {r['device_name']}", "",
             f"{r['date']} | torch {r['torch']} | transformers {r['transformers']} | {r['dtype']} "
             f"| {r['threads']} threads (OMP_NUM_THREADS={r['omp_num_threads']}) | load average "
             f"{r['load_before']} before, {r['load_after']} after | {r['wall_s']:.0f} s", "",
             "Parity before timing: max |logits ours - transformers| "
             f"{r['parity_max_abs_diff']:.2e} (base), {r['parity_lora_max_abs_diff']:.2e} (LoRA); "
             f"tolerance {r['parity_tolerance']:.1e}.", "",
             f"Hardware measured here: matmul {h['matmul_flops'] / 1e9:.1f} GFLOP/s "
             f"({h['matmul_n']}^3, {r['dtype']}), copy {h['bandwidth'] / 1e9:.1f} GB/s (the better "
             "of a measurement at the start and one at the end).", "",
             "## Training step (forward + backward + AdamW): median s (min s)",
             "", f"{r['config']['batch']} x {r['config']['seq']} tokens "
                 f"({r['model_config']['num_image_tokens']} image tokens per row), "
                 f"{r['config']['answer']} labelled per row, LoRA r {r['config']['lora_r']}.", "",
             "| step | ours s | transformers s | ours/transformers | MFU ours | MFU transformers | "
             "peak MiB ours | peak MiB transformers |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, x in t.items():
        if "skipped" in x:
            lines.append(f"| {mode} | skipped: {x['skipped']} | | | | | | |")
            continue
        lines.append(f"| {mode} ({x['trainable'] / 1e6:.2f}M trainable) | {x['ours_s']:.3f} "
                     f"({min(x['ours_times']):.3f}) | {x['transformers_s']:.3f} "
                     f"({min(x['transformers_times']):.3f}) | **{x['ratio']:.2f}** | "
                     f"{100 * x['ours_mfu']:.1f}% | {100 * x['transformers_mfu']:.1f}% | "
                     f"{_mb(x['ours_peak_bytes'])} | {_mb(x['transformers_peak_bytes'])} |")
    lines += ["", f"## Greedy generation, {r['config']['new_tokens']} new tokens, KV cache", ""]
    lines += generation_table(r["generate"])
    d, p, ro = r["dpo"], r["ppo"], r["roles"]
    lines += ["", "## Preference and RL steps (ours)", "",
              "| step | s | peak MiB |", "|---|---|---|"]
    lines.append(f"| DPO step: failed: {d['error']} | | |" if "error" in d else
                 f"| DPO step, {d['pairs']} pairs ({d['rows']} x {d['seq']} tokens), LoRA, "
                 f"reference = adapters off | {d['s']:.3f} | {_mb(d['peak_bytes'])} |")
    lines.append(f"| PPO iteration: failed: {p['error']} | | |" if "error" in p else
                 f"| PPO iteration, {p['prompts']} prompts x {p['new_tokens']} sampled tokens "
                 f"(rollout {p['rollout_s']:.3f} s + one update epoch {p['update_s']:.3f} s) | "
                 f"{p['s']:.3f} | {_mb(p['peak_bytes'])} |")
    if "rollout" in r:
        x, q = r["rollout"], r.get("rollout_ppo", {})
        lines += ["", f"## A PPO rollout's shape: `{r['config']['rollout_model']}` preset, greedy, "
                      f"{r['config']['rollout_new_tokens']} new tokens, KV cache", ""]
        lines += [f"failed: {x['error']}"] if "error" in x else generation_table(x)
        if "error" in q:
            lines += ["", f"PPO iteration failed: {q['error']}"]
        elif q:
            lines += ["", f"PPO iteration at `{r['config']['rollout_model']}`, {q['prompts']} "
                          f"prompts x {q['new_tokens']} sampled tokens, LoRA r {q['lora_r']}, "
                          f"{q['epochs']} epochs of minibatches of {q['minibatch']}: "
                          f"**{q['s']:.3f} s** = rollout {q['rollout_s']:.3f} s + update "
                          f"{q['update_s']:.3f} s."]
    lines += ["",
              "## PPO roles (policy, reference, reward, value): memory of parameters + buffers", ""]
    if "error" in ro:
        return "\n".join(lines + [f"failed: {ro['error']}", ""])
    lines += ["| arrangement | one base, 3 adapters + 2 heads | four models | ratio |",
              "|---|---|---|---|"]
    a, m = ro["allocated"], ro["counted"]
    lines += [f"| allocated on {r['device']} at `{a['model']}` (unique storages) | "
              f"{_mb(a['shared_bytes'])} MiB | {_mb(a['four_bytes'])} MiB | **{a['ratio']:.3f}** |",
              f"| process memory growth at `{a['model']}` | {_mb(a['shared_process_bytes'])} MiB | "
              f"{_mb(a['four_process_bytes'])} MiB | {a['process_ratio']:.3f} |",
              f"| counted at `{m['model']}` (meta device) | {_mb(m['shared_bytes'])} MiB | "
              f"{_mb(m['four_bytes'])} MiB | {m['ratio']:.3f} |", "",
              "MFU = model FLOPs / step time / measured matmul peak (FLOPs formula in bench.py's "
              "docstring; the same FLOPs for both). Bandwidth use = bytes read per decode step "
              "(weights + KV cache) x steps/s / measured copy bandwidth.", ""]
    return "\n".join(lines)


def same_tokens_cell(x):
    """'yes', or where ours differs from transformers and where ours compiled differs from ours."""
    if x["same_tokens"]:
        return "yes"
    eager, compiled = x["first_difference"], x.get("compiled_first_difference")
    parts = [f"NO (from token {eager})" if eager is not None else "",
             f"NO compiled (from token {compiled})" if compiled is not None else ""]
    return "; ".join(p for p in parts if p)


def generation_table(rows):
    """Markdown rows of a generation comparison (ours compiled too when it was timed)."""
    comp = any("ours_compiled_s" in x for x in rows.values())
    head = ("| batch | ours tok/s | transformers tok/s | ours/transformers | decode ms/step ours | "
            "transformers | bandwidth use ours | transformers | same tokens |")
    if comp:
        head += " compiled tok/s | compiled decode ms/step | compiled first calls s |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for B, x in rows.items():
        line = (f"| {B} | {x['ours_tok_s']:.1f} | {x['transformers_tok_s']:.1f} | "
                f"**{x['ratio_tok_s']:.2f}** | {x['ours_decode_ms']:.2f} | "
                f"{x['transformers_decode_ms']:.2f} | {100 * x['ours_bw_util']:.0f}% | "
                f"{100 * x['transformers_bw_util']:.0f}% | "
                f"{same_tokens_cell(x)} |")
        if comp:
            line += (f" {x['ours_compiled_tok_s']:.1f} | {x['ours_compiled_decode_ms']:.2f} | "
                     f"{x['ours_compiled_first_calls_s']:.1f} |")
        lines.append(line)
    return lines


def run_section(name, r, fn, *args):
    """Run one of the ours-only sections; a failure there (a bug in a stage script, out of memory)
    is recorded in the report instead of losing the comparison measured so far. Returns the names
    of the sections that failed: [name], or what fn returns (its own sections' failures)."""
    try:
        return fn(*args) or []
    except Exception as e:  # noqa: BLE001 -- reported, and the run exits non-zero at the end
        traceback.print_exc()
        r[name] = {"error": f"{type(e).__name__}: {e}"}
        return [name]


# what --fsdp's one sharded training step does not read (the other sections' flags)
FSDP_UNREAD = ("gen_batches", "new_tokens", "prompt_text", "dpo_pairs", "ppo_prompts",
               "ppo_new_tokens", "roles_model", "rollout_model", "rollout_batch",
               "rollout_new_tokens", "compile_decode", "matmul_n", "copy_mib", "hf_load")


def main(cfg, given=None):
    """given: the flags typed on the command line (cli's; --quick leaves them alone). None (an
    in-process caller's Config): the fields at other values than their defaults."""
    if cfg.fsdp:  # (as given: --quick fills in its own values below)
        rundir.refuse_unread(cfg, FSDP_UNREAD, "with --fsdp true (one sharded training step "
                             "alone); drop it")
        if "lora" not in cfg.train_modes:
            rundir.refuse_unread(cfg, ["lora_r", "lora_alpha"], "with --fsdp true and no lora in "
                                 "--train_modes; drop it")
        if cfg.device != "cuda" and cfg.dtype not in ("fp32", "auto"):  # (what runs there)
            rundir.refuse_unread(cfg, ["dtype"], "with --fsdp true off the GPU (fp32); drop it")
    if not cfg.rollout_model:  # (no rollout section)
        rundir.refuse_unread(cfg, ["rollout_batch", "rollout_new_tokens"], "with --rollout_model "
                             "'' (no rollout is measured); drop it")
    elif cfg.rollout_batch > 1 and cfg.rollout_batch % 2:  # (ppo.py refuses the uneven split)
        raise common.ConfigError(f"--rollout_batch {cfg.rollout_batch}: must be even (the PPO "
                                 "iteration's two minibatches take half of it each)")
    if cfg.quick:  # the tiny config, except for the fields given
        default = Config()
        given = given if given is not None else [
            k for k in QUICK if getattr(cfg, k) != getattr(default, k)]
        cfg = dataclasses.replace(cfg, **{k: v for k, v in QUICK.items() if k not in given})
    presets_ok = cfg.model in PRESETS and cfg.roles_model in PRESETS
    if not presets_ok or cfg.rollout_model not in (*PRESETS, ""):
        raise common.ConfigError("--model/--roles_model/--rollout_model: choose from "
                                 f"{', '.join(PRESETS)}")
    patch = PRESETS[cfg.model].get("patch_size", ModelConfig.patch_size)
    if 0 < cfg.image_size < patch:  # (no patch: a conv2d error deep in the first forward pass)
        raise common.ConfigError(f"--image_size {cfg.image_size}: smaller than the {cfg.model} "
                                 f"preset's patch size {patch} (at least one patch per image)")
    # (a smaller matmul or copy times its overhead, not the peak: MFU came out at thousands of %)
    if 0 < cfg.matmul_n < 256 or 0 < cfg.copy_mib < 8:
        flag, value, least = (("--matmul_n", cfg.matmul_n, 256) if 0 < cfg.matmul_n < 256
                              else ("--copy_mib", cfg.copy_mib, 8))
        raise common.ConfigError(f"{flag} {value}: 0 (the device's default) or at least {least}: "
                                 "the peak that MFU and bandwidth shares divide by")
    check_positions(cfg)
    distributed.check_device(cfg.device)
    if cfg.dtype not in ("auto", "fp32", "bf16") or cfg.hf_load not in ("auto", "export", "copy"):
        raise common.ConfigError("--dtype: auto, fp32 or bf16; --hf_load: auto, export or copy")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return fsdp_bench(cfg) if cfg.fsdp else run(cfg)
    finally:
        torch.set_num_threads(threads)  # in-process callers (the tests) keep their own setting


def check_positions(cfg):
    """Every sequence a section builds fits its preset's positions (a longer one ran for minutes
    and then failed deep in RoPE)."""
    def prompt_and(c, new):  # bos, image tokens, --prompt_text, then the generated tokens
        return 1 + c.num_image_tokens + cfg.prompt_text + new
    c = model_config(cfg)
    sizes = [("--seq", cfg.seq, cfg.model, c),
             ("--prompt_text + --new_tokens", prompt_and(c, cfg.new_tokens), cfg.model, c),
             ("--prompt_text + --ppo_new_tokens", prompt_and(c, cfg.ppo_new_tokens), cfg.model, c)]
    if cfg.rollout_model:
        r = model_config(cfg, cfg.rollout_model)
        sizes.append(("--prompt_text + --rollout_new_tokens",
                      prompt_and(r, cfg.rollout_new_tokens), cfg.rollout_model, r))
    if cfg.fsdp:  # (one sharded training step alone: the other lengths are not read, and their
        # flags are refused, so a check of them could not be answered)
        sizes = sizes[:1]
    answer_room(c, cfg.seq, cfg.answer)  # (train_batch's rows: checked before any section)
    for flags, n, preset, c in sizes:
        if n > c.max_position:
            raise common.ConfigError(f"{flags}: {n} positions (with the bos and "
                                     f"{c.num_image_tokens} image tokens) are more than the "
                                     f"{preset} preset's {c.max_position}")


def device_name(dev):
    """The GPU's name, or the CPU's model name (/proc/cpuinfo; else what platform knows)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    if dev.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                model_line = next(line for line in f if line.startswith("model name"))
            name = model_line.split(":", 1)[1].strip()
        except (OSError, StopIteration):
            pass
    return name


def bf16_autocast(dev, dtype):
    """bf16 autocast on CUDA when the run computes in bf16; a context doing nothing otherwise."""
    on = dev.type == "cuda" and dtype == torch.bfloat16
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def run(cfg):
    from transformers import __version__ as tf_version
    from transformers.utils import logging as tf_logging
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    dev = torch.device(cfg.device)
    auto_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(cfg.dtype, auto_dtype)
    exact = dtype == torch.float32
    autocast = bf16_autocast(dev, dtype)
    rundir.ensure_writable(cfg.out)
    t_start = time.time()
    r = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": cfg.device,
         "device_name": device_name(dev),
         "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": tf_version,
         "python": platform.python_version(), "dtype": str(dtype).replace("torch.", ""),
         "threads": torch.get_num_threads(),
         "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_before": machine_load(),
         "config": dataclasses.asdict(cfg)}
    torch.manual_seed(cfg.seed)
    n = cfg.matmul_n or (8192 if dev.type == "cuda" else 2048)
    mib = cfg.copy_mib or (2048 if dev.type == "cuda" else 256)
    r["hardware"] = {"matmul_n": n, "matmul_flops": matmul_peak(n, dtype, dev), "copy_mib": mib,
                     # measured again at the end; the better of the two is kept
                     "bandwidth": copy_bandwidth(mib, dev)}
    c = model_config(cfg)
    r["model_config"] = {**dataclasses.asdict(c), "num_image_tokens": c.num_image_tokens}
    ours = build_ours(c, dev, dtype, cfg.seed)
    ours.add_adapter("sft", cfg.lora_r, cfg.lora_alpha)
    with tempfile.TemporaryDirectory() as tmp:
        how = cfg.hf_load if cfg.hf_load != "auto" else ("export" if dev.type == "cpu" else "copy")
        theirs = build_theirs(ours, dev, dtype, how, tmp)
        r["hf_load"], r["hf_attn_implementation"] = how, theirs.config._attn_implementation
        ours.set_trainable()
        for p in theirs.parameters():
            p.requires_grad_(False)
        check_parity(ours, theirs, c, dev, exact, autocast, r)
        print(f"parity: max |diff| {r['parity_max_abs_diff']:.2e} base, "
              f"{r['parity_lora_max_abs_diff']:.2e} LoRA", flush=True)
        train_section(ours, theirs, c, cfg, dev, exact, autocast, r["hardware"]["matmul_flops"], r)
        ratios = [f"{k} {v['ratio']:.2f}" for k, v in r["train"].items() if "ratio" in v]
        print("train: " + ", ".join(ratios), flush=True)
        elem = torch.finfo(dtype).bits // 8
        generate_section(ours, theirs, c, cfg, dev, elem, r["hardware"]["bandwidth"], r)
        ratios = [f"b{k} {v['ratio_tok_s']:.2f}" for k, v in r["generate"].items()]
        print("generate: " + ", ".join(ratios), flush=True)
        del theirs
        gc.collect()
        ours.delete_adapter("sft")
        failed = run_section("dpo", r, dpo_section, ours, c, cfg, dev, autocast, r)
        failed += run_section("ppo", r, ppo_section, ours, c, cfg, dev, tmp, r)
        del ours
        gc.collect()
    failed += run_section("roles", r, roles_section, cfg, c, dev, dtype, r)
    if cfg.rollout_model:
        with tempfile.TemporaryDirectory() as tmp:
            failed += run_section("rollout", r, rollout_section, cfg, dev, dtype, tmp, r)
        if "rollout" in r and "error" not in r["rollout"]:
            ratios = [f"b{k} {v['ratio_tok_s']:.2f}" for k, v in r["rollout"].items()]
            print("rollout: " + ", ".join(ratios), flush=True)
    # what this machine can really do: the better of the two measurements (a shared machine)
    h = r["hardware"]
    h["matmul_flops_start"], h["bandwidth_start"] = h["matmul_flops"], h["bandwidth"]
    h["matmul_flops_end"], h["bandwidth_end"] = matmul_peak(n, dtype, dev), copy_bandwidth(mib, dev)
    if h["matmul_flops_end"] > h["matmul_flops"] or h["bandwidth_end"] > h["bandwidth"]:
        h["matmul_flops"] = max(h["matmul_flops"], h["matmul_flops_end"])
        h["bandwidth"] = max(h["bandwidth"], h["bandwidth_end"])
        for x in r["train"].values():  # utilisation against the better peak
            for k in ("ours", "transformers"):
                if f"{k}_s" in x:
                    x[f"{k}_mfu"] = x["flops"] / x[f"{k}_s"] / h["matmul_flops"]
        for x in [*r["generate"].values(), *r.get("rollout", {}).values()]:
            if not isinstance(x, dict) or "decode_bytes_per_step" not in x:
                continue
            for k in ("ours", "transformers", "ours_compiled"):
                if f"{k}_decode_ms" in x:
                    steps_per_s = 1e3 / x[f"{k}_decode_ms"]
                    x[f"{k}_bw_util"] = x["decode_bytes_per_step"] * steps_per_s / h["bandwidth"]
    r["load_after"], r["wall_s"] = machine_load(), time.time() - t_start
    if dev.type == "cuda":
        r["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(dev)
    else:
        import resource
        r["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    md = markdown(r)
    print(md)
    common.write_whole(os.path.join(cfg.out, "bench.md"), lambda f: f.write(md))
    common.write_json(r, os.path.join(cfg.out, "bench.json"), indent=2)
    if failed:
        print(f"error: sections failed: {', '.join(failed)} (tracebacks above; the report has the "
              "rest)", file=sys.stderr)
        raise SystemExit(1)
    return r


def fsdp_bench(cfg):
    """--fsdp: one sharded training step (distributed.shard_model, as sft.py --fsdp true runs it)
    for each of --train_modes (full: language model + projector, CLIP frozen; lora), median step
    time and peak memory per process. `torchrun --nproc_per_node 8 bench.py --fsdp true --device
    cuda --model llava-7b`: bf16 compute, fp32 master weights and AdamW moments sharded 8 ways.
    --batch rows per process. No transformers comparison. Writes OUT/bench_fsdp.json."""
    d = distributed.setup_dist(cfg.device, fsdp=True, flags=cfg)
    if d.main:  # (before the steps: a 7B measurement was lost to an --out that is a file)
        rundir.ensure_writable(cfg.out)
    bf16 = d.device.type == "cuda" and cfg.dtype != "fp32"
    c = model_config(cfg)
    out = {"world": d.world, "device": str(d.device), "bf16_mixed_precision": bf16,
           "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(c)}
    for mode in cfg.train_modes:
        # fp32 master weights, sharded below
        model = build_ours(c, d.device, torch.float32, cfg.seed).train()
        if mode == "lora":
            model.add_adapter("sft", cfg.lora_r, cfg.lora_alpha)
            model.set_adapter("sft")
            model.set_trainable(adapters=["sft"])
        else:
            model.set_trainable(projector=True, language=True)
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        distributed.shard_model(model, d, bf16=bf16)
        opt = common.make_optimizer(model, cfg.lr)
        # (on the CPU: train_batch draws there and moves the batch; a CUDA one was refused)
        g = torch.Generator().manual_seed(cfg.seed + d.rank)
        batch = train_batch(c, cfg.batch, cfg.seq, cfg.answer, g, d.device)
        local_labels = torch.tensor(float(cfg.batch * cfg.answer), device=d.device)
        n_global = distributed.all_reduce_sum(local_labels, d)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = sft.lm_loss(model, batch, n_global)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        times = []
        for i in range(cfg.warmup + cfg.reps):
            dt = timed(step, d.device)[0]
            if i >= cfg.warmup:
                times.append(dt)
        peak = torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda" else _rss()
        peaks = distributed.all_gather_cat(torch.tensor([float(peak)], device=d.device), d).tolist()
        out[mode] = {"params": n_all, "trainable": n_train, "step_s": statistics.median(times),
                     "times": times,
                     "tokens_per_s": cfg.batch * cfg.seq * d.world / statistics.median(times),
                     "peak_bytes_per_process": peaks, "peak_kind": "cuda max_memory_allocated"
                     if d.device.type == "cuda" else "resident set size"}
        if d.main:
            print(f"fsdp {mode}: {n_all / 1e9:.2f}B params, {n_train / 1e9:.3f}B trained, "
                  f"{d.world} processes | step {statistics.median(times):.3f}s | peak "
                  f"{max(peaks) / 2**30:.2f} GiB per process", flush=True)
        model = opt = None  # free the first mode's shards before the next one
    if d.main:
        common.write_json(out, os.path.join(cfg.out, "bench_fsdp.json"))
    distributed.cleanup_dist()
    return out


# Ctrl-C's line (the report is written at the end)
INTERRUPTED = "interrupted: no report written"


def cli(argv=None):
    cfg = common.parse_config(Config, argv, prog="bench.py")
    with common.user_errors(interrupted=INTERRUPTED):
        return main(cfg, given=common.given_flags(Config, argv))


if __name__ == "__main__":
    with distributed.ending_process():  # (an error after --fsdp's process group: no teardown abort)
        cli()
