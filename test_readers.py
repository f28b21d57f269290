"""Tests for the data readers/validators and the LLaVA-SFT+ converters (fast, no network)."""
import json
import os

import pytest
from PIL import Image

from data import DataError
from formats import (BRIEF_PROMPTS, aokvqa_to_conversations, flickr30k_to_conversations,
                     read_any_conversations, read_llava, read_llava_rlhf_preference, read_lrv,
                     read_mmhal, read_pope, read_povid, read_rl_prompts, vqav2_to_conversations,
                     pair_format)


def png(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 30, 30)).save(folder / name)
    return str(folder / name)


def write(path, obj, jsonl=False):
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in obj) + "\n")
    else:
        path.write_text(json.dumps(obj, indent=1))
    return str(path)


def error(fn, *args, **kw):
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    return str(e.value)


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# ----------------------------------------------------------------------------- LLaVA instruct

@pytest.fixture
def llava(tmp_path):
    img = png(tmp_path / "img", "a.png")
    recs = [{"id": "a", "image": "a.png",
             "conversations": turns("What is this?\n<image>", "A red square.", "Sure?", "Yes.")},
            {"id": "t", "conversations": turns("Say hi.", "Hi.")},
            {"id": "n", "image": "a.png", "conversations": turns("Color?", "Red.")}]
    return tmp_path, img, recs


def test_llava_good_and_image_normalisation(llava):
    tmp, img, recs = llava
    out = read_llava(write(tmp / "d.json", recs), image_folder=str(tmp / "img"))
    want = turns("<image>\nWhat is this?", "A red square.", "Sure?", "Yes.")
    assert out[0] == {"id": "a", "image": img, "conversations": want}
    assert out[1] == {"id": "t", "image": None, "conversations": turns("Say hi.", "Hi.")}
    assert out[2]["conversations"][0]["value"] == "<image>\nColor?"  # missing tag added
    # JSON lines, user/assistant roles, absolute image path, default folder = the data file's folder
    rec = {"id": "u", "image": img, "conversations": [{"from": "user", "value": "<image> Hi"},
                                                       {"from": "assistant", "value": "Ho"}]}
    assert read_llava(write(tmp / "d.jsonl", [rec], jsonl=True)) == [
        {"id": "u", "image": img, "conversations": turns("<image>\nHi", "Ho")}]
    # a line separator (U+2028), a paragraph separator, NEL, as json.dumps(ensure_ascii=False)
    # writes them inside strings: JSON lines end at \n alone (the file was refused)
    seps = "\u2028\u2029\x85"
    odd = [dict(rec, id=f"u{k}", conversations=[rec["conversations"][0], {
        "from": "gpt", "value": f"Line one{c}line two."}]) for k, c in enumerate(seps)]
    path = tmp / "odd.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in odd),
                    encoding="utf-8")
    got = read_llava(str(path))
    assert [r["conversations"][1]["value"] for r in got] == \
        [f"Line one{c}line two." for c in seps]
    # a CR alone ends a line too (no JSON string holds one raw), as the references' text-mode
    # `for line in open(f)` reads it: the file was refused ('Extra data')
    path.write_bytes("\r".join(json.dumps(r, ensure_ascii=False) for r in odd).encode())
    assert read_llava(str(path)) == got


@pytest.mark.parametrize("conv,image,expect", [
    (None, "a.png", "field 'conversations': missing"),
    ("hello", "a.png", "field 'conversations': expected a non-empty list of turns"),
    ([], "a.png", "field 'conversations': expected a non-empty list of turns"),
    (turns("Q?", "A.")[:1] + turns("Q2?"), "a.png",
     "field 'conversations': turn 2 is from 'human', expected 'gpt'"),
    ([{"from": "gpt", "value": "A."}], "a.png", "turn 1 is from 'gpt', expected 'human'"),
    (turns("Q?", "   "), "a.png", "field 'conversations': turn 2: empty value"),
    (turns("Q?", "A.", "Q2?"), "a.png", "ends with a 'human' turn"),
    ([{"from": "bot", "value": "x"}], "a.png",
     "turn 1: 'from' is 'bot', expected 'human' or 'gpt'"),
    ([{"from": "human", "value": 3}], "a.png", "turn 1: 'value' must be a string"),
    # a chat-template turn: it read "'from' is None"
    ([{"role": "user", "content": "Q?"}], "a.png", "turn 1: no 'from'; expected LLaVA's turns, "
     "{'from': 'human' or 'gpt', 'value': text}, got the keys ['content', 'role']"),
    (turns("<image>\nQ?", "A."), None,
     "field 'conversations': '<image>' in a record without an 'image'"),
    (turns("<image>Q?<image>", "A."), "a.png", "'<image>' appears 2 times"),
    (turns("Q?", "A.", "<image> Q2?", "B."), "a.png",
     "'<image>' is in turn 3, expected it in the first human turn"),
    (turns("Q?", "A."), "missing.png", "field 'image': file not found: "),
    (turns("Q?", "A."), 7, "field 'image': expected a string, got an integer"),
])
def test_llava_errors(llava, conv, image, expect):
    tmp, _, recs = llava
    bad = {"id": "abc"}
    if conv is not None:
        bad["conversations"] = conv
    if image is not None:
        bad["image"] = image
    path = write(tmp / "d.json", recs[:2] + [bad])
    msg = error(read_llava, path, image_folder=str(tmp / "img"))
    assert msg.startswith(f"{path}: record 2 (id 'abc'): field '") and expect in msg, msg
    assert "\n" not in msg


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.json"
    assert error(read_llava, str(missing)) == f"{missing}: file not found"
    p = tmp_path / "bad.json"
    p.write_text('[\n {"id": 1},\n {"id": 2,,}\n]')
    assert error(read_llava, str(p)).startswith(f"{p}: invalid JSON at line 3 column")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 1}\n{"id": 2}\n{"id": 3\n')
    assert error(read_pope, str(p)).startswith(f"{p}: line 3: invalid JSON")
    p.write_text("  \n")
    assert error(read_pope, str(p)) == f"{p}: file is empty"
    p.write_text('"just a string"')
    assert "expected a JSON list of records" in error(read_llava, str(p))
    p.write_text('[1]')
    assert error(read_llava, str(p)) == f"{p}: record 0: expected a JSON object, got an integer"
    # records under a key of an object, as some tools export them: read as one record, "record 0:
    # field 'conversations': missing" (dpo.py: "record 0: cannot tell the format")
    p.write_text(json.dumps({"data": [{"id": 1, "conversations": turns("Hi.", "Hi.")}]}))
    wrapped = (f"{p}: expected a JSON list of records (or JSON lines), got an object with the "
               "records under 'data' (give that list itself)")
    assert error(read_llava, str(p)) == error(read_povid, str(p)) == error(pair_format, str(p)) \
        == wrapped
    # one record whose turns are chat-template ones (Hugging Face's): its turns are not records
    chat = [{"role": "user", "content": "<image>\nHi."}, {"role": "assistant", "content": "Hi."}]
    p.write_text(json.dumps({"id": "x", "images": ["a.png"], "messages": chat}))
    assert error(read_llava, str(p)) == f"{p}: record 0 (id 'x'): field 'conversations': missing"


def test_skip_mode(llava):
    tmp, _, recs = llava
    recs = recs[:1] + [{"id": "bad", "conversations": turns("Q?", "")}] + recs[1:]
    out, skipped = read_llava(write(tmp / "d.json", recs), image_folder=str(tmp / "img"),
                              on_error="skip")
    assert [r["id"] for r in out] == ["a", "t", "n"]
    assert len(skipped) == 1
    assert "record 1 (id 'bad'): field 'conversations': turn 2: empty value" in skipped[0]
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        read_llava(write(tmp / "d.json", recs), on_error="ignore")


# ------------------------------------------------------------------------ LRV and auto-detection

def test_lrv(tmp_path):
    img = png(tmp_path / "vg", "2392588.jpg")
    png(tmp_path / "vg", "7.png")
    recs = [{"image_id": "2392588", "question": "Can you see a blue teapot?",
             "answer": "There is no teapot.", "task": "negative"},
            {"image_id": "7.png", "question": "What color?", "answer": "Red."}]
    vg = str(tmp_path / "vg")
    out = read_lrv(write(tmp_path / "lrv.json", {"annotations": recs}), image_folder=vg)
    want = turns("<image>\nCan you see a blue teapot?", "There is no teapot.")
    assert out[0] == {"id": "lrv_2392588_0", "image": img, "task": "negative",
                      "conversations": want}
    assert out[1]["image"] == str(tmp_path / "vg" / "7.png") and out[1]["task"] is None
    int_id = write(tmp_path / "l2.json", [dict(recs[0], image_id=2392588)])
    assert read_lrv(int_id, vg)[0]["image"] == img
    path = write(tmp_path / "l3.json", [{"image_id": "2392588", "question": "Q?"}])
    assert error(read_lrv, path, vg) == f"{path}: record 0: field 'answer': missing"
    path = write(tmp_path / "l4.json", [dict(recs[0], image_id="999")])
    msg = error(read_lrv, path, str(tmp_path / "vg"))
    assert f"{path}: record 0: field 'image_id': file not found: " in msg


def test_read_any_conversations(tmp_path, llava):
    tmp, _, recs = llava
    png(tmp / "img", "5.jpg")
    a = read_any_conversations(write(tmp / "l.json", recs), str(tmp / "img"))
    lrv = write(tmp / "r.json", [{"image_id": "5", "question": "Q?", "answer": "A."}])
    b = read_any_conversations(lrv, str(tmp / "img"))
    assert a[0]["conversations"][0]["value"].startswith("<image>\n")
    assert b[0]["conversations"] == turns("<image>\nQ?", "A.")
    # a JSON lines file of one line (an object): its record (it was refused, "got an object")
    one = tmp / "one.jsonl"
    one.write_text(json.dumps(recs[0]) + "\n")
    assert read_any_conversations(str(one), str(tmp / "img")) == a[:1]
    lrv_one = tmp / "r1.jsonl"
    lrv_one.write_text(json.dumps({"image_id": "5", "question": "Q?", "answer": "A."}) + "\n")
    assert read_any_conversations(str(lrv_one), str(tmp / "img"))[0]["conversations"] == \
        b[0]["conversations"]
    # one record holding an extra list of objects (boxes, say): a record, as two such lines are
    # (it was taken for a wrapper of another name and refused, "got an object")
    boxed = tmp / "boxed.jsonl"
    boxed.write_text(json.dumps(dict(recs[0], objects=[{"name": "dog", "bbox": [1, 2, 3, 4]}]))
                     + "\n")
    assert read_any_conversations(str(boxed), str(tmp / "img"))[0]["conversations"] == \
        a[0]["conversations"]
    # an object holding a list of objects under another key: a wrapper, not a record (the swapped
    # VQA files, {"data": [...]}): refused as before, not read as one record missing its fields
    wrapped = write(tmp / "w.json", {"data": recs})
    assert "expected a JSON list of records or {'annotations': [...]}, got an object" in \
        error(read_any_conversations, wrapped)
    path = write(tmp / "x.json", [{"foo": 1}])
    assert error(read_any_conversations, path) == (
        f"{path}: record 0: field 'conversations': missing (expected LLaVA "
        "instruct 'conversations', or LRV-Instruction 'image_id', 'question', 'answer')")


# ---------------------------------------------------------------- preference, RL prompts, POVID

def pref(**kw):
    r = {"id": "p1", "image": "a.png", "conversations": turns("<image>\nWhat is it?", "old answer"),
         "output_1": {"value": "A red square."}, "output_2": {"value": "A blue dog."},
         "preference": 1}
    r.update(kw)
    return r


def test_preference_good(tmp_path):
    img = png(tmp_path, "a.png")
    caps = write(tmp_path / "caps.json", {"a.png": ["A red square.", "Red."]})
    recs = [pref(), pref(id="p2", preference=2, conversations=turns("What is it?")),
            pref(id="p3", conversations=[turns("Hi", "Yo", "What is it?", "x")])]
    out = read_llava_rlhf_preference(write(tmp_path / "p.json", recs), captions_path=caps,
                                     need_captions=True)
    assert out[0] == {"id": "p1", "image": img, "prompt": turns("<image>\nWhat is it?"),
                      "chosen": "A red square.", "rejected": "A blue dog.",
                      "captions": ["A red square.", "Red."], "preference": 1}
    assert out[1]["chosen"] == "A blue dog." and out[1]["preference"] == 2
    assert out[1]["prompt"] == turns("<image>\nWhat is it?")
    assert out[2]["prompt"] == turns("<image>\nHi", "Yo", "What is it?")
    # the final answer is replaced by each output, never read: empty or tagged, it was refused
    recs = [pref(conversations=turns("<image>\nWhat is it?", "")),
            pref(id="p2", conversations=[turns("What is it?", "<image> x")])]
    out = read_llava_rlhf_preference(write(tmp_path / "p.json", recs))
    assert [r["prompt"] for r in out] == [turns("<image>\nWhat is it?")] * 2
    # 1.0 and 2.0 as 1 and 2 (LLaVA-RLHF's {1: 0, 2: 1}[preference] reads them; refused before)
    floats = read_llava_rlhf_preference(write(tmp_path / "p.json", [pref(preference=2.0)]))
    assert floats == read_llava_rlhf_preference(write(tmp_path / "p.json", [pref(preference=2)]))
    # two outputs alike are kept (LLaVA-RLHF trains on them; it was refused, the whole file with it)
    alike = pref(output_2={"value": "A red square. "})
    out = read_llava_rlhf_preference(write(tmp_path / "p.json", [alike]))
    assert (out[0]["chosen"], out[0]["rejected"]) == ("A red square.", "A red square.")


@pytest.mark.parametrize("kw,expect", [
    ({"preference": 3}, "field 'preference': must be the number 1 or 2, got 3"),
    ({"preference": "1"},
     "field 'preference': must be the number 1 or 2, got '1'"),
    ({"preference": None}, "field 'preference': missing"),
    ({"preference": True}, "field 'preference': must be the number 1 or 2, got True"),
    ({"preference": 1.5}, "field 'preference': must be the number 1 or 2, got 1.5"),
    ({"output_1": {"value": ""}}, "field 'output_1': expected {\"value\": non-empty string}"),
    ({"output_1": "text"}, "field 'output_1': expected an object, got a string"),
    # (all 401 digits were the line)
    ({"preference": 10 ** 400}, "field 'preference': must be the number 1 or 2, "
                                "got " + "1" + "0" * 39),
])
def test_preference_errors(tmp_path, kw, expect):
    png(tmp_path, "a.png")
    path = write(tmp_path / "p.json", [pref(**kw)])
    assert error(read_llava_rlhf_preference, path) == f"{path}: record 0 (id 'p1'): {expect}"


def test_preference_needs_captions(tmp_path):
    png(tmp_path, "a.png")
    path = write(tmp_path / "p.json", [pref()])
    msg = error(read_llava_rlhf_preference, path, need_captions=True)
    assert "field 'captions': no captions" in msg
    # text-only, captions from a file keyed by image (it said "none under None")
    caps = write(tmp_path / "caps.json", {"a.png": ["A red square."]})
    text_only = {k: v for k, v in pref(conversations=turns("What?", "x")).items() if k != "image"}
    path = write(tmp_path / "p.json", [text_only])
    msg = error(read_llava_rlhf_preference, path, need_captions=True, captions_path=caps)
    assert "(none inline; a record without an image has no key in the captions file)" in msg, msg
    # keyed by the base name while the record writes a folder too: said so (LLaVA-RLHF's reward
    # model keys by the image as written; the line named the key tried alone)
    png(tmp_path / "coco", "a.png")
    path = write(tmp_path / "p.json", [pref(image="coco/a.png")])
    msg = error(read_llava_rlhf_preference, path, need_captions=True, captions_path=caps)
    assert "none under 'coco/a.png' in the captions file; it has 'a.png': key it by the image as " \
        "the record writes it)" in msg, msg


def rl(**kw):
    r = {"id": "r1", "image": "000000000042.jpg",
         "conversations": turns("<image>\nWhich one? A. x B. y", "B", "More?", "No."),
         "captions": ["A cat on a mat."], "caption_type": 3, "length_bonus": -0.5}
    r.update(kw)
    return r


def test_rl_prompts(tmp_path):
    img = png(tmp_path, "000000000042.jpg")
    out = read_rl_prompts(write(tmp_path / "rl.json", [rl()]))
    assert out == [{"id": "r1", "image": img, "prompt": turns("<image>\nWhich one? A. x B. y"),
                    "captions": ["A cat on a mat."], "caption_type": 3, "length_bonus": -0.5}]
    defaults = write(tmp_path / "rl.json", [rl(caption_type=None, length_bonus=None)])
    out = read_rl_prompts(defaults, first_turn_only=False)
    assert out[0]["caption_type"] == 1 and out[0]["length_bonus"] == 1.0
    assert len(out[0]["prompt"]) == 3
    # captions from LLaVA-RLHF's image_to_caption.json: "aok_" prefix for caption_type 2-5
    caps = write(tmp_path / "caps.json", {"000000000042.jpg": ["general"],
                                          "aok_000000000042.jpg": ["rationale"]})
    recs = [rl(captions=None), rl(id="r2", captions=None, caption_type=6)]
    out = read_rl_prompts(write(tmp_path / "rl.json", recs), captions_path=caps)
    assert [r["captions"] for r in out] == [["rationale"], ["general"]]
    # a map keyed by the image as written (reward.py's reading, the world's file): found there
    # when the file name is not a key (ppo.py refused the world's own file)
    png(tmp_path / "sub", "7.jpg")
    caps = write(tmp_path / "caps.json", {"sub/7.jpg": ["by path"], "aok_sub/7.jpg": ["aok"]})
    recs = [rl(image="sub/7.jpg", captions=None, caption_type=1),
            rl(id="r2", image="sub/7.jpg", captions=None)]
    out = read_rl_prompts(write(tmp_path / "rl.json", recs), captions_path=caps)
    assert [r["captions"] for r in out] == [["by path"], ["aok"]]
    # no captions: error when facts need them, [] otherwise
    path = write(tmp_path / "rl.json", [rl(captions=None)])
    msg = error(read_rl_prompts, path)
    assert msg.startswith(f"{path}: record 0 (id 'r1'): field 'captions': no captions")
    assert "--facts false" in msg
    assert read_rl_prompts(path, need_captions=False)[0]["captions"] == []
    path = write(tmp_path / "rl.json", [rl(captions=[])])
    assert "field 'captions': no captions" in error(read_rl_prompts, path)
    # LLaVA-RLHF's PPO reads conversations[:2] and replaces the answer: the turns after the
    # first (empty, or holding the tag) were refused though never read
    odd = [rl(conversations=turns("<image>\nWhich one?", "", "More <image>?", " "))]
    path = write(tmp_path / "rl.json", odd)
    assert read_rl_prompts(path)[0]["prompt"] == turns("<image>\nWhich one?")
    assert "turn 2: empty value" in error(read_rl_prompts, path, first_turn_only=False)


@pytest.mark.parametrize("kw,expect", [
    ({"caption_type": 9},
     "field 'caption_type': must be an integer 1-7 "
     "(1 general, 2-5 answer A-D, 6 answer No, 7 answer Yes), got 9"),
    ({"caption_type": "2"}, "field 'caption_type': must be an integer 1-7"),
    ({"caption_type": -10 ** 400}, "field 'caption_type': must be an integer 1-7 (1 general, 2-5 "
                                   "answer A-D, 6 answer No, 7 answer Yes), got -" + "1" + "0" * 38
                                   + "\n"),  # (not all 401 digits)
    ({"length_bonus": "big"}, "field 'length_bonus': expected a number, got 'big'"),
    ({"captions": ["ok", ""]}, "field 'captions': expected a list of non-empty strings"),
    ({"image": None}, "field 'image': missing"),
])
def test_rl_prompt_errors(tmp_path, kw, expect):
    png(tmp_path, "000000000042.jpg")
    path = write(tmp_path / "rl.json", [rl(**kw)])
    msg = error(read_rl_prompts, path)
    assert (msg + "\n").startswith(f"{path}: record 0 (id 'r1'): {expect}"), msg  # ("\n": its end)


def test_povid(tmp_path):
    img = png(tmp_path, "a.png")
    good = {"id": "v", "image": "a.png",
            "conversations": turns("Describe.<image>", "A red square."),
            "rejected_conversations": turns("<image>\nDescribe.", "A red square and a dog.")}
    assert read_povid(write(tmp_path / "v.json", [good])) == [
        {"id": "v", "image": img, "prompt": turns("<image>\nDescribe."), "chosen": "A red square.",
         "rejected": "A red square and a dog."}]
    for kw, expect in [
        ({"rejected_conversations": turns("<image>\nDescribe it.", "x")},
         "field 'rejected_conversations': prompt turns differ from 'conversations'"),
        ({"rejected_conversations": turns("<image>\nDescribe.")},
         "field 'rejected_conversations': ends with a 'human' turn"),
        ({"rejected_conversations": None}, "field 'rejected_conversations': missing"),
    ]:
        path = write(tmp_path / "v.json", [dict(good, **kw)])
        assert error(read_povid, path).startswith(f"{path}: record 0 (id 'v'): {expect}")
    # a chosen equal to its rejected is kept, as POVID keeps it (dpo.py drops and counts it)
    same = dict(good, rejected_conversations=turns("<image>\nDescribe.", "A red square."))
    out = read_povid(write(tmp_path / "v.json", [same]))
    assert (out[0]["chosen"], out[0]["rejected"]) == ("A red square.", "A red square.")


# ------------------------------------------------------------------------- POPE and MMHal-Bench

def test_pope(tmp_path):
    img = png(tmp_path / "val2014", "COCO_val2014_000000310196.jpg")
    image = "COCO_val2014_000000310196.jpg"
    recs = [{"question_id": 1, "image": image, "text": "Is there a snowboard in the image?",
             "label": "yes"},
            {"question_id": 2, "image": image, "text": "Is there a car in the image?",
             "label": "No "}]
    folder = str(tmp_path / "val2014")
    for jsonl in (True, False):
        out = read_pope(write(tmp_path / "pope.jsonl", recs, jsonl=jsonl), image_folder=folder)
        assert out == [dict(recs[0], image=img), dict(recs[1], image=img, label="no")]
    maybe = dict(recs[0], question_id=3, label="maybe")
    path = write(tmp_path / "pope.jsonl", recs + [maybe], jsonl=True)
    assert error(read_pope, path, folder) == (
        f"{path}: record 2 (id 3): field 'label': must be 'yes' or 'no', got 'maybe'")
    out, skipped = read_pope(path, folder, on_error="skip")
    assert len(out) == 2 and len(skipped) == 1
    path = write(tmp_path / "pope.jsonl", [dict(recs[0], text="")], jsonl=True)
    assert error(read_pope, path, folder) == f"{path}: record 0 (id 1): field 'text': empty"


def mmhal_rec(**kw):
    r = {"question_type": "attribute", "question_topic": "animal", "image_id": "ebfc", "image_src":
         "https://c4.staticflickr.com/1/2/ebfc_o.jpg", "image_content": ["Cat", "Mammal"],
         "question": "What color is the cat?", "gt_answer": "The cat is black.", "model_answer": ""}
    r.update(kw)
    return r


def test_mmhal(tmp_path):
    img = png(tmp_path / "images", "ebfc_o.jpg")
    recs = [mmhal_rec(), mmhal_rec(model_answer=None)]
    out = read_mmhal(write(tmp_path / "response_template.json", recs))
    assert out[0] == dict(mmhal_rec(), image=img) and out[1]["model_answer"] == ""
    for kw, expect in [({"image_src": "https://x/y/missing.jpg"},
                        "record 0: field 'image_src': file not found: "),
                       ({"image_content": "Cat"},
                        "record 0: field 'image_content': expected a list, got a string"),
                       ({"gt_answer": None}, "record 0: field 'gt_answer': missing"),
                       ({"model_answer": 5}, "record 0: field 'model_answer': expected a string"),
                       ({"question": "<image>\nWhat color?"},  # (a second placeholder, no image)
                        "record 0: field 'question': '<image>' in a text placed after the image")]:
        path = write(tmp_path / "response_template.json", [mmhal_rec(**kw)])
        assert error(read_mmhal, path).startswith(f"{path}: {expect}")


# ----------------------------------------------------------------------------------- converters

def test_vqav2(tmp_path):
    png(tmp_path, "COCO_train2014_000000000009.jpg")
    png(tmp_path, "COCO_train2014_000000000025.jpg")
    qs = {"questions": [{"image_id": 9, "question": "Is it red?", "question_id": 90},
                        {"image_id": 25, "question": "How many?", "question_id": 250},
                        {"image_id": 9, "question": "What is it?", "question_id": 91},
                        {"image_id": 9, "question": "Is it a dog?", "question_id": 92},
                        {"image_id": 25, "question": "Is it day?", "question_id": 251}]}
    def ans(qid, t, a):
        return {"question_id": qid, "image_id": 0, "answer_type": t, "multiple_choice_answer": a,
                "answers": []}
    an = {"annotations": [ans(90, "yes/no", "yes"), ans(91, "other", "square"),
                          ans(92, "yes/no", "no"), ans(250, "number", "2"),
                          ans(251, "yes/no", "no")]}
    qp, ap = write(tmp_path / "q.json", qs), write(tmp_path / "a.json", an)
    out = vqav2_to_conversations(qp, ap, str(tmp_path))
    assert out == [{"id": "vqav2_9", "image": str(tmp_path / "COCO_train2014_000000000009.jpg"),
                    "caption_type": 7,
                    "conversations": turns("<image>\nIs it red?", "Yes.", "Is it a dog?", "No.")},
                   {"id": "vqav2_25", "image": str(tmp_path / "COCO_train2014_000000000025.jpg"),
                    "caption_type": 6,
                    "conversations": turns("<image>\nIs it day?", "No.")}]
    out = vqav2_to_conversations(qp, ap, str(tmp_path), yes_no_only=False, max_rounds=2)
    assert out[0]["conversations"] == turns("<image>\nIs it red?", "Yes.", "What is it?", "Square.")
    assert out[1]["conversations"] == turns("<image>\nHow many?", "2.", "Is it day?", "No.")
    assert out[1]["caption_type"] == 1
    with pytest.raises(ValueError, match="max_rounds 0: at least 1"):  # (an IndexError)
        vqav2_to_conversations(qp, ap, str(tmp_path), max_rounds=0)
    # the val file's images are COCO_val2014_...: its data_subtype says so (the train names were
    # given to val questions without a word where images are not checked)
    val = write(tmp_path / "qv.json", dict(qs, data_subtype="val2014"))
    named = vqav2_to_conversations(val, ap, "/coco", check_images=False)
    assert named[0]["image"] == "/coco/COCO_val2014_000000000009.jpg"
    an["annotations"].pop(0)
    ap = write(tmp_path / "a.json", an)
    assert error(vqav2_to_conversations, qp, ap, str(tmp_path)) == (
        f"{qp}: record 0 (id 90): field 'question_id': no annotation in {ap}")
    out, skipped = vqav2_to_conversations(qp, ap, str(tmp_path), on_error="skip")
    assert len(skipped) == 1 and out[0]["conversations"] == turns("<image>\nIs it a dog?", "No.")
    an["annotations"][0]["multiple_choice_answer"] = 3
    ap = write(tmp_path / "a.json", an)
    assert error(vqav2_to_conversations, qp, ap, str(tmp_path)) == (
        f"{ap}: record 0 (id 91): field 'multiple_choice_answer': "
        "expected a string, got an integer")


def aok(**kw):
    r = {"question_id": "22MexNkBPpdZGX6sxbxVBH", "image_id": 299207,
         "question": "What is the man by the bags awaiting?",
         "choices": ["skateboarder", "train", "delivery", "cab"], "correct_choice_idx": 3,
         "direct_answers": ["ride", "cab"],
         "rationales": ["A train would not be on the street", "he is waiting for a cab."]}
    r.update(kw)
    return r


def test_aokvqa(tmp_path):
    img = png(tmp_path, "000000299207.jpg")
    path = write(tmp_path / "aok.json", [aok(rationales=["He has bags and stands at the curb"])])
    q = ("<image>\nWhat is the man by the bags awaiting?"
         "\nA. skateboarder\nB. train\nC. delivery\nD. cab")
    assert aokvqa_to_conversations(path, str(tmp_path)) == [
        {"id": "aokvqa_22MexNkBPpdZGX6sxbxVBH", "image": img,
         "captions": ["He has bags and stands at the curb"], "caption_type": 5,
         "conversations": turns(q, "He has bags and stands at the curb. "
                                   "So the correct option is D.")}]
    out = aokvqa_to_conversations(path, str(tmp_path), cot=False)
    direct = q + "\nAnswer with the option's letter from the given choices directly."
    assert out[0]["conversations"] == turns(direct, "D")
    # seeded: same seed -> same rationale pick
    path = write(tmp_path / "aok.json", [aok(question_id=str(i)) for i in range(8)])
    runs = [[r["conversations"][1]["value"]
             for r in aokvqa_to_conversations(path, str(tmp_path), seed=s)]
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and all(a.endswith("So the correct option is D.") for a in runs[0])
    for kw, expect in [({"correct_choice_idx": 4},
                        "field 'correct_choice_idx': 4 is out of range for 4 choices"),
                       ({"correct_choice_idx": None}, "field 'correct_choice_idx': missing"),
                       ({"rationales": []},
                        "field 'rationales': empty; cot=True needs a rationale"),
                       ({"choices": "abc"}, "field 'choices': expected a list, got a string")]:
        path = write(tmp_path / "aok.json", [aok(**kw)])
        assert error(aokvqa_to_conversations, path, str(tmp_path)) == (
            f"{path}: record 0 (id '22MexNkBPpdZGX6sxbxVBH'): {expect}")


def test_converted_records_written_to_a_file_are_read_back(tmp_path, monkeypatch):
    """The converters joined a relative image folder into each record's image; a file written
    from them, read with that --image_folder, looked in coco2017/coco2017/. Now the path is
    absolute (read from anywhere), or, with the folder "", the name alone (LLaVA's way)."""
    (tmp_path / "coco2017").mkdir()
    png(tmp_path / "coco2017", "000000299207.jpg")
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "aok.json", [aok()])
    recs = aokvqa_to_conversations(path, "coco2017")
    assert recs[0]["image"] == str(tmp_path / "coco2017" / "000000299207.jpg")
    (tmp_path / "sub").mkdir()
    written = write(tmp_path / "sub" / "aok_conv.json", recs)
    for folder in ("coco2017", None):
        assert read_any_conversations(written, folder)[0]["image"] == recs[0]["image"]
    bare = write(tmp_path / "sub" / "bare.json", aokvqa_to_conversations(path, ""))
    got = read_any_conversations(bare, "coco2017")[0]["image"]
    assert os.path.samefile(got, tmp_path / "coco2017" / "000000299207.jpg")


def test_flickr30k(tmp_path):
    img = png(tmp_path, "1000092795.jpg")
    png(tmp_path, "10002456.jpg")
    karpathy = {"images": [{"filename": "1000092795.jpg", "split": "train",
                            "sentences": [{"raw": "Two young guys look at their hands."}]},
                           {"filename": "10002456.jpg", "split": "test",
                            "sentences": [{"raw": "a man"}]}]}
    karpathy_file = write(tmp_path / "dataset_flickr30k.json", karpathy)
    out = flickr30k_to_conversations(karpathy_file, str(tmp_path))
    assert len(out) == 1 and out[0]["id"] == "flickr30k_1000092795" and out[0]["image"] == img
    assert out[0]["captions"] == ["Two young guys look at their hands."]
    (h, g) = out[0]["conversations"]
    assert h["from"] == "human" and h["value"].startswith("<image>\n")
    assert h["value"][8:] in BRIEF_PROMPTS
    assert g == {"from": "gpt", "value": "Two young guys look at their hands."}
    assert len(flickr30k_to_conversations(karpathy_file, str(tmp_path), split=None)) == 2
    tok = tmp_path / "results_20130124.token"
    tok.write_text("1000092795.jpg#0\tTwo young guys with shaggy hair look at their hands .\n"
                   "1000092795.jpg#1\ta man 's hat is red , and blue .\n"
                   "10002456.jpg#0\tA dog runs\n")
    a = flickr30k_to_conversations(str(tok), str(tmp_path), seed=3)
    assert a == flickr30k_to_conversations(str(tok), str(tmp_path), seed=3)  # deterministic
    assert a[0]["captions"] == ["Two young guys with shaggy hair look at their hands.",
                                "A man's hat is red, and blue."]
    assert a[1]["conversations"][1]["value"] == "A dog runs." and a[1]["id"] == "flickr30k_10002456"
    tok.write_text("1000092795.jpg#0\tok\nbroken line\n")
    assert error(flickr30k_to_conversations, str(tok), str(tmp_path)) == (
        f"{tok}: line 2: expected 'image.jpg#N<TAB>caption'")
    karpathy["images"][0]["sentences"] = []
    path = write(tmp_path / "k.json", karpathy)
    assert error(flickr30k_to_conversations, path, str(tmp_path)) == (
        f"{path}: record 0 (id '1000092795.jpg'): field 'sentences': "
        f"expected a non-empty list of {{\"raw\": caption}}")


def test_a_huge_value_in_a_record_is_cut_in_the_message(tmp_path):
    """The one line naming a bad record printed a value read from the file whole: a 20000-character
    id, role or label filled the terminal. Each is cut (its repr, to 40 characters)."""
    huge = "x" * 20000
    img = png(tmp_path / "img", "a.png")
    cases = [
        (read_llava, [{"id": huge, "image": "a.png", "conversations": turns("Hi", "")}]),
        (read_llava, [{"id": "a", "conversations": [{"from": huge, "value": "Hi"}]}]),
        (read_pope, [{"question_id": 1, "image": "a.png", "text": "Is there a cat?",
                      "label": huge}]),
        (read_rl_prompts, [rl(length_bonus=huge)]),
    ]
    png(tmp_path / "img", "000000000042.jpg")
    for fn, recs in cases:
        msg = error(fn, write(tmp_path / "d.json", recs), str(tmp_path / "img"))
        assert "xxxxxxxxxx" in msg and len(msg) < 300 + len(img), (fn.__name__, msg[:400])


def test_a_pipe_is_said_to_be_one(tmp_path):
    """--data <(cat file): the path is there, a pipe, and was said to be 'file not found'."""
    from formats import load_json
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert error(load_json, str(fifo)) == f"{fifo}: not a regular file (a pipe or device): give " \
        "a file, which a run records and reads again"
    assert error(load_json, str(tmp_path / "gone")) == f"{tmp_path / 'gone'}: file not found"
