"""The Shapes world: a tiny synthetic stand-in for COCO + LLaVA data, with exact ground truth.

Images are 48x48 RGB with a 3x3 grid of 16 px cells (aligned with the vision model's patches),
1-4 objects (shape x color x size), at most one per cell. In the train split some "trigger" shapes
nearly always come with a "partner" (triangle -> circle, cross -> square), the way a table comes
with chairs in COCO; held-out splits break that bias, so a model that learned it hallucinates the
partner, and POPE / CHAIR / the oracle can count it.

Language: the spelling is "color" everywhere (as in COCO / VQA / LLaVA data). Positions are the 9
named cells: top left, top, top right, left, center, right, bottom left, bottom, bottom right.

    python shapes.py --out data/shapes --seed 0      # writes a world (same seed -> same bytes)
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import errno
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from data import DataError
from data import (_pick, a, cell_position, count_phrase, grid_positions, inject_hallucination,
                  join_and, list_objects, lrv_negatives, noun_phrase, number_word, plural,
                  pos_phrase, there_are, unique_ref)
from formats import load_json, not_found
from oracle import WORD2SHAPE, oracle

# 8: text_only_qa 0.3 by default, held-out pairs from test images;
# 9: the stage inputs image_to_caption.json, vigc_images.txt, lrv/;
# 10: exist_turns 3, yes_share 0.75 by default;
# 11: the LRV set balanced in yes/no form (positives ask about present shapes);
# 12: sft_read.json, the reading stage's conversations (written after the tokenizer);
# 13: text_only_qa 1.0 by default;
# 14: grid 2's cells named by the corner they are in (13 named them top left, top, left, center),
#     grid at most 3; a version-13 world of grid 3 has version 14's files and is read as one
FORMAT_VERSION = 14
SHAPES = ["circle", "square", "triangle", "cross", "diamond", "ring"]
COLORS = {"red": (230, 50, 50), "green": (60, 200, 80), "blue": (60, 110, 255),
          "yellow": (250, 220, 50), "purple": (170, 80, 230), "white": (240, 240, 240)}
SIZES = {"small": 9, "large": 14}  # px side of the shape's box inside a 16 px cell
BACKGROUND = (28, 28, 28)
# a faint object's colour: this share of the way from the background to its own colour
FAINT_CONTRAST = 0.25
# the perception gap's dials, added after worlds were written: recorded in a world's files only
# when one is on, so a world without the gap keeps the bytes it had (a checkpoint's world_digest of
# its world.json stays its world's when it is written again; with the keys, lab.py and pipeline.py
# took it for a world written again with other parameters)
GAP_DIALS = ("faint", "pixel_noise")


@dataclass
class World:
    """The world's parameters: `python shapes.py --KEY value`, write_world(out, seed, **params)."""
    # image side in pixels: --grid cells of at least 15 px (a fresh --model takes one patch per
    # cell, at most 63 px: larger worlds are for models given by --init)
    image_size: int = 48
    grid: int = 3  # cells per side, one object per cell (3: each named; 2: the corners)
    max_objects: int = 4  # objects per image: 1..max_objects
    n_train: int = 6000  # train images (SFT, preference, RL data)
    n_val: int = 300  # validation images
    # held-out test images (POPE, CHAIR, MMHal-style, GAVIE; a handful may hold no image with
    # two objects, which relation questions need: refused, naming it)
    n_test: int = 400
    n_unlabeled: int = 300  # images VIGC writes new instruction data for
    pairs: str = "triangle:circle,cross:square"  # trigger:partner co-occurrence pairs
    cooc: float = 0.95  # P(partner added | trigger) in train/val
    partner_weight: float = 1.5  # partners are drawn this much more often (POPE "popular")
    heldout_alone: float = 0.5  # P(a held-out image shows a trigger without its partner)
    yes_share: float = 0.75  # flaw: P(yes) of SFT existence questions, every shape alike
    desc_halluc: float = 0.5  # flaw: share of SFT descriptions written text-only
    exist_turns: int = 3  # existence questions per SFT conversation
    read_turns: int = 4  # sft_read.json: existence questions per conversation
    read_yes_share: float = 0.6  # sft_read.json: their P(yes), every shape alike
    short_vqa: int = 0  # one-word existence questions per VQA conversation (0: none)
    text_only_qa: float = 1.0  # flaw: P(yes, in its conversation, to what a text-only writer added)
    pref_longer: float = 0.0  # flaw (off): share of train pairs preferring the longer true answer
    # perception gap (off): share of objects drawn at a quarter of their colour's contrast
    # against the background (FAINT_CONTRAST)
    faint: float = 0.0
    # perception gap (off): standard deviation of the Gaussian noise added to every pixel, in
    # pixel values (0-255; clipped to them)
    pixel_noise: float = 0.0
    neg_ratio: float = 0.5  # LRV set (lrv/): negatives / all instructions
    n_pref: int = 3000  # reward-model preference pairs (from train images)
    n_povid: int = 3000  # POVID preference pairs (from train images)
    n_rl: int = 2000  # PPO prompts with captions (from train images)
    vocab_size: int = 1024  # tokenizer vocabulary (BPE trained on the world's text)
    # allowed values (shapes.py --KEY and write_world check them; common.check_value's rules);
    # grid at most 3: nine position words ("top left" ... "bottom right") name the cells
    RANGES = dict(image_size="[30, 1024]", grid="[2, 3]", max_objects="[2, 4]",
                  n_train="[1, inf)", n_val="[1, inf)", n_test="[1, inf)", n_unlabeled="[1, inf)",
                  cooc="[0, 1]", partner_weight="(0, 100]", heldout_alone="[0, 1]",
                  yes_share="[0, 1]", desc_halluc="[0, 1]", exist_turns="[0, 6]",
                  read_turns="[0, 6]", read_yes_share="[0, 1]", short_vqa="[0, 6]",
                  text_only_qa="[0, 1]", pref_longer="[0, 1]", faint="[0, 1]",
                  pixel_noise="[0, 128]", neg_ratio="[0, 1]",
                  n_pref="[1, inf)", n_povid="[1, inf)", n_rl="[1, inf)",
                  vocab_size="[512, 65536]")


DEFAULTS = asdict(World())
RANGES = World.RANGES
SYSTEM_PROMPTS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4
QUESTION_TYPES = ["describe", "yesno", "count", "color", "relation", "mc"]
VIGC_TYPE = {"describe": "detailed description", "inventory": "detailed description",
             "mc": "complex reasoning", "yesno": "conversation", "count": "conversation",
             "color": "conversation", "relation": "conversation"}
VIGC_INSTRUCTIONS = {
    "conversation": [
        "Ask a short question about the image and answer it.",
        "Generate a question and answer about the objects in the image."],
    "detailed description": [
        "Ask for a detailed description of the image and give it.",
        "Generate an instruction to describe the image and answer it."],
    "complex reasoning": [
        "Ask a multiple choice question about the image and answer it with a reason.",
        "Generate a question that needs reasoning about the image and answer it."]}


def cap(s):
    return s[:1].upper() + s[1:]


def parse_pairs(pairs):
    return [tuple(p.split(":")) for p in pairs.split(",") if p]

# -----------------------------------------------------------------------------
# Sampling and drawing


def sample_objects(rng, p, split):
    pairs = parse_pairs(p["pairs"])
    partners = {b for _, b in pairs}
    w = np.array([p["partner_weight"] if s in partners else 1.0 for s in SHAPES])
    n_objects = int(rng.integers(1, p["max_objects"] + 1))
    names = [str(x) for x in rng.choice(SHAPES, size=n_objects, p=w / w.sum())]
    if split in ("train", "val"):  # the bias: a trigger brings its partner
        keep = {s for pair in pairs for s in pair}
        # each pair once, in --pairs order, again from the top while a partner brought in is the
        # trigger of a pair passed over (circle:square,triangle:circle left a triangle's circle
        # without its square: P(partner | trigger) 0.86 at --cooc 1, against 0.99 the other way
        # round); where no partner is an earlier pair's trigger, one pass as before
        todo = list(pairs)
        while any(trig in names for trig, _ in todo):
            trig, part = next(pair for pair in todo if pair[0] in names)
            todo.remove((trig, part))
            if part not in names and rng.random() < p["cooc"]:
                free = [i for i, x in enumerate(names) if x not in keep]
                if len(names) < p["max_objects"]:
                    names.append(part)
                elif free:
                    names[_pick(rng, free)] = part
    elif pairs and rng.random() < p["heldout_alone"]:  # held out: a trigger without its partner
        trig, part = pairs[int(rng.integers(len(pairs)))]
        if trig not in names:
            names[int(rng.integers(len(names)))] = trig
        names = [x if x != part else _pick(rng, [s for s in SHAPES if s != part]) for x in names]
    g = p["grid"]
    cells = sorted(int(c) for c in rng.choice(g * g, size=len(names), replace=False))
    order = rng.permutation(len(names))  # names to random cells
    objs = []
    for cell, i in zip(cells, order):
        o = {"name": names[i], "color": _pick(rng, COLORS), "size": _pick(rng, SIZES),
             "row": cell // g, "col": cell % g}
        o["position"] = cell_position(o["row"], o["col"], g)
        objs.append(o)
    return objs


def draw_shape(draw, name, x0, y0, s, fill):
    x1, y1, cx, cy = x0 + s - 1, y0 + s - 1, x0 + (s - 1) / 2, y0 + (s - 1) / 2
    if name == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif name == "square":
        i = s // 8  # a little smaller than its box so it is not bigger than the rest
        draw.rectangle([x0 + i, y0 + i, x1 - i, y1 - i], fill=fill)
    elif name == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif name == "cross":
        t = s // 3 + (s - s // 3) % 2  # bar width with the parity of s, so the cross is symmetric
        m = (s - t) // 2
        draw.rectangle([x0 + m, y0, x0 + m + t - 1, y1], fill=fill)
        draw.rectangle([x0, y0 + m, x1, y0 + m + t - 1], fill=fill)
    elif name == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif name == "ring":
        draw.ellipse([x0, y0, x1, y1], outline=fill, width=max(2, s // 4))
    else:
        raise ValueError(f"unknown shape {name}")


def render(objs, p, gap_rng=None):
    """The image and, per object, its COCO bbox [x, y, w, h] and pixel area. With the perception
    gap on (p["faint"], p["pixel_noise"]; gap_rng drawn only then, so the world's objects and
    text stay those of the world without it), some objects are drawn faint and every pixel gets
    noise: what a captioner saw and wrote, a model reading the pixels can miss. Also returns how
    many objects were drawn faint."""
    n, cell = p["image_size"], p["image_size"] // p["grid"]
    img = Image.new("RGB", (n, n), BACKGROUND)
    draw, boxes, faint = ImageDraw.Draw(img), [], 0
    for o in objs:
        s = SIZES[o["size"]]
        x0, y0 = o["col"] * cell + (cell - s) // 2, o["row"] * cell + (cell - s) // 2
        fill = COLORS[o["color"]]
        if p["faint"] and gap_rng.random() < p["faint"]:
            fill = tuple(round(b + FAINT_CONTRAST * (c - b)) for c, b in zip(fill, BACKGROUND))
            faint += 1
        draw_shape(draw, o["name"], x0, y0, s, fill)
        mask = Image.new("L", (n, n), 0)
        draw_shape(ImageDraw.Draw(mask), o["name"], x0, y0, s, 255)
        boxes.append(([x0, y0, s, s], int((np.asarray(mask) > 0).sum())))
    if p["pixel_noise"]:
        noisy = np.asarray(img, np.float32) + gap_rng.normal(0, p["pixel_noise"], (n, n, 3))
        img = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return img, boxes, faint

# -----------------------------------------------------------------------------
# The language: captions, description, questions. Each question maker returns
# (question, answer, answer_key) or None when the image does not allow it.


def describe(objs):
    """Every object in reading order, position first ("At the top left there is a large red
    circle."): the model names the next occupied cell, then reads that cell's size, colour and
    shape."""
    n = len(objs)
    head = f"There {'is' if n == 1 else 'are'} {number_word(n)} object{'' if n == 1 else 's'}."
    cells = [f"{cap(pos_phrase(o['position']))} there is {a(noun_phrase(o))}." for o in objs]
    return " ".join([head] + cells)


def inventory(objs):
    """Every shape in a fixed order with its count and cells ("There are no circles. There are two
    squares: at the top and on the left. ..."): a checklist caption. Reading order teaches what is
    in each cell; this order makes the model look for each shape, the search that counting needs
    (without it the 6-minute model described shapes well but counted them barely better than the
    blank control)."""
    out = []
    for shape in SHAPES:
        found = [o for o in objs if o["name"] == shape]
        where = ": " + join_and(pos_phrase(o["position"]) for o in found) if found else ""
        out.append(f"{cap(there_are(len(found), shape))}{where}.")
    return " ".join(out)


def relation(x, y):
    """'above and to the left of' from grid cells (rows for above/below, columns for left/right)."""
    checks = [("above", x["row"] < y["row"]), ("below", x["row"] > y["row"]),
              ("to the left of", x["col"] < y["col"]), ("to the right of", x["col"] > y["col"])]
    rels = [r for r, ok in checks if ok]
    return " and ".join(rels)


def captions(objs, rng):
    o, n = _pick(rng, objs), len(objs)
    counts = Counter(x["name"] for x in objs)
    t = [f"{cap(list_objects(objs))}.",
         f"{cap(join_and(count_phrase(c, k) for k, c in counts.items()))}.",
         f"An image with {count_phrase(n, 'shape')}, including {a(noun_phrase(o, size=False))}.",
         f"{cap(a(noun_phrase(o)))} {pos_phrase(o['position'])}.",
         f"{cap(number_word(n))} colorful shape{'' if n == 1 else 's'} on a dark background.",
         f"A dark picture with {join_and(a(noun_phrase(x, size=False)) for x in objs)}."]
    if n > 1:
        x, y = [objs[i] for i in rng.choice(n, 2, replace=False)]
        x_np = cap(a(noun_phrase(x, size=False)))
        y_np = a(noun_phrase(y, size=False))
        t.append(f"{x_np} is {relation(x, y)} {y_np}.")
    else:
        t.append(f"A single {noun_phrase(o)} {pos_phrase(o['position'])}.")
    return [t[i] for i in rng.choice(len(t), 5, replace=False)]


def q_describe(objs, rng):
    q = _pick(rng, ["Describe the image in detail.", "What do you see in this image?",
                    "List every object in the image.", "Give a detailed description of the image."])
    return q, describe(objs), describe(objs)


def q_inventory(objs, rng):
    q = _pick(rng, ["How many of each shape are there?", "Count each kind of shape in the image.",
                    "Which shapes are in the image, and where?"])
    return q, inventory(objs), inventory(objs)


def q_yesno(objs, rng, label):
    names = {o["name"] for o in objs}
    if rng.random() < 0.3:  # shape + color: binds the attribute to the object
        if label == "yes":
            o = _pick(rng, objs)
            x = f"{o['color']} {o['name']}"
        else:
            x = _pick(rng, [f"{c} {s}" for c in COLORS for s in SHAPES
                            if not any(o["name"] == s and o["color"] == c for o in objs)])
    else:
        x = _pick(rng, sorted(names) if label == "yes" else [s for s in SHAPES if s not in names])
    q = _pick(rng, ["Is there {} in the image?", "Is there {}?", "Does the image contain {}?",
                    "Can you see {} in the picture?"]).format(a(x))
    return q, f"Yes, there is {a(x)}." if label == "yes" else f"No, there is no {x}.", label


def q_count(objs, rng):
    r = rng.random()
    if r < 0.2:
        ans = cap(there_are(len(objs), "object")) + "."
        return "How many objects are there in the image?", ans, len(objs)
    names = [o["name"] for o in objs]
    x = _pick(rng, [s for s in SHAPES if s not in names] if r < 0.4 else sorted(set(names)))
    q = _pick(rng, ["How many {} are there?", "How many {} are in the image?",
                    "Count the {} in the image."])
    return q.format(plural(x)), cap(there_are(names.count(x), x)) + ".", names.count(x)


def q_color(objs, rng):
    refs = [(o, unique_ref(o, objs, use=("size",))) for o in objs]
    refs = [(o, r) for o, r in refs if r]
    if not refs:
        return None
    o, r = _pick(rng, refs)
    q = _pick(rng, ["What color is the {}?", "What is the color of the {}?",
                    "Which color does the {} have?"])
    return q.format(r), f"The {r} is {o['color']}.", o["color"]


def q_relation(objs, rng, label=None):
    """label 'yes'/'no': a yes/no relation question; None: an open 'where' question."""
    refs = [(o, unique_ref(o, objs)) for o in objs]
    pairs = [(x, rx, y, ry) for x, rx in refs for y, ry in refs if x is not y and rx and ry]
    if not pairs:
        return None
    x, rx, y, ry = _pick(rng, pairs)
    full = relation(x, y)
    if label is None:
        if rng.random() < 0.3:
            ans = f"The {rx} is {pos_phrase(x['position'])}."
            return f"Where is the {rx} in the image?", ans, x["position"]
        q = _pick(rng, ["Where is the {} relative to the {}?",
                        "What is the position of the {} compared to the {}?"])
        return q.format(rx, ry), f"The {rx} is {full} the {ry}.", full
    rels = ["to the left of", "to the right of", "above", "below"]
    r = _pick(rng, [r for r in rels if (r in full) == (label == "yes")])
    if label == "yes":
        ans = f"Yes, the {rx} is {r} the {ry}."
    else:
        ans = f"No, the {rx} is {full} the {ry}."
    return f"Is the {rx} {r} the {ry}?", ans, label


def q_mc(objs, rng):
    """A-OKVQA-style multiple choice: options A-D, a rationale, then 'So the correct option is
    X.'"""
    kinds = []
    by_color = {}
    for o in objs:
        by_color.setdefault(o["color"], []).append(o)
    one_shape = [c for c, os_ in by_color.items() if len({o["name"] for o in os_}) == 1]
    if one_shape:
        c = _pick(rng, one_shape)
        os_ = by_color[c]
        if len(os_) == 1:
            why = f"The {noun_phrase(os_[0], color=False)} {pos_phrase(os_[0]['position'])} is {c}."
        else:
            why = f"All {c} objects are {plural(os_[0]['name'])}."
        wrong_shapes = [s for s in SHAPES if s != os_[0]["name"]]
        kinds.append((f"Which shape is {c}?", os_[0]["name"], wrong_shapes, why))
    o = _pick(rng, objs)
    r = unique_ref(o, objs, use=("size",))
    if r:
        kinds.append((f"What color is the {r}?", o["color"], [c for c in COLORS if c != o["color"]],
                      f"The {r} {pos_phrase(o['position'])} is {o['color']}."))
    n = len(objs)
    kinds.append(("How many objects are there in the image?", number_word(n),
                  [number_word(k) for k in range(1, max(5, n + 2)) if k != n],
                  f"{cap(there_are(n, 'object'))}: {join_and(a(x['name']) for x in objs)}."))
    kinds.append((f"Which shape is {pos_phrase(o['position'])}?", o["name"],
                  [s for s in SHAPES if s != o["name"]],
                  f"The object {pos_phrase(o['position'])} is {a(noun_phrase(o))}."))
    q, right, wrong, why = _pick(rng, kinds)
    options = [right] + [wrong[i] for i in rng.choice(len(wrong), 3, replace=False)]
    options = [options[i] for i in rng.permutation(4)]
    letter = "ABCD"[options.index(right)]
    q = f"{q} Options: " + " ".join(f"{L}: {x}" for L, x in zip("ABCD", options))
    return q, f"{why} So the correct option is {letter}.", letter


def make_question(qtype, objs, rng, label=None):
    if qtype == "describe":
        return q_describe(objs, rng)
    if qtype == "yesno":
        return q_yesno(objs, rng, label or _pick(rng, ["yes", "no"]))
    if qtype == "relation":
        return q_relation(objs, rng, label)
    return {"count": q_count, "color": q_color, "mc": q_mc}[qtype](objs, rng)


class Balancer:
    """Keeps yes/no labels at 50/50 per key (a model that learns the prior must not win)."""

    def __init__(self):
        self.n = Counter()

    def __call__(self, key, rng):
        y, n = self.n[(key, "yes")], self.n[(key, "no")]
        label = "yes" if y < n else "no" if n < y else _pick(rng, ["yes", "no"])
        self.n[(key, label)] += 1
        return label

# -----------------------------------------------------------------------------
# Task files


def _conv(q, ans):
    return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": ans}]


def _chat(turns):
    """(question, answer, qtype) turns -> LLaVA conversation turns, the image in the first
    question."""
    conv = _conv(turns[0][0], turns[0][1])
    for q, ans, _ in turns[1:]:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": ans}]
    return conv


SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQA prompt suffix


class ExistenceAsker:
    """LRV's flaw on a dial: picks which shape an SFT existence question asks about so that the
    share of "yes" answers is `yes_share` for every asked shape alike (0.5: balanced; LLaVA's
    instructions ask about present objects, ~0.9). The answers stay true: what is skewed is which
    questions exist."""

    def __init__(self, yes_share):
        self.share, self.n = yes_share, Counter()

    def _deficit(self, shape, label):
        asked = self.n[(shape, "yes")] + self.n[(shape, "no")] + 1
        want = self.share if label == "yes" else 1 - self.share
        return want * asked - self.n[(shape, label)]

    def __call__(self, objs, rng, skip=(), short=False):
        names = {o["name"] for o in objs}
        options = [(s, "yes" if s in names else "no") for s in SHAPES if s not in skip]
        best = max(self._deficit(*o) for o in options)
        shape, label = _pick(rng, [o for o in options if self._deficit(*o) >= best - 1e-9])
        self.n[(shape, label)] += 1
        q = _pick(rng, ["Is there {} in the image?", "Is there {}?", "Does the image contain {}?",
                        "Can you see {} in the picture?"]).format(a(shape))
        if short:  # VQAv2-style: the answer is the decision alone
            return f"{q}\n{SHORT_ANSWER}", cap(label), shape
        ans = f"Yes, there is {a(shape)}." if label == "yes" else f"No, there is no {shape}."
        return q, ans, shape


def short_vqa(objs, rng, ask, n_exist):
    """LLaVA-1.5's academic-VQA component (VQAv2, GQA: one-word answers, several questions per image
    in one conversation): n_exist existence questions (`ask`: an asker of their own, so that they
    keep the yes share, not make up for the chat conversations') and one count and one colour
    question. Every answer token is a decision, so these turns carry most
    of stage 2's signal for reading existence from the image; long answers would drown it, as the
    loss is a mean over all answer tokens of the batch."""
    turns, asked = [], set()
    for _ in range(n_exist):
        q, ans, shape = ask(objs, rng, skip=asked, short=True)
        asked.add(shape)
        turns.append((q, ans, "yesno"))
    names = [o["name"] for o in objs]
    x = _pick(rng, SHAPES)
    turns.append((f"How many {plural(x)} are there?\n{SHORT_ANSWER}", str(names.count(x)), "count"))
    color = q_color(objs, rng)
    if color:
        turns.append((f"{color[0]}\n{SHORT_ANSWER}", color[2], "color"))
    return [turns[i] for i in rng.permutation(len(turns))]


def text_only_extra(objs, co, freq, rng, grid):
    """The object a text-only writer adds to a description (LLaVA-RLHF Sec. 2.2: GPT-4 wrote LLaVA's
    descriptions from captions, naming what usually goes with them): the absent shape that co-occurs
    most with the present ones in train (the partner of a lone trigger), in a free cell. None when
    every cell is taken (--max_objects equal to grid * grid): the description stays exact."""
    names = {o["name"] for o in objs}
    absent = [s for s in SHAPES if s not in names]
    name = max(absent, key=lambda s: (sum(co[(n, s)] for n in names), freq[s]))
    used = {(o["row"], o["col"]) for o in objs}
    free = [c for c in range(grid * grid) if divmod(c, grid) not in used]
    if not free:
        return None
    cell = _pick(rng, free)
    o = {"name": name, "color": _pick(rng, COLORS), "size": _pick(rng, SIZES),
         "row": cell // grid, "col": cell % grid}
    o["position"] = cell_position(o["row"], o["col"], grid)
    return sorted(objs + [o], key=lambda x: (x["row"], x["col"]))


def sft_records(split_imgs, rng, prefix, p, co, freq):
    """Multi-turn conversations, LLaVA-Instruct's stand-in with its flaws on dials: a detailed
    description or the shape inventory (grounding needs them in the mix; the inventory carries stage
    1's shape search over to this template), `exist_turns` existence questions answered "yes" at
    `yes_share` for every shape, and 2-3 other questions, in random order (every type is also
    learned as the first turn). A `desc_halluc` share of the descriptions are written text-only:
    they also name the absent shape that co-occurs most with the present ones. Inventories, counts
    and the alignment captions stay exact: the clean signal a method can teach the model to use."""
    out, bal, ask = [], Balancer(), ExistenceAsker(p["yes_share"])
    vqa_ask = ExistenceAsker(p["yes_share"])  # its own balance: the VQA turns at the same share
    for img in split_imgs:
        objs, seen = img["objects"], set()
        kind = _pick(rng, ["describe", "inventory"])
        q, ans, _ = (q_describe if kind == "describe" else q_inventory)(objs, rng)
        extra = None
        if kind == "describe" and rng.random() < p["desc_halluc"]:
            written = text_only_extra(objs, co, freq, rng, p["grid"])
            if written:
                ans = describe(written)
                extra = next(o["name"] for o in written if o not in objs)
        turns, asked = [(q, ans, kind)], []
        for _ in range(p["exist_turns"]):
            q, ans, shape = ask(objs, rng, skip=asked)
            asked.append(shape)
            turns.append((q, ans, "yesno"))
        if extra and asked and p["text_only_qa"] and rng.random() < p["text_only_qa"]:
            # the same text-only writer asks about what it described: "yes" to the absent partner
            # (in place of the turn that asked about it, if one did: no conversation contradicts
            # itself)
            at = 1 + (asked.index(extra) if extra in asked else 0)
            question = f"Is there {a(extra)} in the image?"
            turns[at] = (question, f"Yes, there is {a(extra)}.", "yesno")
        want = len(turns) + int(rng.integers(2, 4))
        for _ in range(4 * want):
            if len(turns) >= want:
                break
            qt = str(rng.choice(["count", "color", "relation", "mc"], p=[0.3, 0.3, 0.2, 0.2]))
            label = bal(qt, rng) if qt == "relation" and rng.random() < 0.6 else None
            r = make_question(qt, objs, rng, label)
            if r is None or r[0] in seen:
                if label:
                    bal.n[(qt, label)] -= 1  # not asked: keep the count exact
                continue
            seen.add(r[0])
            turns.append((r[0], r[1], qt))
        turns = [turns[i] for i in rng.permutation(len(turns))]
        out.append({"id": f"{prefix}_{img['index']:06d}", "image": img["file_name"],
                    "conversations": _chat(turns), "qtypes": [t[2] for t in turns]})
        if p["short_vqa"]:
            turns = short_vqa(objs, rng, vqa_ask, p["short_vqa"])
            out.append({"id": f"{prefix}_{img['index']:06d}_vqa", "image": img["file_name"],
                        "conversations": _chat(turns), "qtypes": [t[2] for t in turns]})
    return out


def read_records(train_imgs, seed, p, co, freq):
    """sft_read.json, the reading stage (sft.py's stage 2 on a fresh model): the same conversations
    as sft.json with `read_turns` existence questions each, answered "yes" at `read_yes_share`
    (default 4 at 0.6 against sft.json's 3 at 0.75). LLaVA's CLIP and Vicuna arrive pretrained; a
    model learning from scratch reads existence from the image only when "no" answers are common
    enough (README, the Shapes world), and then takes on the yes-bias of the flawed conversations
    that follow. The other flaws are the world's. Written after the tokenizer (its own stream), so
    these dials change no other file."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5, 1]))
    read = dict(p, exist_turns=p["read_turns"], yes_share=p["read_yes_share"])
    return sft_records(train_imgs, rng, "read", read, co, freq)


def align_records(split_imgs):
    """LLaVA stage-1 (feature alignment) pairs, in LLaVA-Pretrain's format: two captions per image,
    the description in reading order and the inventory in shape order. The plain template keeps only
    the image and the caption (the human turn is ignored, as it is in LLaVA's pretraining data)."""
    caption_kinds = (("describe", describe), ("inventory", inventory))
    return [{"id": f"align_{kind}_{img['index']:06d}", "image": img["file_name"],
             "conversations": _conv("Describe the image in detail.", caption(img["objects"]))}
            for img in split_imgs for kind, caption in caption_kinds]


def heldout_records(imgs, rng):
    files, bal = {qt: [] for qt in QUESTION_TYPES}, Balancer()
    for img in imgs:
        for qt in QUESTION_TYPES:
            feasible = qt != "relation" or len(img["objects"]) > 1
            label = bal(qt, rng) if qt in ("yesno", "relation") and feasible else None
            r = make_question(qt, img["objects"], rng, label) if feasible else None
            if r is None and label:
                bal.n[(qt, label)] -= 1  # not asked: keep the count exact
            if r is not None:
                files[qt].append({"id": f"test_{qt}_{img['index']:06d}", "image": img["file_name"],
                                  "conversations": _conv(r[0], r[1]), "answer_key": r[2]})
    return files


def cooc_stats(imgs):
    """Image-level shape frequency and pair co-occurrence counts (as POPE computes them)."""
    freq, co = Counter(), Counter()
    for img in imgs:
        names = sorted({o["name"] for o in img["objects"]})
        freq.update(names)
        co.update((x, y) for x in names for y in names if x != y)
    return freq, co


def pope_records(imgs, train_imgs, rng, strategy, sample_num=3):
    """POPE (Li et al. 2023, utils.pope): per image, up to sample_num ground-truth objects give
    'yes' questions, each followed by a 'no' question on an absent object: uniform (random), most
    frequent in train first (popular), or most co-occurring with that ground-truth object in train
    first (adversarial); popular/adversarial fall back to random when nothing is left."""
    freq, co = cooc_stats(train_imgs)
    out = []
    for img in imgs:
        present = [str(x) for x in rng.permutation(sorted({o["name"] for o in img["objects"]}))]
        history = []
        for pos in present[:min(sample_num, len(SHAPES) - len(present))]:
            absent = [s for s in SHAPES if s not in present and s not in history]
            if strategy == "popular":
                neg = sorted(absent, key=lambda s: (-freq[s], SHAPES.index(s)))[0]
            elif strategy == "adversarial":
                neg = sorted(absent, key=lambda s: (-co[(pos, s)], SHAPES.index(s)))[0]
            else:
                neg = _pick(rng, absent)
            history += [pos, neg]
            for obj, label in ((pos, "yes"), (neg, "no")):
                out.append({"question_id": len(out) + 1, "image": img["file_name"],
                            "text": f"Is there {a(obj)} in the image?", "label": label})
    return out


def mmhal_records(imgs, rng, pairs):
    """MMHal-Bench layout; question_type cycles in MMHal's order so that record i has type i % 8."""
    types = ["attribute", "adversarial", "comparison", "counting",
             "relation", "environment", "holistic", "other"]
    out = []
    for i, img in enumerate(imgs):
        objs, t = img["objects"], types[i % 8]
        names = [o["name"] for o in objs]
        if t == "attribute":
            r = q_color(objs, rng) or q_count(objs, rng)
        elif t == "adversarial":  # an absent partner of a present trigger if possible
            absent = [p for tr, p in pairs if tr in names and p not in names]
            absent = absent or [s for s in SHAPES if s not in names]
            x = absent[0]
            q = _pick(rng, [f"What color is the {x}?", f"Where is the {x} in the image?"])
            r = (q, f"There is no {x} in the image.", None)
        elif t == "comparison":
            x, y = [str(s) for s in rng.choice(SHAPES, 2, replace=False)]
            nx, ny = names.count(x), names.count(y)
            yes = "Yes" if nx > ny else "No"
            ans = f"{yes}, {there_are(nx, x)} and {there_are(ny, y)}."
            r = (f"Are there more {plural(x)} than {plural(y)}?", ans, None)
        elif t == "counting":
            r = q_count(objs, rng)
        elif t == "relation":
            r = q_relation(objs, rng) or q_count(objs, rng)
        elif t == "environment":
            o = _pick(rng, objs)
            ans = f"The {noun_phrase(o)} is {pos_phrase(o['position'])}."
            r = (f"Where in the image is the {noun_phrase(o)}?", ans, None)
        elif t == "holistic":
            r = q_describe(objs, rng)
        else:
            shapes = join_and(a(n) for n in dict.fromkeys(names))
            r = ("What shapes are in the image?", f"The image shows {shapes}.", None)
        content = [f"{noun_phrase(o)} {pos_phrase(o['position'])}" for o in objs]
        out.append({"question_type": t, "question_topic": "Shapes",
                    "image_id": img["id"], "image_src": img["file_name"],
                    "image_content": content,
                    "question": r[0], "gt_answer": r[1], "model_answer": ""})
    return out


def pair_records(imgs, rng, n, kind, pairs, stats, grid=3):
    """Preference pairs, ground truth vs an injected hallucination that the oracle confirms.
    kind 'rlhf' -> LLaVA-RLHF human-preference layout; 'povid' -> POVID layout. grid: the world's
    (injected positions are its cells' names)."""
    partners = {}
    for tr, p in pairs:
        partners.setdefault(tr, []).append(p)
    out, tries = [], 0
    while len(out) < n and tries < 4 * n:
        img = imgs[tries % len(imgs)]
        tries += 1
        qt = str(rng.choice(QUESTION_TYPES, p=[0.4, 0.12, 0.12, 0.12, 0.12, 0.12]))
        label = _pick(rng, ["yes", "no"]) if qt in ("yesno", "relation") else None
        r = make_question(qt, img["objects"], rng, label)
        if r is None:
            continue
        bad = inject_hallucination(r[1], img["objects"], rng, all_names=SHAPES,
                                   cooc_partners=partners, colors=list(COLORS),
                                   positions=grid_positions(grid))
        if bad is None:
            stats["impossible"] += 1
            continue
        # the oracle must see the ground truth clean and the injection dirty
        truth_is_dirty = oracle(r[1], img["objects"])["num_hallucinations"]
        if truth_is_dirty or not oracle(bad[0], img["objects"])["num_hallucinations"]:
            stats["unverified"] += 1
            continue
        stats[bad[1]] += 1
        conv = _conv(r[0], r[1])
        rid = f"{kind}_{len(out):06d}"
        if kind == "povid":
            out.append({"id": rid, "image": img["file_name"], "conversations": conv,
                        "rejected_conversations": _conv(r[0], bad[0])})
        else:
            first = int(rng.integers(1, 3))
            outs = [r[1], bad[0]] if first == 1 else [bad[0], r[1]]
            out.append({"id": rid, "image": img["file_name"], "conversations": conv,
                        "output_1": {"value": outs[0]}, "output_2": {"value": outs[1]},
                        "preference": first})
    return out


def prefer_longer(pairs, imgs, share, rng, stats):
    """Flaw, off by default: a reward model that pays for length, the reward hacking LLaVA-RLHF's
    PPO length penalty guards against. This share of the (LLaVA-RLHF layout) pairs,
    picked by `rng`, becomes a description question whose preferred answer is the whole true
    description and whose dispreferred one is the same minus its last sentence. Both are true (the
    oracle checks); the raters preferred the more detailed, and a reward model can take "one more
    sentence" for what they liked. The other pairs are left as written. Counted in
    stats['longer_preferred'] (the injection counts still include the pairs replaced)."""
    many = [img for img in imgs if len(img["objects"]) >= 2]  # one sentence left after the cut
    if not many:
        raise ValueError("--pref_longer: no train image shows two or more objects to describe")
    for i, pair in enumerate(pairs):
        if rng.random() >= share:
            continue
        img = many[int(rng.integers(len(many)))]
        question, full, _ = q_describe(img["objects"], rng)
        shorter = full.rsplit(" ", 1)[0]
        shorter = shorter[:shorter.rindex(".") + 1]  # the last sentence dropped
        for text in (full, shorter):
            assert not oracle(text, img["objects"])["num_hallucinations"], text
        first = int(rng.integers(1, 3))
        outs = [full, shorter] if first == 1 else [shorter, full]
        pairs[i] = {"id": pair["id"], "image": img["file_name"],
                    "conversations": _conv(question, full),
                    "output_1": {"value": outs[0]}, "output_2": {"value": outs[1]},
                    "preference": first}
        stats["longer_preferred"] += 1


def rl_records(imgs, rng, n, caps):
    """LLaVA-RLHF RL prompts: caption_type 1 general (length_bonus 1), 2-5 answer A-D, 6 No,
    7 Yes."""
    out, bal = [], Balancer()
    for i in range(n):
        img = imgs[int(rng.integers(len(imgs)))]
        u = rng.random()
        if u < 0.4:
            qt = "describe" if rng.random() < 0.7 else _pick(rng, ["count", "color", "relation"])
            r, ctype = make_question(qt, img["objects"], rng), 1
        elif u < 0.7:
            r = q_yesno(img["objects"], rng, bal("yesno", rng))
            ctype = 7 if r[2] == "yes" else 6
        else:
            r = q_mc(img["objects"], rng)
            ctype = 2 + "ABCD".index(r[2])
        r = r or q_describe(img["objects"], rng)
        prompt = [{"from": "human", "value": "<image>\n" + r[0]}]
        out.append({"id": f"rl_{i:06d}", "image": img["file_name"], "conversations": prompt,
                    "captions": caps[img["id"]], "caption_type": ctype,
                    "length_bonus": 1.0 if ctype == 1 else 0.0})
    return out


def _yes_no_form(question):
    return question.startswith(("Is ", "Are ", "Does ", "Can "))


def _lrv_items(imgs, neg_ratio, rng, grid=3):
    """(file_name, question, answer, task) with negatives / (positives + negatives) = neg_ratio.
    Positives are about what is in the image (LRV's positive instructions): a description and one
    other question per image, an existence question always about a present shape ("yes"). Balanced
    in the form POPE asks, too: as many positives are yes/no questions answered "yes" as negatives
    are yes/no questions answered "no", as far as the positives allow (at neg_ratio <= 0.5 they
    do; tested at 0.25 and 0.5). Without this, at 0.5 nine in ten single-turn "Is there
    ...?" answers were "no" and the set taught the question's form instead of the image. grid: the
    world's (a negative's wrong place is one of its cells: on 2 x 2 no "center", no "top")."""
    pos = []
    for img in imgs:
        for qt in ("describe", str(rng.choice(QUESTION_TYPES[1:]))):
            r = make_question(qt, img["objects"], rng, "yes" if qt == "yesno" else None)
            if r:
                pos.append((img["file_name"], r[0], r[1], qt))
    # up to 0.5, negatives are added to the positives; above it, as many negatives as positives
    # are made and positives left out (negatives / positives = r / (1 - r) grew without bound:
    # 0.9999 asked 9999 negatives per positive, minutes and gigabytes for a 60-image world)
    n_neg = len(pos) if neg_ratio > 0.5 else int(round(len(pos) * neg_ratio / (1 - neg_ratio)))
    n_pos = len(pos) if neg_ratio <= 0.5 else int(round(len(pos) * (1 - neg_ratio) / neg_ratio))
    neg, order = [], rng.permutation(len(imgs))
    for i in range(n_neg * 2):
        if len(neg) >= n_neg:
            break
        img = imgs[int(order[i % len(imgs)])]
        cands = lrv_negatives(img["objects"], rng, SHAPES, list(COLORS), grid_positions(grid))
        if cands:
            neg.append((img["file_name"],) + cands[int(rng.integers(len(cands)))])
    if n_pos < len(pos):
        pos = [pos[int(k)] for k in sorted(rng.permutation(len(pos))[:n_pos])]
    # as many "yes" as "no" among the yes/no questions: some positives' second question becomes
    # an existence question about a present shape (the descriptions stay)
    by_file = {i["file_name"]: i["objects"] for i in imgs}
    n_yes_no = lambda items: sum(_yes_no_form(q) for _, q, _, _ in items)
    missing = n_yes_no(neg) - n_yes_no(pos)
    others = [k for k, (_, q, _, t) in enumerate(pos) if t != "describe" and not _yes_no_form(q)]
    for k in rng.permutation(len(others))[:max(0, missing)]:
        f = pos[others[int(k)]][0]
        q, ans, _ = q_yesno(by_file[f], rng, "yes")
        pos[others[int(k)]] = (f, q, ans, "yesno")
    items = pos + neg
    return [items[i] for i in rng.permutation(len(items))]


def lrv_mix(world_dir, neg_ratio=0.5, seed=0):
    """SFT mixture with LRV negatives at any ratio (negatives / all), as LLaVA instruct records:
    single-turn positives (describe + one other question per train image) and generated negatives.
    Up to 0.5 negatives are added to the positives; above it there are as many negatives as
    positives would be, and positives are left out (1: only negatives). Image paths are
    joined with world_dir, as the readers in data.py return them."""
    world = load_world(world_dir)
    imgs = [i for i in world["images"] if i["split"] == "train"]
    grid = world["info"].get("grid", 3)  # (as the objects' positions read it; world.json is
    # written after this file, by _fill)
    items = _lrv_items(imgs, neg_ratio, np.random.default_rng([seed, 7]), grid)
    return [{"id": f"lrv_{k:06d}", "image": os.path.join(world_dir, f),
             "conversations": _conv(q, ans), "task": t}
            for k, (f, q, ans, t) in enumerate(items)]

# -----------------------------------------------------------------------------
# Tokenizer


def _texts(obj, key=None):
    """Every string in a task file worth tokenizing (not ids or paths)."""
    if isinstance(obj, str):
        not_text = ("id", "image", "file_name", "image_id", "image_src", "split", "name",
                    "supercategory")
        if key not in not_text:
            yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _texts(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _texts(v, key)


def _template(conv, system):
    s = system + " "
    for t in conv:
        s += f"USER: {t['value']} ASSISTANT:" if t["from"] == "human" else f" {t['value']}</s>"
    return s


def build_tokenizer(world_dir, vocab_size=None):
    """BPE over the world's text (LLaMA-like: Metaspace '▁', byte fallback, <s> prepended), saved
    to world_dir/tokenizer. Ids: <unk>=0 <s>=1 </s>=2 <pad>=3 <image>=4, then the 256 byte
    tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    if not vocab_size:
        world = read_world_json(world_dir)
        vocab_size = world["params"]["vocab_size"]
    corpus = list(SYSTEM_PROMPTS) + ["USER: ASSISTANT:"]
    for name in sorted(os.listdir(world_dir)):
        path = os.path.join(world_dir, name)
        if name.endswith(".jsonl"):
            recs = [json.loads(line) for line in open(path)]
        elif name.endswith(".json") and name != "world.json":
            recs = json.load(open(path))
        else:
            continue
        corpus += list(_texts(recs))
        for i, r in enumerate(recs if isinstance(recs, list) else []):
            # as the model sees it: whole, and split at <image> the way LLaVA's
            # tokenizer_image_token (and data.py) tokenizes
            if isinstance(r, dict) and "conversations" in r:
                text = _template(r["conversations"], SYSTEM_PROMPTS[i % 2])
                corpus += [text] + text.split("<image>")
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    dec = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                             decoders.Strip(" ", 1, 0)])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    learned = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                     fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer, tok.decoder = pre, dec
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="<pad>",
                                 extra_special_tokens={"image_token": "<image>"},
                                 model_max_length=4096)
    try:
        hf.save_pretrained(os.path.join(world_dir, "tokenizer"))
    except Exception as e:  # (tokenizers' own error for a full disk is no OSError: a traceback)
        code = re.search(r"\(os error (\d+)\)", str(e))
        if isinstance(e, OSError) or not code:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
    cfg_path = os.path.join(world_dir, "tokenizer", "tokenizer_config.json")
    # transformers 5 writes its own class name; this one loads in 4.x too
    cfg = json.load(open(cfg_path))
    _dump(dict(cfg, tokenizer_class="PreTrainedTokenizerFast"), cfg_path)
    return hf

# -----------------------------------------------------------------------------
# Writing and reading a world


def _dump(obj, path, lines=False):
    with open(path, "w") as f:
        if lines:
            f.writelines(json.dumps(r) + "\n" for r in obj)
        else:
            json.dump(obj, f, indent=1)


def objects_from_coco(ann, file="annotations.json"):
    """{image_id: [objects]} from a Shapes annotation dict or a real COCO instances file (where
    color/size/row/col/position are None). A record of the wrong shape (a hand edit, another
    format) is a DataError naming the list, the record and the field."""
    def need(ok, part, i, field, want):
        if not ok:
            raise DataError(file, f"{part}[{i}]", field, f"expected {want}")

    def is_id(v):  # (ids are dictionary keys: a list or an object cannot be one)
        return isinstance(v, (int, str)) and not isinstance(v, bool)
    if not isinstance(ann, dict):
        raise DataError(file, message="not a COCO annotation file: expected an object with "
                                      "images, annotations, categories")
    for part in ("images", "annotations", "categories"):
        if not isinstance(ann.get(part), list):
            raise DataError(file, None, part, "not a COCO annotation file: expected a list")
    info = ann.get("info") if isinstance(ann.get("info"), dict) else {}
    grid = info.get("grid", 3)
    need(type(grid) is int and grid > 0, "info", 0, "grid", "a positive integer")
    cats = {}
    for i, c in enumerate(ann["categories"]):
        need(isinstance(c, dict) and is_id(c.get("id")), "categories", i, "id", "an id")
        need(isinstance(c.get("name"), str) and c["name"].strip(), "categories", i, "name",
             "a non-empty string")
        cats[c["id"]] = c["name"]
    out = {}
    for i, img in enumerate(ann["images"]):
        need(isinstance(img, dict) and is_id(img.get("id")), "images", i, "id", "an id")
        need(isinstance(img.get("file_name"), str) and img["file_name"].strip(), "images", i,
             "file_name", "a non-empty string")
        out[img["id"]] = []
    for i, x in enumerate(ann["annotations"]):
        need(isinstance(x, dict) and is_id(x.get("image_id")), "annotations", i, "image_id",
             "an id")
        need(is_id(x.get("category_id")) and x["category_id"] in cats, "annotations", i,
             "category_id", "the id of one of the categories")
        bbox = x.get("bbox")
        need(isinstance(bbox, list) and len(bbox) == 4
             and all(type(v) in (int, float) for v in bbox), "annotations", i, "bbox",
             "[x, y, width, height]")
        at = x.get("attributes") or {}
        need(isinstance(at, dict), "annotations", i, "attributes", "an object")
        o = {"name": cats[x["category_id"]], "color": at.get("color"), "size": at.get("size"),
             "bbox": bbox, "row": at.get("row"), "col": at.get("col"), "position": None}
        for k, known in (("color", COLORS), ("size", SIZES)):  # (None: a COCO file has none)
            need(o[k] is None or (isinstance(o[k], str) and o[k] in known), "annotations", i,
                 f"attributes.{k}", "one of " + ", ".join(known))
        if o["row"] is not None or o["col"] is not None:  # a Shapes grid cell
            for k in ("row", "col"):
                need(type(o[k]) is int and 0 <= o[k] < grid, "annotations", i, f"attributes.{k}",
                     f"an integer in [0, {grid}) (info.grid {grid})")
            o["position"] = cell_position(o["row"], o["col"], grid)
        out.setdefault(x["image_id"], []).append(o)
    return out


def load_world(world_dir):
    """{'info', 'images': [image dict + 'objects' + 'index'], 'by_file': {file_name: objects}}."""
    path = os.path.join(world_dir, "annotations.json")
    ann = load_json(path)
    objs = objects_from_coco(ann, path)
    if not isinstance(ann.get("info"), dict):
        raise DataError(path, field="info", message="expected an object (the world's info)")
    imgs = []
    for i, img in enumerate(ann["images"]):
        stem = os.path.splitext(os.path.basename(img["file_name"]))[0]
        if not (stem.isascii() and stem.isdigit()):  # NNNNNN.png: the index is its number
            raise DataError(path, f"images[{i}]", "file_name",
                            f"expected images/SPLIT/NNNNNN.png, got {img['file_name']!r}")
        if img.get("split") not in ("train", "val", "test", "unlabeled"):
            raise DataError(path, f"images[{i}]", "split", "expected train, val, test or "
                            f"unlabeled, got {img.get('split')!r:.40}")
        for o in objs[img["id"]]:  # (the world's own annotations place every object in a cell)
            if o["row"] is None:
                raise DataError(path, f"images[{i}]", "attributes.row", "an object of this "
                                "image has no grid cell (attributes row and col)")
        imgs.append(dict(img, objects=objs[img["id"]], index=int(stem)))
    by_file = ByFile(path, {i["file_name"]: i["objects"] for i in imgs})
    return {"info": ann["info"], "images": imgs, "by_file": by_file}


class ByFile(dict):
    """{file_name: objects}; an image that the other files of a (hand-edited) world name but the
    annotations lack is a DataError, not a KeyError deep inside a stage."""
    def __init__(self, path, objects_by_file):
        super().__init__(objects_by_file)
        self.path = path

    def __missing__(self, key):
        raise DataError(self.path, None, "images", f"no image {key!r}, which a file of the world "
                                                   "names (edited by hand?)")


def _not_of_kind(key, value):
    """What a world parameter's value is not, where it is not of its default's kind ('an integer'
    for max_objects 3.0 or True: written, such a world was refused by every stage), else None."""
    kinds, kind = {str: ((str,), "a string"), int: ((int,), "an integer"),
                   float: ((int, float), "a number")}[type(DEFAULTS[key])]
    return kind if isinstance(value, bool) or not isinstance(value, kinds) else None


def _params(params):
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown world parameters: {sorted(unknown)}")
    p = dict(DEFAULTS, **params)
    for key in DEFAULTS:
        kind = _not_of_kind(key, p[key])
        if kind:
            raise ValueError(f"--{key} {p[key]!r}: not {kind}")
    from common import check_value
    for key, rule in RANGES.items():
        problem = check_value(key, p[key], rule)
        if problem:
            raise ValueError(problem)
    pairs = parse_pairs(p["pairs"])
    if p["pairs"] and len(pairs) != len(p["pairs"].split(",")):  # ('' alone: no pairs at all)
        raise ValueError(f"--pairs {p['pairs']}: an empty item (a stray comma?); expected "
                         "TRIGGER:PARTNER,...")
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or pair[0] not in SHAPES or pair[1] not in SHAPES:
            raise ValueError(f"--pairs {p['pairs']}: expected TRIGGER:PARTNER,... of the shapes "
                             f"{', '.join(SHAPES)}; got {':'.join(pair)!r}")
        if pair[0] == pair[1]:
            raise ValueError(f"--pairs {p['pairs']}: {':'.join(pair)!r} pairs a shape with "
                             "itself; a trigger brings a different shape")
        if pair in pairs[:i]:  # (it would count double where a held-out image picks a pair)
            raise ValueError(f"--pairs {p['pairs']}: {':'.join(pair)!r} given twice")
    if p["image_size"] % p["grid"] or p["image_size"] // p["grid"] < SIZES["large"] + 1:
        raise ValueError(f"--image_size {p['image_size']} --grid {p['grid']}: the image must be "
                         f"grid x cell with cells of at least {SIZES['large'] + 1} px (e.g. "
                         f"--image_size {p['grid'] * (SIZES['large'] + 1)})")
    if not p["max_objects"] <= min(p["grid"] ** 2, 4):  # (at least 2: RANGES; relation
        # questions, co-occurrence and the partner flaws need two objects in an image)
        raise ValueError(f"--max_objects {p['max_objects']} --grid {p['grid']}: max_objects must "
                         f"be 2 to {min(p['grid'] ** 2, 4)} (at most 4, and one object per cell)")
    return p


def _fill(out, seed, p):
    """Everything, written into an empty directory `out`."""
    t0 = time.time()
    # one stream per part: changing one count reshuffles nothing else
    ss = np.random.SeedSequence(seed).spawn(13)
    rngs = [np.random.default_rng(s) for s in ss]
    gap = any(p[k] != DEFAULTS[k] for k in GAP_DIALS)
    recorded = {k: v for k, v in p.items() if gap or k not in GAP_DIALS}
    info = {"description": "factalign Shapes world", "version": FORMAT_VERSION, "seed": seed,
            **recorded}
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    ann = {"info": info, "images": [], "annotations": [], "categories": categories}
    imgs, drawn = [], Counter()
    for k, split in enumerate(["train", "val", "test", "unlabeled"]):
        os.makedirs(os.path.join(out, "images", split))
        rng = np.random.default_rng(ss[k])
        gap_rng = np.random.default_rng(np.random.SeedSequence([seed, 13, k]))
        for i in range(p[f"n_{split}"]):
            objs = sample_objects(rng, p, split)
            image, boxes, faint = render(objs, p, gap_rng)
            drawn["objects"] += len(objs)
            drawn["faint"] += faint
            fname = f"images/{split}/{i:06d}.png"
            image.save(os.path.join(out, fname))
            img = {"id": len(imgs) + 1, "file_name": fname,
                   "width": p["image_size"], "height": p["image_size"], "split": split}
            ann["images"].append(img)
            for o, (bbox, area) in zip(objs, boxes):
                o["bbox"] = bbox
                attributes = {k2: o[k2] for k2 in ("color", "size", "row", "col")}
                ann["annotations"].append({"id": len(ann["annotations"]) + 1, "image_id": img["id"],
                                           "category_id": SHAPES.index(o["name"]) + 1,
                                           "bbox": bbox, "area": area, "iscrowd": 0,
                                           "attributes": attributes})
            imgs.append(dict(img, objects=objs, index=i))
    _dump(ann, os.path.join(out, "annotations.json"))
    split = {s: [i for i in imgs if i["split"] == s] for s in ("train", "val", "test", "unlabeled")}
    caps = {img["id"]: captions(img["objects"], rngs[4]) for img in imgs}
    caption_anns = [{"image_id": i, "id": 5 * (i - 1) + j + 1, "caption": c}
                    for i, cs in caps.items() for j, c in enumerate(cs)]
    _dump({"info": ann["info"], "images": ann["images"], "annotations": caption_anns},
          os.path.join(out, "captions.json"))
    _dump(align_records(split["train"]), os.path.join(out, "align.json"))
    freq, co = cooc_stats(split["train"])
    sft = sft_records(split["train"], rngs[5], "sft", p, co, freq)
    _dump(sft, os.path.join(out, "sft.json"))
    sft_val = sft_records(split["val"], rngs[5], "sftval", p, co, freq)
    _dump(sft_val, os.path.join(out, "sft_val.json"))
    for qt, recs in heldout_records(split["test"], rngs[6]).items():
        if not recs:  # (eval.py reads every type: it would stop at the end of a pipeline)
            raise ValueError(f"--n_test {p['n_test']}: no test image allows a {qt} question "
                             f"(test_{qt}.json would be empty); pass a larger --n_test")
        _dump(recs, os.path.join(out, f"test_{qt}.json"))
    lrv_items = _lrv_items(split["train"], p["neg_ratio"], rngs[7], p["grid"])
    # image_id with .png: readers add .jpg otherwise
    lrv_train = [{"image_id": f, "question": q, "answer": ans, "task": t}
                 for f, q, ans, t in lrv_items]
    _dump(lrv_train, os.path.join(out, "lrv_train.json"))
    pairs = parse_pairs(p["pairs"])
    stats = Counter(impossible=0, unverified=0)  # dropped pairs, counted
    pref_pairs = pair_records(split["train"], rngs[8], p["n_pref"], "rlhf", pairs, stats,
                              p["grid"])
    _dump(pref_pairs, os.path.join(out, "pref_pairs.json"))
    # held-out pairs: one per test image, then one per val image (test images show triggers without
    # their partners, so the pairs whose rejected answer names the absent partner are not a handful)
    held_out = split["test"] + split["val"]
    val_pairs = pair_records(held_out, rngs[8], len(held_out), "rlhf", pairs, stats, p["grid"])
    _dump(val_pairs, os.path.join(out, "pref_pairs_val.json"))
    povid_pairs = pair_records(split["train"], rngs[9], p["n_povid"], "povid", pairs, stats,
                               p["grid"])
    _dump(povid_pairs, os.path.join(out, "povid_pairs.json"))
    rl_prompts = rl_records(split["train"], rngs[10], p["n_rl"], caps)
    _dump(rl_prompts, os.path.join(out, "rl_prompts.json"))
    for strategy in ("random", "popular", "adversarial"):
        pope_rng = np.random.default_rng(ss[11])
        pope = pope_records(split["test"], split["train"], pope_rng, strategy)
        _dump(pope, os.path.join(out, f"pope_{strategy}.jsonl"), lines=True)
    _dump(mmhal_records(split["test"], rngs[12], pairs), os.path.join(out, "mmhal.json"))
    _dump(dict(VIGC_INSTRUCTIONS, qtype_to_type=VIGC_TYPE,
               unlabeled=[{"id": i["id"], "image": i["file_name"]} for i in split["unlabeled"]]),
          os.path.join(out, "vigc_instructions.json"))
    vocab = len(build_tokenizer(out, p["vocab_size"]))
    write_stage_inputs(out, p["neg_ratio"])  # after the tokenizer: its corpus stays as it was
    if p["pref_longer"] > 0:  # after the tokenizer too: only the reward model's pairs change
        longer_rng = np.random.default_rng(np.random.SeedSequence([seed, 8, 1]))
        prefer_longer(pref_pairs, split["train"], p["pref_longer"], longer_rng, stats)
        _dump(pref_pairs, os.path.join(out, "pref_pairs.json"))
    read = read_records(split["train"], seed, p, co, freq)  # after the tokenizer too
    _dump(read, os.path.join(out, "sft_read.json"))
    world = {"version": FORMAT_VERSION, "seed": seed, "params": recorded, "stats": {
        "images": {s: len(v) for s, v in split.items()},
        "partner_given_trigger": {s: cooc_rate(split[s], pairs) for s in ("train", "test")},
        "pair_injections": dict(sorted(stats.items())),
        "sft_flaws": sft_flaw_stats(sft, split["train"]),
        "read_flaws": sft_flaw_stats(read, split["train"])}}
    if p["faint"]:  # (only then: a world without the gap keeps its world.json)
        world["stats"]["faint_share"] = round(drawn["faint"] / drawn["objects"], 3)
    _dump(world, os.path.join(out, "world.json"))
    # printed, not stored: files stay byte-identical
    world["stats"]["partner_no_place"] = partner_no_place(split["train"], p)
    world["stats"]["desc_no_place"] = desc_no_place(sft, split["train"], p["grid"])
    world["stats"]["seconds"] = round(time.time() - t0, 1)
    world["stats"]["vocab"] = vocab  # (the BPE stops when no pair is left to merge)
    return world


def write_stage_inputs(out, neg_ratio):
    """The rest of what the stages read, in public formats, from the files already written:
    image_to_caption.json (LLaVA-RLHF's facts file, keyed by the image as the preference files
    write it), vigc_images.txt (the unlabeled images VIGC generates for, one path a line) and
    the LRV set at the world's --neg_ratio (lrv_file)."""
    _dump(world_captions(out), os.path.join(out, "image_to_caption.json"))
    unlabeled = json.load(open(os.path.join(out, "vigc_instructions.json")))["unlabeled"]
    with open(os.path.join(out, "vigc_images.txt"), "w") as f:
        f.writelines(x["image"] + "\n" for x in unlabeled)
    lrv_file(out, neg_ratio, 0)


def lrv_file(world_dir, neg_ratio, seed):
    """WORLD/lrv/neg{neg_ratio}-seed{seed}.json: lrv_mix's records as a LLaVA instruct file (image
    paths relative to the world, the image folder to read it with), written on first use; parallel
    runs asking for the same one write it atomically."""
    path = os.path.join(world_dir, "lrv", f"neg{neg_ratio}-seed{seed}.json")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    recs = lrv_mix(world_dir, neg_ratio, seed)
    recs = [dict(r, image=os.path.relpath(r["image"], world_dir)) for r in recs]
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        _dump(recs, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # (a full disk: no torn temp file left in the world, one a run)
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno:  # (a full disk's)
            e.filename = path
        raise
    return path


def asker_yes_share(flaws):
    """The "yes" share of the existence answers the asker wrote and the text-only writer left in
    place (sft_flaw_stats of a file): its false "yes" answers (text_only_qa) are taken out. Each
    took the place of an asker turn, most often a "no" about the same absent shape, so this reads
    a little above the asker's own share (~0.02 at --yes_share 0.5), within the 0.03 that main()
    calls out of reach."""
    written, false = flaws["yes_share"], flaws["false_yes_share"]
    if written is None:  # (nothing asked)
        return None
    return round((written - false) / max(1e-9, 1 - false), 3)


def sft_flaw_stats(records, imgs):
    """What the flaws did to sft.json, measured on the written records: the share of "yes" among
    existence answers (per asked shape and overall), the "yes" answers about absent shapes
    (text_only_qa), and the share of descriptions that name an absent shape (by the oracle), with
    the shapes they name. A share of nothing (no existence question, a shape never asked, no
    description) is None (null), not 0.0."""
    objs = {i["file_name"]: i["objects"] for i in imgs}
    share = lambda k, n: round(k / n, 3) if n else None
    yes, asked, descs, halluc, named, false_yes = Counter(), Counter(), 0, 0, Counter(), Counter()
    for r in records:
        turns = r["conversations"]
        for qt, (q, ans) in zip(r["qtypes"], zip(turns[::2], turns[1::2])):
            if qt == "yesno":
                words = re.findall(r"[a-z]+", q["value"].lower())
                shape = next(WORD2SHAPE[w] for w in words if w in WORD2SHAPE)
                said_yes = ans["value"].startswith("Yes")
                asked[shape] += 1
                yes[shape] += said_yes
                false_yes[shape] += said_yes and all(o["name"] != shape for o in objs[r["image"]])
            elif qt == "describe":
                got = oracle(ans["value"], objs[r["image"]])["hallucinated_objects"]
                descs, halluc = descs + 1, halluc + bool(got)
                named.update(got)
    return {"yes_share": share(sum(yes.values()), sum(asked.values())),
            "yes_share_by_shape": {s: share(yes[s], asked[s]) for s in SHAPES},
            "false_yes_share": share(sum(false_yes.values()), sum(asked.values())),
            "false_yes_by_shape": dict(false_yes.most_common()),
            "desc_naming_absent": share(halluc, descs),
            "absent_named": dict(named.most_common())}


def partner_no_place(imgs, p):
    """Images where a trigger stands without its partner for want of a place: already at
    --max_objects shapes, each one a pair's (sample_objects swaps out only other shapes)."""
    pairs = parse_pairs(p["pairs"])
    in_pairs = {s for pair in pairs for s in pair}
    n = 0
    for img in imgs:
        names = [o["name"] for o in img["objects"]]
        alone = any(t in names and q not in names for t, q in pairs)
        n += alone and len(names) == p["max_objects"] and set(names) <= in_pairs
    return n


def desc_no_place(records, imgs, grid):
    """(descriptions in `records`, those of a picture with every cell taken): the text-only writer
    has no free cell to add a shape to such a picture, so its description stays exact whatever
    --desc_halluc (only where --max_objects equals grid x grid: 2 x 2 and 4)."""
    full = {i["file_name"] for i in imgs if len(i["objects"]) == grid * grid}
    described = [r["image"] for r in records if "describe" in r["qtypes"]]
    return len(described), sum(f in full for f in described)


def cooc_rate(imgs, pairs):
    """P(partner present | trigger present), over all pairs; None when no image shows a trigger
    (or there are no --pairs)."""
    hits = []
    for img in imgs:
        names = {o["name"] for o in img["objects"]}
        hits += [p in names for tr, p in pairs if tr in names]
    return round(sum(hits) / len(hits), 3) if hits else None


def _is_ours(path):
    return not os.path.exists(path) or not os.listdir(path) or _fingerprint(path) is not None


def _clean_leftovers(out_dir):
    """What a write_world whose process is gone (killed mid-write) left beside out_dir: its temp
    folder (OUT.tmpPID) is removed; its replaced world (OUT.oldPID) is put back where out_dir is
    missing (killed between its two renames: the only copy), else removed. A folder of such a name
    holding anything a world does not is not a write's: left alone."""
    import rundir
    parent, base = os.path.split(out_dir)
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        m = re.fullmatch(re.escape(base) + r"\.(tmp|old)(\d+)", name)
        path = os.path.join(parent, name)
        if (not m or rundir.pid_alive(int(m.group(2))) or not os.path.isdir(path)
                or _foreign(path, WORLD_FILES)):
            continue
        if m.group(1) == "old" and not os.path.exists(out_dir) and _fingerprint(path):
            os.rename(path, out_dir)
            print(f"put back {out_dir}, which a world write that did not finish left as {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by a world write that did not finish")


# what a world's folder holds (write_world refuses to replace a folder holding anything else, and
# says so before generating; test_shapes checks that a written world holds exactly these)
WORLD_FILES = frozenset(
    ["align.json", "annotations.json", "captions.json", "image_to_caption.json", "images", "lrv",
     "lrv_train.json", "mmhal.json", "povid_pairs.json", "pref_pairs.json", "pref_pairs_val.json",
     "rl_prompts.json", "sft.json", "sft_read.json", "sft_val.json", "tokenizer",
     "vigc_images.txt", "vigc_instructions.json", "world.json"]
    + [f"pope_{s}.jsonl" for s in ("random", "popular", "adversarial")]
    + [f"test_{qt}.json" for qt in QUESTION_TYPES])


def _refuse_place(out_dir, flag):
    """Before anything is generated: an out_dir under a plain file (makedirs would fail on the
    temp folder, naming it instead), or inside a world (a world nested in a world: the outer one
    could no longer be rewritten, as it would hold a folder that is not part of a world)."""
    if os.path.islink(out_dir) and not os.path.exists(out_dir):  # (a loop: _world_path follows
        # a link to a folder not made yet, and one that loops is still one: the temp folder's
        # write failed, naming it)
        raise DataError(f"{flag} {out_dir}", message=not_found(out_dir))
    up = os.path.dirname(os.path.abspath(out_dir))  # (a relative name's dirname '' never exists)
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise DataError(f"{flag} {out_dir}", message=f"{up} is a file, not a folder: choose "
                                                     f"another {flag}")
    while True:
        if _fingerprint(up) is not None:
            raise DataError(f"{flag} {out_dir}", message=f"lies inside the Shapes world {up}: a "
                            f"world in a world is refused; choose another {flag}")
        if os.path.dirname(up) == up:
            return
        up = os.path.dirname(up)


def _foreign(out_dir, names):
    """The first entry of out_dir that is not part of a world (a stage's .lock is), or None."""
    if not os.path.isdir(out_dir):
        return None
    return next(iter(sorted(set(os.listdir(out_dir)) - set(names) - {".lock"})), None)


def _world_path(out_dir):
    """Where a world named out_dir is written: a link, to a folder or not yet, is followed (the
    world replaced the link with a local folder, and a dangling one wrote nothing, exit 0)."""
    out_dir = os.path.abspath(out_dir)
    return os.path.realpath(out_dir) if os.path.islink(out_dir) else out_dir


@contextmanager
def writing_lock(out_dir):
    """An exclusive flock on PARENT/.NAME.lock while a world is checked and written at out_dir:
    a second writer (a stage writing it on first use, another shapes.py) waits, then finds the
    world the first one wrote, where it checked before and replaced it after (the last to finish
    won, without a word). The holder removes the file as it lets go; a waiter that then holds a
    removed file takes the lock again on the file there now. A parent this process cannot write
    to goes without the lock: writing the world there fails, and says so."""
    import fcntl
    parent, base = os.path.split(out_dir)
    path = os.path.join(parent, f".{base}.lock")
    said = False
    while True:
        try:
            os.makedirs(parent, exist_ok=True)
            f = open(path, "a+")
        except OSError:
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said:
                print(f"waiting: another process is writing the world {out_dir}", flush=True)
                said = True
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        except OSError:  # (removed by the holder before this one got it)
            pass
        f.close()
    try:
        yield
    finally:
        if os.path.exists(path):
            os.remove(path)
        f.close()


def write_world(out_dir, seed=0, flag="--out", **params):
    """Write a world to out_dir (replacing a world already there; refusing any other non-empty
    directory, one whose world.json does not read, one holding files a world does not, and one
    inside another world). Written to a temp dir first and renamed, so a crash never leaves half a
    world; a killed write's temp dir goes on the next. flag: the option that named out_dir, for
    the errors."""
    if type(seed) is not int or seed < 0:  # (numpy's own error, or True written as seed 1)
        raise ValueError(f"world seed {seed!r}: not an integer >= 0")
    p = _params(params)
    out_dir = _world_path(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(out_dir, message=f"exists and is not a folder: choose another {flag}")
    _refuse_place(out_dir, flag)
    if not _is_ours(out_dir):
        raise DataError(out_dir, message="is not empty and holds no readable world.json: "
                                         "refusing to replace it "
                                         "(choose another folder, or empty this one)")
    foreign = _foreign(out_dir, WORLD_FILES)
    if foreign:  # before generating (minutes for a large world), not after
        raise DataError(out_dir, message=f"holds {foreign}, which is not part of a world: "
                                         "refusing to replace the folder (move it out first)")
    _clean_leftovers(out_dir)
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:  # (a read-only or full disk, a name 250 bytes long: it named tmp)
        raise DataError(f"{flag} {out_dir}", message=f"cannot be written ({e.strerror})") from None
    try:
        world = _fill(tmp, seed, p)
        foreign = _foreign(out_dir, os.listdir(tmp))  # (again: put there while generating)
        if foreign:
            raise DataError(out_dir, message=f"holds {foreign}, which is not part of a world: "
                                             "refusing to replace the folder (move it out first)")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None and e.errno:  # (a full disk's)
            e.filename = out_dir
        raise
    old = f"{out_dir}.old{os.getpid()}"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError as e:  # another process (e.g. another torchrun rank) put one there first
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            if os.path.exists(old):  # (the world there before, back in its place)
                os.rename(old, out_dir)
            raise
    shutil.rmtree(old, ignore_errors=True)
    return world


def read_world_json(world_dir):
    """The world's world.json, parsed (an editor's byte order mark dropped, as the world's other
    files are read: it was refused as unreadable)."""
    with open(os.path.join(world_dir, "world.json"), encoding="utf-8-sig") as f:
        return json.load(f)


def load_params(world_dir):
    """The parameters a world was written with (a key added since: its default, which it wrote);
    ensure_world has checked them."""
    return dict(DEFAULTS, **read_world_json(world_dir)["params"])


def _fingerprint(path):
    try:
        w = read_world_json(path)
        return w["version"], w["seed"], w["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def world_captions(world):
    """{image path as written in the world's files: [5 captions]} from the COCO-style
    captions.json."""
    cap = load_json(os.path.join(world, "captions.json"))
    files = {img["id"]: img["file_name"] for img in cap["images"]}
    out = {}
    for ann in cap["annotations"]:
        out.setdefault(files[ann["image_id"]], []).append(ann["caption"])
    return out


def _check_stored_params(out_dir, params):
    """A world.json edited by hand is refused as shapes.py refuses the same flag: stages read its
    params (the partner pairs, the vocabulary size), and a bad one would fail deep inside them."""
    file = os.path.join(out_dir, "world.json")
    for key in DEFAULTS:
        kind = _not_of_kind(key, params[key])
        if kind:
            raise DataError(file, field=f"params.{key}", message=f"{params[key]!r} is not {kind}")
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:  # (a misspelt edit, as neg_ration, was ignored without a word)
        raise DataError(file, field=f"params.{unknown[0]}", message="not a world parameter")
    try:
        _params({k: params[k] for k in DEFAULTS})
    except ValueError as e:
        raise DataError(file, field="params", message=str(e)) from None
    train = os.path.join(out_dir, "images", "train")
    first = min(os.listdir(train), default=None) if os.path.isdir(train) else None
    if first:  # (a fresh model takes its geometry from image_size: 96 px trained on 48 px images)
        from PIL import Image
        try:
            with Image.open(os.path.join(train, first)) as im:
                size = im.size
        except (OSError, ValueError, Image.DecompressionBombError):
            size = None  # (the stage reading it names it)
        if size and size != (params["image_size"],) * 2:
            raise DataError(file, field="params.image_size", message=f"{params['image_size']}, "
                            f"but its images are {size[0]}x{size[1]} px ({first})")


def ensure_world(out_dir="data/shapes", seed=0, **params):
    """The world in out_dir for (seed, params), written on first use (no folder, or an empty one)
    and reused after. With no params given, any current-format world of that seed is reused
    whatever its sizes (e.g. a small test world). A stage never rewrites a world: any other folder
    is a one-line error saying what to do."""
    unwritten = lambda: not os.path.exists(out_dir) or (os.path.isdir(out_dir)
                                                        and not os.listdir(out_dir))
    if unwritten():
        path = _world_path(out_dir)
        _refuse_place(path, "--world")
        with writing_lock(path):
            _clean_leftovers(path)  # (a write killed between its renames: its world put back)
            if unwritten():  # (else another process wrote it while this one waited: checked below)
                write_world(out_dir, seed, flag="--world", **params)
                return out_dir
    how = f"pass another --world, or delete {out_dir} and it is written again"
    if not os.path.isdir(out_dir):
        raise DataError(out_dir, message="--world is a file, not a folder: pass another --world")
    try:
        w = read_world_json(out_dir)
        version, was_seed, was_params = w["version"], w["seed"], w["params"]
    except FileNotFoundError:
        message = f"holds no world.json (not a Shapes world): {how}"
        raise DataError(out_dir, message=message) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        message = (f"cannot be read ({type(e).__name__}), so this world cannot be checked: "
                   f"{how}")
        raise DataError(os.path.join(out_dir, "world.json"), message=message) from None
    for field, value in (("version", version), ("seed", was_seed)):  # (a hand edit: "0" read as
        if type(value) is not int:  # another seed, with the same number in the message)
            raise DataError(os.path.join(out_dir, "world.json"), field=field,
                            message=f"expected an integer, got {value!r:.40}: {how}")
    same_files = version == 13 and isinstance(was_params, dict) and was_params.get("grid") == 3
    if version != FORMAT_VERSION and not same_files:
        raise DataError(out_dir, message=f"holds a world of format version {version}; "
                                         f"this code reads version {FORMAT_VERSION}: {how}")
    if was_seed != seed:
        message = f"holds the world of seed {was_seed}, not --world_seed {seed}: {how}"
        raise DataError(out_dir, message=message)
    if not isinstance(was_params, dict):
        raise DataError(os.path.join(out_dir, "world.json"), field="params",
                        message="expected an object of world parameters")
    was_params = dict(DEFAULTS, **was_params)  # (as load_params)
    _check_stored_params(out_dir, was_params)
    wanted = _params(params) if params else was_params
    differ = _params_differ(was_params, wanted)
    if differ:
        message = f"holds a world with other parameters ({', '.join(differ)}): {how}"
        raise DataError(out_dir, message=message)
    if not os.path.isdir(os.path.join(out_dir, "tokenizer")):
        raise DataError(out_dir, message=f"holds a world without its tokenizer/ folder: {how}")
    return out_dir


@dataclass
class Config(World):
    """Write a Shapes world (same seed -> byte-identical files)."""
    out: str = "data/shapes"  # folder to write the world to
    seed: int = 0  # world seed
    overwrite: bool = False  # replace a world of another seed, parameters or format in --out
    RANGES = dict(World.RANGES, seed="[0, inf)")


def main(argv=None):
    import common
    args = asdict(common.parse_config(Config, argv, prog="shapes.py"))
    out, seed, overwrite = args.pop("out"), args.pop("seed"), args.pop("overwrite")
    # a user's mistake: one line, exit code 2 (a world is written whole or not at all)
    said = (f"interrupted: no half-written world; {out} is as it was, or holds this whole world if "
            "its writing had just ended")
    with common.user_errors(ValueError, interrupted=said):
        path = _world_path(out)
        _refuse_place(path, "--out")
        with writing_lock(path):  # (another writer's world is there when this one checks)
            _clean_leftovers(path)  # (a killed write's, also where this one is refused)
            if not overwrite:
                refuse_another_world(out, seed, args)
            w = write_world(out, seed, **args)
        say_what_was_written(w["stats"], out, args)  # (inside: `| head` done is one line too)


def say_what_was_written(s, out, args):
    """The summary lines of a world just written (its stats `s`)."""
    import common
    images = " ".join(f"{k} {v}" for k, v in s["images"].items())
    print(f"wrote {out} in {s['seconds']}s | images {images}")
    none = "n/a (--pairs '': no trigger)" if not args["pairs"] else "n/a (no image shows a trigger)"
    rate = {k: none if v is None else v for k, v in s["partner_given_trigger"].items()}
    full = s["partner_no_place"]
    why = (f" (--cooc {args['cooc']:g} asks more: {full} training image{'s' * (full > 1)} at "
           "--max_objects shapes, each one a pair's, had no place left for the partner)"
           ) if full and s["partner_given_trigger"]["train"] < args["cooc"] else ""
    print(f"P(partner | trigger): train {rate['train']} test {rate['test']}{why}")
    kinds = " ".join(f"{k} {v}" for k, v in s["pair_injections"].items())
    print("preference pairs by injection kind: " + kinds)
    print(vocab_line(s["vocab"], args["vocab_size"]))
    if args["image_size"] // args["grid"] > common.MAX_CELL_PATCH:  # (a fresh model refuses it)
        print(f"note: {args['image_size'] // args['grid']} px cells: a fresh --model takes one "
              f"patch per cell, at most {common.MAX_CELL_PATCH} px; this world is for a model "
              "given by --init")
    for line in existence_lines(s["sft_flaws"], "SFT", "yes_share", "exist_turns", args,
                                text_only_writer=True):
        print(line)
    print(description_line(s, args))
    if args["faint"] or args["pixel_noise"]:
        faint = f"{s['faint_share']} of the objects drawn faint" if args["faint"] else "none faint"
        print(f"perception gap: {faint}, pixel noise std {args['pixel_noise']:g} (captions, "
              "annotations and every text file as without it)")
    read = "reading-stage (sft_read.json)"
    for line in existence_lines(s["read_flaws"], read, "read_yes_share", "read_turns", args):
        print(line)


def description_line(s, args):
    """What shapes.py says about the SFT descriptions: the share naming an absent shape, and why it
    falls short of --desc_halluc where pictures fill every cell (on 2 x 2 with --max_objects 4, a
    quarter of them: --desc_halluc 1 wrote 0.64, and nothing said so)."""
    share, flag = s["sft_flaws"]["desc_naming_absent"], f"--desc_halluc {args['desc_halluc']:g}"
    if share is None:
        return f"SFT descriptions: none written ({flag})"
    described, full = s["desc_no_place"]
    why = (f"; {full} of the {described} show all {args['grid'] ** 2} cells taken, where the "
           "text-only writer has no place to add a shape") if full and args["desc_halluc"] else ""
    return f"SFT descriptions naming an absent shape: {share} ({flag}{why})"


def _params_differ(was, now):
    """The world parameters whose values differ between two parameter dicts, sorted."""
    return sorted(k for k in DEFAULTS if was.get(k) != now[k])


def refuse_another_world(out, seed, params):
    """shapes.py writes over the same world (its files come out byte-identical), and over another
    only with --overwrite: runs, answers and derived files made from the old one would stand on
    a world that is not theirs."""
    was = _fingerprint(out)
    if was is None:  # (nothing readable there: write_world says what it refuses)
        return
    version, was_seed, was_params = was
    now = _params(params)
    if version == FORMAT_VERSION:  # (a world.json edited by hand: said as the stages say it)
        again = "; pass --overwrite true to write the world again"
        if not isinstance(was_seed, int) or isinstance(was_seed, bool):
            raise DataError(os.path.join(out, "world.json"), field="seed",
                            message=f"{was_seed!r} is not an integer{again}")
        if not isinstance(was_params, dict):
            raise DataError(os.path.join(out, "world.json"), field="params",
                            message=f"{was_params!r} is not an object{again}")
        try:
            _check_stored_params(out, dict(DEFAULTS, **was_params))
        except DataError as e:
            raise DataError(None, message=str(e) + again) from None
    was_params = dict(DEFAULTS, **was_params) if isinstance(was_params, dict) else {}
    changed = _params_differ(was_params, now)
    if version == FORMAT_VERSION and was_seed == seed and not changed:
        return
    if version != FORMAT_VERSION:
        what = f"a world of format version {version}"
    elif was_seed != seed:
        what = f"the world of seed {was_seed}"
    else:
        k = changed[0]
        what = f"a world with --{k} {was_params.get(k)!r} (now {now[k]!r})"
    raise DataError(out, message=f"holds {what}: pass --overwrite true to replace it (what was "
                                 "made from it would no longer match it)")


def vocab_line(vocab, wanted):
    """What shapes.py says about the tokenizer: its real size, and that a larger --vocab_size
    gives the same one when BPE ran out of pairs to merge first (948 of 1024 on the defaults;
    --vocab_size 65536 gave that same tokenizer, while world.json records the size asked for)."""
    if vocab >= wanted:
        return f"tokenizer: {vocab} tokens (--vocab_size {wanted})"
    return (f"tokenizer: {vocab} tokens (--vocab_size {wanted}: BPE ran out of pairs to merge in "
            f"this world's text; any --vocab_size above {vocab} gives this same tokenizer)")


def existence_lines(flaws, stage, share_flag, turns_flag, args, text_only_writer=False):
    """What shapes.py says about one stage's existence answers: the share written, the asker's,
    and a note when the asker could not reach the flag's share. text_only_writer: the stage's
    descriptions may be written text-only (sft.json), whose false "yes" answers are shown."""
    turns, target = args[turns_flag], args[share_flag]
    # (the one-word VQA turns ask existence questions of their own, at the same share)
    how_many = f"--{turns_flag} {turns}" + (f", --short_vqa {args['short_vqa']}"
                                             if args["short_vqa"] else "")
    if turns == 0 and not args["short_vqa"]:
        return [f"{stage}: no existence questions ({how_many}, --short_vqa 0)"]
    asked = asker_yes_share(flaws)
    line = (f"{stage} existence answers 'yes': {flaws['yes_share']} (the asker's {asked}, "
            f"--{share_flag} {target}, {how_many}")
    if text_only_writer:
        line += f"; the text-only writer's false 'yes' {flaws['false_yes_share']}"
    lines = [line + ")"]
    # the asker cannot reach it: say why (beyond sampling noise: three standard errors of a share
    # over the questions asked, at least 0.03; a small world's share moves by chance alone)
    noise = 3 * math.sqrt(target * (1 - target) / (args["n_train"] * max(turns, 1)))
    if abs(asked - target) > max(0.03, noise):
        # one conversation asks about distinct shapes and an image shows 1..max_objects of six
        why = ("an image shows few of the six shapes, so the later questions must ask about "
               "absent ones") if asked < target else ("an image can show most of the six shapes, "
                                                     "so the later questions must ask about "
                                                     "present ones")
        lines.append(f"note: --{share_flag} {target} is out of reach with {how_many}:"
                     f" one conversation asks about distinct shapes; {why}")
    return lines


if __name__ == "__main__":
    main()
