r"""VIGC: visual instruction generation and correction (arXiv 2308.12714): a LLaVA learns to write
its own instruction data (VIG) and to re-answer it one sentence at a time (VIC); the result is a
LLaVA-instruct file that sft.py trains on.

    python vigc.py  # Shapes: fine-tune ckpt/sft, generate for 200 unlabeled images, oracle report
    python vigc.py --init ckpt/vigc --max_steps 0 --generate 300 --temperature 1.0 \
        --out ckpt/vigc_gen  # generate only, with the trained model (a run folder of its own)
    python sft.py --data ckpt/vigc/vigc_data.json --image_folder data/shapes \
        --init ckpt/sft --out ckpt/sft_vigc  # train on the result
    torchrun --nproc_per_node=8 vigc.py --init llava-v1.5-7b --lora_r 64 --train_vision false \
        --data conversation_58k.json:conv,detail_23k.json:desc,complex_reasoning_77k.json:comp \
        --image_folder coco/train2017 --images coco/val2017 --generate 5000 --max_len 2048 \
        --max_correction_steps 10 --device cuda --grad_checkpoint true
        # (--max_len: 512, the default, is below 576 image tokens)

Training (VIGC Sec. 3; formats from opendatalab/VIGC vigc/datasets/datasets/vigc_train.py):
  VIG  `<image>\n{type instruction}` -> `Question: {q} Answer: {a}`, one of several phrasings per
       type (conversation, detailed description, complex reasoning; on Shapes: yes/no, count, color
       and relation questions / the description / multiple choice with its rationale).
  VIC  `<image>\n{q}` -> a, where the first k sentences of a (k uniform in 0..n-1) are already
       written in the assistant turn and only the *remaining* sentences and </s> are learned: VIGC's
       correction step (vigc/tasks/llava_150k_gen.py) generates the rest of the answer and keeps its
       first sentence.
One model learns both formats, as in VIGC (normal_vigc.yaml trains one model on its *_vig and *_vic
sets together): the task is in the prompt, VIC with k=0 is exactly the SFT format (the model keeps
answering normally and the checkpoint is an ordinary LLaVA), and generation switches no adapters.
Two adapters would double the LoRA memory for no gain in separation that the prompt does not already
give.
--sft_share of plain (multi-turn) SFT conversations keeps multi-turn answering. Loss as sft.py:
answer tokens, normalised by the answer tokens of the global batch; --lora_r > 0 trains a LoRA,
merged at the end.

Generation (rank 0 only; the training runs under torchrun). VIG samples `q Answer: a` after an
assistant turn started with "Question:", at --temperature from a seeded torch.Generator; outputs
that do not parse are dropped and counted. VIC then answers q again: generate, keep the first
sentence, write the kept sentences back into the assistant turn, repeat until the model ends right
after the kept sentence (EOS) or --max_correction_steps. On Shapes, oracle.oracle counts the
hallucinations of the VIG-only and the VIC answers to the same questions.
--vic_mode reference follows VIGC's code instead (vigc/tasks/llava_150k_gen.py with gen_style vig,
generate_llava_qa_conv.yaml): VIC learns question -> the full answer (no answer-so-far prefix), and
the correction continues the VIG turn itself, 'Question: q Answer: s_1 .. s_k', for exactly
--answer_length steps (4) by beam search (--num_beams 5, model.generate), keeping at each step the
text up to its first '.' (nothing when there is none), never stopping at EOS. Every call, VIG's too,
is that beam search with LAVIS's generate defaults (--repetition_penalty 1.5 on the tokens
generated so far; length penalty 1). Ours (the default)
follows the paper's text: VIC learns q + the first k sentences -> the rest, and corrects from the
question alone, greedily, until EOS or --max_correction_steps.
Note: VIGC's iterative Q-Former re-reads the image conditioned on the text so far. LLaVA's image
features do not depend on the text, so with greedy decoding the loop equals one greedy answer up to
sentence re-tokenization: what changes the answer here is that VIC re-answers the question from the
image, without VIG's sampled answer in context and at --vic_temperature.
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import os
import random
import re
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
from data import (IGNORE, DataError, ImageCache, check_images, collate, load_json, normalize,
                  read_any_conversations, read_text, tokenize_conversation,
                  tokenize_conversations)
from formats import IMAGE, TAG_IN_TEXT


@dataclass
class Config:
    """VIGC: train VIG + VIC on one model, then generate instruction data with iterative
    correction."""
    # (the generated data: vigc_data.json and vig_only.json)
    out: str = "ckpt/vigc"  # run directory: checkpoints, metrics, generated data, report.json
    init: str = "ckpt/sft"  # checkpoint (ours, llava-hf, original LLaVA); empty: a fresh --model
    vision_tower: str = ""  # CLIP folder if --init has no CLIP weights (default: the one it names)
    model: str = "shapes"  # preset for a fresh model when --init is empty (tests: tiny)
    tokenizer: str = "{world}/tokenizer"  # for a fresh --model (given: an --init without one)
    data: str = "{world}/sft.json"  # FILE[:conv|desc|comp],... (LLaVA instruct or LRV)
    instructions: str = "{world}/vigc_instructions.json"  # VIG {type: [phrasings]} (empty: ours)
    image_folder: str = ""  # base of --data image paths (default: each file's folder)
    world: str = "data/shapes"  # Shapes world: {world} in paths; written on first use
    world_seed: int = 0  # seed of the Shapes world
    template: str = "vicuna_v1"  # conversation template: vicuna_v1 or llava_v1
    max_len: int = 512  # longest training sequence (longer ones are cut, never in the image)
    sft_share: float = 0.1  # share of plain SFT conversations in the mix (0: VIG + VIC only)
    lora_r: int = 0  # 0: full fine-tune; > 0: LoRA rank on the language model (merged at the end)
    lora_alpha: int = 16  # LoRA alpha (scale alpha / r)
    train_vision: bool = True  # train the CLIP tower (freeze it for real CLIP)
    train_projector: bool = True  # train the projector
    batch_size: int = 64  # sequences per optimizer step (global, over all processes)
    grad_accum: int = 1  # micro-batches per step on each process
    lr: float = 1e-3  # peak learning rate (fine-tuning the SFT model: sft.py --instruct_lr)
    min_lr_ratio: float = 0.1  # final learning rate / peak
    warmup: int = 20  # linear warmup steps
    warmup_from_zero: bool = False  # warmup step s at lr s/W (transformers'); false: (s+1)/W
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # gradient norm clip (0: off)
    max_steps: int = 400  # optimizer steps (0: generate only, from --init)
    save_every: int = 1000  # checkpoint every N steps (and at the end)
    log_every: int = 25  # a log line every N steps
    seed: int = 0  # seed for data order, instructions, answer splits and sampling
    device: str = "cpu"  # cpu or cuda
    dtype: str = "fp32"  # fp32, or bf16 (autocast on GPU)
    grad_checkpoint: bool = False  # activation checkpointing in the decoder (training)
    skip_nonfinite: bool = False  # skip a step with a non-finite loss/gradient instead of stopping
    resume: bool = False  # continue from the newest checkpoint in --out
    overwrite: bool = False  # a run already in --out is moved aside (kept) and a new one starts
    fsdp: bool = False  # shard weights, gradients, AdamW state over the processes (FSDP2; README)
    save_full: bool = False  # --fsdp: whole model in every checkpoint (default: only in the last)
    generate: int = 200  # images to generate instruction data for (0: none)
    images: str = "{world}/vigc_images.txt"  # images to generate for: a folder, an image, a list
    gen_types: tuple = ("conv", "desc", "comp")  # types to generate, one drawn per image
    temperature: float = 0.7  # VIG sampling temperature (0: greedy)
    vic_temperature: float = 0.0  # VIC temperature (0: greedy; VIGC's beam search is deterministic)
    max_correction_steps: int = 6  # VIC steps, a sentence each (--vic_mode ours; EOS stops earlier)
    vic_mode: str = "ours"  # 'ours' (paper's text) or 'reference' (VIGC's code); see the docstring
    answer_length: int = 4  # --vic_mode reference: correction steps, all always run (VIGC: 4)
    num_beams: int = 5  # --vic_mode reference: beams of VIG and each correction step (VIGC: 5)
    repetition_penalty: float = 1.5  # --vic_mode reference: of every generate call (LAVIS: 1.5)
    last_infer_all: bool = False  # VIGC option: last step keeps all it generates, not one sentence
    max_new_tokens: int = 96  # new tokens per generation call
    # (sampled in these batches from one seeded stream, as is --generate's count)
    gen_batch_size: int = 32  # prompts per generation batch (another value draws other samples)
    # allowed values (common.parse_config refuses others in one line; any float must also be finite)
    RANGES = dict(model=tuple(PRESETS), world_seed="[0, inf)", template=("vicuna_v1", "llava_v1"),
                  max_len="[1, inf)", sft_share="[0, 0.99]", lora_r="[0, inf)",
                  lora_alpha="[1, inf)", batch_size="[1, inf)", grad_accum="[1, inf)",
                  lr="(0, inf)",
                  min_lr_ratio="[0, 1]", warmup="[0, inf)", weight_decay="[0, inf)",
                  grad_clip="[0, inf)", max_steps="[0, inf)", save_every="[1, inf)",
                  log_every="[1, inf)", seed=common.SEED_RANGE, device=("cpu", "cuda"),
                  dtype=("fp32", "bf16"), generate="[0, inf)", gen_types=("conv", "desc", "comp"),
                  temperature="[0, inf)", vic_temperature="[0, inf)",
                  max_correction_steps="[1, inf)", vic_mode=("ours", "reference"),
                  answer_length="[1, inf)", num_beams="[1, inf)", max_new_tokens="[1, inf)",
                  gen_batch_size="[1, inf)", repetition_penalty="(0, inf)")


TYPES = {"conv": "conversation", "desc": "detailed description", "comp": "complex reasoning"}
INSTRUCTIONS = {  # --instructions '' (the world has its own: vigc_instructions.json); our wording
    "conversation": ["Generate a question about the content of the image and then answer it.",
                     "Ask a question about the image and give its answer.",
                     "Come up with a question related to the image and answer it."],
    "detailed description": [
        "Generate a question asking for a detailed description of the image and then answer it.",
        "Ask for a detailed description of the picture and provide it.",
        "Write a request to describe the image in detail, followed by the description."],
    "complex reasoning": [
        "Generate a question that needs reasoning about the image and then answer it.",
        "Ask an in-depth reasoning question about the image and answer it.",
        "Pose a question about the image that requires careful reasoning, then answer it."]}
# change freely on --resume
GEN_FIELDS = ("generate", "images", "gen_types", "temperature", "vic_temperature",
              "max_correction_steps", "last_infer_all", "max_new_tokens", "gen_batch_size",
              "answer_length", "num_beams", "repetition_penalty")
# the decoding flags each --vic_mode leaves unread
UNREAD_BY_MODE = dict(ours=("answer_length", "num_beams", "repetition_penalty"),
                      reference=("temperature", "vic_temperature", "max_correction_steps",
                                 "last_infer_all"))
# what --max_steps 0 leaves unread (the data and --max_len are still read: checked)
TRAIN_FIELDS = ("sft_share", "lora_r", "lora_alpha", "train_vision", "train_projector",
                "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "warmup_from_zero",
                "weight_decay", "grad_clip", "save_every", "log_every", "skip_nonfinite",
                "save_full", "grad_checkpoint")

# -------------------- text formats: the VIG target, its parser, sentences, VIC tokens


VIG_START = "Question:"


def vig_target(q, a):
    return f"{VIG_START} {q} Answer: {a}"  # VIGC's VIG_PROMPTS " Question: {q} Answer: {a}"


def parse_vig(text):
    """(question, answer) from a VIG output 'Question: q Answer: a' (any case and spacing), or None
    unless there is exactly one of each marker, in that order, and both parts are non-empty."""
    text = str(text or "").replace("<image>", " ")  # the tag belongs only at the start of a record
    qs = list(re.finditer(r"question\s*:", text, re.I))
    ans = list(re.finditer(r"answer\s*:", text, re.I))
    if len(qs) != 1 or len(ans) != 1 or ans[0].start() < qs[0].end():
        return None
    q, a = text[qs[0].end():ans[0].start()].strip(), text[ans[0].end():].strip()
    return (q, a) if q and a else None


def sentences(text):
    """Split after . ! ? followed by white space (so '2.5' stays whole)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", str(text or "").strip()) if s]


def encode(tokenizer, mc, question, prefix="", target=None, max_len=2048, template="vicuna_v1"):
    """Tokens of `<image>\\n{question}` answered by `prefix` (the answer so far) and `target`.
    target None: a generation prompt ending with 'ASSISTANT: {prefix}', never cut (max_len unread).
    Else labels on target and </s> only (encode_many)."""
    if target is not None:
        return encode_many(tokenizer, mc, [(question, prefix, target)], max_len, template)[0]
    return _prompts(tokenizer, mc, [(question, prefix)], template)[0]


def _turns(question, answer=None):
    gpt = [{"from": "gpt", "value": answer}] if answer is not None else []
    return [{"from": "human", "value": "<image>\n" + question}] + gpt


def _prompts(tokenizer, mc, jobs, template):
    """Generation prompts of (question, prefix) jobs, tokenized together: '... ASSISTANT:', or
    '... ASSISTANT: {prefix}' (its conversation's tokens without the closing </s>)."""
    convs = [_turns(q, p or None) for q, p in jobs]
    out = tokenize_conversations(tokenizer, convs, mc.image_token_id, mc.num_image_tokens,
                                 1 << 30, template)
    for i, (t, (_, p)) in enumerate(zip(out, jobs)):
        if p:
            if int(t["input_ids"][-1]) != tokenizer.eos_token_id:
                raise common.ConfigError(f"the tokenizer does not encode its eos text "
                                         f"{tokenizer.eos_token!r} as its eos id alone")
            ids = t["input_ids"][:-1]
            out[i] = {"input_ids": ids, "labels": torch.full_like(ids, IGNORE)}
    return out


def encode_many(tokenizer, mc, jobs, max_len=2048, template="vicuna_v1"):
    """encode of each (question, prefix, target), the texts tokenized together: labels on target
    and </s> only, None where nothing learned fits --max_len."""
    convs = [_turns(q, (p + " " + t).strip()) for q, p, t in jobs]
    fulls = tokenize_conversations(tokenizer, convs, mc.image_token_id, mc.num_image_tokens,
                                   max_len, template)
    need = [i for i, (_, p, _) in enumerate(jobs) if p and fulls[i] is not None]
    prompts = _prompts(tokenizer, mc, [jobs[i][:2] for i in need], template)
    for i, p in zip(need, prompts):
        full, p = fulls[i], p["input_ids"]
        m = min(len(p), len(full["input_ids"]))
        same = full["input_ids"][:m] == p[:m]
        # the answer so far is context
        full["labels"][:m if bool(same.all()) else int(same.int().argmin())] = IGNORE
        fulls[i] = full if bool((full["labels"] != IGNORE).any()) else None
    return fulls

# -------------------- training data: VIG + VIC examples from question/answer pairs, plus SFT


def load_instructions(path, needed=None):
    """{type: [phrasings]} from a VIGC instructions file (the world's vigc_instructions.json),
    or ours. needed: the types the run reads (its data's pairs' and --gen_types'; default all):
    a file of one type serves a run of that type alone (it was refused for lacking the others)."""
    if not path:
        return INSTRUCTIONS
    info = load_json(path)
    if not isinstance(info, dict):
        raise DataError(path, None, None, "expected an object {type: [instruction phrasings]}")
    needed = [t for t in TYPES.values() if needed is None or t in needed]
    missing = [t for t in needed if t not in info]
    if missing:
        raise DataError(path, None, missing[0], "missing: expected {type: [instruction phrasings]}")
    for t in [t for t in TYPES.values() if t in info]:  # (a string: drawn letter by letter)
        if not isinstance(info[t], list) or not info[t] or \
                not all(isinstance(x, str) and x.strip() for x in info[t]):
            raise DataError(path, None, t, "expected a non-empty list of instruction strings, "
                                           f"got {info[t]!r:.60}")
        tagged = next((x for x in info[t] if IMAGE in x), None)
        if tagged is not None:  # (the image is placed first, once; a phrasing is put after it)
            raise DataError(path, None, t, f"{TAG_IN_TEXT}: {tagged!r:.60}")
    return {t: info[t] for t in TYPES.values() if t in info}


# a record's qtypes: the world's question types, or VIGC's three types by name
QTYPE_TO_TYPE = {**shapes.VIGC_TYPE, **{t: t for t in TYPES.values()}}


def qtype_map(path):
    """How a record's qtypes name instruction types: the --instructions file's `qtype_to_type`
    (the world writes its own there) over ours."""
    info = load_json(path) if path else {}
    given = info.get("qtype_to_type") if isinstance(info, dict) else None
    if given is None:
        return QTYPE_TO_TYPE
    bad = [k for k, v in given.items() if v not in TYPES.values()] \
        if isinstance(given, dict) else [None]
    if bad:
        where = f"{bad[0]!r:.40}: " if bad[0] is not None else ""
        raise DataError(path, None, "qtype_to_type", f"{where}expected an object "
                        f"{{question type: one of {', '.join(TYPES.values())}}}")
    return {**QTYPE_TO_TYPE, **given}


def load_records(cfg, d=None):
    """Image records {'image', 'conversations', 'pairs': [(q, a, type)]} from the --data files. A
    pair's type: the file's, else its record's qtypes (the world's) mapped, else conversation."""
    specs = []
    for path, t in common.data_specs(cfg.data):
        if t and t not in TYPES:
            kinds = ", ".join(TYPES)
            raise common.ConfigError(f"--data: type '{t}' of {path} is not one of {kinds}")
        specs.append((path, TYPES.get(t)))
    records, qtypes_to = [], qtype_map(cfg.instructions)
    for path, kind in specs:
        recs = read_any_conversations(path, cfg.image_folder or None)
        check_images(recs, path, d=d)  # every image decodes, before any step
        for j, r in enumerate(recs):
            # (a file given a type: every pair is of it, its qtypes unread)
            qtypes = r.get("qtypes") if kind is None else None
            conv = r["conversations"]
            # (the world's field: a question type for each question/answer pair)
            if qtypes is not None and (not isinstance(qtypes, list) or len(qtypes) != len(conv) // 2
                                       or not all(isinstance(q, str) for q in qtypes)):
                raise DataError(path, f"{j} (id {r['id']!r:.40})" if r.get("id") else j, "qtypes",
                                f"expected a list of {len(conv) // 2} question types (strings), "
                                f"one per question/answer pair, got {qtypes!r:.60}")
            unknown = next((q for q in qtypes or [] if q not in qtypes_to), None)
            if unknown is not None:  # (was read as a conversation question, without a word)
                raise DataError(path, f"{j} (id {r['id']!r:.40})" if r.get("id") else j, "qtypes",
                                f"unknown question type {unknown!r:.40}: expected one of "
                                f"{', '.join(qtypes_to)}")
            types = [qtypes_to[q] for q in qtypes] if qtypes else []
            pairs = [(conv[i]["value"].replace("<image>", "").strip(), conv[i + 1]["value"].strip(),
                      kind or (types[i // 2] if types else "conversation"))
                     for i in range(0, len(conv) - 1, 2)]
            image_pairs = pairs if r["image"] else []
            records.append({"image": r["image"], "conversations": conv, "pairs": image_pairs})
    return records


def build_examples(records, instructions, cfg):
    """Per image and instruction type: one VIG example and one VIC example (a random pair of that
    type, so the three types are near balanced), then --sft_share of plain SFT conversations.
    Returns the examples and how many VIG examples were left out: a pair whose question or answer
    holds 'Question:' or 'Answer:' (or whose question is empty) makes a VIG target that parse_vig
    cannot read back, so it would teach outputs the generation drops; it still makes VIC
    examples."""
    rng, out, unreadable = random.Random(cfg.seed), [], 0
    for r in records:
        by_type = {}
        for q, a, t in r["pairs"]:
            by_type.setdefault(t, []).append((q, a))
        for t, pairs in by_type.items():
            readable = [p for p in pairs if parse_vig(vig_target(*p)) == p]
            if readable:
                q, a = rng.choice(readable)
                instruction = rng.choice(instructions[t])
                out.append({"image": r["image"], "question": instruction, "prefix": "",
                            "target": vig_target(q, a)})
            else:
                unreadable += 1
            q, a = rng.choice(pairs)
            s = sentences(a) or [a]
            # answer so far: k sentences; target: rest
            k = rng.randrange(len(s)) if cfg.vic_mode == "ours" else 0
            # (from the start: the answer as written, its line breaks too, as VIGC learns it;
            # after k sentences, joined as generation writes them back)
            out.append({"image": r["image"], "question": q, "prefix": " ".join(s[:k]),
                        "target": " ".join(s[k:]) if k else a.strip()})
    n_sft = round(len(out) * cfg.sft_share / (1 - cfg.sft_share))
    sft_records = rng.choices(records, k=n_sft)
    out += [{"image": r["image"], "conversations": r["conversations"]} for r in sft_records]
    return out, unreadable


def make_item(e, tokenizer, mc, cfg, images):
    """A training example tokenized (None if it does not fit --max_len), with its image. Tokenized
    when drawn: a short run never touches most of the pool."""
    if "conversations" in e:
        t = tokenize_conversation(tokenizer, e["conversations"], mc.image_token_id,
                                  mc.num_image_tokens, cfg.max_len, cfg.template)
    else:
        t = encode(tokenizer, mc, e["question"], e["prefix"], e["target"], cfg.max_len,
                   cfg.template)
    if t is not None and e["image"]:
        t = dict(t, pixel_values=normalize(images.unit(e["image"])))
    return t


FIT_PART = 16384  # examples measured between two progress lines


def fitting(examples, tokenizer, mc, cfg, show=False):
    """Whether make_item keeps each example (it fits --max_len with an answer token left), the
    texts tokenized together in parts, with a progress line (one call each: 56 s for 66k LLaVA
    records' 138k examples without a word; 46 s together)."""
    ok, part = [], FIT_PART
    for at in common.progress(range(0, len(examples), part), enabled=show and len(examples) > part,
                              desc=f"measuring {len(examples)} examples, parts"):
        chunk = examples[at:at + part]
        convs = [e["conversations"] for e in chunk if "conversations" in e]
        jobs = [(e["question"], e["prefix"], e["target"]) for e in chunk
                if "conversations" not in e]
        of_convs = iter(tokenize_conversations(tokenizer, convs, mc.image_token_id,
                                               mc.num_image_tokens, cfg.max_len, cfg.template))
        of_jobs = iter(encode_many(tokenizer, mc, jobs, cfg.max_len, cfg.template))
        ok += [next(of_convs if "conversations" in e else of_jobs) is not None for e in chunk]
    return ok


def prompt(tokenizer, model, question, prefix, unit, cfg):
    """A generation prompt: `<image>\n{question}`, then 'ASSISTANT:' and the answer so far, with its
    image."""
    item = encode(tokenizer, model.config, question, prefix, None, 1 << 30, cfg.template)
    item["pixel_values"] = normalize(unit)
    return item


def correct(model, tokenizer, questions, units, cfg, generator=None):
    """VIC: answer each question one sentence at a time. Step k generates from 'q ASSISTANT: s_1 ..
    s_k-1' and keeps the first sentence s_k of what comes back; an item is done when the model ends
    right after that sentence (or says nothing), or after --max_correction_steps. Returns (answers,
    steps)."""
    kept, steps, active = [[] for _ in questions], [0] * len(questions), list(range(len(questions)))
    for step in range(cfg.max_correction_steps):
        if not active:
            break
        items = [prompt(tokenizer, model, questions[i], " ".join(kept[i]), units[i], cfg)
                 for i in active]
        texts, ended = common.generate_answers(model, tokenizer, items, cfg.gen_batch_size,
                                               cfg.max_new_tokens, cfg.vic_temperature,
                                               generator=generator, show=False,
                                               return_finished=True)
        still = []
        for i, text, finished in zip(active, texts, ended):
            steps[i] += 1
            s = sentences(text)
            if not s:
                continue  # EOS straight away: the answer so far is complete
            last = step == cfg.max_correction_steps - 1
            kept[i] += s if last and cfg.last_infer_all else s[:1]
            if not (finished and len(s) == 1):
                still.append(i)
        active = still
    return [" ".join(k) for k in kept], steps


def reference_decoding(cfg):
    """How --vic_mode reference decodes every call: beam search with LAVIS's generate defaults."""
    return dict(num_beams=cfg.num_beams, repetition_penalty=cfg.repetition_penalty)


def correct_reference(model, tokenizer, jobs, cfg):
    """VIC as VIGC's code runs it (llava_150k_gen.py, _update with gen_style 'vig'): step k
    continues the VIG turn 'Question: q Answer: a_1 .. a_k-1' of the job's own instruction by beam
    search and keeps the text up to the first '.' of the continuation (with no '.', nothing);
    exactly --answer_length steps, EOS or not. Returns (answers, steps)."""
    kept = ["" for _ in jobs]
    for _ in range(cfg.answer_length):
        items = []
        for j, a in zip(jobs, kept):
            so_far = f"{VIG_START} {j['q']} Answer: {a}".strip()
            items.append(prompt(tokenizer, model, j["instruction"], so_far, j["unit"], cfg))
        texts = common.generate_answers(model, tokenizer, items, cfg.gen_batch_size,
                                        cfg.max_new_tokens, show=False, **reference_decoding(cfg))
        kept = [f"{a} {text.split('.')[0].strip() + '.' if '.' in text else ''}".strip()
                for a, text in zip(kept, texts)]
    return kept, [cfg.answer_length] * len(jobs)


NAMES_IN_JSON = "the generated data names its images in UTF-8 JSON"


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_list(cfg):
    """(name written to the output, path) of the images to generate for: --images, a folder or one
    image (names absolute) or a file with one path a line (names as listed: relative to its folder
    or --image_folder, as the world's vigc_images.txt lists its unlabeled split)."""
    if os.path.isdir(cfg.images):
        # (not hidden files: a folder copied from a Mac holds a '._x.jpg' of metadata beside each
        # image, which stopped the run as an image that does not decode; nor a folder named so)
        files = [n for n in sorted(os.listdir(cfg.images)) if n.lower().endswith(IMAGE_EXTS)
                 and not n.startswith(".") and not os.path.isdir(os.path.join(cfg.images, n))]
        folder = cfg.images
    elif cfg.images.lower().endswith(IMAGE_EXTS) and os.path.isfile(cfg.images):
        # (one image: it was read as a list of names, "not UTF-8 text: byte 0x89 at offset 0")
        folder, files = os.path.dirname(cfg.images) or ".", [os.path.basename(cfg.images)]
    else:
        return listed_images(cfg)
    paths = [os.path.join(folder, n) for n in files]
    # (the absolute path goes into the JSON written, where sft.py refuses a byte that is not
    # UTF-8 as no text: the folder's path, the working directory's included, and each file
    # name are checked apart, so that the line blames the one to rename)
    folder = os.path.abspath(folder)
    if not common.is_utf8(folder):
        raise common.ConfigError(f"--images: {folder!r}: a folder on this path has a name "
                                 f"that is not UTF-8 ({NAMES_IN_JSON}): rename or move it")
    for n in files:
        if not common.is_utf8(n):
            raise common.ConfigError(f"--images: {os.path.join(folder, n)!r}: the file name "
                                     f"is not UTF-8 ({NAMES_IN_JSON}): rename it")
    return [(os.path.abspath(p), p) for p in paths]


def listed_images(cfg):
    """image_list of a file that names one image a line."""
    if not os.path.isfile(cfg.images):
        why = "not a folder or a file list (with your own --data, pass --images or --generate 0)"
        raise common.ConfigError(f"--images '{cfg.images}': {why}")
    if cfg.images.lower().endswith((".json", ".jsonl")):  # (each line was an image: '[', '{')
        raise common.ConfigError(f"--images '{cfg.images}': a JSON file; expected a folder of "
                                 "images, an image, or a text file naming one image a line")
    folder = cfg.image_folder or os.path.dirname(os.path.abspath(cfg.images))
    names = [ln.strip() for ln in read_text(cfg.images).splitlines() if ln.strip()]
    return [(n, os.path.join(folder, n)) for n in names]


def generate_data(model, tokenizer, cfg, imgs, instructions, oracle=False):
    """VIG then VIC for --generate images (cycling through the list); writes OUT/vigc_data.json (VIC
    answers), OUT/vig_only.json (VIG answers, same questions) and OUT/report.json, with the oracle's
    counts when the images are the world's. Returns the report."""
    # (on the model's device: torch.multinomial refuses a CPU generator for CUDA probabilities)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    t0, rng = time.time(), random.Random(cfg.seed + 1)
    cache = ImageCache(model.config.image_size)
    jobs = []
    for i in range(cfg.generate):
        name, path = imgs[i % len(imgs)]
        t = TYPES[rng.choice(cfg.gen_types)]
        drawn = rng.choice(instructions[t])  # (drawn in both modes: the same types follow)
        # VIGC's generation asks each type in one fixed phrasing (llava_150k_gen.py's
        # VIG_INSTRUCTIONS): the type's first, for --vic_mode reference
        instruction = instructions[t][0] if cfg.vic_mode == "reference" else drawn
        jobs.append({"id": f"vigc_{i:06d}", "image": name, "type": t, "instruction": instruction,
                     "unit": cache.unit(path)})
    # The answer is started with its format marker "Question:" (given, as VIC is given the answer so
    # far): a marker is not content, and a tokenizer without a "▁Question" token (the Shapes one)
    # splits off a lone "▁" that the label mask counts as part of "ASSISTANT: " (as LLaVA's does),
    # so it is never learned.
    items = [prompt(tokenizer, model, j["instruction"], VIG_START, j["unit"], cfg) for j in jobs]
    # VIGC's valid_step: VIG is its first beam-search step; ours samples it
    how = reference_decoding(cfg) if cfg.vic_mode == "reference" else \
        dict(temperature=cfg.temperature, generator=gen)
    vig = common.generate_answers(model, tokenizer, items, cfg.gen_batch_size, cfg.max_new_tokens,
                                  show=False, **how)
    parsed = [parse_vig(f"{VIG_START} {text}") for text in vig]
    ok = [dict(j, q=qa[0], vig=qa[1]) for j, qa in zip(jobs, parsed) if qa]
    t_vig = time.time() - t0
    if cfg.vic_mode == "reference":
        answers, steps = correct_reference(model, tokenizer, ok, cfg)
    else:
        questions = [j["q"] for j in ok]
        units = [j["unit"] for j in ok]
        # (the same stream: at --vic_temperature > 0 VIC drew from torch's global one)
        answers, steps = correct(model, tokenizer, questions, units, cfg, gen)
    for j, a in zip(ok, answers):
        j["vic"] = a
    for name, key in (("vig_only.json", "vig"), ("vigc_data.json", "vic")):
        recs = [{"id": j["id"], "image": j["image"], "type": j["type"],
                 "conversations": [{"from": "human", "value": "<image>\n" + j["q"]},
                                   {"from": "gpt", "value": j[key]}]}
                for j in ok if j[key]]
        common.write_json(recs, os.path.join(cfg.out, name))
    n_empty = sum(not a for a in answers)
    # (the settings that made these files: a resumed run may have been given others than its
    # checkpoints record)
    made_with = {k: getattr(cfg, k) for k in ("seed", "vic_mode", *GEN_FIELDS)
                 if k not in UNREAD_BY_MODE[cfg.vic_mode]}
    report = {"generation": made_with, "vic_mode": cfg.vic_mode, "images": len(jobs),
              "parsed": len(ok),
              "dropped_unparsed": len(jobs) - len(ok), "dropped_empty_correction": n_empty,
              # (None: nothing parsed, so nothing was corrected)
              "correction_steps_per_answer": round(sum(steps) / len(steps), 2) if steps else None,
              "seconds": {"vig": round(t_vig, 1), "vic": round(time.time() - t0 - t_vig, 1)}}
    n_dropped = len(jobs) - len(ok)
    vic = (f"{report['correction_steps_per_answer']} steps per answer, {n_empty} empty answers "
           "dropped") if ok else "nothing to correct"
    print(f"VIG: {len(ok)}/{len(jobs)} outputs parse into a question and an answer "
          f"({n_dropped} dropped) | VIC: {vic} | {report['seconds']}")
    if not any(j["vic"] for j in ok):  # (exit 0 with '[]': sft.py --data refused it later)
        print("warning: no generated instruction was kept: vigc_data.json holds no records, "
              "which sft.py --data refuses (train VIGC longer, or generate with other settings)")
    if oracle:
        report.update(oracle_report(cfg.world, ok))
    # (whole or not at all: the lab takes a run whose report is there as done)
    common.write_json(report, os.path.join(cfg.out, "report.json"), indent=2)
    return report


def world_name(world, name):
    """An image's name in the world's annotations: relative to the world folder (a folder
    --images gives absolute names)."""
    return os.path.relpath(name, os.path.abspath(world)) if os.path.isabs(name) else name


def oracle_report(world, ok):
    """oracle.oracle on the VIG-only and the VIC answers to the same questions: hallucinated
    objects, attributes, relations and false negatives per 100 answers, plus three examples. The
    questions VIC answered with nothing (dropped from vigc_data.json) are left out of both sides:
    an empty answer counted as one without a hallucination, so VIC scored by deleting."""
    objs = shapes.load_world(world)["by_file"]
    emptied = sum(not j["vic"] for j in ok)
    ok = [j for j in ok if j["vic"]]
    out, res = {}, {}
    for key in ("vig", "vic"):
        res[key] = [oracle.oracle(j[key], objs[world_name(world, j["image"])]) for j in ok]

        # None where there is no answer to count (0.0 read as a model that never hallucinates)
        def per100(field, t=None):  # per 100 answers (of type t when given)
            rows = [r for j, r in zip(ok, res[key]) if t in (None, j["type"])]
            return round(100 * sum(r[field] for r in rows) / len(rows), 1) if rows else None
        n_ok = len(ok)
        with_any = sum(r["num_hallucinations"] > 0 for r in res[key])
        n_sentences = sum(len(sentences(j[key])) for j in ok)
        by_type = {t: per100("num_hallucinations", t) for t in TYPES.values()}
        out[key] = {"hallucinations_per_100": per100("num_hallucinations"),
                    "hallucinated_objects_per_100": per100("num_hallucinated_objects"),
                    "answers_with_hallucination": round(with_any / n_ok, 3) if ok else None,
                    "sentences_per_answer": round(n_sentences / n_ok, 2) if ok else None,
                    "hallucinations_per_100_by_type": by_type}
        r = out[key]
        label = "VIG only" if key == "vig" else "VIC"
        if not ok:
            print(f"{label:8s}: no answer parsed, nothing to count (report.json: null)")
            continue
        print(f"{label:8s}: {r['hallucinations_per_100']} hallucinations and "
              f"{r['hallucinated_objects_per_100']} hallucinated objects per 100 answers "
              f"({r['answers_with_hallucination']:.0%} of answers with any, "
              f"{r['sentences_per_answer']} sentences each) | "
              f"by type {r['hallucinations_per_100_by_type']}")
    out["samples"] = []
    for j, rv, rc in list(zip(ok, res["vig"], res["vic"]))[:3]:
        truth = shapes.describe(objs[world_name(world, j["image"])])
        sample = {"image": j["image"], "type": j["type"], "truth": truth, "question": j["q"]}
        sample.update(vig_answer=j["vig"], vig_errors=common.oracle_errors(rv))
        sample.update(vic_answer=j["vic"], vic_errors=common.oracle_errors(rc))
        out["samples"].append(sample)
    for s in out["samples"]:
        print(f"--- {s['image']} ({s['type']}); truth: {s['truth']}\n  Q: {s['question']}\n"
              f"  VIG: {s['vig_answer']}  errors {s['vig_errors']}\n"
              f"  VIC: {s['vic_answer']}  errors {s['vic_errors']}")
    return {"vig_only": out["vig"], "vic": out["vic"], "samples": out["samples"],
            "compared_answers": len(ok), "left_out_empty_correction": emptied}


# -------------------- main: the training loop (as sft.py), then generation on rank 0


def main(cfg):
    given = cfg  # (as given: '{world}' paths unresolved, for refuse_unread's defaults)
    reads = ("data", "tokenizer") if not cfg.init else ("data",)  # a fresh model reads a tokenizer
    cfg, named = common.world_paths(cfg, reads, companions=("instructions", "images"))
    if not 0 <= cfg.sft_share <= 0.99:  # (near 1, n / (1 - share) records would fill memory)
        raise common.ConfigError(f"--sft_share {cfg.sft_share}: must be in [0, 0.99]")
    if cfg.vic_mode not in ("ours", "reference") or cfg.num_beams < 1 or cfg.answer_length < 1:
        raise common.ConfigError(f"--vic_mode {cfg.vic_mode} (ours or reference), "
                                 f"--num_beams {cfg.num_beams} and "
                                 f"--answer_length {cfg.answer_length} (each >= 1)")
    # a decoding flag of the other --vic_mode changed from its default would go unread
    unread = UNREAD_BY_MODE[cfg.vic_mode]
    rundir.refuse_unread(cfg, unread, f"by --vic_mode {cfg.vic_mode} (README: VIGC's two modes); "
                         "drop it or change --vic_mode")
    if cfg.init and not os.path.exists(cfg.init):
        raise common.ConfigError(f"--init {cfg.init}: not found "
                                 "(train it first: python sft.py; a VIGC model: python vigc.py)")
    if cfg.max_steps == 0 and cfg.generate == 0:  # (--overwrite would move a run aside for it)
        raise common.ConfigError("--max_steps 0 and --generate 0: nothing to do (train, generate, "
                                 "or both)")
    rundir.refuse_unread_shared(given)
    if cfg.init:
        rundir.refuse_unread(given, ["model"], "with --init (the checkpoint's architecture); "
                             "drop it")
    if cfg.generate == 0:  # (nothing is generated)
        rundir.refuse_unread(given, [f for f in GEN_FIELDS if f != "generate"],
                             "with --generate 0 (nothing is generated); drop it")
    if cfg.max_steps == 0:  # (nothing is trained)
        rundir.refuse_unread(given, TRAIN_FIELDS, "with --max_steps 0 (nothing is trained); "
                             "drop it")
    distributed.check_world("vigc.py", cfg.fsdp, cfg.grad_accum, batch_size=cfg.batch_size)
    d = distributed.setup_dist(cfg.device, cfg.fsdp, flags=cfg)
    common.seed_everything(cfg.seed)
    rundir.claim_out(cfg, d, inits=[cfg.init])
    if named:  # rank 0 writes the Shapes world once (if missing), the others wait
        distributed.on_main_first(d, lambda: shapes.ensure_world(cfg.world, seed=cfg.world_seed))
    geometry, note = None, None
    if not cfg.init and named:  # a fresh model sees the world's images, one patch a cell
        world_params = shapes.load_params(cfg.world)
        geometry, note = common.world_geometry(world_params, cfg.model, cfg.world)
    # (--images checked before --data is read: LLaVA's 665k records and their images, decoded,
    # took minutes before a mistyped --images was named)
    if "images" in named and cfg.generate > 0 and not os.path.exists(cfg.images):
        # the world's own list, gone (deleted by hand): the advice for a user's --images misleads
        raise common.ConfigError(
            f"--images {cfg.images}: the world's list of unlabeled images is missing; shapes.py "
            f"writes it with the world: write the world again (python shapes.py --out "
            f"{cfg.world} --seed {cfg.world_seed} with the params in its world.json), or pass "
            "--images")
    imgs = image_list(cfg) if cfg.generate > 0 and d.main else []  # checked before any training
    if cfg.generate > 0 and d.main and not imgs:
        raise common.ConfigError(f"--images '{cfg.images}': no images found")
    if imgs:  # every image generation reads decodes, before any step
        # (the first --generate, cycled through: a COCO folder's 118k images were decoded, minutes,
        # for --generate 1000)
        image_records = [{"id": name, "image": path} for name, path in imgs[:cfg.generate]]
        # (not recorded: --generate and --images may change at --resume, GEN_FIELDS; recorded,
        # such a resume was refused as "other images")
        check_images(image_records, cfg.images, field="images", record=False)
    if imgs and "images" in named:  # the oracle counts the world's: each image must be one
        objects = shapes.load_world(cfg.world)["by_file"]
        for name, _ in imgs:
            if world_name(cfg.world, name) not in objects:
                raise common.ConfigError(f"--images {cfg.images}: {name} is not an image of the "
                                         f"world's annotations (the oracle counts those)")
    records = load_records(cfg, d)
    needed = {t for r in records for _, _, t in r["pairs"]}
    needed |= {TYPES[g] for g in cfg.gen_types} if cfg.generate else set()
    instructions = load_instructions(cfg.instructions, needed)
    # generation flags do not change the trained weights: free to change on --resume (the
    # checkpoints record those given; report.json those the data were made with)
    resume_path, state = (rundir.load_resume(cfg.out, cfg, free=GEN_FIELDS) if cfg.resume
                          else (None, None))
    # FSDP: built from --init as at the start, then the shards
    sharded = rundir.sharded_resume(resume_path, d)
    # (sharded: the frozen weights from the base the run was trained on, not a checkpoint
    # --init's run folder has grown since)
    init = rundir.trained_base(resume_path, cfg.init) if sharded and cfg.init else cfg.init
    load_from = init if sharded else resume_path or init
    rundir.note_template("--init", cfg.init, cfg.template)
    rundir.note_world("--init", cfg.init, cfg.world)
    tokenizer_dir, tokenizer_flag = common.tokenizer_source(given, cfg, load_from)
    model, tokenizer = common.load_model_and_tokenizer(load_from, cfg.model, cfg.vision_tower,
                                                       tokenizer_dir,
                                                       distributed.load_device(cfg, d),
                                                       geometry=geometry,
                                                       tokenizer_flag=tokenizer_flag,
                                                       dtype=common.base_dtype(cfg))
    if note and not load_from and d.main:  # (a resumed run's checkpoint holds it already)
        print(note)
    common.check_new_tokens(model, cfg, "max_new_tokens")
    if resume_path is None or sharded:  # (an --init with adapters: the policy it holds)
        rundir.fold_init_adapters(model)
    if cfg.lora_r > 0:
        if not sharded:
            # (its training ended: a run stopped while generating goes on as generation alone)
            common.refuse_merged_resume(resume_path, model, "vigc", " --max_steps 0 and its "
                                        "generation flags alone (no training flag: generation "
                                        "from its model)")
        if "vigc" not in model.adapters:
            model.add_adapter("vigc", cfg.lora_r, cfg.lora_alpha, 0.05)
        model.set_adapter("vigc")
        model.set_trainable(adapters=["vigc"], vision=cfg.train_vision,
                            projector=cfg.train_projector)
    else:
        model.set_trainable(vision=cfg.train_vision, projector=cfg.train_projector, language=True)
    bf16 = cfg.dtype == "bf16" and cfg.device == "cuda"
    if bf16 and not cfg.fsdp:  # (FSDP keeps fp32 master weights and computes in bf16)
        model.cast_base(torch.bfloat16, keep_trained=cfg.lora_r > 0)  # (full: pure bf16)
    model.gradient_checkpointing = cfg.grad_checkpoint
    if cfg.fsdp:
        distributed.shard_model(model, d, bf16=bf16)
    images = ImageCache(model.config.image_size)
    train, unreadable = build_examples(records, instructions, cfg)
    if unreadable and d.main:
        print(f"warning: {unreadable} VIG examples left out: every question/answer pair of that "
              "image and type holds 'Question:' or 'Answer:' (any case), so its VIG target could "
              "not be read back; their VIC examples are kept")
    if len(train) == 0:
        raise common.ConfigError(f"--data {cfg.data}: no training examples (no record has an "
                                 "image and a question/answer pair)")
    # examples that do not fit are left out here, said (drawn into batches and dropped there, a
    # step whose examples all were dropped trained on nothing and logged loss 0)
    kept = [e for e, ok in zip(train, fitting(train, tokenizer, model.config, cfg, d.main)) if ok]
    if not kept:
        raise common.ConfigError(f"--max_len {cfg.max_len}: none of the {len(train)} training "
                                 "examples fits; raise it")
    if len(kept) < len(train) and d.main:
        print(f"warning: {len(train) - len(kept)} of the {len(train)} training examples do not fit "
              f"--max_len {cfg.max_len} with an answer token left; they are left out")
    train = kept
    data_files = [p for p, _ in common.data_specs(cfg.data)] + [cfg.instructions]
    # (not --images: generation alone reads it, free at --resume, and report.json names it;
    # recorded with the data before 2026-12-06, another list at --resume was refused)
    rundir.start_writing(cfg, d, data_files, model, free_files=[cfg.images])
    opt = common.make_optimizer(model, cfg.lr, cfg.weight_decay)
    start = 0
    if state is not None:
        # (the final LoRA-merged checkpoint has no optimizer)
        rundir.restore(model, opt, resume_path, state, d)
        start = state["step"]
        if d.main:
            print(f"resumed from {resume_path} at step {start}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if d.main:
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in trainable)
        what = (f"{len(train)} training examples (VIG + VIC + {cfg.sft_share:.0%} SFT) from "
                f"{len(records)} records" if cfg.max_steps else "no training (--max_steps 0)")
        print(f"{what} | model {n_all / 1e6:.2f}M params, {n_train / 1e6:.2f}M trainable | "
              f"{d.world} process(es)")
    log = common.Logger(cfg.out, d.main)
    autocast = distributed.bf16_autocast(cfg)
    model.train()
    t0, tokens = time.time(), 0
    for step in range(start, cfg.max_steps):
        lr = common.cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio,
                              cfg.warmup_from_zero)
        common.set_lr(opt, lr)
        idx = common.batch_indices(step, len(train), cfg.batch_size, cfg.seed, d.rank, d.world)
        # (each fits: the pool was filtered above, and an example tokenizes the same each time)
        items = [make_item(train[i], tokenizer, model.config, cfg, images) for i in idx]
        n_local = sum(int((x["labels"] != IGNORE).sum()) for x in items)
        n_global = distributed.all_reduce_sum(torch.tensor(float(n_local)), d).clamp(min=1)
        loss_sum = torch.zeros((), device=d.device)  # (summed there: no wait on each backward)
        for chunk in [items[i::cfg.grad_accum] for i in range(cfg.grad_accum)]:
            if not chunk:
                continue
            batch = collate(chunk, tokenizer.pad_token_id)
            tokens += int(batch["attention_mask"].sum())  # (on the host, before the copy)
            batch = common.to_device(batch, d.device)
            with autocast:  # sft.py's loss: answer-token cross-entropy / global answer tokens
                h = model(batch["pixel_values"], batch["input_ids"], None, return_hidden=True)
                labels = batch["labels"][:, 1:]  # position t predicts token t + 1
                answer = labels != IGNORE
                logits = model.logits(h[:, :-1][answer]).float()
                loss = F.cross_entropy(logits, labels[answer], reduction="sum") / n_global
            loss.backward()
            loss_sum += loss.detach().float()
        loss_all, norm = common.optimizer_step(opt, trainable, d, step, cfg, loss_sum)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            dt = time.time() - t0
            grad_norm = norm if norm is not None else float("nan")
            log.log(done, loss=float(loss_all), lr=lr, grad_norm=grad_norm,
                    tok_per_s=round(tokens * d.world / max(dt, 1e-9)))
            t0, tokens = time.time(), 0
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            rundir.save_checkpoint(model, cfg.out, done, cfg, opt, tokenizer, d=d)
    if cfg.fsdp and (cfg.lora_r > 0 or cfg.generate > 0):  # the LoRA merge and generation need
        # the whole model: rank 0 gathers it, on the GPU only to generate, the optimizer let go
        # first (a full copy beside its state ran a 13B GPU out of memory)
        opt = None
        model = distributed.gather_full_model(model, d, d.device if cfg.generate > 0 else "cpu")
    if cfg.lora_r > 0 and model is not None:
        model.merge_adapter("vigc")  # generation and later stages use the merged weights
        if d.main and cfg.max_steps > start:
            rundir.save_checkpoint(model, cfg.out, cfg.max_steps, cfg, None, tokenizer)
    # the other ranks end here: generation is rank 0's alone (ranks waiting in a barrier behind
    # it timed out after 30 minutes, and torchrun then stopped rank 0 before it wrote its data)
    distributed.cleanup_dist()
    if cfg.fsdp and bf16 and cfg.generate > 0 and d.main:  # (gathered in fp32: decode as a run
        # without --fsdp does, on a bf16 base, a LoRA run's trained projector and tower in fp32)
        model.cast_base(torch.bfloat16)
        for part, trained in ((model.projector, cfg.train_projector),
                              (model.vision_tower, cfg.train_vision)):
            if cfg.lora_r > 0 and trained:
                part.float()
    if cfg.generate > 0 and d.main:
        generate_data(model, tokenizer, cfg, imgs, instructions, oracle="images" in named)


if __name__ == "__main__":
    cfg = common.parse_config(Config)
    with distributed.ending_process(), common.user_errors():
        main(cfg)
