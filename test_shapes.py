"""Tests for the Shapes world (shapes.py) and the generators in data.py."""
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import rundir
import oracle
import shapes
import data
from data import DataError
from data import ddpm_noise, inject_hallucination, lrv_negatives

SMALL = dict(n_train=40, n_val=10, n_test=40, n_unlabeled=8, n_pref=30, n_povid=30, n_rl=20)
PARTNERS = {"triangle": ["circle"], "cross": ["square"]}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    d = tmp_path_factory.mktemp("worlds")
    # (c: a seed no default and no lab uses, for the invariants that must hold on every world)
    for name, seed in (("a", 0), ("b", 0), ("c", 7)):
        shapes.write_world(str(d / name), seed=seed, **SMALL)
    return d


def files(root):
    paths = [os.path.join(p, f) for p, _, fs in os.walk(root) for f in fs]
    return sorted(os.path.relpath(path, root) for path in paths)


def test_determinism(worlds):
    a, b, c = worlds / "a", worlds / "b", worlds / "c"
    assert files(a) == files(b) and len(files(a)) > 100
    for f in files(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "annotations.json").read_bytes() != (c / "annotations.json").read_bytes()
    first_image = "images/train/000000.png"
    assert (a / first_image).read_bytes() != (c / first_image).read_bytes()


@pytest.mark.parametrize("name", ["a", "c"])
def test_annotations_match_pixels(worlds, name):
    ann = json.load(open(worlds / name / "annotations.json"))
    by_img = {}
    for x in ann["annotations"]:
        by_img.setdefault(x["image_id"], []).append(x)
    assert len(ann["images"]) == 40 + 10 + 40 + 8
    for img in ann["images"]:
        px = np.asarray(Image.open(worlds / name / img["file_name"]).convert("RGB")).astype(int)
        free = np.ones(px.shape[:2], bool)
        objs = by_img.get(img["id"], [])
        assert 1 <= len(objs) <= 4
        cells = {(o["attributes"]["row"], o["attributes"]["col"]) for o in objs}
        assert len(cells) == len(objs)  # one per cell
        for o in objs:
            x, y, w, h = o["bbox"]
            at = o["attributes"]
            assert at["col"] * 16 <= x and x + w <= (at["col"] + 1) * 16
            assert at["row"] * 16 <= y and y + h <= (at["row"] + 1) * 16
            crop = px[y:y + h, x:x + w]
            same = (crop == shapes.COLORS[at["color"]]).all(-1)
            assert same.sum() == o["area"] > 0.25 * w * h  # the drawn mask, in the annotated colour
            assert ((crop == shapes.BACKGROUND).all(-1) | same).all()
            free[y:y + h, x:x + w] = False
        assert (px[free] == shapes.BACKGROUND).all()  # empty cells are background


def test_cooc_bias_present_in_train_broken_in_test():
    p = shapes._params({})
    rng = np.random.default_rng(0)
    sample = {s: [{"objects": shapes.sample_objects(rng, p, s)} for _ in range(2000)]
              for s in ("train", "test")}
    pairs = shapes.parse_pairs(p["pairs"])
    assert shapes.cooc_rate(sample["train"], pairs) > 0.9
    assert shapes.cooc_rate(sample["test"], pairs) < 0.3
    test_names = [{o["name"] for o in i["objects"]} for i in sample["test"]]
    alone = [any(t in n and q not in n for t, q in pairs) for n in test_names]
    assert np.mean(alone) > 0.4  # trigger without partner: hallucinating the partner is measurable
    # partners more frequent: POPE "popular" asks about them
    freq, _ = shapes.cooc_stats(sample["train"])
    assert min(freq["circle"], freq["square"]) > 1.3 * max(freq["diamond"], freq["ring"])


@pytest.mark.parametrize("name", ["a", "c"])
def test_world_stats(worlds, name):
    """world.json's stats equal what the written files say, recomputed here from the files."""
    root = worlds / name
    w = json.load(open(root / "world.json"))
    stats = w["stats"]
    assert w["params"]["n_train"] == 40 and w["seed"] == {"a": 0, "c": 7}[name]
    ann = json.load(open(root / "annotations.json"))
    per_split = dict(Counter(img["split"] for img in ann["images"]))
    png_files = {s: len(os.listdir(root / "images" / s)) for s in per_split}
    assert stats["images"] == per_split == png_files
    assert per_split == {"train": 40, "val": 10, "test": 40, "unlabeled": 8}
    pairs = [p.split(":") for p in w["params"]["pairs"].split(",")]
    for split in ("train", "test"):
        partner_there = []
        for img in shapes.load_world(str(root))["images"]:
            names = {o["name"] for o in img["objects"]}
            if img["split"] == split:
                partner_there += [p in names for t, p in pairs if t in names]
        rate = sum(partner_there) / len(partner_there)
        assert stats["partner_given_trigger"][split] == round(rate, 3)
    assert stats["partner_given_trigger"]["train"] > stats["partner_given_trigger"]["test"]
    pair_files = ("pref_pairs.json", "pref_pairs_val.json", "povid_pairs.json")
    written_pairs = sum(len(json.load(open(root / f))) for f in pair_files)
    dropped = ("impossible", "unverified")
    kept = sum(n for kind, n in stats["pair_injections"].items() if kind not in dropped)
    assert kept == written_pairs
    yes_by_shape, yes_share, desc_share, named = measured_flaws(root)
    flaws = stats["sft_flaws"]
    assert flaws["yes_share"] == round(yes_share, 3)
    by_shape = {s: round(yes_by_shape.get(s, 0.0), 3) for s in shapes.SHAPES}
    assert flaws["yes_share_by_shape"] == by_shape
    assert flaws["desc_naming_absent"] == round(float(desc_share), 3)
    assert flaws["absent_named"] == dict(named)


FLAW_WORLD = dict(SMALL, n_train=600, n_test=300)


@pytest.fixture(scope="module")
def flaw_worlds(tmp_path_factory):
    d = tmp_path_factory.mktemp("flaws")
    shapes.write_world(str(d / "flawed"), seed=0, **FLAW_WORLD)
    shapes.write_world(str(d / "clean"), seed=0, yes_share=0.5, desc_halluc=0.0, **FLAW_WORLD)
    shapes.write_world(str(d / "weak"), seed=0, cooc=0.0, **FLAW_WORLD)
    return d


def asked_shape(question):
    """The shape a written question names (None: no shape word)."""
    words = question.lower().replace("?", " ").split()
    return next((oracle.WORD2SHAPE[w] for w in words if w in oracle.WORD2SHAPE), None)


def measured_flaws(world, name="sft.json", asker_only=False):
    """From the written files alone: yes share of existence answers per asked shape, the share of
    descriptions that name an absent shape (the oracle against annotations.json) and those
    shapes. asker_only: leave out the text-only writer's false "yes" (text_only_qa), so that the
    shares are the asker's (yes_share), and also return those false "yes" per shape."""
    objs = shapes.load_world(str(world))["by_file"]
    yes, asked, false_yes, descs, named = Counter(), Counter(), Counter(), [], Counter()
    for r in json.load(open(world / name)):
        c = r["conversations"]
        present = {o["name"] for o in objs[r["image"]]}
        for qt, q, ans in zip(r["qtypes"], c[::2], c[1::2]):
            if qt == "yesno":
                shape = asked_shape(q["value"])
                said_yes = ans["value"].startswith("Yes")
                if asker_only and said_yes and shape not in present:
                    false_yes[shape] += 1
                    continue
                asked[shape] += 1
                yes[shape] += said_yes
            if qt == "describe":
                got = oracle.oracle(ans["value"], objs[r["image"]])["hallucinated_objects"]
                descs.append(bool(got))
                named.update(got)
    by_shape = {s: yes[s] / asked[s] for s in asked}
    overall = sum(yes.values()) / sum(asked.values())
    if asker_only:
        return by_shape, overall, {s: false_yes[s] / asked[s] for s in asked}
    return by_shape, overall, np.mean(descs), named


def no_shape_prior(by_shape, share, displaced):
    """Every asked shape's "yes" share is the asker's `share` (within sampling noise), except that
    the text-only writer's "yes" about a shape took the place of that shape's own "no" question
    where one was asked: its share may be higher by that many answers. (Where none was, it took
    the asker's first question, about any shape: a small loss within the noise.)"""
    return all(share - 0.06 < v < share + 0.06 + displaced[s] for s, v in by_shape.items())


def test_flaw_positive_only_existence_questions(flaw_worlds):
    by_shape, overall, displaced = measured_flaws(flaw_worlds / "flawed", asker_only=True)
    asked = shapes.DEFAULTS["yes_share"]
    assert abs(overall - asked) < 0.03 and len(by_shape) == len(shapes.SHAPES)
    # no shape-dependent prior but the text-only writer's
    assert no_shape_prior(by_shape, asked, displaced), (by_shape, displaced)
    by_shape, overall, _, _ = measured_flaws(flaw_worlds / "clean")
    assert abs(overall - 0.5) < 0.03
    assert all(abs(v - 0.5) < 0.06 for v in by_shape.values()), by_shape
    sft = json.load(open(flaw_worlds / "flawed" / "sft.json"))
    chats = [r for r in sft if not r["id"].endswith("_vqa")]
    turns = shapes.DEFAULTS["exist_turns"]
    assert all(r["qtypes"].count("yesno") == turns for r in chats)  # exist_turns


def test_reading_stage_conversations(flaw_worlds, tmp_path):
    """sft_read.json (sft.py's stage 2 on a fresh model): the world's conversations with
    read_turns existence questions each, "yes" at read_yes_share for every shape alike, the other
    flaws as in sft.json; written after the tokenizer, so its dials change no other file."""
    turns, asked = shapes.DEFAULTS["read_turns"], shapes.DEFAULTS["read_yes_share"]
    for world in ("clean", "flawed"):
        read = json.load(open(flaw_worlds / world / "sft_read.json"))
        assert len(read) == FLAW_WORLD["n_train"]
        assert all(r["qtypes"].count("yesno") == turns for r in read)
        by_shape, overall, desc_share, _ = measured_flaws(flaw_worlds / world, "sft_read.json")
        stats = json.load(open(flaw_worlds / world / "world.json"))["stats"]["read_flaws"]
        assert stats["yes_share"] == round(overall, 3)
        by_shape, overall, displaced = measured_flaws(flaw_worlds / world, "sft_read.json", True)
        assert abs(overall - asked) < 0.03 and len(by_shape) == len(shapes.SHAPES)
        assert no_shape_prior(by_shape, asked, displaced), (by_shape, displaced)
        if world == "clean":  # no text-only "yes": no shape-dependent prior at all
            assert all(abs(v - asked) < 0.06 for v in by_shape.values()), by_shape
            assert desc_share == 0
        else:  # the descriptions' flaw as in sft.json
            assert abs(desc_share - shapes.DEFAULTS["desc_halluc"]) < 0.08
    shapes.write_world(str(tmp_path / "other"), seed=0, read_turns=2, read_yes_share=0.4, **SMALL)
    shapes.write_world(str(tmp_path / "default"), seed=0, **SMALL)
    read = json.load(open(tmp_path / "other" / "sft_read.json"))
    assert all(r["qtypes"].count("yesno") == 2 for r in read)
    assert abs(measured_flaws(tmp_path / "other", "sft_read.json", True)[1] - 0.4) < 0.05
    other, default = tmp_path / "other", tmp_path / "default"
    for name in ("sft.json", "sft_val.json", "align.json", "pref_pairs.json",
                 "tokenizer/tokenizer.json"):
        assert (other / name).read_bytes() == (default / name).read_bytes()
    assert (other / "sft_read.json").read_bytes() != (default / "sft_read.json").read_bytes()


def test_flaw_text_only_conversations(flaw_worlds, tmp_path):
    """text_only_qa: a conversation whose description was written text-only also answers "yes"
    about the absent shape it named (GPT-4 wrote LLaVA-Instruct's whole conversation from the same
    text)."""
    def share(w):
        stats = json.load(open(flaw_worlds / w / "world.json"))["stats"]
        return stats["sft_flaws"]["false_yes_share"]
    assert share("clean") == 0 and 0 < share("flawed") < 0.15  # one answer in 3 of a quarter
    world = flaw_worlds / "flawed"  # the default, 1.0: every text-only conversation
    objs = shapes.load_world(str(world))["by_file"]
    halluc_convs, false_yes = 0, 0
    for r in json.load(open(world / "sft.json")):
        names = {o["name"] for o in objs[r["image"]]}
        c = r["conversations"]
        named = set()
        for qt, ans in zip(r["qtypes"], c[1::2]):
            if qt == "describe":
                named = set(oracle.oracle(ans["value"], objs[r["image"]])["hallucinated_objects"])
        halluc_convs += bool(named)
        said = {}
        for qt, q, ans in zip(r["qtypes"], c[::2], c[1::2]):
            shape = asked_shape(q["value"])
            if qt == "yesno":  # a conversation never answers one shape both ways
                assert said.setdefault(shape, ans["value"][:2]) == ans["value"][:2], c
            if qt == "yesno" and ans["value"].startswith("Yes") and shape not in names:
                assert shape in named  # a false "yes" only about what the description named
                false_yes += 1
    assert halluc_convs > 100 and false_yes == halluc_convs
    stats = json.load(open(world / "world.json"))["stats"]["sft_flaws"]
    assert stats["false_yes_by_shape"] and sum(stats["false_yes_by_shape"].values()) == false_yes
    shapes.write_world(str(tmp_path / "w"), seed=0, text_only_qa=0.3, **FLAW_WORLD)
    stats = json.load(open(tmp_path / "w" / "world.json"))["stats"]["sft_flaws"]
    assert 0 < stats["false_yes_share"] < 0.5 * share("flawed")  # about 0.3 of them


def test_short_vqa_conversations(flaw_worlds, tmp_path):
    """LLaVA-1.5's academic-VQA stand-in (off by default): per image one conversation of one-word
    answers, short_vqa existence questions (true, at the same yes share) plus a count and a
    colour."""
    flawed_sft = json.load(open(flaw_worlds / "flawed" / "sft.json"))
    assert not any(r["id"].endswith("_vqa") for r in flawed_sft)
    shapes.write_world(str(tmp_path / "w"), seed=0, short_vqa=2, **FLAW_WORLD)
    sft = json.load(open(tmp_path / "w" / "sft.json"))
    objs = shapes.load_world(str(tmp_path / "w"))["by_file"]
    vqa = [r for r in sft if r["id"].endswith("_vqa")]
    assert len(vqa) == FLAW_WORLD["n_train"] == len(sft) - len(vqa)
    for r in vqa:
        c = r["conversations"]
        assert r["qtypes"].count("yesno") == 2 and "count" in r["qtypes"]
        assert all(q["value"].endswith(shapes.SHORT_ANSWER) for q in c[::2])
        assert all(len(ans["value"].split()) == 1 for ans in c[1::2])
        for qt, q, ans in zip(r["qtypes"], c[::2], c[1::2]):
            names = [o["name"] for o in objs[r["image"]]]
            shape = asked_shape(q["value"])
            if qt == "yesno":
                assert ans["value"] == ("Yes" if shape in names else "No")
            if qt == "count":
                assert ans["value"] == str(names.count(shape))
    yes = [ans["value"] == "Yes"
           for r in vqa for qt, ans in zip(r["qtypes"], r["conversations"][1::2])
           if qt == "yesno"]
    assert abs(np.mean(yes) - shapes.DEFAULTS["yes_share"]) < 0.03  # the same flaw


def test_flaw_hallucinated_descriptions(flaw_worlds):
    _, _, share, named = measured_flaws(flaw_worlds / "flawed")
    assert abs(share - 0.5) < 0.08  # desc_halluc of the descriptions name an absent shape
    assert named.most_common(1)[0][0] in ("circle", "square")  # the co-occurring partners first
    _, _, share, named = measured_flaws(flaw_worlds / "clean")
    assert share == 0 and not named
    w = json.load(open(flaw_worlds / "flawed" / "world.json"))["stats"]["sft_flaws"]
    assert abs(w["desc_naming_absent"] - measured_flaws(flaw_worlds / "flawed")[2]) < 1e-3
    for world in ("flawed", "clean"):  # the clean signal: alignment captions and inventories exact
        objs = shapes.load_world(str(flaw_worlds / world))["by_file"]
        for r in json.load(open(flaw_worlds / world / "align.json")):
            checked = oracle.oracle(r["conversations"][1]["value"], objs[r["image"]])
            assert checked["num_hallucinations"] == 0


def test_flaw_cooccurrence_rates_per_split(flaw_worlds):
    pairs = shapes.parse_pairs(shapes.DEFAULTS["pairs"])
    rate = {}
    for world in ("flawed", "weak"):
        imgs = shapes.load_world(str(flaw_worlds / world))["images"]
        for split in ("train", "test"):
            rate[world, split] = shapes.cooc_rate([i for i in imgs if i["split"] == split], pairs)
    assert rate["flawed", "train"] > 0.85 and rate["flawed", "test"] < 0.3
    assert rate["weak", "train"] < 0.55 < rate["flawed", "train"]  # cooc 0: partners by chance only
    assert abs(rate["weak", "test"] - rate["flawed", "test"]) < 0.1


def test_held_out_pairs_name_absent_partners(flaw_worlds):
    """pref_pairs_val.json: one pair per test image, then one per val image. Test images show a
    trigger without its partner, so pairs whose rejected answer names the absent partner (the
    reward model's facts claim) are common there and rare on val images (train-like: cooc)."""
    d = flaw_worlds / "flawed"
    world = shapes.load_world(str(d))
    split_of = {i["file_name"]: i["split"] for i in world["images"]}
    pairs = json.load(open(d / "pref_pairs_val.json"))
    splits = [split_of[r["image"]] for r in pairs]
    assert len(pairs) == FLAW_WORLD["n_test"] + FLAW_WORLD["n_val"]
    assert set(splits) == {"test", "val"}
    naming = Counter()
    for r, split in zip(pairs, splits):
        objs = world["by_file"][r["image"]]
        rejected = r[f"output_{3 - r['preference']}"]["value"]
        partners = {p for t in {o["name"] for o in objs} for p in PARTNERS.get(t, [])}
        naming[split] += bool(partners & set(oracle.oracle(rejected, objs)["hallucinated_objects"]))
    assert naming["test"] >= 0.1 * FLAW_WORLD["n_test"]
    assert naming["test"] / FLAW_WORLD["n_test"] > 3 * naming["val"] / FLAW_WORLD["n_val"]


def test_flaw_longer_preferred(tmp_path):
    """pref_longer: that share of the train preference pairs prefers a whole true description to
    the same minus its last sentence (both true by the oracle against annotations.json, measured
    on the written file); every other pair, the held-out pairs and the SFT data as written without
    the dial."""
    base = dict(SMALL, n_pref=300)
    shapes.write_world(str(tmp_path / "off"), seed=0, **base)
    world = shapes.write_world(str(tmp_path / "on"), seed=0, pref_longer=0.4, **base)
    objs = shapes.load_world(str(tmp_path / "on"))["by_file"]
    off = json.load(open(tmp_path / "off" / "pref_pairs.json"))
    on = json.load(open(tmp_path / "on" / "pref_pairs.json"))
    assert len(on) == len(off) == 300
    longer, sides = 0, set()
    for was, r in zip(off, on):
        if r == was:
            continue
        longer += 1
        sides.add(r["preference"])
        chosen = r[f"output_{r['preference']}"]["value"]
        rejected = r[f"output_{3 - r['preference']}"]["value"]
        assert chosen == r["conversations"][1]["value"] and r["id"] == was["id"]
        assert chosen.startswith(rejected) and len(rejected.split()) < len(chosen.split())
        assert rejected.endswith(".") and rejected.count(".") == chosen.count(".") - 1
        for text in (chosen, rejected):
            assert not oracle.oracle(text, objs[r["image"]])["num_hallucinations"], text
    assert 0.3 < longer / len(on) < 0.5
    assert sides == {1, 2}  # the longer answer on either side, as the injected pairs
    assert world["stats"]["pair_injections"]["longer_preferred"] == longer
    # built after the tokenizer: a world's SFT checkpoints stay valid with the dial on
    for name in ("pref_pairs_val.json", "povid_pairs.json", "sft.json", "tokenizer/tokenizer.json"):
        assert (tmp_path / "on" / name).read_bytes() == (tmp_path / "off" / name).read_bytes()


def test_perception_gap_faint_objects_and_pixel_noise(worlds, tmp_path):
    """faint and pixel_noise change the pixels alone: that share of the objects is drawn at
    FAINT_CONTRAST of its colour's contrast (measured on the written images), every pixel gets
    noise of that standard deviation, and every other file is the world's without the gap (its
    objects, captions, text and tokenizer: a captioner saw what a model reading pixels may miss)."""
    off, on = worlds / "a", tmp_path / "gap"
    world = shapes.write_world(str(on), seed=0, faint=0.5, pixel_noise=16, **SMALL)
    assert files(on) == files(off)
    without_params = {"annotations.json", "captions.json", "world.json"}
    for f in files(off):
        if f.endswith(".png"):
            continue
        if f in without_params:  # (their info or params name the two dials, when on only)
            a, b = (json.load(open(w / f)) for w in (off, on))
            # off: the bytes of a world written before the dials (a checkpoint's world_digest)
            assert not {"faint", "pixel_noise"} & set(a.get("info") or a["params"]), f
            assert (b.get("info") or b["params"])["faint"] == 0.5, f
            for d in (a, b):
                (d.get("info") or d["params"]).pop("faint", None)
                (d.get("info") or d["params"]).pop("pixel_noise", None)
                d.get("stats", {}).pop("faint_share", None)
            assert a == b, f
        else:
            assert (off / f).read_bytes() == (on / f).read_bytes(), f
    assert shapes.load_params(str(off))["faint"] == 0.0  # (unrecorded: read as the default)
    ann = json.load(open(on / "annotations.json"))
    read = lambda world, name: np.asarray(Image.open(world / name).convert("RGB")).astype(float)
    pixels = {img["id"]: (read(on, img["file_name"]), read(off, img["file_name"]))
              for img in ann["images"]}  # (each image read once: with the gap, and without)
    faint = 0
    for o in ann["annotations"]:
        px, was = pixels[o["image_id"]]
        x, y, w, h = o["bbox"]
        inside = (was[y:y + h, x:x + w] == shapes.COLORS[o["attributes"]["color"]]).all(-1)
        mean = px[y:y + h, x:x + w][inside].mean(0)
        full = np.array(shapes.COLORS[o["attributes"]["color"]], float)
        dim = shapes.BACKGROUND + shapes.FAINT_CONTRAST * (full - shapes.BACKGROUND)
        is_faint = np.abs(mean - dim).sum() < np.abs(mean - full).sum()
        # the noise's mean over an object's pixels: at most 7.8 off its colour here (half the
        # contrast would be 43 off)
        assert np.abs(mean - (dim if is_faint else full)).max() < 12, (o["bbox"], mean)
        faint += is_faint
    noise = [(px - was)[(was == shapes.BACKGROUND).all(-1)].ravel() for px, was in pixels.values()]
    share = faint / len(ann["annotations"])
    assert round(share, 3) == world["stats"]["faint_share"] and 0.35 < share < 0.65
    # the background (28) under noise clipped at 0: as np draws it, within 5%
    clipped = np.clip(28 + np.random.default_rng(0).normal(0, 16, 200_000), 0, 255).round() - 28
    assert abs(np.concatenate(noise).std() / clipped.std() - 1) < 0.05


@pytest.mark.parametrize("bad", [dict(yes_share=1.5), dict(desc_halluc=-0.1),
                                 dict(cooc=float("nan")), dict(exist_turns=7), dict(short_vqa=-1),
                                 dict(text_only_qa=1.5), dict(pref_longer=1.5),
                                 dict(read_turns=7), dict(read_yes_share=-0.1),
                                 dict(pref_longer=0.5, max_objects=1), dict(faint=1.5),
                                 dict(pixel_noise=-1), dict(pixel_noise=200)])
def test_flaw_dials_checked(bad, tmp_path):
    with pytest.raises(ValueError):
        shapes.write_world(str(tmp_path / "w"), **bad)
    assert not os.path.exists(tmp_path / "w")


def test_world_without_pairs_is_written_and_a_self_pair_refused(tmp_path, capsys):
    """--pairs '': no trigger, no partner, no held-out trigger alone (it crashed on the empty list
    when --heldout_alone > 0); a shape paired with itself is refused."""
    small = [f"--{k}={v}" for k, v in SMALL.items()]
    shapes.main(["--out", str(tmp_path / "w"), "--pairs="] + small)
    w = json.load(open(tmp_path / "w" / "world.json"))
    assert w["params"]["pairs"] == "" and (tmp_path / "w" / "sft.json").exists()
    # (it said "no image shows a trigger", as if triggers had been left out by chance)
    none = "n/a (--pairs '': no trigger)"
    assert f"P(partner | trigger): train {none} test {none}\n" in capsys.readouterr().out
    # no rate of nothing: null where no image shows a trigger
    assert w["stats"]["partner_given_trigger"] == {"train": None, "test": None}
    for stray in (",", "triangle:circle,", ",triangle:circle", "triangle:circle,,cross:square"):
        with pytest.raises(ValueError, match="an empty item"):
            shapes.write_world(str(tmp_path / "stray"), pairs=stray, **SMALL)
    with pytest.raises(ValueError, match="pairs a shape with itself"):
        shapes.write_world(str(tmp_path / "self"), pairs="circle:circle", **SMALL)
    assert not (tmp_path / "self").exists()


def test_full_grid_world_keeps_exact_descriptions_where_no_cell_is_free(tmp_path, capsys):
    """--max_objects equal to grid * grid: the text-only writer cannot add a shape to a full
    picture, so those descriptions stay exact; the others still name the absent partner. shapes.py
    says so beside the share it wrote (--desc_halluc 1 wrote 0.64 on 2 x 2 without a word)."""
    small = [f"--{k}={v}" for k, v in dict(SMALL, n_train=200).items()]
    shapes.main(["--out", str(tmp_path / "w"), "--image_size", "32", "--grid", "2",
                 "--max_objects", "4", "--desc_halluc", "1"] + small)
    said = capsys.readouterr().out
    w = json.load(open(tmp_path / "w" / "world.json"))
    by = shapes.load_world(str(tmp_path / "w"))["by_file"]
    full = named = described = 0
    for rec in json.load(open(tmp_path / "w" / "sft.json")):
        if "describe" not in rec["qtypes"]:
            continue
        answer = rec["conversations"][2 * rec["qtypes"].index("describe") + 1]["value"]
        objs = by[rec["image"]]
        wrong = oracle.oracle(answer, objs)["hallucinated_objects"]
        full += len(objs) == 4
        described += 1
        assert not (wrong and len(objs) == 4), (answer, objs)
        named += bool(wrong)
    assert full > 0 and named > 0
    share = w["stats"]["sft_flaws"]["desc_naming_absent"]
    assert share < 1.0
    assert (f"SFT descriptions naming an absent shape: {share} (--desc_halluc 1; {full} of the "
            f"{described} show all 4 cells taken, where the text-only writer has no place to add "
            "a shape)\n") in said, said


def test_every_cell_is_named_by_where_it_is(tmp_path):
    """Position words follow the picture: on a 2 x 2 grid each cell is the corner it is in (world
    format 13 named them top left, top, left and center, so the world and the oracle called the
    bottom-right shape "in the center"); on the 3 x 3 grid each of the nine cells has its own."""
    assert [data.cell_position(r, c, 2) for r in (0, 1) for c in (0, 1)] == [
        "top left", "top right", "bottom left", "bottom right"]
    assert [data.cell_position(r, c, 3) for r in range(3) for c in range(3)] == list(
        data.POSITIONS)
    shapes.write_world(str(tmp_path / "w"), image_size=32, grid=2, max_objects=4, **SMALL)
    w = shapes.load_world(str(tmp_path / "w"))
    seen = set()
    for img in w["images"]:
        for o in img["objects"]:
            x0, y0 = o["bbox"][:2]  # the drawn shape's box, in pixels
            vertical = "top" if y0 < 16 else "bottom"
            assert o["position"] == f"{vertical} {'left' if x0 < 16 else 'right'}", o
            seen.add(o["position"])
    assert len(seen) == 4
    for rec in json.load(open(tmp_path / "w" / "sft.json")):
        for t in rec["conversations"]:
            old_names = r"\b(in the center|at the top|at the bottom|on the left|on the right)[.,?]"
            assert not re.search(old_names, t["value"]), t
    describe = [r for r in json.load(open(tmp_path / "w" / "test_describe.json"))][0]
    objs = w["by_file"][describe["image"]]
    exact = " ".join(f"{shapes.cap(data.pos_phrase(o['position']))} there is "
                     f"{data.a(data.noun_phrase(o))}." for o in objs)
    assert oracle.oracle(exact, objs)["hallucinated_objects"] == [], exact


def test_grid_2_negatives_and_injections_name_only_its_cells(tmp_path):
    """On a 2 x 2 grid the LRV negatives and the injected hallucinations of the preference pairs
    place things only at its four corners: they drew from all nine 3 x 3 names, so a "negative"
    could be true ("There is no square at the top." of a square at the top left) and questions
    asked about a "center" the grid lacks."""
    shapes.write_world(str(tmp_path / "w"), image_size=30, grid=2, max_objects=4,
                       **dict(SMALL, n_train=200, n_pref=50, n_povid=50))
    shapes.lrv_file(str(tmp_path / "w"), 0.25, 1)  # (written on first use, as sft.py --lrv does)
    corners = {"top left", "top right", "bottom left", "bottom right"}
    place = re.compile(r"\b(?:at|in|on) the (top left|top right|bottom left|bottom right|top|"
                       r"bottom|left|right|center)\b", re.IGNORECASE)
    seen = Counter()
    for name in ("lrv/neg0.5-seed0.json", "lrv/neg0.25-seed1.json", "lrv_train.json",
                 "pref_pairs.json", "pref_pairs_val.json", "povid_pairs.json"):
        text = (tmp_path / "w" / name).read_text()
        for m in place.finditer(text):
            seen[name] += 1
            assert m.group(1).lower() in corners, (name, text[m.start() - 80:m.end() + 20])
    assert min(seen.values()) > 0 and len(seen) == 6
    # and a negative about a present shape's place is false (the oracle finds it there)
    by = shapes.load_world(str(tmp_path / "w"))["by_file"]
    for r in json.load(open(tmp_path / "w" / "lrv_train.json")):
        m = re.match(r"There is no (\w+) (?:at|in|on) the ([a-z ]+)\. ", r["answer"])
        if m:
            objs = by[r["image_id"]]
            assert not [o for o in objs if (o["name"], o["position"]) == m.groups()], r
    # the 3 x 3 grid's names are all nine, as before
    assert data.grid_positions(3) == data.POSITIONS


@pytest.mark.parametrize("name", ["a", "c"])
def test_generated_text_is_clean(worlds, name):
    w = shapes.load_world(str(worlds / name))
    by = w["by_file"]
    texts, on_purpose = [], Counter()
    task_files = ["align.json", "sft.json", "sft_val.json"]
    task_files += [f"test_{q}.json" for q in shapes.QUESTION_TYPES]
    for f in task_files:
        for rec in json.load(open(worlds / name / f)):
            answers = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
            kinds = rec.get("qtypes", [None] * len(answers))  # SFT descriptions: flawed on purpose
            objs = by[rec["image"]]
            named = {s for t, k in zip(answers, kinds) if k == "describe"
                     for s in oracle.oracle(t, objs)["hallucinated_objects"]}
            for t, k in zip(answers, kinds):
                said = set(oracle.oracle(t, objs)["hallucinated_objects"])
                if k == "describe":
                    continue  # flawed on purpose
                if k == "yesno" and said and said <= named:  # text_only_qa: the description's "yes"
                    on_purpose[f] += 1
                    continue
                texts.append((t, objs))
    lrv = json.load(open(worlds / name / "lrv_train.json"))
    texts += [(r["answer"], by[r["image_id"]]) for r in lrv]
    mmhal = json.load(open(worlds / name / "mmhal.json"))
    texts += [(r["gt_answer"], by[r["image_src"]]) for r in mmhal]
    cap = json.load(open(worlds / name / "captions.json"))
    fname = {i["id"]: i["file_name"] for i in cap["images"]}
    texts += [(c["caption"], by[fname[c["image_id"]]]) for c in cap["annotations"]]
    assert len(cap["annotations"]) == 5 * len(cap["images"])
    stats = json.load(open(worlds / name / "world.json"))["stats"]["sft_flaws"]
    # no other false "yes"
    assert on_purpose["sft.json"] == sum(stats["false_yes_by_shape"].values())
    bad = [(t, oracle.oracle(t, o)) for t, o in texts if oracle.oracle(t, o)["num_hallucinations"]]
    assert not bad, bad[:3]


def test_alignment_captions(worlds):
    """align.json: a description and an inventory per train image; the inventory names every shape,
    with the right count and, for shapes that are there, every cell."""
    w = shapes.load_world(str(worlds / "a"))
    recs = json.load(open(worlds / "a" / "align.json"))
    train = [f for f in w["by_file"] if "/train/" in f]
    assert sorted(r["image"] for r in recs) == sorted(train * 2)
    inventories = [r for r in recs if r["id"].startswith("align_inventory")]
    assert len(inventories) == len(train)
    for r in inventories:
        objs, text = w["by_file"][r["image"]], r["conversations"][1]["value"]
        assert data.render(r["conversations"], "plain")[0] == "<image>" + text + "\n"
        said = {m["name"]: m for m in oracle.oracle(text, objs)["mentions"]}
        assert set(said) == set(shapes.SHAPES)
        for name in shapes.SHAPES:
            n = sum(o["name"] == name for o in objs)
            assert said[name]["negated"] == (n == 0), (text, name)
            assert n == 0 or said[name]["count"] == n, (text, name)
            sentence = text.split(". ")[shapes.SHAPES.index(name)]
            for o in objs:
                if o["name"] == name:
                    assert data.pos_phrase(o["position"]) in sentence


def test_generators_judged_by_oracle():
    p, rng = shapes._params({}), np.random.default_rng(1)
    n_inj = Counter()
    for _ in range(150):
        objs = shapes.sample_objects(rng, p, "test")
        negs = lrv_negatives(objs, rng, shapes.SHAPES, list(shapes.COLORS))
        assert negs and {t for _, _, t in negs} <= {"negative", "negative_existent"}
        for q, ans, _ in negs:
            assert oracle.oracle(ans, objs)["num_hallucinations"] == 0, (q, ans, objs)
            # 'The big circle is red, not blue.': the premise corrected is a wrong one (a count
            # drawn equal to the true one read 'There are two circles in the image, not two.')
            said, _, wrong = ans.rpartition(", not ")
            assert not said or wrong.rstrip(".") not in said.split(), (q, ans, objs)
        for qt in shapes.QUESTION_TYPES:
            r = shapes.make_question(qt, objs, rng, "yes" if rng.random() < 0.5 else "no")
            for kind in ("object", "attribute", "relation", None):
                out = r and inject_hallucination(r[1], objs, rng, kind=kind,
                                                 all_names=shapes.SHAPES, cooc_partners=PARTNERS,
                                                 colors=list(shapes.COLORS))
                if out:
                    n_inj[out[1]] += 1
                    assert out[1] == (kind or out[1])
                    assert oracle.oracle(out[0], objs)["num_hallucinations"] > 0, (r[1], out)
    assert set(n_inj) == {"object", "attribute", "relation"} and min(n_inj.values()) > 50


def test_a_relation_flip_true_of_another_pair_is_no_injection():
    """'The circle is to the left of the square.' with a circle on each side of it: 'to the right
    of' is true too, so the flip is no hallucination and nothing is injected."""
    objs = [{"name": "circle", "color": "red", "size": "large", "row": 1, "col": 0,
             "position": "left"},
            {"name": "square", "color": "blue", "size": "small", "row": 1, "col": 1,
             "position": "center"},
            {"name": "circle", "color": "green", "size": "small", "row": 1, "col": 2,
             "position": "right"}]
    text = "The circle is to the left of the square."
    assert inject_hallucination(text, objs, np.random.default_rng(0), kind="relation",
                                all_names=shapes.SHAPES, colors=list(shapes.COLORS)) is None
    out = inject_hallucination(text, objs[:2], np.random.default_rng(0), kind="relation",
                               all_names=shapes.SHAPES, colors=list(shapes.COLORS))
    assert out == ("The circle is to the right of the square.", "relation")


def test_generators_plain_coco():
    objs = [{"name": "person", "bbox": [0, 0, 5, 5]}, {"name": "person", "bbox": [5, 5, 5, 5]},
            {"name": "dining table", "bbox": [1, 1, 9, 9]}]
    names = ["person", "dining table", "chair", "car"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        negs = lrv_negatives(objs, rng, names)
        assert {t for _, _, t in negs} == {"negative", "negative_existent"}
        for q, a, t in negs:  # what is there, said correctly
            if t == "negative":
                assert "two people and a dining table" in a
            else:
                assert "two people" in a or "one dining table" in a
    out = inject_hallucination("There are two people and a dining table.", objs, rng,
                               kind="attribute", all_names=names)
    assert out and "two people" not in out[0]
    out = inject_hallucination("A person sits at a dining table.", objs, rng, kind="object",
                               all_names=names, cooc_partners={"dining table": ["chair"]})
    assert out and "chair" in out[0]
    assert inject_hallucination("A person.", objs, rng, kind="relation", all_names=names) is None
    out = inject_hallucination("A person is to the left of a dining table.", objs, rng,
                               kind="relation", all_names=names)
    assert out == ("A person is to the right of a dining table.", "relation")


def test_ddpm_noise_closed_form():
    betas = 1 / (1 + np.exp(-np.linspace(-6, 6, 1000))) * (5e-3 - 1e-5) + 1e-5
    abar = np.cumprod(1 - betas)[500]
    x = torch.full((3, 64, 64), 0.7)
    g = torch.Generator().manual_seed(0)
    y = ddpm_noise(x.expand(16, 3, 64, 64), t=500, generator=g)
    assert y.shape == (16, 3, 64, 64)
    assert abs(y.mean().item() - np.sqrt(abar) * 0.7) < 0.01
    assert abs(y.var().item() - (1 - abar)) < 0.01
    first = ddpm_noise(x, generator=torch.Generator().manual_seed(3))
    again = ddpm_noise(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert y.min() < 0  # not clamped


@pytest.mark.parametrize("name", ["a", "c"])
def test_pope(worlds, name):
    w = shapes.load_world(str(worlds / name))
    train = [i for i in w["images"] if i["split"] == "train"]
    _, co = shapes.cooc_stats(train)
    mean_co = {}
    for strategy in ("random", "popular", "adversarial"):
        recs = [json.loads(line) for line in open(worlds / name / f"pope_{strategy}.jsonl")]
        assert [r["question_id"] for r in recs] == list(range(1, len(recs) + 1))
        labels = Counter(r["label"] for r in recs)
        assert labels["yes"] == len(recs) // 2 == labels["no"]
        scores = []
        for yes, no in zip(recs[::2], recs[1::2]):
            names = {o["name"] for o in w["by_file"][yes["image"]]}
            x, y = yes["text"].split()[3], no["text"].split()[3]
            assert (yes["label"], no["label"]) == ("yes", "no") and x in names and y not in names
            scores.append(co[(x, y)])
        mean_co[strategy] = np.mean(scores)
    assert mean_co["adversarial"] > mean_co["random"]


@pytest.mark.parametrize("name", ["a", "c"])
def test_task_file_formats(worlds, name):
    d = worlds / name
    sft = json.load(open(d / "sft.json"))
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in sft)
    # the one-word VQA conversations: own test
    sft = [r for r in sft if not r["id"].endswith("_vqa")]
    assert len(sft) == 40
    assert all(len({"describe", "inventory"} & set(r["qtypes"])) == 1 for r in sft)
    assert {"describe", "inventory"} <= {q for r in sft for q in r["qtypes"]}
    assert len({r["qtypes"][0] for r in sft}) > 2  # every question type also comes first
    # a description, exist_turns existence questions, then 2-3 others (fewer if none is left)
    most = 1 + shapes.DEFAULTS["exist_turns"] + 3
    assert all(most - 2 <= len(r["conversations"]) // 2 <= most for r in sft)
    for qt in shapes.QUESTION_TYPES:
        recs = json.load(open(d / f"test_{qt}.json"))
        assert recs and all("answer_key" in r for r in recs)
        assert all(oracle.score_answer(qt, r["conversations"][1]["value"], r["answer_key"])
                   for r in recs)
    for qt in ("yesno", "relation"):
        yn = Counter(r["answer_key"] for r in json.load(open(d / f"test_{qt}.json")))
        assert abs(yn["yes"] - yn["no"]) <= 1
    for r in json.load(open(d / "pref_pairs.json")):
        gt = r["conversations"][-1]["value"]
        assert r["conversations"][-1]["from"] == "gpt"
        assert r[f"output_{r['preference']}"]["value"] == gt
        assert r[f"output_{3 - r['preference']}"]["value"] != gt
    assert len(json.load(open(d / "pref_pairs_val.json"))) > 0
    for r in json.load(open(d / "povid_pairs.json")):
        assert r["conversations"][0] == r["rejected_conversations"][0]
        assert r["conversations"][1] != r["rejected_conversations"][1]
    for r in json.load(open(d / "rl_prompts.json")):
        assert r["conversations"][-1]["from"] == "human" and len(r["captions"]) == 5
        assert 1 <= r["caption_type"] <= 7
        assert r["length_bonus"] == (1.0 if r["caption_type"] == 1 else 0.0)
    lrv = json.load(open(d / "lrv_train.json"))
    assert all(os.path.exists(d / r["image_id"]) for r in lrv)
    assert abs(np.mean([r["task"].startswith("negative") for r in lrv]) - 0.5) < 0.05
    mm = json.load(open(d / "mmhal.json"))
    assert [r["question_type"] for r in mm[:8]] == ["attribute", "adversarial", "comparison",
                                                    "counting", "relation", "environment",
                                                    "holistic", "other"]
    vigc = json.load(open(d / "vigc_instructions.json"))
    assert {"conversation", "detailed description", "complex reasoning"} <= set(vigc)
    assert len(vigc["unlabeled"]) == 8


def test_lrv_mix_ratio(worlds):
    for ratio in (0.0, 0.25, 0.5):
        recs = shapes.lrv_mix(str(worlds / "a"), ratio, seed=0)
        frac = np.mean([r["task"].startswith("negative") for r in recs])
        assert abs(frac - ratio) < 0.03
        # balanced in POPE's form too: the single-turn yes/no questions are half "yes"
        asks = [r["conversations"] for r in recs
                if shapes._yes_no_form(r["conversations"][0]["value"].split("\n")[-1])]
        if ratio:
            assert abs(np.mean([c[1]["value"].startswith("Yes") for c in asks]) - 0.5) < 0.05
        assert recs[0]["conversations"][0]["value"].startswith("<image>\n")
        assert all(os.path.isfile(r["image"]) for r in recs)
    world = str(worlds / "a")
    assert shapes.lrv_mix(world, 0.5, seed=1) == shapes.lrv_mix(world, 0.5, seed=1)


def test_a_full_disk_while_writing_an_lrv_file_leaves_no_temp_file(tmp_path, monkeypatch):
    """`sft.py --lrv true --seed N` writes WORLD/lrv/neg*-seedN.json on first use: a disk filling
    up there left its torn temp file in the world (one more each run, on a disk already full) and
    the error named no file. Now the temp file is removed and the error names the LRV file."""
    world = tmp_path / "w"
    shapes.write_world(str(world), seed=0, n_train=6, n_val=2, n_test=4, n_unlabeled=2,
                       n_pref=4, n_povid=4, n_rl=4)
    before = sorted(os.listdir(world / "lrv"))

    def half(obj, path, lines=False):
        with open(path, "w") as f:
            f.write("[{")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(shapes, "_dump", half)
    with pytest.raises(OSError) as e:
        shapes.lrv_file(str(world), 0.5, 3)
    assert e.value.filename == str(world / "lrv" / "neg0.5-seed3.json")
    assert sorted(os.listdir(world / "lrv")) == before


def test_lrv_mix_above_one_half_leaves_positives_out(worlds):
    """Above 0.5 the negatives were made r / (1 - r) times the positives: --neg_ratio 0.9999
    (in its range [0, 1]) asked 9999 per positive, and writing a 60-image world ran for minutes
    past a gigabyte. Now there are as many negatives as positives would be and positives are
    left out: the share holds, the set is never more than twice the positives, 1 is all
    negatives, and 0.5 and below are as before (the lab's LRV runs: 0, 0.25, 0.5)."""
    world = str(worlds / "a")
    half = len(shapes.lrv_mix(world, 0.5, seed=0))
    for ratio in (0.75, 0.9, 0.9999, 1.0):
        recs = shapes.lrv_mix(world, ratio, seed=0)
        frac = np.mean([r["task"].startswith("negative") for r in recs])
        assert abs(frac - ratio) < 0.03 and len(recs) <= half, (ratio, frac, len(recs))
    assert all(r["task"].startswith("negative") for r in shapes.lrv_mix(world, 1.0, seed=0))


def test_tokenizer(worlds):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tk = PreTrainedTokenizerFast.from_pretrained(str(worlds / "a" / "tokenizer"))
    assert [tk.convert_tokens_to_ids(t) for t in shapes.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tk.unk_token_id, tk.bos_token_id, tk.eos_token_id, tk.pad_token_id) == (0, 1, 2, 3)
    assert 512 <= len(tk) <= 1024
    s = "USER: <image>\nIs there a circle? ASSISTANT: Yes, there is a circle.</s>"
    enc = tk(s, return_offsets_mapping=True)
    ids = enc["input_ids"]
    assert ids[0] == 1 and ids.count(4) == 1 and ids[-1] == 2 and ids.count(2) == 1
    assert len(tk(" ASSISTANT:", add_special_tokens=False)["input_ids"]) == 1
    assert len(enc["offset_mapping"]) == len(ids)
    assert s[slice(*enc["offset_mapping"][ids.index(4)])] == "<image>"
    assert tk.decode(ids, skip_special_tokens=False) == "<s> " + s
    u = "Ünïcode ☃ text"
    assert tk.decode(tk(u, add_special_tokens=False)["input_ids"]) == u
    assert tk.unk_token_id not in tk(u)["input_ids"]
    auto = AutoTokenizer.from_pretrained(str(worlds / "a" / "tokenizer"), local_files_only=True)
    assert auto(s)["input_ids"] == ids


def test_ensure_world(tmp_path):
    d = str(tmp_path / "w")
    tiny = dict(n_train=6, n_val=2, n_test=4, n_unlabeled=2, n_pref=4, n_povid=4, n_rl=4)
    shapes.ensure_world(d, seed=0, **tiny)
    t = os.path.getmtime(os.path.join(d, "annotations.json"))
    shapes.ensure_world(d, seed=0, **tiny)
    assert os.path.getmtime(os.path.join(d, "annotations.json")) == t  # reused
    # a world written before a parameter existed wrote that parameter's default: still the same
    meta = json.load(open(os.path.join(d, "world.json")))
    del meta["params"]["pref_longer"]
    json.dump(meta, open(os.path.join(d, "world.json"), "w"))
    shapes.ensure_world(d, seed=0, **tiny)
    with pytest.raises(DataError, match="holds a world with other parameters \\(pref_longer\\)"):
        shapes.ensure_world(d, seed=0, **dict(tiny, pref_longer=0.5))
    assert os.path.getmtime(os.path.join(d, "annotations.json")) == t
    # never rewritten
    with pytest.raises(DataError, match="holds a world with other parameters \\(n_train\\)"):
        shapes.ensure_world(d, seed=0, **dict(tiny, n_train=7))
    with pytest.raises(DataError, match="holds the world of seed 0, not --world_seed 1"):
        shapes.ensure_world(d, seed=1)
    assert os.path.getmtime(os.path.join(d, "annotations.json")) == t
    # format 13 wrote the same files on the 3 x 3 grid: read; its 2 x 2 cells had other names
    kept = json.load(open(os.path.join(d, "world.json")))
    json.dump(dict(kept, version=13), open(os.path.join(d, "world.json"), "w"))
    shapes.ensure_world(d, seed=0)
    two = dict(kept, version=13, params=dict(kept["params"], grid=2, image_size=32))
    json.dump(two, open(os.path.join(d, "world.json"), "w"))
    with pytest.raises(DataError, match="holds a world of format version 13; this code reads"):
        shapes.ensure_world(d, seed=0)
    # a world.json edited by hand: its params are held to shapes.py's own rules, in one line
    for key, value, needle in (("yes_share", 2, "field 'params': --yes_share 2: must be in"),
                               ("yes_share", "abc", "field 'params.yes_share': 'abc' is not a"),
                               ("n_train", 6.5, "field 'params.n_train': 6.5 is not an integer"),
                               ("pairs", "circle", "field 'params': --pairs circle: expected"),
                               (None, [1], "field 'params': expected an object")):
        edited = dict(kept, params=dict(kept["params"], **{key: value}) if key else value)
        json.dump(edited, open(os.path.join(d, "world.json"), "w"))
        with pytest.raises(DataError, match=re.escape(needle)) as e:
            shapes.ensure_world(d, seed=0)
        assert str(e.value).startswith(os.path.join(d, "world.json"))
    json.dump(kept, open(os.path.join(d, "world.json"), "w"))
    shapes.write_world(d, seed=0, **dict(tiny, n_train=7))  # shapes.py itself replaces a world
    assert len(os.listdir(os.path.join(d, "images", "train"))) == 7
    assert not [f for f in os.listdir(tmp_path) if f != "w"]
    # a file a world does not have: not replaced
    open(os.path.join(d, "my_notes.txt"), "w").write("mine")
    with pytest.raises(DataError, match="holds my_notes.txt, which is not part of a world"):
        shapes.write_world(d, seed=0, **tiny)
    assert len(os.listdir(os.path.join(d, "images", "train"))) == 7
    assert not [f for f in os.listdir(tmp_path) if f != "w"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not empty and holds no readable world.json"):
        shapes.write_world(str(other), **tiny)
    with pytest.raises(TypeError, match="unknown world parameters"):
        shapes.write_world(str(tmp_path / "x"), bogus=1)


def test_world_folder_holds_what_write_world_expects(worlds):
    """WORLD_FILES is what write_world checks a folder against before generating: it must be
    what a world holds (an entry added to _fill and not here would make every rewrite fail)."""
    assert set(os.listdir(worlds / "a")) == shapes.WORLD_FILES


def test_out_refused_before_generating(tmp_path, monkeypatch):
    """Refused before a world is generated: a folder holding a file a world does not (checked
    only after the whole world was written before), an --out inside an existing world (a world
    nested in a world, after which the outer one could no longer be rewritten), and an --out
    under a plain file (the error named the internal temp folder, x.tmpPID)."""
    tiny = dict(n_train=6, n_val=2, n_test=4, n_unlabeled=2, n_pref=4, n_povid=4, n_rl=4)
    outer = tmp_path / "w"
    shapes.write_world(str(outer), seed=0, **tiny)
    before = files(outer)

    def no_fill(*args):
        raise AssertionError("generated before refusing")
    monkeypatch.setattr(shapes, "_fill", no_fill)
    (outer / "my_notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds my_notes.txt, which is not part of a world"):
        shapes.write_world(str(outer), seed=0, **tiny)
    (outer / "my_notes.txt").unlink()
    for nested in (outer / "sub", outer / "images" / "x" / "y"):
        with pytest.raises(DataError, match=f"lies inside the Shapes world {outer}: a world in"):
            shapes.write_world(str(nested), seed=0, **tiny)
    with pytest.raises(DataError, match=re.escape(f"--world {outer / 'sub'}: lies inside")):
        shapes.ensure_world(str(outer / "sub"), seed=0, **tiny)
    assert files(outer) == before and sorted(os.listdir(tmp_path)) == ["w"]
    (tmp_path / "afile").write_text("a file")
    out = tmp_path / "afile" / "x"
    with pytest.raises(DataError) as e:
        shapes.write_world(str(out), seed=0, **tiny)
    assert str(e.value) == (f"--out {out}: {tmp_path / 'afile'} is a file, not a folder: choose "
                            "another --out")
    assert (tmp_path / "afile").read_text() == "a file"
    assert sorted(os.listdir(tmp_path)) == ["afile", "w"]


def test_a_full_disk_while_saving_the_tokenizer_is_one_line(tmp_path, monkeypatch, capsys):
    """shapes.py with the disk filling up as the world's tokenizer was saved: tokenizers' own
    error (a bare Exception, 'No space left on device (os error 28)') was a traceback. Now one line
    and exit 2, the world there before as it was and no temp folder left."""
    from transformers import PreTrainedTokenizerFast
    tiny = ["--n_train", "6", "--n_val", "2", "--n_test", "4", "--n_unlabeled", "2", "--n_pref",
            "4", "--n_povid", "4", "--n_rl", "4"]
    out = tmp_path / "w"
    shapes.main(["--out", str(out)] + tiny)
    before = files(out), (out / "world.json").read_bytes()

    def full_disk(self, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        shapes.main(["--out", str(out), "--seed", "1", "--overwrite", "true"] + tiny)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {out}: No space left on device while writing"), err
    assert (files(out), (out / "world.json").read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["w"]


def test_out_that_is_a_link_gets_the_world_where_it_points(tmp_path):
    """shapes.py --out LINK: a link to a folder not made yet wrote nothing and exited 0 (the
    rename's ENOTDIR read as "another process put one there first"); a link to a world was
    replaced by a local folder. The world is written where the link points; the link stays."""
    tiny = dict(n_train=6, n_val=2, n_test=4, n_unlabeled=2, n_pref=4, n_povid=4, n_rl=4)
    os.symlink(tmp_path / "scratch" / "w", tmp_path / "link")  # (dangling: scratch/ not made)
    shapes.write_world(str(tmp_path / "link"), seed=0, **tiny)
    assert os.path.islink(tmp_path / "link")
    assert (tmp_path / "scratch" / "w" / "world.json").is_file()
    shapes.write_world(str(tmp_path / "link"), seed=1, **tiny)  # (written again, other seed)
    assert os.path.islink(tmp_path / "link")
    assert json.load(open(tmp_path / "scratch" / "w" / "world.json"))["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["link", "scratch"]
    assert os.listdir(tmp_path / "scratch") == ["w"]


def test_objects_from_plain_coco():
    coco = {"images": [{"id": 7, "file_name": "a.jpg"}],
            "categories": [{"id": 1, "name": "person"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4]}]}
    person = {"name": "person", "color": None, "size": None, "bbox": [1, 2, 3, 4],
              "row": None, "col": None, "position": None}
    assert shapes.objects_from_coco(coco) == {7: [person]}
    with pytest.raises(DataError, match="field 'annotations': not a COCO annotation file"):
        shapes.objects_from_coco({"images": []})


def test_vocab_size_out_of_reach_is_said(tmp_path, capsys):
    """BPE stops when the world's text has no pair left to merge: a larger --vocab_size gave a
    byte-identical tokenizer while world.json recorded the size asked for, without a word. The
    real size is printed, and when the size asked for is more, that any larger one gives it."""
    small = [f"--{k}={v}" for k, v in SMALL.items()]
    shapes.main(["--out", str(tmp_path / "big"), "--vocab_size", "65536"] + small)
    out = capsys.readouterr().out
    real = len(data.load_tokenizer(str(tmp_path / "big" / "tokenizer")))
    assert real < 65536 and (f"tokenizer: {real} tokens (--vocab_size 65536: BPE ran out of "
                             "pairs to merge in this world's text; any --vocab_size above "
                             f"{real} gives this same tokenizer)") in out
    shapes.main(["--out", str(tmp_path / "at"), "--vocab_size", str(real)] + small)
    out = capsys.readouterr().out
    assert f"tokenizer: {real} tokens (--vocab_size {real})\n" in out
    tok = "tokenizer/tokenizer.json"
    assert (tmp_path / "big" / tok).read_bytes() == (tmp_path / "at" / tok).read_bytes()


def test_flaw_stats_of_nothing_are_null(tmp_path):
    """No number for nothing: with no existence question the "yes" shares (overall, per shape,
    the false ones) are null, and a shape never asked is null beside the asked ones (they read
    0.0, as if every answer about it were "no")."""
    tiny = dict(SMALL, n_train=20)
    w = shapes.write_world(str(tmp_path / "w"), exist_turns=0, read_turns=0, **tiny)
    for key in ("sft_flaws", "read_flaws"):
        flaws = w["stats"][key]
        assert flaws["yes_share"] is None and flaws["false_yes_share"] is None, flaws
        assert flaws["yes_share_by_shape"] == {s: None for s in shapes.SHAPES}
        assert flaws["desc_naming_absent"] is not None  # (descriptions were written)
    stored = json.load(open(tmp_path / "w" / "world.json"))["stats"]["sft_flaws"]
    assert stored["yes_share"] is None and stored["yes_share_by_shape"]["circle"] is None
    circle = {"name": "circle", "color": "red", "size": "large", "row": 0, "col": 0,
              "position": "top left"}
    rec = {"image": "a.png", "qtypes": ["yesno"], "conversations": [
        {"from": "human", "value": "Is there a circle in the image?"},
        {"from": "gpt", "value": "Yes, there is a circle."}]}
    flaws = shapes.sft_flaw_stats([rec], [{"file_name": "a.png", "objects": [circle]}])
    assert flaws["yes_share_by_shape"] == dict({s: None for s in shapes.SHAPES}, circle=1.0)
    assert flaws["yes_share"] == 1.0 and flaws["false_yes_share"] == 0.0
    assert flaws["desc_naming_absent"] is None  # no description
    said = shapes.description_line({"sft_flaws": flaws, "desc_no_place": (0, 0)},
                                   dict(shapes.DEFAULTS, desc_halluc=0.5))
    assert said == "SFT descriptions: none written (--desc_halluc 0.5)"


def test_unreachable_yes_share_is_said_not_hidden(tmp_path, capsys):
    """A conversation asks about distinct shapes: at 4 questions per image, 0.95 "yes" is out of
    reach, and shapes.py says so beside the share it wrote; the default is within reach."""
    small = [f"--{k}={v}" for k, v in SMALL.items()]
    far = ["--out", str(tmp_path / "far"), "--yes_share", "0.95", "--exist_turns", "4"]
    shapes.main(far + small)
    out = capsys.readouterr().out
    stats = json.load(open(tmp_path / "far" / "world.json"))["stats"]
    written = stats["sft_flaws"]["yes_share"]
    assert written < 0.9 and f"'yes': {written} (the asker's " in out
    assert "--yes_share 0.95, --exist_turns 4;" in out
    assert "out of reach with --exist_turns 4" in out and "must ask about absent ones" in out
    # at 0 the direction turns: an image of 4 shapes leaves 2 absent for 3 distinct questions
    shapes.main(["--out", str(tmp_path / "none"), "--yes_share", "0"] + small)
    out = capsys.readouterr().out
    assert "--yes_share 0.0 is out of reach" in out and "must ask about present ones" in out
    # no existence questions: said so, not a share of nothing
    shapes.main(["--out", str(tmp_path / "zero"), "--exist_turns", "0", "--read_turns", "0"]
                + small)
    out = capsys.readouterr().out
    assert "SFT: no existence questions (--exist_turns 0, --short_vqa 0)" in out
    assert "(sft_read.json): no existence questions (--read_turns 0, --short_vqa 0)" in out
    assert "out of reach" not in out and "'yes'" not in out
    # ... unless the one-word VQA turns ask them: their share is shown, not "none"
    shapes.main(["--out", str(tmp_path / "vqa"), "--exist_turns", "0", "--read_turns", "0",
                 "--short_vqa", "2"] + small)
    out = capsys.readouterr().out
    written = json.load(open(tmp_path / "vqa" / "world.json"))["stats"]["sft_flaws"]["yes_share"]
    assert written > 0 and "no existence questions" not in out
    assert f"SFT existence answers 'yes': {written} (" in out
    assert "--exist_turns 0, --short_vqa 2" in out and "--read_turns 0, --short_vqa 2" in out
    # (the share of a 40-image world is too coarse to be near anything: 400 images)
    larger = [f"--{k}={v}" for k, v in dict(SMALL, n_train=400).items()]
    shapes.main(["--out", str(tmp_path / "near")] + larger)
    out = capsys.readouterr().out
    assert "out of reach" not in out
    share = json.load(open(tmp_path / "near" / "world.json"))["stats"]["sft_flaws"]
    # (3 x 3: a free cell in every picture, no reason to give)
    assert f"SFT descriptions naming an absent shape: {share['desc_naming_absent']} " \
           "(--desc_halluc 0.5)\n" in out
    # the text-only writer's "yes" is not the asker's: at 0.5 the file says "yes" more often (0.56)
    # and the asker still reached 0.5
    shapes.main(["--out", str(tmp_path / "half"), "--yes_share", "0.5"] + larger)
    out = capsys.readouterr().out
    stats = json.load(open(tmp_path / "half" / "world.json"))["stats"]
    assert stats["sft_flaws"]["yes_share"] > 0.53 and "out of reach" not in out
    read = stats["read_flaws"]
    assert f"(sft_read.json) existence answers 'yes': {read['yes_share']} (the asker's " in out


def test_a_cooc_out_of_reach_is_said_with_why(tmp_path, capsys):
    """--cooc 1 gave P(partner | trigger) 0.96 without a word: a trigger keeps no partner only in
    an image already at --max_objects shapes, each one a pair's (none to swap out); shapes.py says
    so beside the rate it measured."""
    # (and in any --pairs order: a partner that is an earlier pair's trigger gets its partner too;
    # circle:square,triangle:circle left a brought-in circle without its square, rate 0.86)
    for pairs in (shapes.DEFAULTS["pairs"], "circle:square,triangle:circle"):
        p = shapes._params({"cooc": 1.0, "pairs": pairs})
        rng = np.random.default_rng(0)
        pairs = shapes.parse_pairs(p["pairs"])
        in_pairs = {s for pair in pairs for s in pair}
        imgs = [{"objects": shapes.sample_objects(rng, p, "train")} for _ in range(2000)]
        alone = [[o["name"] for o in i["objects"]] for i in imgs
                 if any(t in {o["name"] for o in i["objects"]}
                        and q not in {o["name"] for o in i["objects"]} for t, q in pairs)]
        assert alone and all(len(n) == p["max_objects"] and set(n) <= in_pairs for n in alone)
    small = [f"--{k}={v}" for k, v in SMALL.items()]
    shapes.main(["--out", str(tmp_path / "w"), "--cooc", "1"] + small)
    out = capsys.readouterr().out
    rate = json.load(open(tmp_path / "w" / "world.json"))["stats"]["partner_given_trigger"]
    line = next(x for x in out.splitlines() if x.startswith("P(partner | trigger)"))
    train = [i for i in shapes.load_world(str(tmp_path / "w"))["images"]
             if i["file_name"].startswith("images/train/")]
    full = shapes.partner_no_place(train, shapes._params({"cooc": 1.0}))
    images = "image" if full == 1 else "images"
    why = (f"(--cooc 1 asks more: {full} training {images} at --max_objects shapes, each one a "
           "pair's, had no place left for the partner)")
    assert rate["train"] < 1 and full >= 1 and line.endswith(why), line
    shapes.main(["--out", str(tmp_path / "w0"), "--cooc", "0"] + small)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("P(partner"))
    assert "asks more" not in line, line


def test_a_small_worlds_share_off_by_chance_is_not_called_out_of_reach(tmp_path, capsys):
    """At 120 images of one reading question each, the asker's "yes" share landed 0.033 from
    --read_yes_share 0.6 by chance (2000 images: 0.607), and shapes.py called 0.6 out of reach,
    giving a reason (the later questions of a conversation) that one question does not have. The
    bar is now three standard errors of the share over the questions asked, at least 0.03."""
    small = [f"--{k}={v}" for k, v in dict(SMALL, n_train=120).items()]
    shapes.main(["--out", str(tmp_path / "w"), "--neg_ratio", "1", "--exist_turns", "1",
                 "--read_turns", "1"] + small)
    out = capsys.readouterr().out
    read = json.load(open(tmp_path / "w" / "world.json"))["stats"]["read_flaws"]
    assert abs(shapes.asker_yes_share(read) - 0.6) > 0.03  # (the chance miss this is about)
    assert "out of reach" not in out, out


def test_world_image_size_check_survives_a_decompression_bomb(tiny_world, tmp_path):
    # (PIL refuses the image with its own error, not an OSError: a traceback from the check)
    import shutil
    from PIL import Image
    world = tmp_path / "w"
    shutil.copytree(tiny_world, world)
    Image.new("1", (13500, 13500)).save(world / "images" / "train" / "0.png")
    assert shapes.ensure_world(str(world)) == str(world)  # (the stage reading it names it)


def test_two_writers_of_one_world_at_once_do_not_replace_each_other(tmp_path):
    """Two writers of one fresh world path at once (two shapes.py, or stages writing it on first
    use) each checked before writing and replaced the folder after: both said they wrote it, the
    last to finish won, and a stage trained on a world of another seed than it recorded. Now the
    check and the write hold one lock: of shapes.py --seed 0 and --seed 1, one writes and the
    other refuses the world it finds (without --overwrite), and of two stages asking for seeds 0
    and 1, one writes and the other refuses it; nothing is left beside the world."""
    import functools
    import sys
    import tempfile
    from conftest import TINY_WORLD, forked
    sizes = [x for k, v in TINY_WORLD.items() for x in (f"--{k}", str(v))]

    def cli(seed):  # what `python shapes.py --out A --seed N` runs
        shapes.main(["--out", str(tmp_path / "a"), "--seed", str(seed), *sizes])

    def stage(seed):  # what a stage runs on a world not written yet
        try:
            shapes.ensure_world(str(tmp_path / "b"), seed, **TINY_WORLD)
        except shapes.DataError as e:
            sys.exit(str(e))
    for name, writer in (("a", cli), ("b", stage)):
        # (each a forked copy of this process: no interpreter's start, 2 s of CPU each)
        logs = [tempfile.TemporaryFile("w+") for _ in (0, 1)]
        runs = [forked(functools.partial(writer, seed), logs[seed]) for seed in (0, 1)]
        results = []
        for run, log in zip(runs, logs):
            run.join(300)
            log.seek(0)
            results.append((run.exitcode, log.read()))
        ok = [seed for seed, (rc, _) in enumerate(results) if rc == 0]
        assert len(ok) == 1, (name, results)
        refused = results[1 - ok[0]][1]
        assert f"holds the world of seed {ok[0]}" in refused, (name, refused)
        assert json.load(open(tmp_path / name / "world.json"))["seed"] == ok[0]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_ensure_world_puts_back_a_world_left_between_the_renames_and_uses_it(tmp_path):
    """A world write killed between its two renames leaves the only copy of the world as
    OUT.oldPID. A stage then saw no world, wrote a fresh one (with no parameters given, a
    6000-image world over what was a small one) and only then found the old copy. The leftover
    is put back first now, and used."""
    from conftest import TINY_WORLD
    d = str(tmp_path / "w")
    shapes.write_world(d, seed=0, **TINY_WORLD)
    stamp = os.stat(os.path.join(d, "annotations.json")).st_mtime_ns
    dead = next(p for p in range(4_000_000, 4_100_000) if not rundir.pid_alive(p))
    os.rename(d, f"{d}.old{dead}")
    shapes.ensure_world(d, seed=0, **TINY_WORLD)
    assert os.stat(os.path.join(d, "annotations.json")).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path)) == ["w"]


def test_write_world_refuses_a_value_of_another_kind(tmp_path):
    """write_world (the Python API; shapes.py's flags are typed) took max_objects=3.0, cooc=True
    or seed=True and wrote a world every stage then refused, and grid=2.0, n_train=6.0,
    pairs=None or seed=-1 ended in a traceback from numpy, PIL or deep inside: each is refused
    before anything is written now, naming the parameter."""
    from conftest import TINY_WORLD
    for change, needle in (({"max_objects": 3.0}, "--max_objects 3.0: not an integer"),
                           ({"cooc": True}, "--cooc True: not a number"),
                           ({"grid": 2.0, "image_size": 30}, "--grid 2.0: not an integer"),
                           ({"pairs": None}, "--pairs None: not a string"),
                           ({"cooc": "0.5"}, "--cooc '0.5': not a number"),
                           ({"seed": True}, "world seed True: not an integer >= 0"),
                           ({"seed": -1}, "world seed -1: not an integer >= 0")):
        params = dict(TINY_WORLD, **change)
        seed = params.pop("seed", 0)
        with pytest.raises(ValueError, match=re.escape(needle)):
            shapes.write_world(str(tmp_path / "w"), seed=seed, **params)
        assert os.listdir(tmp_path) == []
    w = shapes.write_world(str(tmp_path / "w"), seed=0, **dict(TINY_WORLD, cooc=1))  # (an int
    assert w["params"]["cooc"] == 1  # is a fine number)


def test_a_world_json_saved_with_a_bom_reads_as_the_world(tiny_world, tmp_path):
    # (an editor's byte order mark, which every other file of the world takes, made world.json
    # "cannot be read (JSONDecodeError)" for the stages and shapes.py alike)
    import shutil
    from conftest import TINY_WORLD
    world = tmp_path / "w"
    shutil.copytree(tiny_world, world)
    file = world / "world.json"
    file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    assert shapes.ensure_world(str(world)) == str(world)
    assert shapes.load_params(str(world))["n_train"] == TINY_WORLD["n_train"]
    shapes.main(["--out", str(world), "--seed", "0", *sum(
        ([f"--{k}", str(v)] for k, v in TINY_WORLD.items()), [])])  # (the same world: reused)
