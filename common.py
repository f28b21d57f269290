"""What every training script shares: dataclass config -> command line, torchrun/DDP setup,
seeding, AdamW + cosine schedule, logging, atomic checkpoints and --resume, clean errors."""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import FORMAT_VERSION, CheckpointError, latest_checkpoint

# ----------------------------------------------------------------------------------------
# errors users cause: one line, exit code 2, no traceback
# ----------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A flag value or combination that cannot work."""


class NonFiniteError(Exception):
    """A non-finite loss or gradient."""


USER_ERRORS = (ConfigError, CheckpointError, NonFiniteError)


def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


@contextmanager
def user_errors(*extra):
    """Turn the errors a user can cause (bad data, bad checkpoint, bad flags, unwritable paths)
    into one line on stderr and exit code 2. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except USER_ERRORS + tuple(extra) as e:
        fail(str(e))
    except PermissionError as e:
        fail(f"{e.filename}: permission denied")
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        fail(f"{e.filename}: {e.strerror}")
    except OSError as e:
        if getattr(e, "filename", None):
            fail(f"{e.filename}: {e.strerror}")
        raise


# ----------------------------------------------------------------------------------------
# dataclass config -> command line
# ----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        fail(f"{self.prog}: {message} (see --help)")


def _parse_bool(s):
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def _converter(tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]: 'none' -> None
        inner = _converter(next(a for a in args if a is not type(None)))
        return lambda s: None if s.strip().lower() in ("none", "") else inner(s)
    if origin in (tuple, list) or tp in (tuple, list):  # comma-separated: --lora_targets q,v
        inner = _converter(args[0]) if args else str
        return lambda s: tuple(inner(x) for x in s.split(",") if x.strip() != "")
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        def conv(s, tp=tp):
            try:
                return tp(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got '{s}'")
        return conv
    raise TypeError(f"unsupported config field type {tp}")


def seed_suffix(cfg, config_class, fields):
    """A world seed N > 0 moves each of `fields` still at its default to 'NAME-seedN' (data/shapes ->
    data/shapes-seed1), so that worlds of two seeds and the runs on them never share a folder."""
    if not cfg.world_seed:
        return cfg
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    for name in fields:
        if getattr(cfg, name) == defaults[name]:
            root, ext = os.path.splitext(getattr(cfg, name))
            setattr(cfg, name, f"{root}-seed{cfg.world_seed}{ext}")
    return cfg


def parse_config(cls, argv=None, prog=None):
    """`--field value` for every field of the dataclass `cls`; types are checked and unknown
    flags are an error. Help text comes from the comment after each field."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = _Parser(prog=prog or os.path.basename(sys.argv[0]), description=(cls.__doc__ or "").strip(),
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        if tp in (tuple, list) or typing.get_origin(tp) in (tuple, list):  # --x a b c or --x a,b,c
            parser.add_argument(f"--{f.name}", type=_converter(tp), nargs="*", default=default,
                                help=comments.get(f.name, " "), metavar=f.name.upper())
        else:
            parser.add_argument(f"--{f.name}", type=_converter(tp), default=default,
                                help=comments.get(f.name, " "), metavar=f.name.upper())
    args = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):  # nargs lists of comma-split tuples -> one flat tuple
        v = args[f.name]
        if isinstance(v, list):
            args[f.name] = tuple(x for part in v for x in part)
    return cls(**args)


def _field_comments(cls):
    """Field comments (`name: type = default  # comment`) from the class source, for --help."""
    import inspect
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        s = line.strip()
        if ":" in s and "#" in s and not s.startswith("#"):
            out[s.split(":")[0].strip()] = s.split("#", 1)[1].strip()
    return out


# ----------------------------------------------------------------------------------------
# distributed, seeding, device
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_dist(device="cpu"):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs as a world of one."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def cleanup_dist():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t, d):
    """Mean of a tensor over ranks (identity in a single process)."""
    if d.world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= d.world
    return t


def all_gather_cat(t, d):
    """Concatenate equally-shaped tensors from all ranks along dim 0."""
    if d.world == 1:
        return t
    out = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


def sync_grads(params, d):
    """Sum gradients across ranks (explicit data parallelism: one all-reduce per parameter after
    backward). Our losses are normalised by global counts (tokens or pairs in the global batch), so
    the per-rank gradients add up to the single-process gradient exactly; the model stays unwrapped."""
    if d.world == 1:
        return
    for p in params:  # every rank must all-reduce the same tensors, also after an empty micro-batch
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if grads:  # one flat all-reduce instead of one per tensor
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        _unflatten(flat, grads)


def _unflatten(flat, grads):
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def all_reduce_sum(t, d):
    """Sum of a tensor over ranks (identity in a single process)."""
    if d.world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def on_main_first(d, fn):
    """Run fn on the main process first (e.g. writing the Shapes world), then on the others."""
    if d.main:
        out = fn()
    if d.world > 1:
        dist.barrier()
    if not d.main:
        out = fn()
    return out


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_indices(step, n, batch_size, seed, rank=0, world=1):
    """Indices of the global batch number `step` over a dataset of n items, split across ranks.
    A fresh permutation per epoch, seeded by (seed, epoch): the data order depends only on the
    step, so --resume needs no sampler state and any world size sees the same global batches."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    idx = perm[(i * batch_size) % n:][:batch_size]
    if len(idx) < batch_size:  # n < batch_size: wrap around
        idx = torch.cat([idx, perm[:batch_size - len(idx)]])
    if batch_size % world:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {world} processes")
    per = batch_size // world
    return idx[rank * per:(rank + 1) * per].tolist()


# ----------------------------------------------------------------------------------------
# optimizer and schedule
# ----------------------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999), vision_lr_ratio=1.0):
    """AdamW over trainable parameters; matrices decay, biases/norms/1-D parameters do not. The vision
    tower and projector may run at vision_lr_ratio x lr (set_lr keeps the ratio)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("nothing to train: no parameter requires grad")
    groups = []
    for is_vision in (False, True):
        part = [(n, p) for n, p in named if n.startswith(("vision_tower.", "projector.")) == is_vision]
        scale = vision_lr_ratio if is_vision else 1.0
        for decay in (True, False):
            ps = [p for _, p in part if (p.dim() >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def cosine_lr(step, max_steps, lr, warmup=0, min_ratio=0.0):
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio * lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_and_check(params, max_norm, step, out_dir, skip_nonfinite=False, loss=None):
    """Clip the gradient norm. A non-finite loss or gradient stops the run naming the step (numbered as
    the log lines and checkpoints number them: the update after checkpoint-N is step N + 1) and the
    last good checkpoint, or (skip_nonfinite) returns None so the caller skips the update."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    bad_loss = loss is not None and not math.isfinite(float(loss))
    if bad_loss or not torch.isfinite(norm):
        if skip_nonfinite:
            for p in params:
                p.grad = None
            return None
        last = latest_checkpoint(out_dir) or "none yet"
        raise NonFiniteError(f"step {step + 1}: non-finite {'loss' if bad_loss else 'gradient'}; stopped. Last good "
                             f"checkpoint: {last} (resume with --resume, or pass --skip_nonfinite true)")
    return float(norm)


def _injected_fault(params, step):
    """Test hook, off unless set: FACTALIGN_FAULT_STEP=N makes the gradient of update step N (1-based, as
    logged) NaN, as an overflow would, so the tests can reach the non-finite guard in every stage."""
    at = os.environ.get("FACTALIGN_FAULT_STEP")
    if at and int(at) == step + 1:
        for p in params:
            if p.grad is not None:
                p.grad.view(-1)[0] = float("nan")
                return True
    return False


def optimizer_step(opt, params, d, step, cfg, loss=None, reduce=True):
    """One update, the same in every stage: sum the gradients over ranks, clip, check that loss and
    gradient are finite, step, zero. `loss` is this rank's share (summed over ranks when reduce) and
    comes back global, with the gradient norm; the norm is None when --skip_nonfinite skipped the step."""
    if _injected_fault(params, step) and loss is not None:
        loss = loss * float("nan")
    sync_grads(params, d)
    if loss is not None and reduce:
        loss = all_reduce_sum(loss, d)
    norm = clip_and_check(params, cfg.grad_clip, step, cfg.out, getattr(cfg, "skip_nonfinite", False), loss)
    if norm is not None:
        opt.step()
    elif d.main:
        print(f"warning: step {step + 1}: non-finite loss or gradient; update skipped (--skip_nonfinite)", flush=True)
    opt.zero_grad(set_to_none=True)
    return loss, norm


# ----------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------

class Logger:
    """One nanoGPT-style line per log step on stdout and the same numbers in OUT/metrics.jsonl."""

    def __init__(self, out_dir, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.t0 = time.time()
        if enabled and os.path.exists(self.path):  # a run killed mid-line: drop the cut line before appending
            with open(self.path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)

    def log(self, step, **metrics):
        if not self.enabled:
            return
        metrics = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in metrics.items()}
        parts = [f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()] + [f"{time.time() - self.t0:.1f}s"]
        print(" | ".join(parts), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time() - self.t0, 3), **metrics}) + "\n")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def progress(iterable, total=None, desc="", enabled=True, every=1.0):
    """A minimal progress bar on stderr (no dependency): count, rate and ETA, redrawn each second."""
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    t0 = last = time.time()
    i = 0
    for i, x in enumerate(iterable, 1):
        yield x
        now = time.time()
        if enabled and (now - last >= every or i == total):
            last = now
            rate = i / max(now - t0, 1e-9)
            eta = f" eta {int((total - i) / rate)}s" if total else ""
            print(f"\r{desc} {i}/{total or '?'} {rate:.1f}/s{eta}   ", end="", file=sys.stderr, flush=True)
    if enabled and i:
        print(file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# checkpoints: OUT/checkpoint-NNNNNN/ written to a temp dir and renamed (a crash never leaves
# a half checkpoint); --init OUT and --resume read the newest complete one
# ----------------------------------------------------------------------------------------

RESUME_FREE_FIELDS = {"resume", "out", "log_every", "save_every", "eval_every", "max_steps",
                      "skip_nonfinite"}  # do not change the math (skip_nonfinite: the way out of a stopped run)


def ensure_writable(out_dir):
    """Fail early, with one line, when the output directory cannot be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{out_dir}: output directory cannot be written ({e.strerror})")


def rng_state(generators=None):
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    return state


def set_rng_state(state, generators=None):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


def save_checkpoint(model, out_dir, step, run_config, optimizer=None, tokenizer=None, base=None, generators=None,
                    extra_state=None, keep=2, d=None):
    """Write OUT/checkpoint-{step}: model files (+ tokenizer) and trainer_state.pt (optimizer, step,
    RNG, run config). Written into a temp dir and renamed; older checkpoints beyond `keep` removed.
    Only the main process writes; all processes wait for it."""
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    if d is None or d.main:
        tmp = os.path.join(out_dir, f".tmp-checkpoint-{step:06d}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        cfg = dataclasses.asdict(run_config) if dataclasses.is_dataclass(run_config) else dict(run_config)
        # base is stored relative to the checkpoint, so a moved ckpt/ tree keeps working
        model.save_pretrained(tmp, base=base, extra_config={"step": step, "run_config": cfg})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {"format_version": FORMAT_VERSION, "step": step, "run_config": cfg,
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "rng": rng_state(generators), "extra": extra_state or {}}
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving the same step (e.g. the final save): swap it out
            _discard(final)
        os.rename(tmp, final)
        old = sorted(n for n in os.listdir(out_dir) if n.startswith("checkpoint-") and n[11:].isdigit()
                     and os.path.exists(os.path.join(out_dir, n, "config.json")))  # keep counts complete ones
        for n in old[:-keep] if keep > 0 else []:
            _discard(os.path.join(out_dir, n))
    if d is not None and d.world > 1:
        dist.barrier()
    return final


def _discard(path):
    """Delete a checkpoint directory after renaming it to a temp name (one atomic step): a kill during
    the deletion never leaves a checkpoint-N that looks complete (has config.json) but is not."""
    trash = os.path.join(os.path.dirname(path), f".tmp-checkpoint-discard-{os.path.basename(path)}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path):
    for n in os.listdir(path):
        with open(os.path.join(path, n), "rb") as f:
            os.fsync(f.fileno())


def load_resume(out_dir, run_config, generators=None):
    """The newest checkpoint in OUT and its trainer state, after checking that the run config is the
    same (except fields that do not change the math). Restores RNG states. None if there is none."""
    for n in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        incomplete = n.startswith("checkpoint-") and not os.path.exists(os.path.join(out_dir, n, "config.json"))
        if n.startswith(".tmp-checkpoint-") or incomplete:  # a checkpoint whose writing (or deletion) was cut off
            shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)
    path = latest_checkpoint(out_dir)
    if path is None:
        return None, None
    file = os.path.join(path, "trainer_state.pt")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read trainer state ({type(e).__name__}: {e})")
    if not isinstance(state, dict) or not {"format_version", "step", "run_config", "rng"} <= set(state):
        raise CheckpointError(f"{file}: not a factalign trainer state (expected format_version, step, run_config, rng)")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {state['format_version']!r} "
                              f"{'is newer than' if _newer(state['format_version']) else 'differs from'} the "
                              f"{FORMAT_VERSION} this code reads; resume with the factalign version that wrote it")
    now = dataclasses.asdict(run_config)
    diff = [k for k in now if k not in RESUME_FREE_FIELDS and _norm(now[k]) != _norm(state["run_config"].get(k))]
    if diff:
        k = diff[0]
        raise ConfigError(f"{path}: --resume with a different config: field '{k}' was "
                          f"{state['run_config'].get(k)!r}, now {now[k]!r}")
    set_rng_state(state["rng"], generators)
    return path, state


def _newer(version):
    return isinstance(version, int) and version > FORMAT_VERSION


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


# ----------------------------------------------------------------------------------------
# models, tokenizers and the computations several stages share
# ----------------------------------------------------------------------------------------

def load_model_and_tokenizer(init="", preset="shapes", vision_tower="", tokenizer_dir="", device="cpu",
                             dtype=None):
    """A model from a checkpoint (`init`: ours, llava-hf, original LLaVA, or a LLaMA dir plus
    `vision_tower`), or a fresh `preset` sized to the tokenizer in `tokenizer_dir`. The tokenizer
    comes from the checkpoint directory (or tokenizer_dir when the checkpoint has none)."""
    from data import load_tokenizer
    from model import LLaVA, resolve_checkpoint
    if init:
        path = resolve_checkpoint(init)
        tok_dir = path if os.path.exists(os.path.join(path, "tokenizer_config.json")) or \
            os.path.exists(os.path.join(path, "tokenizer.json")) else tokenizer_dir
        if not tok_dir:
            raise ConfigError(f"{path}: no tokenizer files in the checkpoint directory")
        tokenizer = load_tokenizer(tok_dir)
        model = LLaVA.from_pretrained(path, vision_tower=vision_tower or None, dtype=dtype)
    else:
        tokenizer = load_tokenizer(tokenizer_dir)
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        vocab = -(-len(tokenizer) // 64) * 64  # rounded up: friendlier matmul shapes
        model = LLaVA.from_preset(preset, vocab_size=vocab, image_token_id=image_id if image_id is not None else -200,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
        if dtype is not None:
            model = model.to(dtype)
    return model.to(device), tokenizer


def prompt_item(tokenizer, model, turns, image_unit=None, template="vicuna_v1", max_len=2048):
    """Tokenized generation prompt (turns end with a human turn) with its normalised image."""
    from data import normalize, tokenize_conversation
    c = model.config
    item = tokenize_conversation(tokenizer, turns, c.image_token_id, c.num_image_tokens, max_len, template)
    if item is None:
        return None
    if image_unit is not None:
        item["pixel_values"] = normalize(image_unit)
    return item


@torch.no_grad()
def generate_answers(model, tokenizer, items, batch_size=32, max_new_tokens=64, temperature=0.0, top_p=1.0,
                     generator=None, desc="generate", show=True):
    """Decode answers for prompt items (from prompt_item) in left-padded batches with the KV cache.
    Returns the decoded answer texts (cut at EOS)."""
    from data import collate
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    batches = range(0, len(items), batch_size)
    for start in progress(batches, total=len(batches), desc=desc, enabled=show):
        chunk = items[start:start + batch_size]
        b = collate(chunk, tokenizer.pad_token_id, side="left")
        pix = b["pixel_values"].to(dev) if b["pixel_values"] is not None else None
        g = model.generate(pix, b["input_ids"].to(dev), b["attention_mask"].to(dev), max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, generator=generator)
        for i in range(len(chunk)):
            n = int(g.lengths[i])
            toks = g.tokens[i, :n].tolist()
            out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


def sequence_logprobs(model, batch, average=False):
    """Sum (or mean) over the labelled tokens of log p(token | prefix): the answer log-likelihood
    that DPO and PPO use. Image, prompt and pad tokens carry label -100 and count for nothing.
    Returns (B,) values and the (B,) number of labelled tokens."""
    from data import IGNORE
    logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    n = mask.sum(-1)
    total = logp.sum(-1)
    return (total / n.clamp(min=1) if average else total), n


def to_device(batch, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def score_sequences(model, head, input_ids, attention_mask, image_features):
    """Scalar score per right-padded sequence: head(hidden state at the last real token)."""
    h = model(None, input_ids, attention_mask, return_hidden=True, image_features=image_features)
    last = attention_mask.sum(1) - 1
    return model.heads[head](h[torch.arange(len(h), device=h.device), last])


def lm_loss(model, batch, n_global):
    """Sum of answer-token cross-entropies / answer tokens in the global batch. The head runs only on
    labelled positions: with a 32k vocabulary the full (B, T, V) logits would dominate memory.
    Batches are right-padded, so the causal mask alone keeps every real token from seeing a pad:
    no padding mask is passed and SDPA takes its fused causal path."""
    h = model(batch["pixel_values"], batch["input_ids"], None, return_hidden=True)
    from data import IGNORE
    labels = batch["labels"][:, 1:]
    sel = labels != IGNORE
    logits = model.logits(h[:, :-1][sel]).float()
    return F.cross_entropy(logits, labels[sel], reduction="sum") / n_global
