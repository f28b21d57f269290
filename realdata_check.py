"""Every reader, converter and scorer of the project on real published files (../shared/realdata,
see its SOURCES.md), and the reproduction of LLaVA-1.5-13B's published POPE F1 through eval.py.

    python -m pytest -q realdata_check.py  # FACTALIGN_REALDATA=DIR to read another folder

The files stay outside the repository, so this module is not named test_*.py: the README's
`python -m pytest -q` does not collect it; `.ci/run` runs it by name after the suite, and there a
missing folder is a failure, not a skip. Images are not part of the files: readers run with
check_images=False (or empty stand-in files where a reader insists), which checks everything but
the pixels."""
import json
import os

import pytest

import benchmarks
import eval as evaluation
import judges
import metrics
from conftest import run_cli
from formats import (aokvqa_to_conversations, flickr30k_to_conversations, read_any_conversations,
                     read_llava, read_llava_bench, read_llava_rlhf_preference, read_lrv, read_mmhal,
                     read_pope, read_povid, read_rl_prompts, vqav2_to_conversations)

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_REALDATA = os.path.join(HERE, "..", "shared", "realdata")
REALDATA = os.environ.get("FACTALIGN_REALDATA", SHARED_REALDATA)
SPLITS = ("random", "popular", "adversarial")
# LLaVA-1.5-13B's POPE F1 as published, in percent: per split in the LLaVA-1.5 paper's Table 4,
# the average in LLaVA's MODEL_ZOO.md
PUBLISHED_F1 = {"random": 87.1, "popular": 86.2, "adversarial": 84.5, "average": 85.9}


def real(*parts):
    path = os.path.join(REALDATA, *parts)
    assert os.path.exists(path), (f"{path}: missing (the real files live in ../shared/realdata; "
                                  "set FACTALIGN_REALDATA)")
    return path


def test_realdata_folder_is_there():
    assert os.path.isdir(REALDATA), (f"{REALDATA}: no such folder "
                                     "(set FACTALIGN_REALDATA or run from .ci/run)")
    assert os.path.isfile(os.path.join(REALDATA, "SOURCES.md"))


# ----------------------------------------------------------------------------------------
# POPE: the published answers give the published numbers
# ----------------------------------------------------------------------------------------

def pope_labels():
    return [real("pope", f"llavarlhf_coco_pope_{s}.jsonl") for s in SPLITS]


def test_llava15_13b_published_pope_answers_give_the_published_f1(tmp_path):
    """LLaVA-1.5's question file (no labels) + the coco_pope_{category} label files (LLaVA-RLHF's
    copy, the LLaVA-1.5 version: random has 2910 questions) + LLaVA-1.5-13B's answers file, through
    eval.py exactly as a user runs it. Published numbers are rounded to 0.1 (the popular split
    computes to 86.25 here, published 86.2), so each must lie within 0.06 of ours."""
    code, out, err = run_cli("eval", [
        "--rescore", "true", "--ckpt", "llava-v1.5-13b", "--benchmarks", "pope",
        "--out", str(tmp_path),
        "--pope_files", real("pope", "llava15_llava_pope_test.jsonl"),
        "--pope_labels", *pope_labels(),
        "--llava_answers", real("pope", "llava15_answers_llava-v1.5-13b.jsonl")])
    assert code == 0, err
    scores = json.load(open(tmp_path / "llava-v1.5-13b" / "scores.json"))["pope"]
    n_questions = {s: scores[s]["n"] for s in SPLITS}
    assert n_questions == {"random": 2910, "popular": 3000, "adversarial": 3000}
    for split, published in PUBLISHED_F1.items():
        assert abs(100 * scores[split]["f1"] - published) < 0.06, (split, scores[split])
    # the 13B model says yes less often than half the time (its POPE recall is below its precision)
    assert all(scores[s]["precision"] > scores[s]["recall"] for s in SPLITS)
    # adversarial, random, popular: file order
    assert "| llava-v1.5-13b | 0.845 | 0.871 | 0.862 |" in out


def test_pope_labels_from_another_pope_version_are_refused(tmp_path):
    """RUCAIBox's own random split has 3000 questions, LLaVA-1.5's 2910: pairing by order would
    score answers against other questions' labels. One line, exit 2."""
    code, _, err = run_cli("eval", [
        "--rescore", "true", "--benchmarks", "pope", "--out", str(tmp_path),
        "--pope_files", real("pope", "llava15_llava_pope_test.jsonl"),
        "--pope_labels", real("pope", "rucaibox_coco_pope_random.json"), *pope_labels()[1:],
        "--llava_answers", real("pope", "llava15_answers_llava-v1.5-13b.jsonl")])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "llava15_llava_pope_test.jsonl: record" in err
    assert "rucaibox_coco_pope_random.json" in err


POPE_FILES = ([(f"rucaibox_coco_pope_{s}.json", 3000) for s in SPLITS]
              + [(f"llavarlhf_coco_pope_{s}.jsonl", 2910 if s == "random" else 3000)
                 for s in SPLITS]
              + [(f"rucaibox_{d}_pope_seem_{s}.json", 3000)
                 for d in ("aokvqa", "gqa") for s in SPLITS])


@pytest.mark.parametrize("name,n", POPE_FILES)
def test_read_pope_on_every_published_pope_file(name, n):
    recs = read_pope(real("pope", name), image_folder="/images", check_images=False)
    assert len(recs) == n
    # LLaVA-1.5's random split dropped 90 "no" questions
    assert sum(r["label"] == "yes" for r in recs) == 1500
    # "Is there a/an X in the image?", the published typo "imange" included (LLaVA-1.5's "an"
    # questions)
    ends = ("in the image?", "in the imange?")
    assert all(r["text"].startswith("Is there a") and r["text"].endswith(ends) for r in recs)
    assert all(r["image"].startswith("/images/") for r in recs)
    assert len({r["question_id"] for r in recs}) == n


def test_pope_parser_on_the_published_answers():
    """The reference parser (first sentence, words 'No'/'not'/'no') on all 8910 answers of
    LLaVA-1.5-13B: the short-answer prompt makes every answer a bare Yes or No."""
    path = real("pope", "llava15_answers_llava-v1.5-13b.jsonl")
    answers = [json.loads(line)["text"] for line in open(path)]
    assert len(answers) == 8910 and set(answers) == {"Yes", "No"}
    preds = [metrics.pope_yes_no(a) for a in answers]
    assert preds == ["yes" if a == "Yes" else "no" for a in answers]


# ----------------------------------------------------------------------------------------
# CHAIR with the real synonyms.txt
# ----------------------------------------------------------------------------------------

def test_chair_synonyms_and_counting_on_real_synonyms():
    syn = metrics.load_synonyms(real("chair", "synonyms.txt"))
    assert len(set(syn.values())) == 80  # one line per COCO category
    assert syn["man"] == syn["policeman"] == "person"
    assert syn["taxi"] == "car" and syn["hot dog"] == "hot dog"
    text = "A man rides a bike past two taxis and a baby elephant near a toilet seat."
    assert metrics.coco_objects(text, syn) == ["person", "bicycle", "car", "elephant", "toilet"]
    q = {"syn": syn, "objects": {"person", "bicycle", "elephant"}}
    counts = [metrics.chair_counts(q, text), metrics.chair_counts(q, "A woman on a bicycle.")]
    assert counts == [(5, 2), (2, 0)]
    m = metrics.chair_metrics(counts, [len(text.split()), 4])
    assert m["chair_i"] == pytest.approx(2 / 7) and m["chair_s"] == 0.5


# ----------------------------------------------------------------------------------------
# LRV-Instruction and GAVIE, POVID
# ----------------------------------------------------------------------------------------

def test_lrv_readme_record():
    path = real("lrv", "readme_sample_filter_cap.json")
    recs = read_lrv(path, image_folder="/vg", check_images=False)
    assert len(recs) == 1 and recs[0]["image"] == "/vg/2392588.jpg"
    turns = recs[0]["conversations"]
    assert turns[0]["value"].startswith("<image>") and "blue teapot" in turns[0]["value"]
    no_teapot = "There is no mention of a teapot on the white electric stove in the kitchen."
    assert turns[1]["value"] == no_teapot
    assert read_any_conversations(path, "/vg", check_images=False) == recs


def test_gavie_evaluation_set_reads_as_questions(tmp_path):
    """LRV's 1000 GAVIE questions with benchmarks.py's reader (Visual Genome <image_id>.jpg; the
    boxes file is a stand-in: GAVIE's boxes come from Visual Genome, which is not here)."""
    items = json.load(open(real("lrv", "evaluation_set.json")))
    ids = {str(r["image_id"]) for r in items}
    for i in ids:
        open(tmp_path / f"{i}.jpg", "w").close()
    boxes = tmp_path / "boxes.json"
    json.dump({i: [{"caption": "object", "bbox": [0, 0, 1, 1]}] for i in ids}, open(boxes, "w"))
    cfg = evaluation.Config(gavie_file=real("lrv", "evaluation_set.json"),
                            image_folder=str(tmp_path), gavie_annotations=str(boxes))
    qs = benchmarks.lrv_gavie_questions(cfg)
    assert len(qs) == 1000 and len(ids) == 120  # several questions per Visual Genome image
    assert qs[0]["prompt"] == "Which objects are on the wooden table?"
    assert qs[0]["image"] == str(tmp_path / "2356371.jpg")
    prompt = judges.gavie_prompt(qs[0], "A cup and a plate.")
    assert "Which objects are on the wooden table?" in prompt and "A cup and a plate." in prompt


def test_povid_readme_record():
    recs = read_povid(real("povid", "readme_sample.json"), image_folder="/coco", check_images=False)
    assert len(recs) == 1
    r = recs[0]
    assert r["id"] == "COCO_train2014_000000353952"
    assert r["image"] == "/coco/./data/coco/COCO_train2014_000000353952.jpg"
    assert r["chosen"].startswith("This is a vintage black and white image")
    # the injected hallucination
    assert "carriages" in r["rejected"] and "carriages" not in r["chosen"]


# ----------------------------------------------------------------------------------------
# LLaVA instruct (LLaVA-1.5's ScienceQA eval file), SFT+ converters on VQA-v2, A-OKVQA,
# Flickr30k
# ----------------------------------------------------------------------------------------

def test_llava_conversation_file_with_text_only_and_image_records():
    path = real("llava_instruct", "llava15_scienceqa_llava_test_CQM-A.json")
    recs = read_llava(path, "/sqa", check_images=False)
    assert len(recs) == 4241 and sum(r["image"] is not None for r in recs) == 2017
    first = recs[0]
    assert first["id"] == "4" and first["image"] is None
    assert first["conversations"][1]["value"] == "B"
    with_image = next(r for r in recs if r["image"])
    assert with_image["image"] == "/sqa/5/image.png"
    assert with_image["conversations"][0]["value"].startswith("<image>")


def test_llava_bench_question_files_in_both_published_layouts(tmp_path):
    """LLaVA-RLHF's qa90_questions.jsonl (ids, no references) and LLaVA's first-release
    coco2014_val_gpt4_qa_30x3.jsonl (GPT-4's answers inline, ids by line); eval matches the 30x3
    file's COCO_val2014_ names to a context file keyed as caps_boxes_coco2014_val_80.jsonl keys
    them."""
    qa90 = read_llava_bench(real("llava_instruct", "llavarlhf_qa90_questions.jsonl"), "/coco",
                            check_images=False)
    assert [q["question_id"] for q in qa90] == list(range(90))
    assert [q["category"] for q in qa90[:3]] == ["conv", "detail", "complex"]
    assert all(q["reference"] is None for q in qa90)
    assert qa90[0]["image"] == "/coco/000000441147.jpg"
    assert qa90[0]["text"] == "What is the color of the two suitcases in the image?"
    path = real("llava_instruct", "llava_coco2014_val_gpt4_qa_30x3.jsonl")
    first = read_llava_bench(path, "/coco", check_images=False)
    assert [q["question_id"] for q in first] == list(range(90))
    assert sorted({q["category"] for q in first}) == ["complex", "conv", "detail"]
    assert first[0]["reference"].startswith("The skateboard in the image is in an upside-down")
    names = sorted({os.path.basename(q["image"])[len("COCO_val2014_"):] for q in first})
    assert len(names) == 30
    context = tmp_path / "caps_boxes.jsonl"
    context.write_text("".join(json.dumps({"id": n[:-4], "image": n, "captions": [f"Image {n}."],
                                           "instances": [{"category": "dog",
                                                          "bbox": [0.1, 0.2, 0.3, 0.4]}]}) + "\n"
                               for n in names))
    cfg = evaluation.Config(rescore=True, llava_bench_file=path, image_folder="/",
                            llava_bench_context=str(context))
    qs = benchmarks.llava_bench_questions(cfg, None)
    assert len(qs) == 90 and qs[0]["context"] == ("Image 000000525439.jpg.\n\n"
                                                  "dog: [0.1, 0.2, 0.3, 0.4]")


def test_vqav2_excerpt_converts():
    q = real("vqav2", "excerpt_v2_OpenEnded_mscoco_val2014_questions.json")
    a = real("vqav2", "excerpt_v2_mscoco_val2014_annotations.json")
    # 'other' answer: not yes/no
    assert vqav2_to_conversations(q, a, "/coco", check_images=False) == []
    # (its data_subtype names the images COCO_val2014_...)
    recs = vqav2_to_conversations(q, a, "/coco", yes_no_only=False, check_images=False)
    assert len(recs) == 1 and recs[0]["image"] == "/coco/COCO_val2014_000000262148.jpg"
    turns = recs[0]["conversations"]
    assert "Where is he looking?" in turns[0]["value"] and turns[1]["value"] == "Down."


def test_aokvqa_excerpt_converts():
    path = real("aokvqa", "excerpt_aokvqa_v1p0_val.json")
    recs = aokvqa_to_conversations(path, "/coco", check_images=False)
    assert len(recs) == 1
    r = recs[0]
    assert r["image"] == "/coco/000000461751.jpg" and r["caption_type"] == 5  # answer D
    assert "D. cigarette" in r["conversations"][0]["value"]
    assert r["conversations"][1]["value"].endswith("So the correct option is D.")
    assert r["captions"][0] == "He's smoking while riding."
    direct = aokvqa_to_conversations(path, "/coco", cot=False, check_images=False)
    assert direct[0]["conversations"][1]["value"] == "D"


def test_flickr30k_excerpt_converts():
    path = real("flickr30k", "excerpt_results_20130124.token")
    recs = flickr30k_to_conversations(path, "/f30k", split=None, check_images=False)
    assert [r["id"] for r in recs] == ["flickr30k_1000092795", "flickr30k_10002456"]
    assert all(len(r["captions"]) == 5 for r in recs)
    first = "Two young guys with shaggy hair look at their hands while hanging out in the yard."
    assert recs[0]["captions"][0] == first
    assert recs[1]["image"] == "/f30k/10002456.jpg"


# ----------------------------------------------------------------------------------------
# layouts rebuilt from the loaders' code (reconstructed/: not published files, see SOURCES.md)
# ----------------------------------------------------------------------------------------

def test_reconstructed_llava_rlhf_and_mmhal_layouts_read():
    captions = real("reconstructed", "image_to_caption_layout.json")
    pref_path = real("reconstructed", "llava_rlhf_preference_layout.json")
    pref = read_llava_rlhf_preference(pref_path, "/coco", check_images=False,
                                      captions_path=captions)
    assert pref[0]["chosen"] == "A dog on grass." and pref[0]["rejected"] == "Two cats on a sofa."
    assert pref[0]["captions"] == ["A dog standing on the grass."]
    rl = read_rl_prompts(real("reconstructed", "ppo_prompts_layout.json"), "/coco",
                         check_images=False,
                         captions_path=real("reconstructed", "image_to_caption_layout.json"))
    assert [r["caption_type"] for r in rl] == [1, 2]
    assert rl[1]["captions"] == ["The dog is on grass."]
    mmhal_path = real("reconstructed", "mmhal_response_template_layout.json")
    mm = read_mmhal(mmhal_path, "/mmhal", check_images=False)
    assert [r["question_type"] for r in mm] == ["attribute", "counting"]
    assert mm[0]["image"] == "/mmhal/10172500456_1f40b6bd38_o.jpg"
