r"""Supervised fine-tuning of a LLaVA: LLaVA-SFT+ (LLaVA-RLHF, arXiv 2309.14525, Sec. 3) and LRV
robust instruction tuning with negative instructions (arXiv 2306.14565).

    python sft.py  # Shapes world, `shapes` preset, from scratch (all three stages)
    python sft.py --init ckpt/sft --out ckpt/lrv --lrv true  # LRV from SFT: the world's LRV set
    python sft.py --blank_images true --out ckpt/sft_blank  # control: answers without seeing?
    torchrun --nproc_per_node=8 sft.py --init llava-v1.5-7b --data llava.json:1,vqav2.json:0.5 \
        --image_folder coco/ --lora_r 64 --lr 2e-4 --weight_decay 0 --max_len 2048 \
        --train_vision false --device cuda --dtype bf16 --grad_checkpoint true

LLaVA's two stages (arXiv 2304.08485, Sec. 4.2): stage 1, feature alignment, learns image -> caption
in the 'plain' template ("<image>{caption}\n": no system prompt, no question); stage 2 tunes on
instruction conversations with fresh optimizer moments. Real models run them as two commands
(stage 1: --data captions.json --template plain --train_vision false --train_lm false; stage 2:
--init of its output). On Shapes, from scratch, one run does three: the first --align_steps steps
align on the world's align.json (per image a description in reading order and an inventory in
shape order, ~50 tokens each). Measured on 2 cores: instruction tuning alone for the same time
learns to read colours but not shapes (descriptions right 0.02, counts 0.53); stage 1 teaches
shapes in ~1000 cheap steps, and the inventory teaches the search that counting needs. Answering
"Is there a circle?" from the image comes late and suddenly, and only where "no" answers are common
enough: on sft.json's 0.75 "yes" some seeds never learn it. So stage 2 reads (--read_steps on
sft_read.json: the same conversations with 4 existence questions at 0.6 "yes"), the stand-in for
what LLaVA's pretrained CLIP and Vicuna bring, and stage 3 tunes on the flawed sft.json for the
last steps at --instruct_lr, which puts LLaVA's yes-bias on a model that can see (README).

Loss (LLaVA, Eq. 3 of arXiv 2304.08485): L = -sum_t log p(x_t | x_<t, image) over the answer
tokens (and their </s>) only, normalised by the number of answer tokens in the global batch.
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
import distributed
import rundir
import oracle
import shapes
from model import PRESETS
from data import (IGNORE, DataError, ImageCache, check_images, collate, end_text, load_json,
                  normalize, pack, read_any_conversations, record_label, render, render_plain,
                  require_records, tokenize_conversations)

# where LLaVA's preprocess_v1 splits a round into its question and answer (conv.sep + role + ': ')
ROUND_SPLIT = " ASSISTANT: "
# --data's weights repeat records (references, tokenized once) up to this many in all
MAX_TRAIN_RECORDS = 10_000_000
TOKENIZE_PART = 16384  # conversations tokenized between two progress lines


@dataclass
class Config:
    """Supervised fine-tuning (LLaVA-SFT+ / LRV robust instruction tuning)."""
    out: str = "ckpt/sft"  # run directory: checkpoint-N/ subdirectories and metrics.jsonl
    init: str = ""  # checkpoint (ours, llava-hf, original LLaVA, LLaMA dir); empty: a fresh --model
    vision_tower: str = ""  # CLIP folder if --init has no CLIP weights (default: the one it names)
    tokenizer: str = "{world}/tokenizer"  # for a fresh --model (given: an --init without one)
    model: str = "shapes"  # preset for a fresh model: tiny, shapes, bench, llava-7b, llava-13b
    data: str = "{world}/sft.json"  # FILE[:weight],FILE[:weight] (LLaVA instruct or LRV)
    image_folder: str = ""  # folder image paths are relative to (default: each data file's folder)
    val_data: str = "{world}/sft_val.json"  # validation file (empty: none)
    align_data: str = "{world}/align.json"  # fresh --model: stage-1 captions, plain template
    read_data: str = "{world}/sft_read.json"  # fresh --model: stage-2 (reading) conversations
    world: str = "data/shapes"  # Shapes world: {world} in paths; written on first use
    world_seed: int = 0  # seed of the Shapes world
    lrv: bool = False  # add the world's LRV single-turn set (with negatives)
    neg_ratio: float = -1.0  # LRV: negatives / all in that set (-1: the world's, 0.5 = balanced)
    blank_images: bool = False  # control run: every image replaced by a blank one
    template: str = "vicuna_v1"  # template: vicuna_v1, llava_v1, or plain (stage-1 captions)
    align_steps: int = 1000  # fresh --model: first N steps align (<= max_steps // 2)
    read_steps: int = 2000  # fresh --model: then N steps on --read_data (the last step is --data's)
    align_batch_size: int = 32  # sequences per stage-1 step (a description: ~1/4 of a conversation)
    max_len: int = 512  # longest tokenized sequence (longer ones are cut, never in the image)
    lora_r: int = 0  # 0: full fine-tune; > 0: LoRA rank on the language model
    lora_alpha: int = 16  # LoRA alpha (scale alpha / r)
    lora_dropout: float = 0.05  # LoRA dropout
    lora_targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")  # projections that get LoRA
    train_vision: bool = True  # train the CLIP tower (from scratch on Shapes; freeze for real CLIP)
    train_projector: bool = True  # train the projector
    train_lm: bool = True  # train the language model weights (full fine-tune only)
    batch_size: int = 16  # sequences per optimizer step (global, over all processes)
    pack: bool = True  # pack micro-batches (attention within each sequence; no padding; same loss)
    grad_accum: int = 1  # micro-batches per step on each process
    lr: float = 2e-3  # peak learning rate
    vision_lr_ratio: float = 0.1  # CLIP + projector lr = this x lr (at 1.0 Shapes features blow up)
    min_lr_ratio: float = 0.1  # final learning rate / peak
    warmup: int = 50  # linear warmup steps
    instruct_lr: float = 1e-3  # after a reading stage: peak lr of the last stage (on --data)
    instruct_warmup: int = 10  # after a reading stage: warmup steps of the last stage
    warmup_from_zero: bool = False  # warmup step s at lr s/W (transformers'); false: (s+1)/W
    weight_decay: float = 0.1  # AdamW decay on matrices (Shapes: 0.1 helps stage 2 find existence)
    grad_clip: float = 1.0  # gradient norm clip (0: off)
    max_steps: int = 3500  # optimizer steps, all stages (Shapes: 1000 align + 2000 read + 500)
    eval_every: int = 500  # validation loss every N steps (0: only at the end)
    eval_batches: int = 4  # validation batches per evaluation
    save_every: int = 500  # checkpoint every N steps (and at the end)
    log_every: int = 50  # a log line every N steps
    seed: int = 0  # seed for init, data order and dropout
    device: str = "cpu"  # cpu or cuda
    dtype: str = "fp32"  # fp32, or bf16 (autocast on GPU; LoRA weights stay fp32)
    grad_checkpoint: bool = False  # activation checkpointing in the decoder
    skip_bad: bool = False  # skip bad records with a count (default: stop before training)
    skip_nonfinite: bool = False  # skip a step with a non-finite loss/gradient instead of stopping
    resume: bool = False  # continue from the newest checkpoint in --out
    overwrite: bool = False  # a run already in --out is moved aside (kept) and a new one starts
    fsdp: bool = False  # shard weights, gradients, AdamW state over the processes (FSDP2; README)
    save_full: bool = False  # --fsdp: whole model in every checkpoint (default: only in the last)
    report: bool = True  # world's --data: held-out accuracy per question type
    report_n: int = 100  # questions per type in the report
    # allowed values (common.parse_config refuses others in one line; any float must also be finite)
    RANGES = dict(model=tuple(PRESETS), world_seed="[0, inf)", neg_ratio="[-1, 1]",
                  template=("vicuna_v1", "llava_v1", "plain"), align_steps="[0, inf)",
                  read_steps="[0, inf)", instruct_lr="(0, inf)", instruct_warmup="[0, inf)",
                  align_batch_size="[1, inf)", max_len="[1, inf)", lora_r="[0, inf)",
                  lora_alpha="[1, inf)", lora_dropout="[0, 1)",
                  lora_targets=("q", "k", "v", "o", "gate", "up", "down"), batch_size="[1, inf)",
                  grad_accum="[1, inf)", lr="(0, inf)", vision_lr_ratio="[0, inf)",
                  min_lr_ratio="[0, 1]", warmup="[0, inf)", weight_decay="[0, inf)",
                  grad_clip="[0, inf)", max_steps="[1, inf)", eval_every="[0, inf)",
                  eval_batches="[1, inf)", save_every="[1, inf)", log_every="[1, inf)",
                  seed=common.SEED_RANGE, device=("cpu", "cuda"), dtype=("fp32", "bf16"),
                  report_n="[1, inf)")


def refuse_unplain(records, path, numbered=True):
    """--template plain reads one human turn with <image> and one answer: the first record that is
    not, named in its file (the tokenizer's error named the record's id as its number, no file);
    by its id alone where not numbered (--skip_bad left records out: the count would be off)."""
    for i, r in enumerate(records):
        try:
            render_plain(r["conversations"])
        except ValueError as e:
            where = record_label(i, r) if numbered else f"with id {r.get('id')!r:.40}"
            raise DataError(path, where, "conversations", str(e)) from None


def load_records(cfg, d=None):
    """Training and validation conversations (LLaVA instruct records) and what was skipped. --lrv
    adds the world's LRV file at --neg_ratio (shapes.lrv_file writes it on first use for --seed)."""
    on_error = "skip" if cfg.skip_bad else "raise"
    folder = cfg.image_folder or None
    specs = [(path, weight, folder) for path, weight in common.data_specs(cfg.data, weighted=True)]
    if cfg.lrv:  # LRV: single-turn instructions, neg_ratio of them negative; images in the world
        specs.append((shapes.lrv_file(cfg.world, cfg.neg_ratio, cfg.seed), "", cfg.world))
    train, skipped, empty = [], [], []
    for path, weight, image_folder in specs:
        try:
            w = float(weight) if weight else 1.0
        except ValueError:  # not a weight: the ':' belongs to the path
            path, w = f"{path}:{weight}", 1.0
        if not 0 < w < float("inf"):
            raise common.ConfigError(f"--data: weight '{weight}' of {path} "
                                     "must be a finite number > 0")
        got = read_any_conversations(path, image_folder, on_error=on_error)
        recs, bad = got if on_error == "skip" else (got, [])
        if cfg.template == "plain":
            refuse_unplain(recs, path, numbered=not bad)
        if not recs and not bad:
            empty.append(path)
        skipped += bad
        recs, bad = check_images(recs, path, on_error, d=d)
        skipped += bad
        # weight w: round(w * n) records, repeated or subsampled
        g = torch.Generator().manual_seed(cfg.seed)
        n = round(w * len(recs))
        if recs and n == 0:  # (a file given, none of it trained on)
            raise common.ConfigError(f"--data: weight '{weight}' of {path} keeps 0 of its "
                                     f"{len(recs)} records (round(weight x {len(recs)}); use more "
                                     f"than {0.5 / len(recs):.3g})")
        if len(train) + n > MAX_TRAIN_RECORDS:  # (the copies would fill memory minutes in)
            raise common.ConfigError(f"--data: weight '{weight}' of {path} makes {n:,} of its "
                                     f"{len(recs)} records, {len(train) + n:,} in all: at most "
                                     f"{MAX_TRAIN_RECORDS:,} (weights are proportions: scale "
                                     "them down together)")
        copies = [torch.randperm(len(recs), generator=g) for _ in range(-(-n // max(len(recs), 1)))]
        idx = torch.arange(n) if n == len(recs) else torch.cat(copies)[:n]  # weight 1: as it is
        train += [recs[i] for i in idx.tolist()]
    # every file empty: say so (not "0 of 0 conversations do not fit --max_len"); an empty file
    # beside others adds nothing (VIGC's generated files can be empty after a weak run)
    if len(empty) == len(specs):
        require_records(train, empty[0], "conversations")  # (train is empty)
    if empty and int(os.environ.get("RANK", "0")) == 0:  # (said, not refused)
        print(f"note: --data {', '.join(empty)}: no records, adds nothing to the training data")
    val = read_any_conversations(cfg.val_data, cfg.image_folder or None) if cfg.val_data else []
    if cfg.val_data:  # (a file of none would validate nothing without saying so)
        require_records(val, cfg.val_data, "conversations")
        if cfg.template == "plain":
            refuse_unplain(val, cfg.val_data)
    # validation images decode too, before any step (not at the first evaluation)
    val = check_images(val, cfg.val_data, decoded={r.get("image") for r in train}, d=d)[0]
    return train, val, skipped


class Tokenized:
    """Conversations tokenized once up front (so drops are counted before training), images on
    demand. Each is kept as int32 ids and a bool mask of the learned ones (the labels are those ids
    there, IGNORE elsewhere): a quarter of two int64 rows, which for LLaVA's 665k conversations
    at 576 image tokens were ~14 GB per process. Under torchrun (`d` and `needed`: the item indices
    this rank's batches take, given how many items there are) each rank measures a share of the
    conversations, the counts are gathered, and each keeps the ids of its own batches' items
    alone: every rank tokenized and held the whole mix (~9 min and ~10 GB each)."""

    def __init__(self, records, tokenizer, model_config, cfg, images, template=None, show=False,
                 d=None, needed=None):
        self.template = template or cfg.template
        # (LLaVA's preprocess_v1 splits the text at its templates' end text: a value holding it
        # is a 'tokenization mismatch'; preprocess_plain checks nothing)
        self.eos = end_text(tokenizer) if self.template != "plain" else None
        self.tokenize = lambda turns: tokenize_conversations(
            tokenizer, turns, model_config.image_token_id, model_config.num_image_tokens,
            cfg.max_len, self.template)
        # a --data weight > 1 repeats records (the same objects): each is tokenized once
        unique = list({id(r): r for r in records}.values())
        rank, world = (d.rank, d.world) if d is not None and needed is not None else (0, 1)
        if world == 1:
            held = self.tokenized(unique, range(len(unique)), show)
            learned = {j: None if t is None else int(t[1].sum()) for j, t in held.items()}
        else:  # a share each, then every rank's counts (and the first fault, as one process's)
            try:
                held, fault = self.tokenized(unique, range(rank, len(unique), world), show), None
            except common.ConfigError as e:
                held, fault = {}, (e.index, str(e))
            counts = {j: None if t is None else int(t[1].sum()) for j, t in held.items()}
            shares = rundir.rank_states((counts, fault), d)
            faults = sorted(f for _, f in shares if f is not None)
            if faults:
                raise common.ConfigError(faults[0][1])
            learned = {j: n for part, _ in shares for j, n in part.items()}
        at = {id(r): j for j, r in enumerate(unique)}
        fits = [at[id(r)] for r in records if learned[at[id(r)]] is not None]
        self.dropped = len(records) - len(fits)
        self.n_labels = torch.tensor([learned[j] for j in fits], dtype=torch.long)
        self.unlearned = int((self.n_labels == 0).sum())  # (main says how many)
        if world > 1 and fits:  # the items of this rank's batches: its own share's kept, the rest
            # made (none fitting: main says so, as with one process)
            mine = {fits[i] for i in needed(len(fits))}
            held = {j: t for j, t in held.items() if j in mine}
            held.update(self.tokenized(unique, sorted(mine - held.keys()), show))
        self.items = [(held.get(j), unique[j].get("image")) for j in fits]
        self.images, self.blank = images, cfg.blank_images

    def tokenized(self, unique, which, show):
        """{index into unique: (int32 ids, bool learned mask), or None where the conversation does
        not fit} for the indices `which`, in parts with a progress line (LLaVA's 665k took minutes
        without a word). A conversation the template cannot render: a ConfigError naming it, its
        .index the conversation's (len(unique) where not told)."""
        which, got, at = list(which), {}, 0
        parts = range(0, len(which), TOKENIZE_PART)
        try:
            for at in common.progress(parts, desc=f"tokenizing {len(which)} conversations, parts",
                                      enabled=show and len(parts) > 1):
                part = which[at:at + TOKENIZE_PART]
                done = self.tokenize([unique[j]["conversations"] for j in part])
                got.update((j, None if t is None else (t["input_ids"].to(torch.int32),
                                                       self.learned(t, unique[j])))
                           for j, t in zip(part, done))
        except ValueError as e:  # e.g. a multi-turn conversation under --template plain
            where = getattr(e, "index", None)  # (render's errors name the conversation)
            j = len(unique) if where is None else which[at + where]
            name = unique[j].get("id") if where is not None else None
            record = "" if where is None else f": record {name}" if name is not None else \
                f": conversation {j} of the run's data"
            fault = common.ConfigError(f"--template {self.template}{record}: {e}")
            fault.index = j
            raise fault from None
        return got

    def learned(self, t, record):
        """The tokens learned: the answers', none where LLaVA's preprocess_v1 finds a "tokenization
        mismatch" and masks the whole conversation: it splits the text into rounds at '</s>' and
        each round at ' ASSISTANT: ', so a turn holding '</s>' (ours learned an end inside the
        answer), or one that makes a round split into other than a question and an answer (' Say
        ASSISTANT: hi'; ours learned it), is not learned."""
        # (a '</s>' inside a turn makes a round without the answer mark, or an empty one)
        rounds = render(record["conversations"], self.template, self.eos)[0].split(self.eos)[:-1] \
            if self.eos else []
        if any(len(r.split(ROUND_SPLIT)) != 2 for r in rounds):
            return torch.zeros(len(t["labels"]), dtype=torch.bool)
        return t["labels"] != IGNORE

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        tokens, image = self.items[i]
        if tokens is None:  # (a bug: the batches planned for `needed` and those taken differ)
            raise RuntimeError(f"item {i} was not tokenized in this process (another rank's)")
        ids, learned = tokens
        ids = ids.long()
        item = {"input_ids": ids, "labels": torch.where(learned, ids, IGNORE)}
        if image:
            unit = self.images.unit(image)
            item["pixel_values"] = normalize(torch.zeros_like(unit) if self.blank else unit)
        return item


def items_taken(steps, batch_size, seed, d):
    """n -> the indices of n items that this rank's batches of `steps` take (the training loop's
    batch_indices)."""
    return lambda n: {i for step in steps
                      for i in common.batch_indices(step, n, batch_size, seed, d.rank, d.world)}


def stage_steps(cfg, max_steps):
    """(alignment steps, reading steps) of a fresh model's run of max_steps: --align_steps at
    most half of them, then --read_steps leaving the last step (at least) to --data."""
    fresh = not cfg.init
    aligning = bool(cfg.align_data) and fresh and cfg.align_steps > 0
    align_steps = min(cfg.align_steps, max_steps // 2) if aligning else 0
    reads_data = bool(cfg.read_data) and fresh
    read_steps = min(cfg.read_steps, max_steps - align_steps - 1) if reads_data else 0
    return align_steps, read_steps


def main(cfg):
    given = cfg  # (as given: '{world}' paths unresolved)
    if -1 < cfg.neg_ratio < 0:
        raise common.ConfigError(f"--neg_ratio {cfg.neg_ratio}: give a share in [0, 1], or -1 "
                                 "for the world's (shapes.py --neg_ratio)")
    if cfg.lora_r == 0 and not (cfg.train_vision or cfg.train_projector or cfg.train_lm):
        raise common.ConfigError("--lora_r 0 with --train_vision, --train_projector and --train_lm "
                                 "false: nothing to train")
    fresh = not cfg.init  # a fresh model reads a tokenizer and aligns first
    rundir.refuse_unread_shared(cfg, [cfg.warmup, cfg.instruct_warmup] if fresh else [cfg.warmup])
    if not fresh:  # (a fresh model's preset and stages)
        rundir.refuse_unread(cfg, ("model", "align_steps", "read_steps", "align_batch_size",
                                   "align_data", "read_data", "instruct_lr", "instruct_warmup"),
                             "with --init (the checkpoint's architecture, no alignment or reading "
                             "stage); drop it")
    else:
        rundir.refuse_unread(cfg, ["vision_tower"], "without --init (a fresh --model builds its "
                             "own CLIP tower); drop it")
    if cfg.lora_r > 0:
        rundir.refuse_unread(cfg, ["train_lm"], "with --lora_r > 0 (LoRA trains the language "
                             "model); drop it")
    if not (cfg.train_vision or cfg.train_projector):  # (the ratio is their learning rate's)
        rundir.refuse_unread(cfg, ["vision_lr_ratio"], "with --train_vision false and "
                             "--train_projector false (neither trains); drop it")
    if not cfg.report:
        rundir.refuse_unread(cfg, ["report_n"], "with --report false; drop it")
    reads = ("data", "tokenizer") if fresh else ("data",)
    companions = ("val_data", "align_data", "read_data") if fresh else ("val_data",)
    cfg, named = common.world_paths(cfg, reads, companions)
    for data_flag, steps_flag in (("align_data", "align_steps"), ("read_data", "read_steps")):
        # (a --data outside the world brings none; 0 steps asks for what happens anyway)
        if fresh and not getattr(cfg, data_flag) and getattr(cfg, steps_flag) > 0:
            rundir.refuse_unread(cfg, [steps_flag], f"without --{data_flag} (the world's goes with "
                                 f"the world's --data); pass --{data_flag} FILE or drop it")
    # flags of a stage given no step are not read: refused as given (the world's paths are their
    # defaults), a data flag only where it names a file ('' agrees with the 0 steps)
    if fresh and cfg.align_steps == 0:
        unread = ["align_batch_size", "align_data"] if given.align_data else ["align_batch_size"]
        rundir.refuse_unread(given, unread, "with --align_steps 0 (no alignment stage); drop it")
    if fresh and cfg.read_steps == 0 and given.read_data:
        rundir.refuse_unread(given, ["read_data"], "with --read_steps 0 (no reading stage); drop "
                             "it")
    if fresh and not (cfg.read_data and cfg.read_steps > 0):  # (the last stage's lr is --lr)
        rundir.refuse_unread(cfg, ["instruct_lr", "instruct_warmup"], "without a reading stage "
                             "(instruction tuning then runs at --lr and --warmup); drop it")
    if "data" not in named:
        rundir.refuse_unread(cfg, ["report_n"], "with a --data outside the world (the report "
                             "asks the world's questions); drop it")
    if not cfg.lrv:
        rundir.refuse_unread(cfg, ["neg_ratio"], "without --lrv true; drop it")
    refuse_val_in_stages(cfg, fresh)
    aligning = bool(cfg.align_data) and fresh and cfg.align_steps > 0
    align_steps, read_steps = stage_steps(cfg, cfg.max_steps)
    reading = read_steps > 0
    # (a stage that gets no step, as with --max_steps 1, has no batch to split)
    align_sizes = {"align_batch_size": cfg.align_batch_size} if align_steps else {}
    distributed.check_world("sft.py", cfg.fsdp, cfg.grad_accum, batch_size=cfg.batch_size,
                            **align_sizes)
    d = distributed.setup_dist(cfg.device, cfg.fsdp, flags=cfg)
    common.seed_everything(cfg.seed)
    rundir.claim_out(cfg, d, inits=[cfg.init])
    if named or cfg.lrv:  # rank 0 writes the Shapes world once (if missing), the others wait
        distributed.on_main_first(d, lambda: shapes.ensure_world(cfg.world, seed=cfg.world_seed))
    geometry, note = None, None
    if fresh and (named or cfg.lrv):  # a fresh model sees the world's images, one patch a cell
        world_params = shapes.load_params(cfg.world)
        geometry, note = common.world_geometry(world_params, cfg.model, cfg.world)
    if cfg.neg_ratio < 0:  # the world's own share (its lrv/ file for --seed 0); without --lrv,
        # unused, and 0.5 when no world is read (the value runs recorded before -1 meant this)
        world_ratio = shapes.load_params(cfg.world)["neg_ratio"] if named or cfg.lrv else 0.5
        cfg = common.replace_config(cfg, neg_ratio=world_ratio)
    train_records, val_records, skipped = load_records(cfg, d)
    # (checked where --max_steps leaves stage 2 no step too, as stage 1's: a short trial run
    # checks the files the full run reads)
    stage2 = bool(cfg.read_data) and fresh and cfg.read_steps > 0
    read_records, read_skipped = load_read_records(cfg, train_records, d) if stage2 else ([], [])
    skipped += read_skipped
    if skipped and d.main:  # (once, as dpo says it)
        print(f"skipped {len(skipped)} bad records (--skip_bad); first: {skipped[0]}")
    resume_path, state = rundir.load_resume(cfg.out, cfg) if cfg.resume else (None, None)
    planned = state and state["run_config"].get("max_steps")
    was = stage_steps(cfg, planned) if state else (align_steps, read_steps)
    if was != (align_steps, read_steps):
        # (steps after the resumed one would run another stage than the run's plan said)
        raise common.ConfigError(f"--max_steps {cfg.max_steps} on --resume: the stages would be "
                                 f"{align_steps} alignment + {read_steps} reading steps, this run "
                                 f"was planned with {was[0]} + {was[1]} (--max_steps {planned}); "
                                 "resume with a --max_steps that keeps them, or pass another "
                                 "--out")
    dtype = torch.bfloat16 if cfg.dtype == "bf16" and cfg.device == "cuda" else None
    # FSDP: built from --init, the shards later
    sharded = rundir.sharded_resume(resume_path, d)
    # (sharded: the frozen weights from the base the run was trained on, not a checkpoint
    # --init's run folder has grown since)
    init = rundir.trained_base(resume_path, cfg.init) if sharded and cfg.init else cfg.init
    load_from = init if sharded else resume_path or init
    tokenizer_dir, tokenizer_flag = common.tokenizer_source(given, cfg, load_from)
    model, tokenizer = common.load_model_and_tokenizer(load_from, cfg.model, cfg.vision_tower,
                                                       tokenizer_dir,
                                                       distributed.load_device(cfg, d),
                                                       geometry=geometry,
                                                       tokenizer_flag=tokenizer_flag,
                                                       dtype=common.base_dtype(cfg),
                                                       fresh_projector_ok=True)
    if note and not load_from and d.main:  # (a resumed run's checkpoint holds it already)
        print(note)
    if d.main:  # (the world's note only where this run reads the world)
        rundir.note_world("--init", cfg.init, cfg.world if named or cfg.lrv else None)
    if cfg.lora_r > 0 and not sharded:
        common.refuse_merged_resume(resume_path, model, "sft")
    if resume_path is None or sharded:  # (an --init with adapters: the policy it holds)
        rundir.fold_init_adapters(model)
    if cfg.lora_r > 0 and "sft" not in model.adapters:
        model.add_adapter("sft", cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.lora_r > 0:
        model.set_adapter("sft")
        model.set_trainable(adapters=["sft"], vision=cfg.train_vision,
                            projector=cfg.train_projector)
    else:
        model.set_trainable(vision=cfg.train_vision, projector=cfg.train_projector,
                            language=cfg.train_lm)
    if dtype is not None and not cfg.fsdp:  # (FSDP keeps fp32 master weights and computes in bf16)
        # (a full fine-tune of the language model: pure bf16, README's memory table)
        model.cast_base(dtype, keep_trained=cfg.lora_r > 0 or not cfg.train_lm)
    model.gradient_checkpointing = cfg.grad_checkpoint
    if cfg.fsdp:
        distributed.shard_model(model, d, bf16=dtype is not None)
    images = ImageCache(model.config.image_size)
    first = align_steps + read_steps  # (stage 3's first step: --data's batches, this rank's share)
    taken = items_taken(range(max(first, state["step"] if state else 0), cfg.max_steps),
                        cfg.batch_size, cfg.seed, d)
    train = Tokenized(train_records, tokenizer, model.config, cfg, images, show=d.main, d=d,
                      needed=taken)
    val = Tokenized(val_records, tokenizer, model.config, cfg, images, show=d.main)
    # the records' text is not read again: let it go (LLaVA's 665k held ~4 GB more per process)
    n_records, checked = len(train_records), {r.get("image") for r in train_records}
    del train_records
    if train.unlearned and d.main:
        print(f"warning: {train.unlearned} training conversations teach no token: a turn holds "
              f"the template's end text {train.eos!r} or its answer mark {ROUND_SPLIT!r} (LLaVA "
              "masks such a conversation whole: 'tokenization mismatch')")
    if train.dropped and d.main:
        print(f"warning: dropped {train.dropped} of {n_records} training conversations "
              f"that do not fit --max_len {cfg.max_len} with at least part of the first answer")
    align = None  # stage 1: image -> caption pairs, plain template
    if aligning:  # a fresh model; --resume keeps the rule
        align_records = read_any_conversations(cfg.align_data, cfg.image_folder or None)
        if align_steps:  # (--max_steps 1 leaves the stage no step: its data is not used;
            # the images --data decoded already are not decoded again)
            align_records = check_images(align_records, cfg.align_data, decoded=checked,
                                         d=d)[0]
            require_records(align_records, cfg.align_data, "captions")
        align = Tokenized(align_records, tokenizer, model.config, cfg, images, template="plain")
        if align_steps and len(align) == 0:  # (a stage of no data: no step knows its batch)
            raise common.ConfigError(f"--align_data {cfg.align_data}: no caption fits --max_len "
                                     f"{cfg.max_len} ({align.dropped} dropped)")
    read = Tokenized(read_records, tokenizer, model.config, cfg, images) if reading else None
    if reading and len(read) == 0:
        raise common.ConfigError(f"--read_data {cfg.read_data}: no conversation fits --max_len "
                                 f"{cfg.max_len} ({read.dropped} dropped)")
    if len(train) == 0:
        raise common.ConfigError(f"no training data left: {train.dropped} of {n_records} "
                                 f"conversations do not fit --max_len {cfg.max_len}, "
                                 f"{len(skipped)} bad records skipped")
    if val_records and len(val) == 0:  # (validation left out without a word; reward and dpo
        # refuse this too)
        raise common.ConfigError(f"--val_data {cfg.val_data}: no conversation fits --max_len "
                                 f"{cfg.max_len} ({val.dropped} dropped): raise --max_len, or "
                                 "--val_data '' for none")
    if "data" in named and cfg.report:  # (every rank: each stops alike)
        for _ in report_questions(model, tokenizer, cfg):
            pass
    data_files = [p for p, _ in common.data_specs(cfg.data)] + [cfg.val_data]
    data_files += [cfg.align_data] if aligning else []
    data_files += [cfg.read_data] if reading else []
    rundir.start_writing(cfg, d, data_files, model)
    opt = common.make_optimizer(model, cfg.lr, cfg.weight_decay,
                                vision_lr_ratio=cfg.vision_lr_ratio)
    start = 0
    if state is not None:
        rundir.restore(model, opt, resume_path, state, d)
        start = state["step"]
        if d.main:
            print(f"resumed from {resume_path} at step {start}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if d.main:
        n_train = sum(p.numel() for p in trainable)
        n_instruct = cfg.max_steps - align_steps - read_steps
        reading_steps = f"{read_steps} reading + " if read else ""
        split = f"{align_steps} alignment + {reading_steps}{n_instruct} instruction steps | "
        split = split if align or read else ""
        n_all = sum(p.numel() for p in model.parameters())
        print(f"{split}{len(train)} training conversations, {len(val)} validation | "
              f"model {n_all / 1e6:.2f}M params, {n_train / 1e6:.2f}M trainable | "
              f"{d.world} process(es)")
    log = common.Logger(cfg.out, d.main)
    autocast = distributed.bf16_autocast(cfg)
    stages = run_stages(cfg, align, align_steps, read, read_steps, train)
    model.train()
    t0, tokens = time.time(), 0
    for step in range(start, cfg.max_steps):
        # stages one after another, each with its own warmup and cosine decay
        number, first, length, dataset, batch_size, peak_lr, warmup = next(
            s for s in reversed(stages) if step >= s[1])
        if step == first > 0:
            opt.state.clear()  # a stage starts with fresh Adam moments, as LLaVA's second run does
        lr = common.cosine_lr(step - first, length, peak_lr, warmup, cfg.min_lr_ratio,
                              cfg.warmup_from_zero)
        common.set_lr(opt, lr)
        idx = common.batch_indices(step, len(dataset), batch_size, cfg.seed, d.rank, d.world)
        n_global = distributed.all_reduce_sum(dataset.n_labels[idx].sum().float(), d).clamp(min=1)
        loss_sum = torch.zeros((), device=d.device)  # (summed there: no wait on each backward)
        micro = [idx[i::cfg.grad_accum] for i in range(cfg.grad_accum)]
        for chunk in micro:
            examples = [dataset[i] for i in chunk]
            batch = make_batch(examples, tokenizer, cfg)
            tokens += int(batch["attention_mask"].sum())  # (on the host, before the copy)
            batch = common.to_device(batch, d.device)
            with autocast:
                loss = lm_loss(model, batch, n_global)
            loss.backward()
            loss_sum += loss.detach().float()
        loss_all, norm = common.optimizer_step(opt, trainable, d, step, cfg, loss_sum)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            dt = time.time() - t0
            stage = {"stage": number} if len(stages) > 1 else {}
            grad_norm = norm if norm is not None else float("nan")
            log.log(done, **stage, loss=float(loss_all), lr=lr, grad_norm=grad_norm,
                    tok_per_s=round(tokens * d.world / max(dt, 1e-9)))
            t0, tokens = time.time(), 0
        if val and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            log.log(done, val_loss=validation_loss(model, val, cfg, tokenizer, d))
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            rundir.save_checkpoint(model, cfg.out, done, cfg, opt, tokenizer, d=d)
    reporting = "data" in named and cfg.report
    if cfg.fsdp and (cfg.lora_r > 0 or reporting):  # the LoRA merge and the report need the
        # whole model: rank 0 gathers it, on the GPU only for the report's answers, the optimizer
        # let go first (a full copy beside its state ran a 13B GPU out of memory)
        opt = None
        model = distributed.gather_full_model(model, d, d.device if reporting else "cpu")
    # the SFT model later stages start from: adapter merged into the base
    if cfg.lora_r > 0 and d.main:
        model.merge_adapter("sft")
        rundir.save_checkpoint(model, cfg.out, cfg.max_steps, cfg, None, tokenizer)
    if reporting and d.main:  # the world's held-out questions, scored exactly
        report(model, tokenizer, cfg)
    distributed.cleanup_dist()


def refuse_val_in_stages(cfg, fresh):
    """--val_data naming the file a fresh model's alignment or reading stage trains on (as
    common.refuse_val_in_data refuses a --data file): its held-out scores would be of training
    records. Checked for the stages the flags plan, also where --max_steps leaves one no step."""
    if not (fresh and cfg.val_data):
        return
    for flag, steps in (("align_data", cfg.align_steps), ("read_data", cfg.read_steps)):
        path = getattr(cfg, flag)
        if steps and path and os.path.realpath(path) == os.path.realpath(cfg.val_data):
            raise common.ConfigError(f"--val_data {cfg.val_data}: the --{flag} file (its held-out "
                                     "scores would be of training records); give another file, "
                                     "or '' for none")


def load_read_records(cfg, train_records, d=None):
    """Stage 2's conversations (--read_data) and what was skipped, their images checked up front as
    --data's are (those not already checked with --data)."""
    on_error = "skip" if cfg.skip_bad else "raise"
    got = read_any_conversations(cfg.read_data, cfg.image_folder or None, on_error=on_error)
    records, skipped = got if on_error == "skip" else (got, [])
    checked = {r.get("image") for r in train_records}
    records, bad = check_images(records, cfg.read_data, on_error, decoded=checked, d=d)
    return require_records(records, cfg.read_data, "conversations"), skipped + bad


def run_stages(cfg, align, align_steps, read, read_steps, train):
    """(number, first step, steps, dataset, batch size, peak lr, warmup) of each stage. A fresh
    Shapes model: 1 alignment (image -> caption), 2 reading (conversations with more "no" answers:
    existence is learned from the image), 3 instruction tuning on --data (the flawed conversations)
    at --instruct_lr. With --init: instruction tuning alone, at --lr."""
    stages = []
    if align:
        stages.append((1, 0, align_steps, align, cfg.align_batch_size, cfg.lr, cfg.warmup))
    if read:
        stages.append((2, align_steps, read_steps, read, cfg.batch_size, cfg.lr, cfg.warmup))
    lr, warmup = (cfg.instruct_lr, cfg.instruct_warmup) if read else (cfg.lr, cfg.warmup)
    first = align_steps + read_steps
    stages.append((3 if read else 2, first, cfg.max_steps - first, train, cfg.batch_size, lr,
                   warmup))
    return stages


def lm_loss(model, batch, n_global):
    """LLaVA Eq. 3: -sum of log p(answer token | tokens before it, image) / n_global, the answer
    tokens of the global batch. The head runs only on labelled positions: with a 32k vocabulary
    the (B, T, V) logits would dominate memory. Right padding needs no mask (causal attention keeps
    real tokens off the pads); a packed batch's seq_lens keep attention within each sequence."""
    seq_lens = batch.get("seq_lens")
    h = model(batch["pixel_values"], batch["input_ids"], None, return_hidden=True,
              seq_lens=seq_lens)
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    answer = labels != IGNORE
    logits = model.logits(h[:, :-1][answer]).float()
    return F.cross_entropy(logits, labels[answer], reduction="sum") / n_global


def make_batch(items, tokenizer, cfg):
    """--pack: one row of the sequences end to end (data.pack; stage 2 on Shapes pads ~23% of a
    right-padded batch), else right-padded. The loss is the same either way (test_sft_pack)."""
    return pack(items) if cfg.pack else collate(items, tokenizer.pad_token_id)


@torch.no_grad()
def validation_loss(model, val, cfg, tokenizer, d):
    model.eval()
    n = min(len(val), cfg.eval_batches * cfg.batch_size)
    total, count = torch.zeros(()), torch.zeros(())
    for chunk, counts in distributed.rank_chunks(n, cfg.batch_size, d):
        batch = common.to_device(make_batch([val[i] for i in chunk], tokenizer, cfg), d.device)
        with distributed.bf16_autocast(cfg):
            loss = lm_loss(model, batch, 1.0).float().cpu()
        if counts:
            total += loss
            count += val.n_labels[chunk].sum()
    model.train()
    total, count = distributed.all_reduce_sum(total, d), distributed.all_reduce_sum(count, d)
    return float(total / count.clamp(min=1))


def report_questions(model, tokenizer, cfg, images=None):
    """(question type, prompt items, answer keys) of the first --report_n held-out questions of
    each type; without images, the check before step 1 that each fits --max_len (it was made
    after training: a finished run stopped there, without its report)."""
    for qtype in shapes.QUESTION_TYPES:
        path = os.path.join(cfg.world, f"test_{qtype}.json")
        recs = read_any_conversations(path, cfg.world)[:cfg.report_n]
        keys = [r["answer_key"] for r in load_json(path)[:cfg.report_n]]
        items = []
        for r in recs:
            unit = images.unit(r["image"]) if images is not None else None
            if unit is not None and cfg.blank_images:
                unit = torch.zeros_like(unit)
            first_turn = r["conversations"][:1]
            item = common.prompt_item(tokenizer, model, first_turn, unit, cfg.template,
                                      cfg.max_len)
            if item is None:
                raise DataError(path, f"id {r.get('id')!r:.40}", "conversations",
                                f"its question is longer than --max_len {cfg.max_len} tokens "
                                "(the report after training asks it)")
            items.append(item)
        yield qtype, items, keys


def report(model, tokenizer, cfg):
    """Held-out accuracy per question type on the Shapes test split (greedy answers, exact
    scoring)."""
    rows = {}
    questions = report_questions(model, tokenizer, cfg, ImageCache(model.config.image_size))
    for qtype, items, keys in questions:
        answers = common.generate_answers(model, tokenizer, items, max_new_tokens=48,
                                          desc=f"report {qtype}")
        n_right = sum(oracle.score_answer(qtype, a, k) for a, k in zip(answers, keys))
        rows[qtype] = round(n_right / len(keys), 3) if keys else None  # None: no questions
    line = " | ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in rows.items())
    print(f"held-out accuracy ({'blank images' if cfg.blank_images else 'real images'}): {line}")
    # (whole or not at all: the lab takes a run whose report is there as done)
    common.write_json(rows, os.path.join(cfg.out, "report.json"), indent=2)
    return rows


if __name__ == "__main__":
    cfg = common.parse_config(Config)
    with distributed.ending_process(), common.user_errors():
        main(cfg)
