r"""Preference optimisation of a LLaVA: DPO (arXiv 2305.18290), IPO (arXiv 2310.12036), conservative
DPO (label smoothing), robust DPO, reference-free DPO, and POVID (arXiv 2402.11411).

    python dpo.py  # Shapes: ground truth vs injected hallucination, from ckpt/sft
    python dpo.py --povid_stage 2 --init ckpt/dpo --out ckpt/povid  # POVID stage 2 from stage 1
    python dpo.py --loss ipo --beta 0.5 --out ckpt/dpo_ipo  # IPO on length-normalised log-probs
    torchrun --nproc_per_node=8 dpo.py --init llava-v1.5-7b \
        --data POVID_preference_data_for_VLLMs.json --image_folder coco/ --max_len 1048 \
        --lora_r 128 --lora_alpha 256 --lr 1e-7 --min_lr_ratio 0 --warmup_from_zero true \
        --batch_size 8 --grad_clip 0 --device cuda --dtype bf16  # + steps, warmup: README

logp = sum over the final answer's tokens (and its </s>) of log p(token | prefix, image); image,
prompt and pad positions carry label -100 and count for nothing. With
h = (logp_c - ref_c) - (logp_r - ref_r):
    sigmoid   -log sigmoid(beta h)                                    DPO, Eq. 7
    cdpo      -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   cDPO (label smoothing eps)
    rdpo      (-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
                                                   rDPO (arXiv 2403.00409; TRL's 'robust')
    ipo       (h - 1/(2 beta))^2, logp averaged over the answer tokens  IPO, Eq. 17
    ref_free  sigmoid with ref_c = ref_r = 0
POVID stage 2: 0.5 L(chosen, injected) + 0.5 L(chosen, answer under a noised image); see
answer_logps.

The reference policy is not a second copy of the weights: with LoRA it is the same model with the
adapters off; a full fine-tune computes reference log-probs once and caches them in
OUT/ref_logps-<hash>.pt (a resumed one whose cache is gone loads --init again to compute them).
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
import distributed
import rundir
import shapes
from data import (IGNORE, ImageCache, check_images, collate, ddpm_noise, normalize, load_image,
                  pair_format, povid_noisy_image, read_llava_rlhf_preference, read_povid,
                  tokenize_conversations)
from checkpoint import base_weights_dir, is_peft_dir, peft_base_dir


@dataclass
class Config:
    """Preference optimisation: DPO / IPO / cDPO / reference-free, and POVID."""
    out: str = "ckpt/dpo"  # run directory: checkpoint-N/, metrics.jsonl, ref_logps-<hash>.pt
    init: str = "ckpt/sft"  # checkpoint to start from; it is also the reference policy
    vision_tower: str = ""  # CLIP folder if --init has no CLIP weights (default: the one it names)
    data: str = "{world}/povid_pairs.json"  # a POVID or LLaVA-RLHF preference file
    format: str = "auto"  # auto: by fields; povid (rejected_conversations); llava_rlhf (output_1/2)
    val_data: str = "{world}/pref_pairs_val.json"  # held-out pairs: reward accuracy (empty: none)
    image_folder: str = ""  # folder image paths are relative to (default: the data file's folder)
    world: str = "data/shapes"  # Shapes world: {world} in paths; written on first use
    world_seed: int = 0  # seed of the Shapes world
    template: str = "vicuna_v1"  # conversation template: vicuna_v1 or llava_v1
    max_len: int = 512  # longest tokenized sequence (longer: cut there, as POVID; counted)
    loss: str = "sigmoid"  # sigmoid (DPO), ipo, cdpo (label smoothing), rdpo (robust) or ref_free
    beta: float = 0.1  # KL strength: temperature of sigmoid/cdpo; IPO's target margin is 1/(2 beta)
    label_smoothing: float = 0.0  # cdpo/rdpo: assumed chance eps of a flipped preference (0, 0.5)
    povid_stage: int = 1  # 1: DPO on the pairs; 2: POVID, half the loss against noisy-image answers
    noise_t: int = 500  # POVID: diffusion step of the image noise (0..999; POVID uses 500)
    noise_on: str = "original"  # POVID: 'original' (POVID's: noised full-size, 8-bit) or 'resized'
    noisy_tokens: str = "own"  # POVID: 'own' (POVID's code: each scores its own argmax) or 'policy'
    lora_r: int = 16  # LoRA rank on the LM (0: full fine-tune, reference log-probs cached)
    lora_alpha: int = 32  # LoRA alpha (scale alpha / r)
    lora_dropout: float = 0.0  # LoRA dropout (POVID: 0, trl's DPOTrainer turns every dropout off)
    lora_targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")  # projections that get LoRA
    train_vision: bool = False  # full fine-tune only: also train the CLIP tower
    train_projector: bool = False  # full fine-tune only: also train the projector
    batch_size: int = 32  # pairs per optimizer step (global, over all processes)
    grad_accum: int = 1  # micro-batches per step on each process
    lr: float = 2e-4  # peak learning rate (Shapes, 1e-3: CHAIR_i 0.11 -> 0.50)
    min_lr_ratio: float = 0.1  # final learning rate / peak
    warmup: int = 20  # linear warmup steps
    warmup_from_zero: bool = False  # warmup step s at lr s/W (transformers'); false: (s+1)/W
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # gradient norm clip (0: off)
    max_steps: int = 300  # optimizer steps
    eval_every: int = 100  # held-out reward accuracy every N steps (0: only at the end)
    eval_n: int = 300  # held-out pairs per evaluation
    save_every: int = 100  # checkpoint every N steps (and at the end)
    log_every: int = 20  # a log line every N steps (metrics averaged over them)
    seed: int = 0  # seed for data order, LoRA init and image noise
    device: str = "cpu"  # cpu or cuda
    dtype: str = "fp32"  # fp32, or bf16 (autocast on GPU; LoRA weights stay fp32)
    grad_checkpoint: bool = False  # activation checkpointing in the decoder
    skip_bad: bool = False  # skip bad records with a count (default: stop before training)
    skip_nonfinite: bool = False  # skip a step with a non-finite loss/gradient instead of stopping
    resume: bool = False  # continue from the newest checkpoint in --out
    overwrite: bool = False  # a run already in --out is moved aside (kept) and a new one starts
    fsdp: bool = False  # shard weights, gradients, AdamW state over the processes (FSDP2; README)
    save_full: bool = False  # --fsdp: whole model in every checkpoint (default: only in the last)
    # allowed values (common.parse_config refuses others in one line; any float must also be finite)
    RANGES = dict(format=("auto", "povid", "llava_rlhf"), world_seed="[0, inf)",
                  template=("vicuna_v1", "llava_v1"), max_len="[1, inf)",
                  loss=("sigmoid", "ipo", "cdpo", "rdpo", "ref_free"), beta="(0, inf)",
                  label_smoothing="[0, 0.5)", povid_stage="[1, 2]", noise_t="[0, 999]",
                  noise_on=("original", "resized"), noisy_tokens=("own", "policy"),
                  lora_r="[0, inf)", lora_alpha="[1, inf)", lora_dropout="[0, 1)",
                  lora_targets=("q", "k", "v", "o", "gate", "up", "down"), batch_size="[1, inf)",
                  grad_accum="[1, inf)", lr="(0, inf)", min_lr_ratio="[0, 1]", warmup="[0, inf)",
                  weight_decay="[0, inf)", grad_clip="[0, inf)", max_steps="[1, inf)",
                  eval_every="[0, inf)", eval_n="[1, inf)", save_every="[1, inf)",
                  log_every="[1, inf)", seed=common.SEED_RANGE, device=("cpu", "cuda"),
                  dtype=("fp32", "bf16"))


def check_config(cfg):
    for wrong, message in (
            (cfg.loss not in ("sigmoid", "ipo", "cdpo", "rdpo", "ref_free"),
             f"--loss {cfg.loss}: choose sigmoid, ipo, cdpo, rdpo or ref_free"),
            (cfg.beta <= 0, f"--beta {cfg.beta}: must be > 0"),
            # (IPO's target 1/(2 beta), squared, past float32: a non-finite loss at step 1)
            (cfg.loss == "ipo" and 0.5 / cfg.beta > math.sqrt(common.FLOAT32_MAX),
             f"--beta {cfg.beta} with --loss ipo: its target 1/(2 beta) squared is past float32 "
             "(the loss is (h - 1/(2 beta))^2); give --beta >= 2.8e-20"),
            (cfg.loss in ("cdpo", "rdpo") and not 0 < cfg.label_smoothing < 0.5,
             f"--loss {cfg.loss} needs --label_smoothing in (0, 0.5)"),
            (cfg.loss not in ("cdpo", "rdpo") and cfg.label_smoothing != 0,
             "--label_smoothing is used by --loss cdpo and rdpo only"),
            (cfg.povid_stage not in (1, 2), f"--povid_stage {cfg.povid_stage}: must be 1 or 2"),
            (not 0 <= cfg.noise_t < 1000, f"--noise_t {cfg.noise_t}: must be 0..999"),
            (cfg.noise_on not in ("original", "resized"),
             f"--noise_on {cfg.noise_on}: choose original or resized"),
            (cfg.noisy_tokens not in ("own", "policy"),
             f"--noisy_tokens {cfg.noisy_tokens}: choose own or policy"),
            (cfg.format not in ("auto", "povid", "llava_rlhf"),
             f"--format {cfg.format}: choose auto, povid or llava_rlhf"),
            (cfg.povid_stage == 2 and cfg.lora_r == 0 and cfg.loss != "ref_free",
             "--povid_stage 2 needs --lora_r > 0: its noisy-image rejections are drawn fresh each "
             "step, so their reference log-probs cannot be cached, and a full fine-tune keeps no "
             "second copy of the weights to compute them"),
            (cfg.lora_r > 0 and (cfg.train_vision or cfg.train_projector),
             "--train_vision/--train_projector need --lora_r 0: with LoRA the reference is the "
             "model with its adapters off, and trained tower/projector weights would move it too")):
        if wrong:
            raise common.ConfigError(message)


def preference_loss(pi_c, pi_r, ref_c, ref_r, beta, loss="sigmoid", label_smoothing=0.0):
    """Per-pair losses and the implicit rewards beta * (logp - ref), from the answer log-probs of
    the policy (pi_) and the reference (ref_), chosen (_c) and rejected (_r)."""
    if loss == "ref_free":
        # a reference that likes every answer alike
        ref_c, ref_r = torch.zeros_like(pi_c), torch.zeros_like(pi_r)
    h = (pi_c - ref_c) - (pi_r - ref_r)  # the log-ratio margin
    if loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # IPO, Eq. 17 of arXiv 2310.12036 (tau = beta)
    elif loss == "cdpo":  # conservative DPO: the preference is wrong with probability eps
        log_p_right = F.logsigmoid(beta * h)
        log_p_flipped = F.logsigmoid(-beta * h)
        losses = -(1 - label_smoothing) * log_p_right - label_smoothing * log_p_flipped
    elif loss == "rdpo":  # robust DPO: unbiased, its mean over eps-flipped labels is DPO's loss
        # (-(1 - eps) log s(bh) + eps log s(-bh)) / (1 - 2 eps), with log s(-x) = log s(x) - x:
        # the same value, without the cancellation that read 0 for log 2 near eps = 0.5
        eps = label_smoothing
        losses = -F.logsigmoid(beta * h) - eps / (1 - 2 * eps) * beta * h
    else:
        losses = -F.logsigmoid(beta * h)  # DPO, Eq. 7 of arXiv 2305.18290
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


# -- data: preference pairs {prompt, chosen, rejected, image}, tokenized once ----------------------

def read_pairs(path, fmt, image_folder, on_error, d=None):
    """Pairs from a POVID or a LLaVA-RLHF preference file (format told by the fields), and the
    skipped lines."""
    fmt = pair_format(path) if fmt == "auto" else fmt
    reader = read_povid if fmt == "povid" else read_llava_rlhf_preference
    # text-only pairs are not supported: a record without an image is bad data
    got = reader(path, image_folder or None, on_error=on_error, image_required=True)
    recs, skipped = got if on_error == "skip" else (got, [])
    recs, bad = check_images(recs, path, on_error, d=d)
    return recs, skipped + bad


def load_pairs(cfg, d=None):
    """Training and validation pairs, and the skipped-record lines."""
    on_error = "skip" if cfg.skip_bad else "raise"
    train, skipped = read_pairs(cfg.data, cfg.format, cfg.image_folder, on_error, d)
    if cfg.val_data:
        val, bad = read_pairs(cfg.val_data, "auto", cfg.image_folder, on_error, d)
    else:
        val, bad = [], []
    return train, val, skipped + bad


class Pairs:
    """Chosen and rejected conversations tokenized once (labels on the final answer only), images
    on demand."""

    def __init__(self, records, tokenizer, mc, cfg, images):
        self.items, self.dropped, self.images, self.pad = [], 0, images, tokenizer.pad_token_id
        self.tied = 0  # pairs whose chosen and rejected are the same tokens (as written, or cut)
        self.cut = 0  # pairs kept, cut at max_len (POVID's collator cuts to model_max_length)

        convs = [r["prompt"] + [{"from": "gpt", "value": r[k]}]
                 for r in records for k in ("chosen", "rejected")]
        t = tokenize_conversations(tokenizer, convs, mc.image_token_id, mc.num_image_tokens,
                                   cfg.max_len, cfg.template, train_on="last")
        for r, c, rj in zip(records, t[0::2], t[1::2]):
            if c is None or rj is None:
                self.dropped += 1
            elif torch.equal(c["input_ids"], rj["input_ids"]):  # (no preference left to learn)
                self.tied += 1
            else:
                self.items.append((c, rj, r["image"]))
                # (cut: at max_len without the answer's closing </s>)
                self.cut += any(len(x["input_ids"]) >= cfg.max_len and
                                int(x["input_ids"][-1]) != tokenizer.eos_token_id for x in (c, rj))

    def __len__(self):
        return len(self.items)

    def batch(self, idx):
        """2B rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1], right-padded, and the B
        images."""
        b = collate([self.items[i][0] for i in idx] + [self.items[i][1] for i in idx], self.pad)
        b["units"] = torch.stack([self.images.unit(self.items[i][2]) for i in idx])  # [0, 1] pixels
        b["pixel_values"] = normalize(b["units"])
        b["image_paths"] = [self.items[i][2] for i in idx]
        return b


def noisy_pixels(units, seeds, t, paths=None):
    """POVID's distorted images, one seed per pair. With `paths` (--noise_on original, the default)
    as POVID makes them (data.povid_noisy_image): the DDPM step on the original-size [0,1] image,
    cast to 8 bits (values outside [0, 1] wrap around), then padded with the clean mean colour,
    resized and normalised. Without (--noise_on resized): the DDPM step on the padded, resized [0,1]
    tensor, CLIP-normalised as floats; kept because it is the noise the paper describes (a Gaussian
    step, no wrap-around artefacts, no clean padding for the model to read), but POVID's numbers
    were made with the other."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if paths is not None:
        size = units.shape[-1]
        noised = [povid_noisy_image(load_image(p), size, t, g) for p, g in zip(paths, gens)]
        return torch.stack(noised)
    return normalize(torch.stack([ddpm_noise(u, t, g) for u, g in zip(units, gens)]))


# -- forward passes --------------------------------------------------------------------------------

def answer_logps(model, b, feats, average=False, noisy=None):
    """Answer log-probs of a pair batch: chosen and rejected rows in ONE pass, the image features
    computed once per pair (feats (B, N, hidden), repeated for the rejected rows). Returns chosen
    (B,), rejected (B,), noisy (B,) or None, and the noisy argmax tokens or None; sums (means with
    `average`: IPO).

    POVID stage 2 (`noisy`: features of the noised images, or the tokens to score), as POVID's
    tool/dpo_trainer_inherent.py (concatenated_multi_forward, _get_noisy_batch_logps): the model
    reads the CHOSEN answer teacher-forced under the noised image; its argmax at each answer
    position is the dispreferred token, scored as log p(argmax_t | clean image, chosen prefix) and
    summed over positions."""
    ids, labels = b["input_ids"], b["labels"]
    # rows are right-padded: causal attention alone keeps real tokens off the pads (no mask needed)
    B = len(ids) // 2
    h = model(None, ids, None, return_hidden=True, image_features=feats.repeat(2, 1, 1))
    lab = labels[:, 1:]  # position t predicts token t+1
    sel = lab != IGNORE  # answer positions only: image, prompt and pads carry -100
    row, n = sel.nonzero()[:, 0], sel.sum(-1).clamp(min=1).float()
    # (answer tokens, vocab): the head only there
    logp = torch.log_softmax(model.logits(h[:, :-1][sel]).float(), -1)

    def per_row(v, rows, count):  # per-token values summed (or averaged) by row
        s = torch.zeros(count, device=v.device, dtype=v.dtype).index_add(0, rows, v)
        return s / n[:count] if average else s

    out = per_row(logp.gather(-1, lab[sel][:, None])[:, 0], row, 2 * B)
    if noisy is None:
        return out[:B], out[B:], None, None
    # noised-image features: this model's own argmax (no gradient through it)
    if noisy.is_floating_point():
        with torch.no_grad():
            h_noisy = model(None, ids[:B], None, return_hidden=True, image_features=noisy)
            noisy = model.logits(h_noisy[:, :-1][sel[:B]]).argmax(-1)
    # sel is row-major: the chosen rows' answer positions come first, in the same order
    is_c = row < B
    noisy_logps = per_row(logp[is_c].gather(-1, noisy[:, None])[:, 0], row[is_c], B)
    return out[:B], out[B:], noisy_logps, noisy


def pair_losses(model, b, cfg, ref=None, noisy_pix=None):
    """Per-pair losses and metrics. The reference is the same model with its adapters off (LoRA), or
    `ref` (B, 2) summed log-probs from the cache (full fine-tune), or 0 (ref_free)."""
    avg = cfg.loss == "ipo"
    trains_encoder = cfg.train_vision or cfg.train_projector
    with torch.set_grad_enabled(torch.is_grad_enabled() and trains_encoder):
        # once per pair, for the policy and the reference
        feats = model.encode_images(b["pixel_values"])
    with torch.no_grad():
        nfeats = model.encode_images(noisy_pix) if noisy_pix is not None else None
    pi_c, pi_r, pi_n, tokens = answer_logps(model, b, feats, avg, nfeats)
    if cfg.loss == "ref_free":
        ref_c = ref_r = ref_n = torch.zeros_like(pi_c)
    elif ref is not None:
        if avg:
            n = (b["labels"][:, 1:] != IGNORE).sum(-1).clamp(min=1).float()
        else:
            n = torch.ones(2 * len(ref), device=ref.device)
        ref_c, ref_r = ref[:, 0] / n[:len(ref)], ref[:, 1] / n[len(ref):]
    else:
        noisy_ref = tokens if cfg.noisy_tokens == "policy" else nfeats
        with torch.no_grad(), model.no_adapter():
            ref_c, ref_r, ref_n, _ = answer_logps(model, b, feats.detach(), avg, noisy_ref)
    losses, rc, rr = preference_loss(pi_c, pi_r, ref_c, ref_r, cfg.beta, cfg.loss,
                                     cfg.label_smoothing)
    m = {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracies": (rc > rr).float(),
         "rewards/margins": rc - rr, "logps/chosen": pi_c.detach(), "logps/rejected": pi_r.detach()}
    # POVID stage 2 (its get_batch_metrics): both pairs share the chosen answer
    if pi_n is not None:
        losses_n, _, rn = preference_loss(pi_c, pi_n, ref_c, ref_n, cfg.beta, cfg.loss,
                                          cfg.label_smoothing)
        losses = 0.5 * losses + 0.5 * losses_n
        m.update({"noisy/rewards/rejected": rn, "noisy/rewards/accuracies": (rc > rn).float(),
                  "noisy/rewards/margins": rc - rn, "noisy/logps/rejected": pi_n.detach()})
    m["loss"] = losses.detach()
    return losses, m


# -- full fine-tune: reference log-probs computed once, cached on disk -----------------------------

def fingerprint(cfg, init_dir, *datasets):
    """Hash of what reference log-probs depend on: the tokenized pairs (data, tokenizer, template,
    max_len), the image files (size, mtime), the checkpoint files (name, size, mtime and first MiB:
    the safetensors header), device and dtype. A changed data file or checkpoint gets a new cache
    file."""
    # ('autocast': tables made before the reference ran under the training pass's autocast;
    # 'grey8': before 16-bit and [0, 1] float grey images were read as their 8-bit grey, not as
    # convert('RGB')'s flat white or black: a resume recomputes and compares, same_table)
    h = hashlib.sha256(json.dumps([cfg.dtype, cfg.device, "autocast", "grey8"]).encode())
    for ds in datasets:
        for c, r, image in ds.items:
            for t in (c["input_ids"], c["labels"], r["input_ids"], r["labels"]):
                h.update(t.numpy().tobytes())
            h.update(f"{image}|{os.stat(image).st_size}|{os.stat(image).st_mtime_ns}".encode())
    # (a PEFT adapter: the base its config names, read as any checkpoint's)
    base = base_weights_dir(peft_base_dir(init_dir) if is_peft_dir(init_dir) else init_dir)
    folders = [init_dir, base]
    folders += [cfg.vision_tower] if cfg.vision_tower else []
    for folder in dict.fromkeys(folders):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            # (hidden names passed over: a save killed mid-write leaves its .PID.tmp there, read
            # by no loader, which gave the same weights another cache key)
            if os.path.isfile(path) and name != "trainer_state.pt" and not name.startswith("."):
                h.update(f"{name}|{os.stat(path).st_size}|{os.stat(path).st_mtime_ns}".encode())
                with open(path, "rb") as f:
                    h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


@torch.no_grad()
def reference_table(model, ds, cfg, d):
    """(N, 2) summed answer log-probs [chosen, rejected] of every pair under `model` (ranks share
    the work)."""
    out = torch.zeros(len(ds), 2)
    for chunk, counts in distributed.rank_chunks(len(ds), cfg.batch_size, d):
        b = common.to_device(ds.batch(chunk), d.device)
        with distributed.bf16_autocast(cfg):  # (as the policy's pass: equal at step 0)
            c, r, _, _ = answer_logps(model, b, model.encode_images(b["pixel_values"]))
        if counts:
            out[chunk] = torch.stack([c, r], 1).float().cpu()
    return distributed.all_reduce_sum(out, d)


def same_table(a, b):
    """Whether two reference tables hold the same log-probs (up to float noise)."""
    return all(k in a and a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-4)
               for k in b)


def cached_reference(cfg, d, init_dir, train, val, get_model, resuming=False):
    path = os.path.join(cfg.out, f"ref_logps-{fingerprint(cfg, init_dir, train, val)}.pt")
    for name in os.listdir(cfg.out) if d.main else []:  # (a killed run's: never renamed, read)
        if name.startswith("ref_logps-") and ".pt.tmp" in name:
            os.remove(os.path.join(cfg.out, name))
    if os.path.exists(path):
        if d.main:
            print(f"reference log-probs: reusing {path}")
        return torch.load(path)
    model, t0 = get_model().eval(), time.time()
    table = {"train": reference_table(model, train, cfg, d),
             "val": reference_table(model, val, cfg, d)}
    made = sorted(n for n in os.listdir(cfg.out) if n.startswith("ref_logps-")
                  and n.endswith(".pt") and n != os.path.basename(path))
    if resuming and made and not any(same_table(torch.load(os.path.join(cfg.out, n)), table)
                                     for n in made):
        # (a full fine-tune's --init replaced at its path went on against the new weights'
        # log-probs without a word; files only touched, or moved, give the same table: go on)
        raise common.ConfigError(
            f"{cfg.out}: --resume: this run's reference log-probs ({made[0]}) differ from those "
            f"of today's inputs: {init_dir}'s weights, the images or the tokenized pairs changed "
            "since it started, and it would go on against another reference; resume with the "
            "inputs it started from, or start a new run")
    tmp, failed = f"{path}.tmp{os.getpid()}", None  # (write_whole's temp name)
    if d.main:  # temp name + rename: a crash never leaves half a cache
        try:
            common.write_whole(path, lambda f: torch.save(table, f), binary=True)
        except Exception as e:  # (a full disk: torch's own error, a traceback)
            failed = e
    # every process stops where the main one could not write (the others trained on alone)
    rundir.agree_written(failed, tmp, cfg.out, path, d)
    if d.main:
        print(f"reference log-probs: computed in {time.time() - t0:.1f}s, cached in {path}")
    return table


# -- training --------------------------------------------------------------------------------------

def main(cfg):
    check_config(cfg)
    rundir.refuse_unread_shared(cfg)
    if cfg.povid_stage == 1:
        rundir.refuse_unread(cfg, ("noise_t", "noise_on", "noisy_tokens"), "with --povid_stage 1 "
                             "(no noisy images: POVID's stage 2); drop it")
    elif cfg.loss == "ref_free":
        rundir.refuse_unread(cfg, ["noisy_tokens"], "with --loss ref_free (no reference is "
                             "scored); drop it")
    cfg, named = common.world_paths(cfg, ("data", "init"), ("val_data",))
    distributed.check_world("dpo.py", cfg.fsdp, cfg.grad_accum, batch_size=cfg.batch_size)
    d = distributed.setup_dist(cfg.device, cfg.fsdp, flags=cfg)
    common.seed_everything(cfg.seed)
    rundir.claim_out(cfg, d, inits=[cfg.init])
    if named:  # rank 0 writes the Shapes world once (if missing), the others wait
        distributed.on_main_first(d, lambda: shapes.ensure_world(cfg.world, seed=cfg.world_seed))
    train_recs, val_recs, skipped = load_pairs(cfg, d)
    if skipped and d.main:
        print(f"skipped {len(skipped)} bad records (--skip_bad); first: {skipped[0]}")
    # POVID noise seeds: the same on every rank, saved in checkpoints
    noise_gen = torch.Generator().manual_seed(cfg.seed)
    resume_path, state = rundir.load_resume(cfg.out, cfg) if cfg.resume else (None, None)
    # FSDP: built from --init as at the start, then the shards
    sharded = rundir.sharded_resume(resume_path, d)
    # (--resume of a LoRA run: the base its adapters were trained on)
    init_dir = rundir.trained_base(resume_path, cfg.init, loads_adapters=not sharded)
    rundir.note_template("--init", cfg.init, cfg.template)
    rundir.note_world("--init", cfg.init, cfg.world)
    load_from = init_dir if sharded else resume_path or init_dir
    # (the checkpoint's own tokenizer: the world's would be another vocabulary)
    model, tokenizer = common.load_model_and_tokenizer(load_from, vision_tower=cfg.vision_tower,
                                                       device=distributed.load_device(cfg, d),
                                                       dtype=common.base_dtype(cfg))
    # the frozen base the adapters sit on, as the checkpoint names it
    if resume_path is not None and not sharded:
        base = rundir.recorded_base(resume_path)
    else:
        # e.g. POVID stage 2 from a LoRA stage-1 run: that policy, merged, is the reference
        # (as POVID)
        merged = rundir.fold_init_adapters(model)
        # LoRA checkpoints point at the init's weights
        base = init_dir if cfg.lora_r > 0 and not merged else None
        if cfg.lora_r > 0:
            model.add_adapter("dpo", cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.lora_r > 0:
        model.set_adapter("dpo")
        model.set_trainable(adapters=["dpo"])
    else:
        model.set_trainable(vision=cfg.train_vision, projector=cfg.train_projector, language=True)
    # (FSDP: fp32 master weights, bf16 compute)
    if cfg.dtype == "bf16" and cfg.device == "cuda" and not cfg.fsdp:
        model.cast_base(torch.bfloat16, keep_trained=cfg.lora_r > 0)  # (full: pure bf16)
    model.gradient_checkpointing = cfg.grad_checkpoint
    if cfg.fsdp:
        distributed.shard_model(model, d, bf16=cfg.dtype == "bf16" and cfg.device == "cuda")
    images = ImageCache(model.config.image_size)
    train = Pairs(train_recs, tokenizer, model.config, cfg, images)
    val = Pairs(val_recs[:cfg.eval_n], tokenizer, model.config, cfg, images)
    if (train.dropped or train.tied) and d.main:
        print(f"warning: dropped {train.dropped + train.tied} of {len(train_recs)} pairs: "
              f"{train.dropped} whose answer starts past --max_len {cfg.max_len}, {train.tied} "
              "whose chosen and rejected are the same tokens (as written, or once cut there)")
    if train.cut and d.main:  # (the chosen's </s> cut away with the rest)
        print(f"note: {train.cut} of {len(train_recs)} pairs reach --max_len {cfg.max_len}: "
              "trained on their first tokens alone (as POVID's collator cuts them)")
    if len(train) == 0:
        raise common.ConfigError(f"{cfg.data}: no training pairs left ({len(train_recs)} read, "
                                 f"{train.dropped} whose answer starts past --max_len "
                                 f"{cfg.max_len}, {train.tied} whose two answers are the same "
                                 f"tokens, {len(skipped)} bad records skipped)")
    if val_recs and len(val) == 0:  # (the held-out rewards were logged as 0 over no pair)
        raise common.ConfigError(f"{cfg.val_data}: no validation pair left "
                                 f"({len(val_recs[:cfg.eval_n])} read, {val.dropped} whose "
                                 f"answer starts past --max_len {cfg.max_len}, {val.tied} whose "
                                 "chosen and rejected are the same tokens)")
    data_files = [cfg.data, cfg.val_data]
    rundir.start_writing(cfg, d, data_files, model)
    ref = None
    # on --resume the init model is loaded again only if the cache is gone
    if cfg.lora_r == 0 and cfg.loss != "ref_free":

        def reference_model():
            if resume_path is None or sharded:
                return model
            init_model, _ = common.load_model_and_tokenizer(init_dir, "", cfg.vision_tower,
                                                            device=d.device,
                                                            dtype=common.base_dtype(cfg))
            # (as the policy was cast at its start: its projector too, loaded fp32)
            return init_model.cast_base(common.base_dtype(cfg))
        ref = cached_reference(cfg, d, init_dir, train, val, reference_model,
                               resuming=resume_path is not None)
    opt = common.make_optimizer(model, cfg.lr, cfg.weight_decay)
    start = 0
    if state is not None:
        rundir.restore(model, opt, resume_path, state, d, generators={"noise": noise_gen})
        start = state["step"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if d.main:
        resumed = f"resumed from {resume_path} | " if resume_path else ""
        reference = "none" if cfg.loss == "ref_free" else "cached" if ref else "adapters off"
        n_train = sum(p.numel() for p in trainable)
        print(f"{resumed}{len(train)} training pairs, {len(val)} validation | {cfg.loss}, "
              f"beta {cfg.beta}, POVID stage {cfg.povid_stage} | reference: {reference} | "
              f"{n_train / 1e6:.3f}M trainable parameters | {d.world} process(es)")
    log = common.Logger(cfg.out, d.main)
    autocast = distributed.bf16_autocast(cfg)
    # a log line's means cover the steps since the last line, also across a --resume (the
    # checkpoint keeps each rank's running sums)
    sums = (rundir.own_state(state["extra"].get("log_sums"), d) if state else None) or {}
    t0, timed = time.time(), 0
    model.train()
    for step in range(start, cfg.max_steps):
        lr = common.cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio,
                              cfg.warmup_from_zero)
        common.set_lr(opt, lr)
        idx = common.batch_indices(step, len(train), cfg.batch_size, cfg.seed, d.rank, d.world)
        # fresh noise every step: a seed per pair of the global batch, drawn alike on every rank (so
        # the noise does not depend on the number of processes, and the saved generator restores it
        # exactly)
        seeds = None
        if cfg.povid_stage == 2:
            global_seeds = torch.randint(0, 2 ** 62, (cfg.batch_size,), generator=noise_gen)
            seeds = global_seeds[d.rank * len(idx):]
        step_loss = torch.zeros((), device=d.device)  # (summed there: no wait on each backward)
        step_sums = {}  # (into the log window's sums once the update is taken, not skipped)
        for pos in (list(range(i, len(idx), cfg.grad_accum)) for i in range(cfg.grad_accum)):
            b = train.batch([idx[p] for p in pos])
            paths = b["image_paths"] if cfg.noise_on == "original" else None
            npix = None
            if seeds is not None:
                npix = noisy_pixels(b["units"], seeds[pos], cfg.noise_t, paths).to(d.device)
            ref_b = ref["train"][[idx[p] for p in pos]].to(d.device) if ref else None
            with autocast:
                losses, m = pair_losses(model, common.to_device(b, d.device), cfg, ref_b, npix)
            # / the global number of pairs: the ranks' gradients add up
            loss = losses.sum() / cfg.batch_size
            loss.backward()
            step_loss += loss.detach().float()
            for k, v in list(m.items()) + [("pairs", torch.ones(len(pos), device=d.device))]:
                step_sums[k] = step_sums.get(k, 0) + v.float().sum()
        step_loss, norm = common.optimizer_step(opt, trainable, d, step, cfg, step_loss)
        if norm is not None:  # (a step --skip_nonfinite skipped: its NaN left out of the means)
            sums = {k: sums.get(k, 0) + v for k, v in step_sums.items()}
        done, timed = step + 1, timed + 1
        # means over the pairs since the last line, all ranks (the same steps skipped on each)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            # (every step since the last line skipped: its columns, each null)
            avg = {k: float("nan") for k in step_sums if k != "pairs"}
            if sums:
                totals = distributed.all_reduce_sum(torch.stack(list(sums.values())), d).tolist()
                tot = dict(zip(sums, totals))
                avg = {k: v / tot["pairs"] for k, v in tot.items() if k != "pairs"}
            grad_norm = norm if norm is not None else float("nan")
            s_per_step = round((time.time() - t0) / timed, 3)
            log.log(done, loss=avg.pop("loss"), **avg, lr=lr, grad_norm=grad_norm,
                    s_per_step=s_per_step)
            sums, t0, timed = {}, time.time(), 0
        if val and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            log.log(done, **evaluate(model, val, cfg, d, ref["val"] if ref else None))
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            log_sums = rundir.rank_states({k: v.cpu() for k, v in sums.items()}, d)
            rundir.save_checkpoint(model, cfg.out, done, cfg, opt, tokenizer, base=base,
                                   generators={"noise": noise_gen}, d=d,
                                   extra_state={"log_sums": log_sums})
    distributed.cleanup_dist()


@torch.no_grad()
def evaluate(model, val, cfg, d, ref=None):
    """Held-out reward accuracy: the share of pairs whose chosen answer gets the larger implicit
    reward."""
    model.eval()
    tot = torch.zeros(3)
    for chunk, counts in distributed.rank_chunks(len(val), cfg.batch_size, d):
        with distributed.bf16_autocast(cfg):
            _, m = pair_losses(model, common.to_device(val.batch(chunk), d.device), cfg,
                               ref[chunk].to(d.device) if ref is not None else None)
        if counts:
            tot += torch.stack([m["rewards/accuracies"].sum().cpu(),
                                m["rewards/margins"].sum().cpu(), torch.tensor(float(len(chunk)))])
    model.train()
    tot = distributed.all_reduce_sum(tot, d)
    return {"val_reward_accuracy": float(tot[0] / tot[2]),
            "val_reward_margin": float(tot[1] / tot[2])}


def cli(argv=None):
    cfg = common.parse_config(Config, argv, prog="dpo.py")
    with common.user_errors():
        main(cfg)


if __name__ == "__main__":
    with distributed.ending_process():
        cli()
