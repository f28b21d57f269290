r"""Reward model for Fact-RLHF (LLaVA-RLHF, arXiv 2309.14525, Sec. 2.2-2.3): the SFT model with a
LoRA adapter 'reward' and a scalar head 'reward' read at the last token of an evaluation turn that,
with --facts, lists the image's captions (Factually Augmented RLHF).

    python reward.py  # Shapes: ground truth vs injected hallucination
    python reward.py --pairs sampled --out ckpt/rm_sampled  # SFT samples ranked by the oracle
    python reward.py --facts false --out ckpt/rm_plain  # ablation: the plain RLHF reward model
    python reward.py --blank_images true --out ckpt/rm_blank  # control: facts read without images?
    torchrun --nproc_per_node=8 reward.py --init llava-rlhf-sft --data llava_7b_v1_preference.json \
        --captions image_to_caption.json --image_folder coco/train2017 --lora_r 64 --lora_alpha 16 \
        --lr 2e-5 --batch_size 32 --max_steps 200 --grad_clip 0.3 --max_len 4096 \
        --prompt_space true --caption_shuffle answer --warmup_from_zero true \
        --device cuda --dtype bf16 --grad_checkpoint true --seed 42  # LLaVA-RLHF's (README)
    python reward.py --init LLaVA-RLHF-13b-v1.5-336/sft_model \
        --import_llava_rlhf LLaVA-Fact-RM-13b-v1.5-336-lora-padding/checkpoint-200 \
        --out ckpt/rm_llava_rlhf
        # LLaVA-RLHF's own reward model, untrained further, as a checkpoint ppo.py --reward reads

The scored sequence (data.reward_item; ppo.py scores its rollouts with the same one, so it lives in
data.py beside the template): the conversation, the response, then an evaluation turn
    USER: Please evaluate the quality of your last response. There are several dimensions ... (the
          criteria: accurate, helpful, natural, concise) {facts}
    ASSISTANT: Following your definitions, the quality score of my last response is
and the score is read at its last token. With --facts, {facts} says the response should be fully
supported by the image's captions, listed one '  - caption' a line in a shuffled order (Fact-RLHF);
without, it is empty. The wording is LLaVA-RLHF's fact_rlhf_reward_prompt.txt verbatim (data.py:
EVAL_QUESTION, FACTS_INTRO, EVAL_ANSWER, eval_question); --eval_prompt short keeps the facts and
says the rest in half the tokens.

Loss (InstructGPT Eq. 1, as LLaVA-RLHF's RewardModelTrainer.compute_loss writes it):
    L = mean_pairs[-log sigmoid(r_chosen - r_rejected)] + 1e-3 * |mean_pairs(r_chosen + r_rejected)|
The second term keeps the scores centred at 0 (the pairwise loss alone ignores their offset).
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import math
import os
import random
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import distributed
import rundir
import oracle
import shapes
from data import (DataError, ImageCache, check_images, collate, normalize,
                  read_llava_rlhf_preference, require_records, reward_item)
from checkpoint import resolve_checkpoint
from interop import load_llava_rlhf_reward, llava_rlhf_reward_parts


@dataclass
class Config:
    """Fact-RLHF reward model: LoRA + scalar head on the SFT model, trained on preference pairs."""
    out: str = "ckpt/rm"  # run directory: checkpoint-N/ subdirectories, metrics.jsonl, report.json
    init: str = "ckpt/sft"  # the SFT checkpoint (frozen; the RM checkpoint is saved with base= it)
    vision_tower: str = ""  # CLIP folder if --init has no CLIP weights (default: the one it names)
    # a LLaVA-RLHF reward model (its checkpoint-N/: adapter_model/ + reward_head) trained on --init:
    # written as this script's checkpoint, scored as LLaVA-RLHF scores; no training, no data read
    import_llava_rlhf: str = ""
    data: str = "{world}/pref_pairs.json"  # a LLaVA-RLHF human-preference file ({world}: --world)
    captions: str = "{world}/image_to_caption.json"  # LLaVA-RLHF facts file (read with --facts)
    image_folder: str = ""  # folder image paths are relative to (default: the data file's folder)
    val_data: str = "{world}/pref_pairs_val.json"  # held-out pairs (empty: split off --data)
    eval_size: int = 500  # held-out pairs used, at most (LLaVA-RLHF splits 500 off its data)
    pairs: str = "injected"  # 'injected' (the file's) or 'sampled' (oracle-ranked)
    n_sampled: int = 1000  # --pairs sampled: prompts to answer twice (ties dropped, counted)
    sample_temperature: float = 0.7  # --pairs sampled: sampling temperature
    sample_max_new_tokens: int = 64  # --pairs sampled: answer length limit
    world: str = "data/shapes"  # Shapes world: {world} in paths; written on first use
    world_seed: int = 0  # seed of the Shapes world
    facts: bool = True  # Fact-RLHF: evaluation turn lists the image captions (false: plain RLHF)
    caption_shuffle: str = "pair"  # facts shuffled once per pair, or per answer (LLaVA-RLHF)
    blank_images: bool = False  # control run: every image black (do the facts get read without it?)
    # the wording of the evaluation turn:
    eval_prompt: str = "llava-rlhf"  # 'llava-rlhf' (verbatim) | 'short' (same facts, half as long)
    template: str = "vicuna_v1"  # conversation template: vicuna_v1 or llava_v1
    # '...</s> USER: Please evaluate' as LLaVA-RLHF joins its reward prompt (false: our template's
    # '</s>USER:'); recorded in the checkpoint, and ppo.py scores the same way
    prompt_space: bool = False
    max_len: int = 1024  # longest scored sequence (pairs that do not fit are dropped and counted)
    lora_r: int = 16  # LoRA rank (LLaVA-RLHF: 64, its one RM: 13B; 16 suits the shapes preset)
    lora_alpha: int = 16  # LoRA alpha (LLaVA-RLHF: 16)
    lora_dropout: float = 0.0  # LoRA dropout (LLaVA-RLHF: 0)
    lora_targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")  # projections that get LoRA
    batch_size: int = 16  # pairs per optimizer step (global; LLaVA-RLHF: 4 x 8 GPUs = 32)
    lr: float = 1e-3  # peak learning rate (LLaVA-RLHF: 2e-5 on 13B)
    min_lr_ratio: float = 1.0  # final lr / peak (1.0: constant after warmup, as LLaVA-RLHF)
    warmup: int = 10  # linear warmup steps
    warmup_from_zero: bool = False  # warmup step s at lr s/W (transformers'); false: (s+1)/W
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # gradient norm clip (0: off)
    center_coef: float = 1e-3  # coefficient of |mean(r_chosen + r_rejected)|
    max_steps: int = 150  # optimizer steps
    eval_every: int = 50  # held-out accuracy every N steps (and at the end)
    save_every: int = 50  # checkpoint every N steps (and at the end)
    log_every: int = 10  # a log line every N steps
    seed: int = 0  # seed for data order, caption shuffling and sampling
    device: str = "cpu"  # cpu or cuda
    dtype: str = "fp32"  # fp32, or bf16 (base weights in bf16 on GPU; LoRA and head stay fp32)
    grad_checkpoint: bool = False  # activation checkpointing in the decoder
    resume: bool = False  # continue from the newest checkpoint in --out
    overwrite: bool = False  # a run already in --out is moved aside (kept) and a new one starts
    fsdp: bool = False  # shard weights, gradients, AdamW state over the processes (FSDP2; README)
    save_full: bool = False  # --fsdp: whole model in every checkpoint (default: only in the last)
    skip_nonfinite: bool = False  # skip a step with a non-finite loss/gradient instead of stopping
    # allowed values (common.parse_config refuses others in one line; any float must also be finite)
    RANGES = dict(eval_size="[1, inf)", pairs=("injected", "sampled"), n_sampled="[1, inf)",
                  sample_temperature="[0, inf)", sample_max_new_tokens="[1, inf)",
                  world_seed="[0, inf)", caption_shuffle=("pair", "answer"),
                  eval_prompt=("llava-rlhf", "short"),
                  template=("vicuna_v1", "llava_v1"), max_len="[1, inf)", lora_r="[1, inf)",
                  lora_alpha="[1, inf)", lora_dropout="[0, 1)",
                  lora_targets=("q", "k", "v", "o", "gate", "up", "down"), batch_size="[1, inf)",
                  lr="(0, inf)", min_lr_ratio="[0, 1]", warmup="[0, inf)", weight_decay="[0, inf)",
                  grad_clip="[0, inf)", center_coef="[0, inf)", max_steps="[1, inf)",
                  eval_every="[0, inf)", save_every="[1, inf)", log_every="[1, inf)",
                  seed=common.SEED_RANGE, device=("cpu", "cuda"), dtype=("fp32", "bf16"))


def preference_loss(r_chosen, r_rejected, n_global, center_coef, d):
    """Returns (surrogate loss whose gradients summed over ranks are those of L, value of L).
    Pairwise term summed and divided by the global pair count. The centring term |m|, m = global
    mean of r_c + r_r, is not a sum over ranks; its gradient sign(m) dm/dtheta is: each rank adds
    sign(m) * sum_local / n_global."""
    pair = -F.logsigmoid(r_chosen - r_rejected).sum() / n_global
    local = (r_chosen + r_rejected).sum() / n_global
    m = distributed.all_reduce_sum(local.detach(), d)
    loss = pair + center_coef * torch.sign(m) * local
    value = distributed.all_reduce_sum(pair.detach(), d) + center_coef * m.abs()
    return loss, value


def split_off(n, n_val, seed):
    """(training, held-out) indices of n pairs as LLaVA-RLHF's random_split(data, [n - n_val,
    n_val], generator seeded with seed) draws them: one permutation, the last n_val held out
    (its script's seed is 42)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:n - n_val], perm[n - n_val:]


def load_pairs(cfg, d, model, tokenizer):
    """(train, val, stats): pairs {prompt, chosen, rejected, captions, image} and counts of what was
    dropped."""
    stats = {}
    captions = cfg.captions if cfg.facts else None
    folder = cfg.image_folder or None
    read = lambda path: read_llava_rlhf_preference(path, folder, captions_path=captions or None,
                                                   need_captions=cfg.facts)
    train = check_images(read(cfg.data), cfg.data, d=d)[0]  # every image decodes, before any step
    if cfg.val_data:
        val = require_records(read(cfg.val_data), cfg.val_data, "preference pairs")
        val = check_images(val[:cfg.eval_size], cfg.val_data, d=d)[0]
    else:
        # (at least one pair of a small file: under 10 pairs it held out none, and said nothing)
        n_val = min(cfg.eval_size, max(len(train) // 10, 1 if len(train) > 1 else 0))
        kept, held = split_off(len(train), n_val, cfg.seed)
        train, val = [train[i] for i in kept], [train[i] for i in held]
    if cfg.pairs == "sampled":
        objects = shapes.load_world(cfg.world)["by_file"]
        train = train[:cfg.n_sampled]
        train, stats["train"] = sample_pairs(cfg, d, model, tokenizer, train, objects, cfg.world, 0)
        val, stats["val"] = sample_pairs(cfg, d, model, tokenizer, val, objects, cfg.world, 1)
    return train, val, stats


@torch.no_grad()
def sample_pairs(cfg, d, model, tokenizer, recs, objects, world, split, batch=64):
    """LLaVA-RLHF's human preference collection with an exact annotator: two answers per prompt
    sampled from the SFT model, the one with fewer oracle-counted hallucinations is chosen; ties are
    dropped and counted. Fixed batches with their own seeded generator, spread over ranks: the same
    pairs at any world size."""
    images = ImageCache(model.config.image_size)
    model.eval()
    items = []
    for r in recs:
        if not r.get("image"):  # (a text-only pair: no image to answer about, none to rank by)
            raise DataError(cfg.data, f"id {r.get('id')!r:.40}", "image", "missing: --pairs "
                            "sampled asks about the image and ranks by its annotations")
        unit = images.unit(r["image"])
        it = common.prompt_item(tokenizer, model, r["prompt"], unit, cfg.template, cfg.max_len)
        if it is None:
            raise DataError(cfg.data, f"id {r.get('id')!r:.40}", "prompt",
                            f"longer than --max_len {cfg.max_len} tokens (image included)")
        items += [it, it]  # two samples per prompt
    mine = {}
    for b in range(d.rank, -(-len(items) // batch), d.world):
        g = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000003 + split * 10007 + b)
        # the SFT policy (also when resuming a run whose RM adapter is loaded)
        with model.no_adapter():
            chunk = items[b * batch:(b + 1) * batch]
            mine[b] = common.generate_answers(model, tokenizer, chunk, batch,
                                              cfg.sample_max_new_tokens, cfg.sample_temperature,
                                              generator=g, show=False)
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, mine)
        mine = {k: v for p in parts for k, v in p.items()}
    answers = [a for b in sorted(mine) for a in mine[b]]
    pairs, stats = [], {"prompts": len(recs), "ties": 0, "empty": 0}
    for i, r in enumerate(recs):
        a, b = answers[2 * i], answers[2 * i + 1]
        if not a or not b:
            stats["empty"] += 1
            continue
        objs = objects.get(os.path.relpath(r["image"], world))
        if objs is None:
            why = "the oracle that ranks the samples reads the world's annotations"
            raise common.ConfigError(f"--pairs sampled: {r['image']} is not in {world} ({why})")
        ha, hb = (oracle.oracle(x, objs)["num_hallucinations"] for x in (a, b))
        if ha == hb:
            stats["ties"] += 1
            continue
        win, lose = (a, b) if ha < hb else (b, a)
        pairs.append(dict(r, chosen=win, rejected=lose, hallucinations=[min(ha, hb), max(ha, hb)],
                          preference=1 if ha < hb else 2))  # (the first sample as output_1)
    stats["pairs"] = len(pairs)
    return pairs, stats


def pair_batch(pairs, idx, cfg, tokenizer, model, images, rng_key, keys=None):
    """Chosen and rejected of each pair tokenized and collated into one right-padded batch
    [chosen..., rejected...], with one normalised image per pair. --caption_shuffle pair: both
    answers read the captions in one shuffled order (the pair differs in its answer only); answer:
    each answer's captions shuffled on their own, as LLaVA-RLHF's reward-model data does. The
    order is drawn from (rng_key, the pair's key: keys[i], or i)."""
    chosen, rejected, pix, dropped, second = [], [], [], 0, []
    for i in idx:
        p = pairs[i]
        caps = p["captions"] if cfg.facts else None
        own = cfg.caption_shuffle == "answer"
        key = i if keys is None else keys[i]
        items = [reward_item(tokenizer, model.config, p["prompt"], p[k], caps,
                             random.Random(f"{rng_key}-{key}" + (f"-{k}" if own else "")),
                             cfg.template, cfg.max_len, cfg.eval_prompt, cfg.prompt_space)
                 for k in ("chosen", "rejected")]
        if items[0] is None or items[1] is None:
            dropped += 1
            continue
        chosen.append(items[0])
        rejected.append(items[1])
        second.append(p.get("preference") == 2)
        if p.get("image"):
            unit = images.unit(p["image"])
            pix.append(normalize(torch.zeros_like(unit) if cfg.blank_images else unit))
    if not chosen:
        return None, dropped
    b = collate(chosen + rejected, tokenizer.pad_token_id, side="right")
    b["pixel_values"] = torch.stack(pix) if pix else None
    b["chose_second"] = torch.tensor(second)
    return b, dropped


def hits(rc, rr, chose_second):
    """Pairs ranked right: r_chosen > r_rejected, and a tie where the chosen answer is output_2, as
    LLaVA-RLHF counts them (its prediction is output_2 when r(output_2) - r(output_1) >= 0:
    RLHF/models/reward_model.py:327, output_1/2 at index 0/1 in RLHF/data_utils/data_utils_rm.py:71
    and 111)."""
    return float(((rc > rr) | ((rc == rr) & chose_second.to(rc.device))).sum())


def fits(p, cfg, tokenizer, model_config):
    """Whether pair_batch keeps pair p: its chosen and rejected both fit --max_len (the captions'
    order, shuffled there, hardly changes the length)."""
    caps = p["captions"] if cfg.facts else None
    return all(reward_item(tokenizer, model_config, p["prompt"], p[k], caps, random.Random(0),
                           cfg.template, cfg.max_len, cfg.eval_prompt, cfg.prompt_space) is not None
               for k in ("chosen", "rejected"))


def forward_pairs(model, b, device):
    """(r_chosen, r_rejected): image features computed once per pair (the tower is frozen) and
    reused."""
    b = common.to_device(b, device)
    feats = None
    if b["pixel_values"] is not None:
        with torch.no_grad():
            feats = model.encode_images(b["pixel_values"])
        feats = torch.cat([feats, feats])
    r = common.score_sequences(model, "reward", b["input_ids"], b["attention_mask"], feats)
    return r.chunk(2)


@torch.no_grad()
def evaluate(model, val, cfg, tokenizer, images, d, keys=None):
    """Held-out pairwise accuracy (hits), loss and mean margin; fixed caption order, drawn per pair
    from its place in the held-out set (keys: of a subset's pairs there, so each is scored as in
    the whole)."""
    model.eval()
    sums = torch.zeros(4)  # correct, loss, margin, count
    for chunk, counts in distributed.rank_chunks(len(val), cfg.batch_size, d):
        b, _ = pair_batch(val, chunk, cfg, tokenizer, model, images, f"val-{cfg.seed}", keys)
        if b is None:
            continue
        rc, rr = forward_pairs(model, b, d.device)
        if counts:
            correct = hits(rc, rr, b["chose_second"])
            loss = float(-F.logsigmoid(rc - rr).sum())
            margin = float((rc - rr).sum())
            sums += torch.tensor([correct, loss, margin, len(rc)])
    sums = distributed.all_reduce_sum(sums, d)
    model.train()
    n = max(float(sums[3]), 1.0)
    return {"val_accuracy": float(sums[0]) / n, "val_loss": float(sums[1]) / n,
            "val_margin": float(sums[2]) / n, "n_val": int(sums[3])}


def partner_pairs(val, world):
    """The places in `val` of the held-out Shapes pairs whose rejected answer names the absent
    co-occurring partner of a shape in the image (triangle -> circle): where a fact list should
    help the reward model most."""
    objects = shapes.load_world(world)["by_file"]
    # load_params: a key world.json lacks is its default, as the world was written with it
    pairs = shapes.parse_pairs(shapes.load_params(world)["pairs"])
    out = []
    for i, p in enumerate(val):
        # (a text-only pair, or an image from outside the world: no annotated objects to
        # hallucinate a partner of; it counts in the accuracy over all pairs only)
        rel = os.path.relpath(p["image"], world) if p.get("image") else None
        if rel not in objects:
            continue
        objs = objects[rel]
        partners = {b for a, b in pairs if a in {o["name"] for o in objs}}
        if partners & set(oracle.oracle(p["rejected"], objs)["hallucinated_objects"]):
            out.append(i)
    return out


def other_image_facts(val):
    """(place in val, pair) of the held-out pairs, each pair's captions taken from the next pair of
    another image (a control: an RM that reads its facts should lose accuracy; one that ignores
    them should not)."""
    out, n = [], len(val)
    for i, p in enumerate(val):
        after = (val[(i + k) % n] for k in range(1, n))  # the next pairs, wrapping round, no copy
        other = next((q for q in after if q["image"] != p["image"]), None)
        if other is not None:
            out.append((i, dict(p, captions=other["captions"])))
    return out


def import_llava_rlhf(cfg):
    """LLaVA-RLHF's reward model as a checkpoint of this script: its LoRA and reward_head become
    adapter and head 'reward' on --init, the run config records how it scores (its reward prompt
    joined with a space, as its data_utils joins it; --facts, --eval_prompt and --template as
    given: their defaults are its Fact-RLHF reward model's), and ppo.py --reward reads it."""
    for flag, on in (("--resume", cfg.resume), ("--fsdp", cfg.fsdp)):
        if on:
            raise common.ConfigError(f"{flag} true: --import_llava_rlhf trains nothing")
    read = {"import_llava_rlhf", "init", "vision_tower", "out", "overwrite", "device", "facts",
            "eval_prompt", "template", "prompt_space", "world", "world_seed"}  # (the world: the
    # context flags every stage takes)
    rundir.refuse_unread(cfg, [f.name for f in fields(cfg) if f.name not in read],
                         "with --import_llava_rlhf (nothing is trained or read but its files); "
                         "drop it")
    common.require_paths(cfg, ["init"])
    if not os.path.isdir(cfg.import_llava_rlhf):
        raise common.ConfigError(f"--import_llava_rlhf {cfg.import_llava_rlhf}: directory not "
                                 "found")
    llava_rlhf_reward_parts(cfg.import_llava_rlhf)  # (its files are there: before --out is made)
    if "prompt_space" in getattr(cfg, "_given", ()) and not cfg.prompt_space:
        raise common.ConfigError("--prompt_space false: not read with --import_llava_rlhf (its "
                                 "reward prompt is joined with a space, as its data_utils joins "
                                 "it); drop it")
    cfg = common.replace_config(cfg, prompt_space=True)
    d = distributed.setup_dist(cfg.device, False, flags=cfg)
    rundir.claim_out(cfg, d, inits=[cfg.init])
    # (the base as stored: its weights are only read for shapes, never changed nor written here;
    # read in fp32, the stages' default on a CPU, a 13B fp16 release took 52 GB)
    model, tokenizer = common.load_model_and_tokenizer(cfg.init, vision_tower=cfg.vision_tower,
                                                       device=d.device, dtype="auto")
    if model.adapters:
        raise common.ConfigError(f"{cfg.init}: the SFT checkpoint holds LoRA adapters "
                                 f"{sorted(model.adapters)}; the reward model's base has none")
    load_llava_rlhf_reward(model, cfg.import_llava_rlhf, "reward")
    model.set_adapter("reward")
    rundir.start_writing(cfg, d, model=model)
    base = resolve_checkpoint(cfg.init)  # (the RM checkpoint points here for its frozen weights)
    rundir.save_checkpoint(model, cfg.out, 0, cfg, None, tokenizer, base=base, d=d)
    print(f"{cfg.import_llava_rlhf} -> {cfg.out}: LoRA r {model.adapters['reward']['r']} and "
          f"reward head on {cfg.init} | facts {cfg.facts}, {cfg.eval_prompt} wording, "
          f"{cfg.template}, prompt joined with a space")
    distributed.cleanup_dist()


def main(cfg):
    if cfg.import_llava_rlhf:
        return import_llava_rlhf(cfg)
    rundir.refuse_unread_shared(cfg)
    if not cfg.facts:  # (plain RLHF: the reward prompt names no facts)
        rundir.refuse_unread(cfg, ("captions", "caption_shuffle"), "with --facts false; drop it")
    if cfg.pairs == "injected":
        rundir.refuse_unread(cfg, ("n_sampled", "sample_temperature", "sample_max_new_tokens"),
                             "with --pairs injected (nothing is sampled); drop it")
    companions = ("val_data", "captions") if cfg.facts else ("val_data",)
    cfg, named = common.world_paths(cfg, ("data", "init"), companions)
    distributed.check_world("reward.py", cfg.fsdp, batch_size=cfg.batch_size)
    d = distributed.setup_dist(cfg.device, cfg.fsdp, flags=cfg)
    common.seed_everything(cfg.seed)
    rundir.claim_out(cfg, d, inits=[cfg.init])
    resume_path, state = rundir.load_resume(cfg.out, cfg) if cfg.resume else (None, None)
    if cfg.eval_prompt not in ("llava-rlhf", "short"):
        raise common.ConfigError("--eval_prompt must be 'llava-rlhf' or 'short', "
                                 f"got '{cfg.eval_prompt}'")
    if cfg.pairs not in ("injected", "sampled"):
        raise common.ConfigError(f"--pairs must be 'injected' or 'sampled', got '{cfg.pairs}'")
    if cfg.pairs == "sampled" and cfg.sample_temperature == 0:  # (then 'no training pairs')
        raise common.ConfigError("--sample_temperature 0 with --pairs sampled: greedy decoding "
                                 "answers a prompt the same way twice, so every pair is a tie; "
                                 "pass a temperature > 0")
    if named or cfg.pairs == "sampled":  # rank 0 writes the world (if missing), the others wait
        distributed.on_main_first(d, lambda: shapes.ensure_world(cfg.world, seed=cfg.world_seed))
    # FSDP: built from --init as at the start, then the shards
    sharded = rundir.sharded_resume(resume_path, d)
    # the RM points here for its frozen weights
    base = rundir.trained_base(resume_path, cfg.init, loads_adapters=not sharded)
    rundir.note_template("--init", cfg.init, cfg.template)
    rundir.note_world("--init", cfg.init, cfg.world)
    load_from = base if sharded else resume_path or base
    # (a run whose checkpoints are whole (--init's base weights changed as loaded: a PEFT
    # adapter's vision LoRA merged) goes on writing them whole)
    if resume_path and not sharded and rundir.recorded_base(resume_path) is None:
        base = None
    # (a resumed run loads its own reward model)
    # (the checkpoint's own tokenizer: the world's would be another vocabulary)
    # (sampled pairs are drawn before sharding: on the run's device)
    where = d.device if cfg.pairs == "sampled" else distributed.load_device(cfg, d)
    model, tokenizer = common.load_model_and_tokenizer(load_from, vision_tower=cfg.vision_tower,
                                                       device=where, policy=resume_path is None,
                                                       dtype=common.base_dtype(cfg))
    if cfg.pairs == "sampled":
        common.check_new_tokens(model, cfg, "sample_max_new_tokens")
    if resume_path is None and model.adapters:
        raise common.ConfigError(f"{cfg.init}: the SFT checkpoint holds LoRA adapters "
                                 f"{sorted(model.adapters)}; "
                                 f"merge them into the base first (sft.py does at the end)")
    # (FSDP: fp32 master weights, bf16 compute)
    if cfg.dtype == "bf16" and cfg.device == "cuda" and not cfg.fsdp:
        model.cast_base(torch.bfloat16)
    # sampled pairs come from the SFT model itself
    train, val, stats = load_pairs(cfg, d, model, tokenizer)
    if "reward" not in model.adapters:
        model.add_adapter("reward", cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        head = model.add_head("reward")
        # as LLaVA-RLHF's nn.Linear head (bias 0); drawn on the CPU, as LoRA's A matrices are,
        # wherever the model is (the same head on a GPU with or without --fsdp)
        weight = torch.empty(head.weight.shape)
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        with torch.no_grad():
            head.weight.copy_(weight)
    model.set_adapter("reward")
    model.set_trainable(adapters=["reward"], heads=["reward"])
    model.gradient_checkpointing = cfg.grad_checkpoint
    if cfg.fsdp:
        distributed.shard_model(model, d, bf16=cfg.dtype == "bf16" and cfg.device == "cuda")
    if not train and stats:  # --pairs sampled: say how each prompt's two samples ended
        counts = stats["train"]
        raise common.ConfigError(f"--pairs sampled: no training pairs left: of {counts['prompts']} "
                                 f"prompts, {counts['ties']} sampled two answers with as many "
                                 f"hallucinations (ties) and {counts['empty']} an empty answer; "
                                 "raise --sample_temperature or --n_sampled")
    if not train:
        raise common.ConfigError(f"{cfg.data}: no training pairs left (no record, or every one "
                                 "held out or dropped)")
    # pairs that do not fit are left out here, counted (drawn into batches and dropped there, a
    # step whose pairs all were dropped trained on nothing and logged loss 0)
    kept = [p for p in train if fits(p, cfg, tokenizer, model.config)]
    if not kept:
        raise common.ConfigError(f"{cfg.data}: no pair fits --max_len {cfg.max_len} (chosen and "
                                 f"rejected, {len(train)} pairs): raise --max_len")
    too_long, train = len(train) - len(kept), kept
    # held-out pairs too, each keeping its place for its caption order (dropped inside a batch, a
    # rank whose whole share was dropped skipped its forward pass: under FSDP the others waited)
    val_keys = [i for i, p in enumerate(val) if fits(p, cfg, tokenizer, model.config)]
    if val and not val_keys:  # (accuracy 0 on 0 pairs was reported)
        where = cfg.val_data or f"{cfg.data} (its held-out pairs)"
        raise common.ConfigError(f"{where}: no held-out pair fits --max_len {cfg.max_len} "
                                 f"(chosen and rejected, {len(val)} pairs): raise --max_len")
    val_too_long, val = len(val) - len(val_keys), [val[i] for i in val_keys]
    data_files = [cfg.data, cfg.val_data, cfg.captions if cfg.facts else ""]
    rundir.start_writing(cfg, d, data_files, model)
    if cfg.pairs == "sampled" and d.main:
        common.write_json({"train": train, "val": val, "stats": stats},
                          os.path.join(cfg.out, "sampled_pairs.json"))
    opt = common.make_optimizer(model, cfg.lr, cfg.weight_decay)
    start = 0
    if state is not None:
        rundir.restore(model, opt, resume_path, state, d)
        start = state["step"]
        if d.main:
            print(f"resumed from {resume_path} at step {start}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    images = ImageCache(model.config.image_size)
    if d.main:
        extra = f" | sampled: {stats}" if stats else ""
        n_train = sum(p.numel() for p in trainable)
        left_out = f" ({too_long} longer than --max_len left out)" if too_long else ""
        val_left_out = f" ({val_too_long} longer left out)" if val_too_long else ""
        print(f"{len(train)} training pairs{left_out}, {len(val)} held-out{val_left_out} | "
              f"facts {cfg.facts} | "
              f"{n_train / 1e6:.3f}M trainable | {d.world} process(es){extra}")
        alike = [sum(p["chosen"] == p["rejected"] for p in ps) for ps in (train, val)]
        if any(alike):  # (LLaVA-RLHF trains on them: only the centring term learns from them)
            print(f"note: {alike[0]} training and {alike[1]} held-out pairs have the same chosen "
                  "and rejected answer: kept, as LLaVA-RLHF keeps them (accuracy counts a tie as "
                  "a hit where output_2 was chosen, as it does)")
    log = common.Logger(cfg.out, d.main)
    model.train()
    t0, dropped, acc_sum, n_sum, metrics = time.time(), too_long, 0.0, 0, {}
    # a log line covers the steps since the last line, also across a --resume (the checkpoint
    # keeps each rank's running counts)
    counts = rundir.own_state(state["extra"].get("log_counts"), d) if state else None
    if counts:
        dropped, acc_sum, n_sum = counts["dropped"], counts["acc"], counts["n"]
    timed = 0.0  # pairs since t0
    for step in range(start, cfg.max_steps):
        lr = common.cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio,
                              cfg.warmup_from_zero)
        common.set_lr(opt, lr)
        idx = common.batch_indices(step, len(train), cfg.batch_size, cfg.seed, d.rank, d.world)
        b, drop = pair_batch(train, idx, cfg, tokenizer, model, images, f"{cfg.seed}-{step}")
        dropped += drop
        n_local = 0.0 if b is None else b["input_ids"].shape[0] / 2
        n_global = distributed.all_reduce_sum(torch.tensor(n_local), d)
        if b is not None:
            rc, rr = forward_pairs(model, b, d.device)
        else:
            # (on the device: CPU tensors go to gloo while the other ranks reduce on NCCL)
            rc, rr = torch.zeros(0, device=d.device), torch.zeros(0, device=d.device)
        loss, value = preference_loss(rc, rr, n_global.clamp(min=1), cfg.center_coef, d)
        if loss.requires_grad:  # (a rank whose pairs were all too long still joins the all-reduces)
            loss.backward()
        acc_sum += hits(rc, rr, b["chose_second"]) if b is not None else 0.0
        n_sum += float(n_global)
        timed += float(n_global)
        # value is global already
        _, norm = common.optimizer_step(opt, trainable, d, step, cfg, value, reduce=False)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            acc = float(distributed.all_reduce_sum(torch.tensor(acc_sum), d)) / max(n_sum, 1)
            grad_norm = norm if norm is not None else float("nan")
            pairs_per_s = round(timed / max(time.time() - t0, 1e-9), 1)
            log.log(done, loss=float(value), train_acc=acc, lr=lr, grad_norm=grad_norm,
                    dropped=dropped, pairs_per_s=pairs_per_s)
            t0, acc_sum, n_sum, timed = time.time(), 0.0, 0, 0.0
        if val and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            metrics = evaluate(model, val, cfg, tokenizer, images, d, val_keys)
            log.log(done, **metrics)
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            counts = rundir.rank_states({"dropped": dropped, "acc": acc_sum, "n": n_sum}, d)
            rundir.save_checkpoint(model, cfg.out, done, cfg, opt, tokenizer, base=base, d=d,
                                   extra_state={"log_counts": counts})
    if val and not metrics:  # (resumed after the last step)
        metrics = evaluate(model, val, cfg, tokenizer, images, d, val_keys)
    partner = partner_pairs(val, cfg.world) if "val_data" in named else []
    if partner:  # the hallucination the facts are there to catch: the absent co-occurring partner
        part = evaluate(model, [val[i] for i in partner], cfg, tokenizer, images, d,
                        [val_keys[i] for i in partner])
        if part["n_val"]:  # (none scored: every such pair too long for --max_len)
            metrics.update(val_accuracy_partner=part["val_accuracy"], n_val_partner=part["n_val"])
    # a control: the facts of another image (none when every held-out pair shows one image)
    shuffled = other_image_facts(val) if cfg.facts and val else []
    if shuffled:
        keys, pairs = zip(*shuffled)
        other = evaluate(model, list(pairs), cfg, tokenizer, images, d,
                         [val_keys[i] for i in keys])
        if other["n_val"]:
            metrics.update(val_accuracy_other_facts=other["val_accuracy"],
                           n_val_other_facts=other["n_val"])
    if d.main:
        report = {**metrics, "facts": cfg.facts, "eval_prompt": cfg.eval_prompt,
                  "data": cfg.data, "pairs": cfg.pairs, "train_pairs": len(train),
                  "dropped_too_long": dropped, "sampled": stats}
        # (whole or not at all: the lab takes a run whose report is there as done)
        common.write_json(report, os.path.join(cfg.out, "report.json"), indent=2)
        if metrics:
            partner_note = ""
            if "n_val_partner" in metrics:
                partner_note = (f" ({metrics['val_accuracy_partner']:.3f} on the "
                                f"{metrics['n_val_partner']} naming a co-occurring partner)")
            print(f"held-out pairwise accuracy {metrics['val_accuracy']:.3f} "
                  f"on {metrics['n_val']} pairs{partner_note}")
            if "val_accuracy_other_facts" in metrics:
                print(f"with another image's captions as the facts: "
                      f"{metrics['val_accuracy_other_facts']:.3f} (how much the facts are read)")
    distributed.cleanup_dist()


if __name__ == "__main__":
    cfg = common.parse_config(Config)
    with distributed.ending_process(), common.user_errors():
        main(cfg)
