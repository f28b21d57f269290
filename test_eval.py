"""Tests for eval.py, benchmarks.py, metrics.py and judges.py: metric math against hand-computed
numbers, the parsers, the oracle judge, the HTTP judge against a local server, and the CLI (reuse,
resume, compare, bad input) on the tiny world of conftest.py."""
import contextlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchmarks  # noqa: E402
import common  # noqa: E402
import eval as E  # noqa: E402
import judges  # noqa: E402
import metrics  # noqa: E402
import shapes  # noqa: E402
from conftest import FullDisk, count_decode_compiles, merge_flags  # noqa: E402
from data import load_tokenizer  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint_files  # noqa: E402
from model import LLaVA  # noqa: E402

CIRCLE = {"name": "circle", "color": "red", "size": "large", "row": 1, "col": 0, "position": "left",
          "bbox": [1, 17, 14, 14]}
TRIANGLE = {"name": "triangle", "color": "blue", "size": "small", "row": 0, "col": 2,
            "position": "top right", "bbox": [35, 3, 9, 9]}
OBJECTS = [CIRCLE, TRIANGLE]
FAST = ["--limit", "4", "--max_new_tokens", "6", "--pope_max_new_tokens", "3", "--batch_size", "8"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_world):
    """The tiny Shapes world of conftest.py and two tiny random checkpoints with its tokenizer: m0 a
    checkpoint directory, m1 a run directory holding checkpoint-000001/ (as sft.py writes them)."""
    root = tmp_path_factory.mktemp("eval")
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    ckpts = []
    for seed, sub in ((0, "m0"), (1, "m1/checkpoint-000001")):
        torch.manual_seed(seed)
        vocab_size = -(-len(tok) // 64) * 64
        m = LLaVA.from_preset("tiny", vocab_size=vocab_size, image_token_id=4, pad_token_id=3,
                              bos_token_id=1, eos_token_id=2)
        save_checkpoint_files(m, str(root / "ckpt" / sub))
        tok.save_pretrained(str(root / "ckpt" / sub))
        ckpts.append(str(root / "ckpt" / sub.split("/")[0]))
    return {"root": root, "world": tiny_world, "ckpts": ckpts}


def run_cli(env, out, *args):  # (later flags replace earlier ones: conftest.merge_flags)
    return E.cli(merge_flags(["--world", env["world"], "--out", str(out), *FAST, *args]))


def lines(path):
    return [json.loads(x) for x in open(path)]


# ----------------------------------------------------------------------------------------- POPE

def test_pope_metrics_hand_computed():
    # 10 questions, 6 'yes' labels: TP 4, FN 2, FP 1, TN 3.
    # accuracy (4+3)/10 = 0.7; precision 4/5 = 0.8; recall 4/6 = 2/3; F1 = 2TP/(2TP+FP+FN) = 8/11;
    # yes-ratio (TP+FP)/10 = 0.5
    labels = ["yes"] * 6 + ["no"] * 4
    preds = ["yes"] * 4 + ["no"] * 2 + ["yes"] + ["no"] * 3
    m = metrics.pope_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (4, 2, 1, 3)
    assert m["accuracy"] == pytest.approx(0.7) and m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(8 / 11)
    assert m["yes_ratio"] == pytest.approx(0.5)
    # no 'yes' at all: 0, not a crash
    assert metrics.pope_metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0


@pytest.mark.parametrize("answer, want", [
    ("No, there is not a dog in the image.", "no"), ("There is no dog", "no"), ("Yes.", "yes"),
    ("yes", "yes"), ("No", "no"), ("no.", "no"), ("It is not there.", "no"),
    ("Yes, there is a dog. There is no cat.", "yes"),  # only the first sentence counts
    # the reference matches exactly 'No', 'not', 'no'
    ("Not really", "yes"), ("NO", "yes"), ("No!", "yes"),
    ("I don't know", "yes"), ("", "yes"), ("Nope", "yes")])
def test_pope_parser_follows_the_reference(answer, want):
    assert metrics.pope_yes_no(answer) == want


# ---------------------------------------------------------------------------------------- CHAIR

def test_chair_on_shapes_via_the_oracle():
    captions = [
        # 2 mentions, 0 hallucinated
        "A red circle and a blue triangle.",
        # disc = circle; square is not there: 2, 1
        "A red disc and a blue square.",
        # chair.py counts 'no square' too; doughnut = ring
        "There is no square. A doughnut is at the top.",
        # chair.py counts the repeat: 2, 0
        "A red circle and a red circle."]
    counts = [metrics.chair_counts({"objects": OBJECTS}, c) for c in captions]
    assert counts == [(2, 0), (2, 1), (2, 2), (2, 0)]
    m = metrics.chair_metrics(counts, [len(c.split()) for c in captions])
    assert m["chair_i"] == pytest.approx(3 / 8) and m["chair_s"] == pytest.approx(2 / 4)
    # once each, negations skipped
    ours = [metrics.chair_counts({"objects": OBJECTS}, c, "ours") for c in captions]
    assert ours == [(2, 0), (2, 1), (1, 1), (1, 0)]
    # no object named at all: no CHAIR_i (it read 0.000, a perfect score of nothing); CHAIR_s is
    # a share of descriptions, and none of them names an absent object
    m = metrics.chair_metrics([(0, 0), (0, 0)], [2, 3])
    assert m["chair_i"] is None and m["chair_s"] == 0.0 and m["mentions"] == 0


def test_gavie_limit_takes_the_types_in_turn(tiny_world):
    """GAVIE on Shapes asks each held-out type alike: a --limit under the six types asks one of
    each of the first (it asked two of the first types and none of the last), and the default
    60 asks 10 of each in type order, as before."""
    import shapes
    world = (tiny_world, shapes.load_world(tiny_world)["by_file"])
    types = lambda qs: [q["qtype"] for q in qs]
    qs = benchmarks.gavie_questions(E.Config(limit=4), world)
    assert types(qs) == shapes.QUESTION_TYPES[:4]
    qs = benchmarks.gavie_questions(E.Config(limit=8), world)
    first_two = ("describe", "yesno")
    assert types(qs) == [t for t in shapes.QUESTION_TYPES for _ in range(1 + (t in first_two))]
    qs = benchmarks.gavie_questions(E.Config(), world)
    assert types(qs) == [t for t in shapes.QUESTION_TYPES for _ in range(10)]


def test_chair_reference_counting_on_coco_by_hand(tmp_path):
    """chair.py's caption_to_words by hand: lower-case, tokenize, singularize (pattern.en), merge
    its two-word list, drop 'seat' beside 'toilet', keep synonyms.txt entries (split at ', '
    exactly)."""
    (tmp_path / "synonyms.txt").write_text("person, man, woman, people, baby\ndog, puppy\nhot dog\n"
                                           "wine glass\nelephant\ntoilet\nchair, seat\n"
                                           "bus, minibus\nmotorcycle,  motor bike, moped\n")
    syn = metrics.load_synonyms(str(tmp_path / "synonyms.txt"))
    # chair.py's split keeps the leading space
    assert " motor bike" in syn and "motor bike" not in syn
    text = ("A dog chases a dog past a bus and two men near a toilet seat; a baby elephant, "
            "wine glasses and a motor bike.")
    # dog, dog (both count); bus -> 'bu' (pattern), no object; men -> man -> person; toilet (its
    # seat dropped); 'baby elephant' -> elephant; 'wine glasses' -> 'wine glass'; 'motor bike'
    # merged but no entry matches it
    assert metrics.coco_objects(text, syn) == [
        "dog", "dog", "person", "toilet", "elephant", "wine glass"]
    q = {"syn": syn, "objects": {"dog", "toilet"}}
    assert metrics.chair_counts(q, text) == (6, 3)
    # hot dog (absent), puppy -> dog
    assert metrics.chair_counts(q, "A hot dog and two puppies.") == (2, 1)
    # punctuation is a token, as nltk's: no two words join across it (they did: one mention)
    assert metrics.coco_objects("Her baby, dog. A hot, dog.", syn) == ["person", "dog", "dog"]
    # a character beyond ASCII is part of its word unless nltk splits it off (its quotes and
    # dashes): each one was a token of its own, so 'dogé' or 'dog，' read a dog nltk never sees
    # (expected: nltk 3.10's word_tokenize on each text)
    kept = ["A dogé.", "the dog\u0301 bone", "a dog´s bowl", "a dog，baby", "a dog。",
            "a dog\u200bbaby", "a dog…", "¡dog!", "café-dog", "a dog·puppy", "a pizza\u00addog"]
    assert [metrics.coco_objects(t, syn) for t in kept] == [[]] * len(kept)
    split = ["“dog”", "«dog»", "a dog’s bowl", "a dog—a puppy", "a dog–puppy", "a 猫 dog 🐶",
             "a hot\u00a0dog", "a dog\u3000baby"]
    assert [metrics.coco_objects(t, syn) for t in split] == [
        ["dog"], ["dog"], ["dog"], ["dog", "dog"], ["dog", "dog"], ["dog"], ["hot dog"],
        ["dog", "person"]]
    m = metrics.chair_metrics([(6, 3), (2, 1)], [1, 1])
    assert m["chair_i"] == pytest.approx(4 / 8) and m["chair_s"] == 1.0
    # once each; bus, motor bike read as objects
    ours = metrics.load_synonyms(str(tmp_path / "synonyms.txt"), "ours")
    assert metrics.coco_objects(text, ours, "ours") == [
        "dog", "bus", "person", "toilet", "elephant", "wine glass", "motorcycle"]
    words = {"glasses": "glass", "glass": "glas", "bus": "bu", "buses": "bus", "people": "person",
             "women": "woman", "knives": "knife", "puppies": "puppy", "benches": "bench",
             "ties": "ty", "cookies": "cookies", "skis": "ski", "mice": "mouse", "sheep": "sheep",
             "scissors": "scissors"}
    assert {w: metrics.singularize_like_pattern(w) for w in words} == words


def test_chair_coco_word_matcher(tmp_path):
    (tmp_path / "synonyms.txt").write_text("person, man, woman, people, baby\ndog, puppy\nhot dog\n"
                                           "dining table, table\nwine glass\nelephant\ntoilet\n"
                                           "chair, seat\n")
    names = ["person", "dog", "dining table", "wine glass", "toilet"]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    ann = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
           "categories": cats,
           "annotations": [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1]},
                           {"image_id": 7, "category_id": 2, "bbox": [0, 0, 1, 1]},
                           {"image_id": 9, "category_id": 3, "bbox": [0, 0, 1, 1]},
                           {"image_id": 9, "category_id": 4, "bbox": [0, 0, 1, 1]}]}
    (tmp_path / "instances.json").write_text(json.dumps(ann))
    for f in ("a.jpg", "b.jpg"):
        (tmp_path / f).write_bytes(b"not decoded here")
    cfg = E.Config(chair_instances=str(tmp_path / "instances.json"),
                   chair_synonyms=str(tmp_path / "synonyms.txt"),
                   image_folder=str(tmp_path), chair_counting="ours")
    q7, q9 = benchmarks.coco_chair_questions(cfg)
    assert (q7["id"], q7["objects"]) == ("7", {"person", "dog"})
    assert q9["objects"] == {"dining table", "wine glass"}
    syn = q7["syn"]
    # men -> man -> person, puppies -> puppy -> dog, 'hot dogs' -> hot dog (2 words first); person
    # counted once
    walk = "Two men and a woman walk their puppies past hot dogs."
    assert metrics.coco_objects(walk, syn, "ours") == ["person", "dog", "hot dog"]
    # 'baby elephant' is an elephant, not a person; 'wine glasses' -> wine glass; table -> dining
    # table
    elephant = "A baby elephant near a table with wine glasses."
    assert metrics.coco_objects(elephant, syn, "ours") == ["elephant", "dining table", "wine glass"]
    assert metrics.coco_objects("A toilet seat.", syn, "ours") == ["toilet"]  # not a chair
    # 3 mentions, 1 hallucinated each
    counts = [metrics.chair_counts(q7, "Two men walk their puppies past a hot dog stand.", "ours"),
              metrics.chair_counts(q9, "A baby elephant near a table with wine glasses.", "ours")]
    assert counts == [(3, 1), (3, 1)]
    m = metrics.chair_metrics(counts, [1, 1])
    assert m["chair_i"] == pytest.approx(2 / 6) and m["chair_s"] == 1.0


def test_chair_export_is_what_the_chair_scripts_read(env, tmp_path, capsys):
    """--export true with CHAIR: export/chair.jsonl, one {"image_id", "caption"} per description,
    the COCO image id as the instances file has it (an int), as CHAIR-metric-standalone's chair.py
    reads captions (--image_id_key image_id --caption_key caption); CHAIR had no export. Run on
    the world's own COCO-layout annotations (the COCO path) and on Shapes CHAIR (whose export
    wrote the question's id, a string, where the annotations' image id belongs)."""
    world = env["world"]
    (tmp_path / "synonyms.txt").write_text("\n".join(shapes.SHAPES) + "\n")
    coco = ["--benchmarks", "chair", "--chair_instances", os.path.join(world, "annotations.json"),
            "--chair_synonyms", str(tmp_path / "synonyms.txt"), "--image_folder", world,
            "--chair_prompt", "Describe the image.", "--limit", "3", "--export", "true"]
    for name, argv in (("coco", coco), ("shapes", ["--benchmarks", "chair", "--export", "true"])):
        out = tmp_path / name
        chair = run_cli(env, out, "--ckpt", env["ckpts"][0], *argv)["m0"]["chair"]
        answers = lines(out / "m0" / "answers_chair.jsonl")
        exported = lines(out / "m0" / "export" / "chair.jsonl")
        assert [r["caption"] for r in exported] == [a["answer"] for a in answers], name
        assert all(set(r) == {"image_id", "caption"} for r in exported)
        if name == "coco":
            with open(os.path.join(world, "annotations.json")) as f:
                images = json.load(f)["images"][:3]
            assert [r["image_id"] for r in exported] == [img["id"] for img in images]
            assert all(isinstance(r["image_id"], int) for r in exported)
        else:  # the annotations' id of the described image, not the question's (a string)
            with open(os.path.join(world, "annotations.json")) as f:
                ids = {img["file_name"]: img["id"] for img in json.load(f)["images"]}
            with open(os.path.join(world, "test_describe.json")) as f:
                image = {r["id"]: r["image"] for r in json.load(f)}
            assert [r["image_id"] for r in exported] == [ids[image[a["id"]]] for a in answers]
            assert all(isinstance(r["image_id"], int) for r in exported)
        # and scored again from it, as from a LLaVA answers file (it was refused: "expected
        # {question_id, prompt, text}"), CHAIR-metric-standalone's JSON list layout too; matched
        # by image id (Shapes' was "no answer matches one of the 4 questions": its question ids
        # are not its image ids)
        export = out / "m0" / "export" / "chair.jsonl"
        as_list = tmp_path / f"{name}_chair_list.json"
        as_list.write_text(json.dumps(exported))
        # LisaAnne/Hallucination's chair.py reads coco-caption's output, captions in imgToEval
        # (it was "record 0: field 'text': expected {question_id, prompt, text}")
        coco_caption = tmp_path / f"{name}_coco_caption.json"
        coco_caption.write_text(json.dumps({"overall": {"CIDEr": 0.0}, "imgToEval": {
            str(r["image_id"]): dict(r, CIDEr=0.0) for r in exported}}))
        for answers in (export, as_list, coco_caption):
            again = run_cli(env, tmp_path / f"{name}_rescored", "--ckpt", "other", *argv,
                            "--export", "false", "--rescore", "true", "--llava_answers",
                            str(answers))
            assert again["other"]["chair"] == chair, name
    # captions answer no POPE question whose id is a caption's image id (they were scored as
    # its yes/no answers, rc 0)
    pope = os.path.join(world, "pope_random.jsonl")
    caps = tmp_path / "captions.jsonl"
    caps.write_text("".join(json.dumps({"image_id": json.loads(x)["question_id"], "caption": "yes"})
                            + "\n" for x in open(pope)))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(env, tmp_path / "pope", "--ckpt", "other", "--benchmarks", "pope", "--pope_files",
                pope, "--rescore", "true", "--llava_answers", str(caps))
    assert "captions.jsonl: no caption's image_id is the image of one of the 4 questions" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------- MMHal, GAVIE, oracle

def test_rating_parsers():
    for rule in ("reference", "ours"):
        assert judges.parse_rating("The answer looks fine.", rule) is None  # zero ratings
        assert judges.parse_rating("Short explanation.\nRating: 4, somewhat informative", rule) == 4
        assert judges.parse_rating("RATING: 2", rule) == 2
        # two ratings
        assert judges.parse_rating("Rating: 5 ... on reflection, Rating: 3", rule) is None
        assert judges.parse_rating("Rating: 5. Final rating: 5", rule) == 5  # one value
        assert judges.parse_rating("Rating: 7", rule) is None
    # eval_gpt_mmhal.py tests the text 'rating: k' for k = 0..6: 'rating: 60' holds 'rating: 6',
    # 'rating:5' none
    assert judges.parse_rating("Rating: 60") == 6
    assert judges.parse_rating("Rating: 60", "ours") is None
    assert judges.parse_rating("Rating:5") is None and judges.parse_rating("Rating:5", "ours") == 5
    parsed = judges.parse_gavie("Relevancy: 8\nAccuracy: 6\nReason: ok")
    assert parsed == {"relevancy": 8.0, "accuracy": 6.0}
    assert judges.parse_gavie("Relevancy: 8") is None
    assert judges.parse_gavie("Relevancy: 8 Accuracy: 11") is None
    assert judges.parse_gavie("Relevancy: 8 Accuracy: 6 Accuracy: 7") is None
    # a number that is not a plain score is no score (it read as its first digits: 1e3 as 1)
    assert judges.parse_gavie("Relevancy: 1e3\nAccuracy: 6") is None
    assert judges.parse_gavie("Relevancy: 8.5.2\nAccuracy: 6") is None
    assert judges.parse_gavie("Relevancy: 8.\nAccuracy: 6/10") == {"relevancy": 8, "accuracy": 6}
    types = ["attribute", "attribute", "counting", "other"]
    q = [{"id": str(i), "question_type": t} for i, t in enumerate(types)]
    replies = {"0": "Rating: 6", "1": "Rating: 2", "2": "rating: 4", "3": "no idea"}
    m = judges.mmhal_metrics(q, replies)
    # the reference: ratings 6, 2, 4 and 0 for the unreadable reply: mean 3, two of four below 3
    assert m["score"] == pytest.approx(3.0) and m["hallucination_rate"] == pytest.approx(2 / 4)
    assert m["n"] == 4
    assert m["per_type"] == {"attribute": 4.0, "counting": 4.0, "other": 0.0}
    assert m["unparsed_ids"] == ["3"]
    m = judges.mmhal_metrics(q, replies, "ours")
    # ours: rated 6, 2, 4: mean 4, one of three below 3; the unreadable reply is counted and left
    # out
    assert m["score"] == pytest.approx(4.0) and m["hallucination_rate"] == pytest.approx(1 / 3)
    assert m["per_type"] == {"attribute": 4.0, "counting": 4.0}
    assert (m["unparsed"], m["unparsed_ids"]) == (1, ["3"])
    assert m["score_unparsed_as_0"] == pytest.approx(3.0)
    # a hallucination is a rating below 3 (eval_gpt_mmhal.py): a 3 is none
    m = judges.mmhal_metrics(q[:3], {"0": "Rating: 3", "1": "Rating: 2", "2": "Rating: 3"})
    assert m["hallucination_rate"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("answer, rating", [
    ("The circle is red.", 5),  # true, all facts of the gt
    # and more true detail
    ("The circle is red. There is also a small blue triangle at the top right.", 6),
    ("I am not sure.", 3),  # truthful, not informative
    ("The circle is blue.", 1),  # wrong color
    ("There is a green square.", 0)])  # hallucinated object
def test_oracle_judge_mmhal(answer, rating):
    q = {"gt": "The circle is red.", "objects": OBJECTS, "prompt": "What color is the circle?",
         "question_type": "attribute", "image_content": ["large red circle on the left"]}
    prompt = judges.mmhal_prompt(q, answer)
    reply = judges.OracleJudge()(prompt, dict(q, answer=answer, bench="mmhal"))
    assert judges.parse_rating(reply) == rating
    assert "What color is the circle?" in judges.mmhal_prompt(q, answer)
    assert "Rating: 0, not informative" in judges.MMHAL_PROMPT


def test_oracle_judge_gavie():
    q = {"gt": "Yes, there is a circle.", "objects": OBJECTS,
         "prompt": "Is there a circle in the image?", "qtype": "yesno",
         "boxes": [("large red circle", [1, 17, 14, 14])]}
    def judge(a):
        reply = judges.OracleJudge()(judges.gavie_prompt(q, a), dict(q, answer=a, bench="gavie"))
        return judges.parse_gavie(reply)
    assert judge("Yes, there is a circle.") == {"relevancy": 10, "accuracy": 10}
    assert judge("No.") == {"relevancy": 10, "accuracy": 7}          # right form, wrong verdict
    assert judge("There is a square.") == {"relevancy": 5, "accuracy": 7}
    assert judge("blah") == {"relevancy": 0, "accuracy": 0}
    assert "large red circle X:1 Y:17 Width:14 Height:14" in judges.gavie_prompt(q, "x")


# ---------------------------------------------------------------------------------- the HTTP judge

class FakeAPI(http.server.BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions from a script of (status, content) pairs; records the
    bodies."""
    script, bodies, done = [], [], threading.Event()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeAPI.bodies.append((self.path, self.headers.get("Authorization"), body))
        step = FakeAPI.script.pop(0) if FakeAPI.script else (200, "Fine.\nRating: 5")
        # (a dict: a raw reply {"status", "headers", "body", "trickle": seconds a byte})
        raw = step if isinstance(step, dict) else {}
        status, content, *finish = (raw.get("status", 200), None) if raw else step
        reply = raw.get("body", {"choices": [{"message": {"role": "assistant", "content": content},
                                              "finish_reason": finish[0] if finish else "stop"}]})
        data = json.dumps(reply).encode()
        self.send_response(status)
        for k, v in raw.get("headers", {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for i in range(30 if raw.get("slow_headers") else 0):  # (a header line at a time)
            self.send_header(f"X-Wait-{i}", "1")
            self.flush_headers()
            if FakeAPI.done.wait(raw["slow_headers"]):  # (the test is over)
                return
        self.end_headers()
        if raw.get("cut"):  # (half the body, then the connection closes)
            self.wfile.write(data[:len(data) // 2])
            return
        if raw.get("trickle"):
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                if FakeAPI.done.wait(raw["trickle"]):  # (the test is over)
                    return
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass

    timeout = 5  # (each read and write: a client that never sends its request cannot hold close)


class FakeServer(http.server.ThreadingHTTPServer):
    """FakeAPI's server. Its request threads are joined when it closes, and a client gone prints
    no error: a slow reply of one test trickled on for seconds after it, and a write to a client
    gone (a timeout under load) printed a traceback into the stderr a later test had redirected.
    Any other error of a handler is kept in `errors` (fake_api fails the test on one)."""
    daemon_threads, block_on_close = False, True

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            self.errors.append(error)


@contextlib.contextmanager
def fake_api():
    """The URL of a FakeAPI served until the block ends; its replies end with it."""
    FakeAPI.script, FakeAPI.bodies, FakeAPI.done = [], [], threading.Event()
    server = FakeServer(("127.0.0.1", 0), FakeAPI)
    server.errors = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        FakeAPI.done.set()
        server.shutdown()
        server.server_close()
    assert not server.errors, server.errors  # (the fake's own bug: not a judge's retry)


@pytest.fixture
def api():
    with fake_api() as url:
        yield url


def test_the_fake_api_ends_its_replies_with_the_test_and_prints_nothing(monkeypatch):
    """A reply trickling in outlived its test by seconds; under load the client went away, the
    server thread's next write failed, and socketserver printed a traceback to the stderr that a
    later test's run_cli had redirected (its error no longer one line: a flaky judge test). Now a
    reply ends with its test, the request threads are joined (a client that never finishes its
    request included), and a client gone prints nothing."""
    monkeypatch.setattr(FakeAPI, "timeout", 0.5)
    content = "x" * 200
    reply = {"status": 200, "body": {"choices": [{"message": {"content": content}}]},
             "trickle": 0.01}
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        with fake_api() as url:
            FakeAPI.script = [reply, reply]
            port = urllib.parse.urlsplit(url).port
            # a client that goes away mid-reply, as a judge's request that timed out under load
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(request)
                client.recv(1)
            time.sleep(0.3)  # (the next bytes meet a closed socket)
            # one that stays, as a judge's request thread left behind does
            staying = socket.create_connection(("127.0.0.1", port))
            staying.sendall(request)
            staying.recv(1)
            # and one that never ends its request: its thread waits out the read's timeout
            halfway = socket.create_connection(("127.0.0.1", port))
            halfway.sendall(request[:20])
        left = [t for t in threading.enumerate() if "process_request" in t.name]
        got = b""
        while chunk := staying.recv(4096):  # (what the staying client got, to the close)
            got += chunk
        staying.close()
        halfway.close()
    assert not left and err.getvalue() == "", (left, err.getvalue())
    assert content.encode() not in got  # (its reply ended with the test, not trickled out)


def test_openai_judge_retries_and_parses(api):
    FakeAPI.script = [(500, "overloaded"), (200, "The response is accurate.\nRating: 5")]
    cfg = E.Config(judge="openai", judge_url=api, judge_model="judge-x", judge_key="sk-test",
                   judge_retries=2, judge_backoff=0.01, judge_timeout=5)
    reply = judges.make_judge(cfg)("PROMPT TEXT", {})
    # a 500, then the retry succeeded
    assert judges.parse_rating(reply) == 5 and len(FakeAPI.bodies) == 2
    path, auth, body = FakeAPI.bodies[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-x"
    assert body["messages"] == [{"role": "user", "content": "PROMPT TEXT"}]
    assert body["temperature"] == 0 and body["max_tokens"] == 512
    FakeAPI.script = [(400, "bad request")]
    with pytest.raises(judges.JudgeError, match="HTTP 400"):  # not retried
        judges.make_judge(cfg)("x", {})


def test_openai_judge_waits_double_up_to_an_hour(api, monkeypatch):
    # many retries: each wait doubles from --judge_backoff and stops at an hour (the doubling went
    # past what a float holds: an OverflowError after every answer was made)
    waits = []
    monkeypatch.setattr(judges.time, "sleep", waits.append)
    FakeAPI.script = [(500, "overloaded")] * 1200
    cfg = E.Config(judge="openai", judge_url=api, judge_model="judge-x", judge_key="sk-test",
                   judge_retries=1100, judge_backoff=2.0, judge_timeout=5)
    with pytest.raises(judges.JudgeError, match="no reply after 1101 tries"):
        judges.make_judge(cfg)("x", {})
    assert waits[:3] == [2.0, 4.0, 8.0] and max(waits) == judges.MAX_WAIT == waits[-1]
    assert len(waits) == 1100


def test_openai_judge_says_what_the_server_said_and_keeps_the_key(api, monkeypatch):
    """A redirect was followed (the key sent to the other host, the prompt dropped: urllib resends a
    POST as a GET) and its reply stored as a verdict; Retry-After was not read; a spent quota (a
    429) was retried for a minute and said only "429"; a 200 carrying an error said "KeyError"; a
    server echoing a wrong key put it on the screen; no line named the question."""
    waits = []
    monkeypatch.setattr(judges.time, "sleep", waits.append)
    key = "sk-SECRET-123"
    cfg = E.Config(judge="openai", judge_url=api, judge_model="m", judge_key=key,
                   judge_retries=2, judge_backoff=0.01, judge_timeout=5)
    judge, record = judges.make_judge(cfg), {"bench": "mmhal", "id": 7}

    def refused(script, words):
        FakeAPI.script, FakeAPI.bodies = list(script), []
        with pytest.raises(judges.JudgeError) as e:
            judge("x", record)
        assert words in str(e.value) and key not in str(e.value), str(e.value)
        return str(e.value)
    refused([{"status": 302, "headers": {"Location": "http://elsewhere.example/v1"}}],
            "redirects to 'http://elsewhere.example/v1'")
    assert len(FakeAPI.bodies) == 1
    quota = {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}
    refused([{"status": 429, "body": quota}], "You exceeded your current quota")
    assert len(FakeAPI.bodies) == 1  # (not retried: waiting does not refill a quota)
    echo = {"error": {"message": f"Incorrect API key provided: {key}"}}
    assert "mmhal question 7" in refused([{"status": 401, "body": echo}], "(the key)")
    refused([{"status": 200, "body": {"error": {"message": "overloaded, try later"}}}] * 3,
            "an error in a 200 reply: {\"error\": {\"message\": \"overloaded, try later\"}}")
    assert len(FakeAPI.bodies) == 3
    # (a 200 naming an error no retry mends was asked again --judge_retries times)
    unknown = {"error": {"message": "no such model", "code": "model_not_found"}}
    refused([{"status": 200, "body": unknown}] * 3, "no such model")
    assert len(FakeAPI.bodies) == 1
    refused([{"status": 429, "headers": {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}}],
            "the server asks to wait")
    # (a key of a few characters, as a local server's, is not scrubbed: it blanked its letters)
    short = judges.make_judge(E.Config(judge="openai", judge_url=api, judge_model="m",
                                       judge_key="k", judge_retries=0))
    FakeAPI.script = [{"status": 404, "body": {"error": {"message": "unknown model"}}}]
    with pytest.raises(judges.JudgeError, match="unknown model"):
        short("x", record)
    waits.clear()
    FakeAPI.script = [{"status": 429, "headers": {"Retry-After": "7"}},
                      {"status": 408}, (200, "Rating: 4")]
    assert judge("x", record) == "Rating: 4" and waits == [7.0, 0.02]  # (408 retried too)


def test_openai_judge_timeout_bounds_the_whole_reply(api):
    """--judge_timeout bounded each socket read alone: a reply dripping in a byte at a time held
    the run for as long as it dripped."""
    FakeAPI.script = [{"status": 200, "body": {"choices": [{"message": {"content": "x" * 200}}]},
                       "trickle": 0.01}]
    cfg = E.Config(judge="openai", judge_url=api, judge_model="m", judge_key="k",
                   judge_retries=0, judge_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(judges.JudgeError, match="within --judge_timeout 0.3 s"):
        judges.make_judge(cfg)("x", {})
    assert time.monotonic() - t0 < 1.5


def test_openai_judge_reads_odd_replies_and_bounds_headers_and_error_text(api):
    """A hunt with a fake server: a 500 whose text was cut off ended in http.client's traceback
    (not retried); content sent as a list of parts, or as a number, ended in an AttributeError;
    --judge_timeout bounded neither headers sent a line at a time nor an error's text dripping
    in (each held the run for as long as it lasted). Now the 500 is retried, parts are joined (a
    number is no reply: retried, then one line), and both slow cases stop within the timeout."""
    cfg = E.Config(judge="openai", judge_url=api, judge_model="m", judge_key="k",
                   judge_retries=1, judge_backoff=0.01, judge_timeout=0.5)
    judge = judges.make_judge(cfg)
    FakeAPI.script = [{"status": 500, "body": {"error": {"message": "x" * 400}}, "cut": True},
                      (200, "Rating: 4")]
    assert judge("x", {}) == "Rating: 4"
    parts = [{"type": "text", "text": "Fine.\n"}, {"type": "text", "text": "Rating: 5"}]
    FakeAPI.script = [{"status": 200, "body": {"choices": [{"message": {"content": parts}}]}}]
    assert judge("x", {}) == "Fine.\nRating: 5"
    FakeAPI.script = [{"status": 200, "body": {"choices": [{"message": {"content": 5}}]}}] * 2
    with pytest.raises(judges.JudgeError, match=r"not a chat-completions reply \(TypeError\)"):
        judge("x", {})
    error_text = {"status": 500, "body": {"error": {"message": "y" * 100}}, "trickle": 0.05}
    for slow in ({"status": 200, "slow_headers": 0.1}, error_text):
        FakeAPI.script = [slow, slow]
        t0 = time.monotonic()
        with pytest.raises(judges.JudgeError, match="within --judge_timeout 0.5 s"):
            judge("x", {})
        assert time.monotonic() - t0 < 2.5, slow


def test_empty_judge_replies_are_said_not_stored_and_asked_again(env, api, capsys):
    """A reply without a word (a content filter's, content null) was stored and scored 0 on every
    later run without a word of why."""
    out = env["root"] / "judge_empty"
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "mmhal", "--judge", "openai",
            "--judge_url", api, "--judge_key", "k")
    FakeAPI.script = [(200, None, "content_filter")]
    run_cli(env, out, *args)
    printed = capsys.readouterr().out
    assert "warning: m0 mmhal: 1 judge replies were empty (finish_reason content_filter; " \
        in printed and "not stored, so the next run asks again" in printed, printed
    assert len([x for x in open(out / "m0" / "judge_mmhal.jsonl")]) == 3
    # (scores.json says which of the unparsed replies were empty: they looked like a 0 verdict)
    assert "1 of them empty and not stored" in printed
    assert json.load(open(out / "m0" / "scores.json"))["mmhal"]["empty_replies"] == 1
    FakeAPI.bodies.clear()
    run_cli(env, out, *args)
    assert len(FakeAPI.bodies) == 1 and "were empty" not in capsys.readouterr().out
    assert "empty_replies" not in json.load(open(out / "m0" / "scores.json"))["mmhal"]


def test_a_key_given_where_it_is_not_read_is_not_shown(env, tmp_path):
    from conftest import run_cli as run_stage
    code, _, err = run_stage("eval", ["--ckpt", env["ckpts"][0], "--benchmarks", "pope",
                                      "--world", env["world"], "--out", str(tmp_path / "o"),
                                      "--judge_key", "sk-SECRET-123"])
    assert code == 2 and "--judge_key (a key, not shown): not read" in err, err
    assert "sk-SECRET" not in err


def test_a_key_an_http_header_cannot_carry_is_one_line_before_any_answer(env, api, tmp_path,
                                                                         monkeypatch):
    """A key read from a file saved on Windows ends in a CR: urllib refused the header with a
    ValueError, which was taken for a bad reply, retried, and named as 'not a chat-completions
    reply' once every answer had been generated."""
    from conftest import run_cli as run_stage
    monkeypatch.setenv("OPENAI_API_KEY", "sk-SECRET-123\r")
    code, out, err = run_stage("eval", ["--ckpt", env["ckpts"][0], "--benchmarks", "mmhal",
                                        "--world", env["world"], "--out", str(tmp_path / "o"),
                                        "--judge", "openai", "--judge_url", api,
                                        "--judge_retries", "0", *FAST])
    assert code == 2 and err.count("\n") == 1, err
    assert "error: OPENAI_API_KEY: holds '\\r' at position 13" in err and "SECRET" not in err
    assert not os.path.exists(tmp_path / "o") and not FakeAPI.bodies  # (nothing asked)


def test_a_key_http_client_sends_is_sent_as_it_is_and_only_such_a_key(api):
    """A key holding a space, a tab or a Latin-1 letter was refused, though http.client sends it;
    what putheader refuses (a letter beyond U+00FF, a CR or LF that no space or tab follows) is
    refused before any request."""
    for key in ["sk a", "sk\tb", "sk-é\xff", "sk-a\r\n b"]:
        cfg = E.Config(judge="openai", judge_url=api, judge_model="m", judge_key=key,
                       judge_retries=0, judge_timeout=5)
        assert judges.make_judge(cfg)("x", {}) == "Fine.\nRating: 5"
        assert FakeAPI.bodies[-1][1] == f"Bearer {key}", key
    FakeAPI.bodies.clear()
    for key, i in [("sk-\u0100", 3), ("sk-猫", 3), ("sk-a\r", 4), ("sk\na", 2), ("s\r\nk", 2)]:
        cfg = E.Config(judge="openai", judge_url=api, judge_key=key)
        with pytest.raises(common.ConfigError, match=re.escape(
                f"--judge_key: holds {key[i]!r} at position {i} (an HTTP header carries Latin-1")):
            judges.make_judge(cfg)
    assert not FakeAPI.bodies


def test_an_azure_openai_key_goes_in_its_api_key_header(monkeypatch):
    """Azure OpenAI takes an API key in an 'api-key' header (its REST reference); it was sent as
    'Authorization: Bearer', which Azure reads as an Entra ID token. An Entra ID token (a JWT)
    still goes as Bearer, and every other host gets Bearer."""
    sent = []

    def read(self, req):  # (no Azure host to reach here: the request as it would go)
        sent.append(dict(req.header_items()))
        return json.dumps({"choices": [{"message": {"content": "Rating: 5"}}]}).encode()
    monkeypatch.setattr(judges.OpenAIJudge, "_read", read)
    azure = "https://res.openai.azure.com/openai/deployments/gpt4?api-version=2024-10-21"
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2ln-_x"
    for url, key, header in [(azure, "0123abcd", {"Api-key": "0123abcd"}),
                             (azure, jwt, {"Authorization": f"Bearer {jwt}"}),
                             ("https://api.openai.com/v1", "s", {"Authorization": "Bearer s"}),
                             ("http://azure.com.example/v1", "k", {"Authorization": "Bearer k"})]:
        cfg = E.Config(judge="openai", judge_url=url, judge_model="m", judge_key=key,
                       judge_retries=0)
        assert judges.make_judge(cfg)("x", {}) == "Rating: 5"
        keys = {k: v for k, v in sent[-1].items() if k in ("Api-key", "Authorization")}
        assert keys == header, (url, key)
    azure_url = judges.chat_completions_url(azure)
    assert azure_url.endswith("/deployments/gpt4/chat/completions?api-version=2024-10-21")


@pytest.mark.parametrize("url, said", [
    ("{api} ", "holds ' '"), ("{api}\r", "holds '\\r'"), ("{api}/modèle", "holds 'è'"),
    ("127.0.0.1:1/v1", "not an http:// or https:// address"),
    ("https://host:abc/v1", "Port could not be cast to integer value as 'abc'"),
    ("http://host:99999/v1", "Port out of range 0-65535"), ("http://[::1/v1", "Invalid IPv6 URL"),
    ("http://host?x=é", "holds 'é'")])
def test_a_judge_url_urllib_cannot_send_is_one_line_before_any_answer(env, api, tmp_path, url,
                                                                      said):
    """A --judge_url with a trailing space or CR (copied), a path letter beyond ASCII, or no scheme
    was urllib's InvalidURL, UnicodeEncodeError or ValueError, said (the last two as 'not a
    chat-completions reply') once every answer had been generated and the retries spent."""
    from conftest import run_cli as run_stage
    url = url.format(api=api)
    code, out, err = run_stage("eval", ["--ckpt", env["ckpts"][0], "--benchmarks", "mmhal",
                                        "--world", env["world"], "--out", str(tmp_path / "o"),
                                        "--judge", "openai", "--judge_url", url, "--judge_key",
                                        "k", "--judge_retries", "0", *FAST])
    assert code == 2 and err.count("\n") == 1, err
    assert f"error: --judge_url {url!r}: {said}" in err
    assert not os.path.exists(tmp_path / "o") and not FakeAPI.bodies  # (nothing asked)


def test_judge_urls_urllib_sends_pass_and_a_query_stays_after_the_path(api):
    """The URL check lets through what urllib sends (a host beyond ASCII goes as IDNA); it refuses
    a URL without a host, with a user before it, or a host IDNA cannot encode (urllib failed on
    each once every answer was made). '/chat/completions' went after a query ('?x=1')."""
    for url in ["http://localhost:8000/v1", "https://host/v1/chat/completions",
                "http://[::1]:8000/v1", "http://host:8000/v1?api-version=2024-02-01",
                "HTTP://HOST/v1", "https://bücher.example/v1", "http://host/v1#é"]:
        assert judges.check_judge_url(url) is None, url
    for url, said in [("http:///v1", "no host"), ("http://:8000/v1", "no host"),
                      ("http://u:pw@host/v1", "a user or password"),
                      ("http://a..b/v1", "host 'a..b': ")]:
        with pytest.raises(common.ConfigError, match=re.escape(f"--judge_url {url!r}: {said}")):
            judges.check_judge_url(url)
    # (a whole endpoint is used as given: it was doubled, a 404 on a strict server)
    for given in ("/?x=1", "/chat/completions?x=1", "/chat/completions/"):
        cfg = E.Config(judge="openai", judge_url=api + given, judge_model="m", judge_key="k",
                       judge_retries=0, judge_timeout=5)
        assert judges.make_judge(cfg)("x", {}) == "Fine.\nRating: 5"
        sent = "/v1/chat/completions" + ("?x=1" if "?" in given else "")
        assert FakeAPI.bodies[-1][0] == sent, given


MMHAL_TEMPLATE = ("Judge it. Reply as {\"rating\": k}.\n"
                  "### Image Contents\n{image_content}\n\n"
                  "### Question\n{question}\n\n"
                  "### Standard Human-Generated Answer\n{gt_answer}\n\n"
                  "### LMM Response to Evaluate\n{answer}\n")
GAVIE_TEMPLATE = ("bounding box:\n{boxes}\n\n"
                  "Here is the instruction for the image:\n{question}\n\n"
                  "Answer1: {answer}\n")


def test_judge_prompt_files_fill_their_placeholders(tmp_path):
    (tmp_path / "mmhal.txt").write_text(MMHAL_TEMPLATE)
    (tmp_path / "gavie.txt").write_text(GAVIE_TEMPLATE)
    t = judges.load_judge_prompts((f"mmhal={tmp_path / 'mmhal.txt'}",
                                   f"gavie={tmp_path / 'gavie.txt'}"))
    q = {"prompt": "What color is the circle?", "gt": "The circle is red.",
         "image_content": ["Circle", "Triangle"],
         "boxes": [("large red circle", [1, 17, 14, 14]), ("small blue triangle", [35, 3, 9, 8])]}
    # eval_gpt_mmhal.py joins the contents with ', '; other braces, in the template or the answer,
    # stay as they are
    assert judges.judge_prompt("mmhal", q, "It is {blue}.", t) == (
        'Judge it. Reply as {"rating": k}.\n### Image Contents\nCircle, Triangle\n\n'
        "### Question\nWhat color is the circle?\n\n"
        "### Standard Human-Generated Answer\nThe circle is red.\n\n"
        "### LMM Response to Evaluate\nIt is {blue}.\n")
    assert judges.judge_prompt("gavie", q, "Red.", t) == (
        "bounding box:\nlarge red circle X:1 Y:17 Width:14 Height:14\n"
        "small blue triangle X:35 Y:3 Width:9 Height:8\n\n"
        "Here is the instruction for the image:\nWhat color is the circle?\n\nAnswer1: Red.\n")
    # no file: ours
    assert judges.judge_prompt("mmhal", q, "Red.", {}) == judges.mmhal_prompt(q, "Red.")
    (tmp_path / "bad.txt").write_text("{question} {boxes} {answer}")
    with pytest.raises(E.DataError, match="not for mmhal: boxes"):
        judges.load_judge_prompts((f"mmhal={tmp_path / 'bad.txt'}",))
    (tmp_path / "noanswer.txt").write_text("{question}")
    with pytest.raises(E.DataError, match="missing answer"):
        judges.load_judge_prompts((f"gavie={tmp_path / 'noanswer.txt'}",))
    with pytest.raises(common.ConfigError):
        judges.load_judge_prompts((str(tmp_path / "mmhal.txt"),))
    # no file named (was 'error: : file not found'), or one benchmark twice (the first ignored)
    with pytest.raises(common.ConfigError, match="--judge_prompt mmhal=: expected mmhal=FILE"):
        judges.load_judge_prompts(("mmhal=",))
    with pytest.raises(common.ConfigError, match="mmhal= given twice"):
        judges.load_judge_prompts((f"mmhal={tmp_path / 'mmhal.txt'}",
                                   f"mmhal={tmp_path / 'bad.txt'}"))
    # LRV's official output format is read too
    official = ("Relevancy:\nscore of the answer1: 8\nreason: it follows.\n\n"
                "Accuracy:\nscore of the answer1: 6\nreason: no.")
    assert judges.parse_gavie(official) == {"relevancy": 8.0, "accuracy": 6.0}
    # and the format LRV's prompts/GAVIE.txt asks for ('score of answer1:')
    gavie_txt = ("Accuracy:\nscore of answer1: 7\nreason: fine.\n\n"
                 "Relevancy:\nscore of answer1: 9\nreason: on topic.")
    assert judges.parse_gavie(gavie_txt) == {"relevancy": 9.0, "accuracy": 7.0}
    # judges' markdown, 'score' after the key, a full-width colon, and a reason that says
    # 'accuracy:' inside LRV's format: each was left unparsed (out of both means)
    for reply in ("**Relevancy**: 8\n**Accuracy**: 6", "Relevancy: **8**\nAccuracy: **6**",
                  "Relevancy score: 8\nAccuracy score: 6", "Relevancy\uff1a8\nAccuracy\uff1a6",
                  official.replace("it follows.", "the answer's accuracy: fine.")):
        assert judges.parse_gavie(reply) == {"relevancy": 8.0, "accuracy": 6.0}, reply
    # (a review of that change: LRV's format on one line, or a label after a reason on its line,
    # came back unparsed; a sentence saying 'overall accuracy score: 7' counted as a score)
    for reply in ("Accuracy: score of answer1: 6 reason: fine. Relevancy: score of answer1: 8 "
                  "reason: on topic.", gavie_txt.replace("7", "6").replace("9", "8")
                  .replace("fine.\n\n", "fine. "), "Relevancy: 8\nAccuracy: 6\nOverall accuracy "
                  "score: 7"):
        assert judges.parse_gavie(reply) == {"relevancy": 8.0, "accuracy": 6.0}, reply
    # (a hunt: a reason saying 'accuracy: 3' took the place of the section's own score, in LRV's
    # format and in ours)
    for reply in (official.replace("reason: no.", "reason: accuracy: 3 items."),
                  "Relevancy: 8\nAccuracy: 6\nReason: accuracy: 3",
                  # (and a review of that fix: scores on one line, then a line of reasons each,
                  # came back unparsed)
                  "Relevancy: 8, Accuracy: 6\nRelevancy: on topic.\nAccuracy: it names a square.",
                  "Relevancy: 8\n- Accuracy: 6\nAccuracy: an explanation"):
        assert judges.parse_gavie(reply) == {"relevancy": 8.0, "accuracy": 6.0}, reply


def test_judge_prompt_reaches_the_judge(env, api, tmp_path):
    (tmp_path / "mmhal.txt").write_text(MMHAL_TEMPLATE)
    out = env["root"] / "judge_prompt"
    run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "mmhal", "--judge", "openai",
            "--judge_url", api, "--judge_key", "k",
            "--judge_prompt", f"mmhal={tmp_path / 'mmhal.txt'}")
    sent = [b["messages"][0]["content"] for _, _, b in FakeAPI.bodies]
    assert len(sent) == 4
    assert all(p.startswith("Judge it. Reply as {") and "### Question" in p for p in sent)
    assert all(r["judge"].startswith("openai:") and "|prompt:" in r["judge"]
               for r in map(json.loads, open(out / "m0" / "judge_mmhal.jsonl")))


def test_judge_replies_cut_at_the_limit_are_said_and_the_limit_can_go(env, api, capsys):
    """A reply the endpoint stopped at --judge_max_tokens (512 by default) lost MMHal's rating,
    which comes at its end, and scored 0 without a word; LLaVA-RLHF's eval_gpt_mmhal.py sends no
    limit, which --judge_max_tokens 0 now does."""
    out = env["root"] / "judge_cut"
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "mmhal", "--judge", "openai",
            "--judge_url", api, "--judge_key", "k")
    FakeAPI.script = [(200, "The response names a", "length")]
    run_cli(env, out, *args)
    printed = capsys.readouterr().out
    said = "warning: m0 mmhal: 1 of 4 judge replies stopped at --judge_max_tokens 512 ('cut' in " \
        "judge_mmhal.jsonl)"
    assert said in printed, printed
    assert all(b["max_tokens"] == 512 for _, _, b in FakeAPI.bodies)
    run_cli(env, out, *args)  # (the stored replies reused: the cut one is said again)
    assert said in capsys.readouterr().out and len(FakeAPI.bodies) == 4
    FakeAPI.bodies.clear()
    FakeAPI.script = [(200, "The server's own cap", "length")]  # (it said "raise" 0)
    run_cli(env, out, *args, "--judge_max_tokens", "0")  # (another limit: judged again)
    assert len(FakeAPI.bodies) == 4 and all("max_tokens" not in b for _, _, b in FakeAPI.bodies)
    assert "1 of 4 judge replies stopped at the server's own limit (--judge_max_tokens 0 sends " \
        "none)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ the CLI

def test_cli_run_reuse_and_compare(env, capsys):
    a, b = env["ckpts"]
    out = env["root"] / "runs"
    run_cli(env, out, "--ckpt", a)  # E.cli: what `python eval.py` runs, in-process
    d = out / "m0"
    files = sorted(os.listdir(d))
    assert files == ["answers_chair.jsonl", "answers_gavie.jsonl", "answers_mmhal.jsonl",
                     "answers_pope_adversarial.jsonl", "answers_pope_popular.jsonl",
                     "answers_pope_random.jsonl", "judge_gavie.jsonl", "judge_mmhal.jsonl",
                     "scores.json"]
    scores = json.load(open(d / "scores.json"))
    assert set(scores["pope"]) == {"random", "popular", "adversarial", "average"}
    assert scores["pope"]["random"]["n"] == 4
    assert scores["chair"]["n"] == 4 and scores["mmhal"]["n"] == 4 and scores["gavie"]["n"] == 4
    line = lines(d / "answers_pope_random.jsonl")[0]
    assert set(line) == {"id", "prompt", "answer", "label", "source", "image_digest"}
    assert line["prompt"] == "Is there a circle in the image?"
    assert 0 <= scores["mmhal"]["score"] <= 6

    # the second run, as a subprocess: every answer and judge reply reused, nothing generated or
    # judged again
    before = {f: open(d / f, "rb").read() for f in files if f.startswith(("answers", "judge"))}
    command = [sys.executable, os.path.join(HERE, "eval.py"), "--ckpt", a, "--world", env["world"],
               "--out", str(out), *FAST]
    r = subprocess.run(command, capture_output=True, text=True, cwd=HERE, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("generating 0") == 6 and "reused 4 answers" in r.stdout
    assert "| m0 |" in r.stdout
    assert {f: open(d / f, "rb").read() for f in before} == before
    assert json.load(open(d / "scores.json")) == scores
    # --rescore: scores from the files alone, no checkpoint needed
    gone = str(env["root"] / "gone" / "m0")
    rescored = run_cli(env, out, "--ckpt", gone, "--rescore", "true")
    assert rescored["m0"]["mmhal"] == scores["mmhal"]

    rows = run_cli(env, out, "--compare", a, b)  # m0 reused, m1 generated
    md = open(out / "compare.md").read()
    assert md.startswith("| checkpoint | POPE F1 random | POPE F1 popular | POPE F1 adversarial "
                         "| yes-ratio | CHAIR_i")
    assert "| m0 |" in md and "| m1 |" in md and set(rows) == {"m0", "m1"}
    assert [r["checkpoint"] for r in json.load(open(out / "compare.json"))["rows"]] == ["m0", "m1"]


def test_resume_after_an_interrupted_answers_file(env, capsys):
    out = env["root"] / "resume"
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "chair", "--limit", "12")
    run_cli(env, out, *args)
    path = out / "m0" / "answers_chair.jsonl"
    full = lines(path)
    text = open(path).read()
    # stop half-way through a line, as a crash would
    cut = text.index("\n", len(text) // 2) + 20
    open(path, "w").write(text[:cut])
    kept = len(text[:cut].splitlines()) - 1
    capsys.readouterr()
    run_cli(env, out, *args)
    assert f"reused {kept} answers, generating {12 - kept}" in capsys.readouterr().out
    again = lines(path)
    assert sorted(x["id"] for x in again) == sorted(x["id"] for x in full) and len(again) == 12
    # greedy: same answers
    assert {x["id"]: x["answer"] for x in again} == {x["id"]: x["answer"] for x in full}
    capsys.readouterr()
    # other decoding settings: a new source, nothing reused
    run_cli(env, out, *args, "--temperature", "0.7")
    assert "reused 0 answers, generating 12" in capsys.readouterr().out
    assert len(lines(path)) == 24
    # sampled: a continued run draws what the uninterrupted one drew, in batches of any size (each
    # question has its own stream; the answers left were drawn from the run's one stream's start)
    sampled = {x["id"]: x["answer"] for x in lines(path)[12:]}
    assert len(set(sampled.values())) > 1  # (sampling, not a model that says one thing)
    text = open(path).read()
    open(path, "w").write("".join(text.splitlines(True)[:12 + 5]))
    run_cli(env, out, *args, "--temperature", "0.7", "--batch_size", "3")
    assert "reused 5 answers, generating 7" in capsys.readouterr().out
    assert {x["id"]: x["answer"] for x in lines(path)[12:]} == sampled


def test_answers_about_other_pixels_are_not_reused(env, capsys):
    """An answer is about its image as much as its prompt: POPE asks the same questions under the
    same ids in every world, so answers of a rewritten world (or another --image_folder) were
    reused and scored against the new labels."""
    import shutil
    from PIL import Image, ImageOps
    world = str(env["root"] / "repainted")
    shutil.copytree(env["world"], world)
    out = env["root"] / "pixels"
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--world", world)
    run_cli(env, out, *args)
    capsys.readouterr()
    run_cli(env, out, *args)
    assert capsys.readouterr().out.count("reused 4 answers, generating 0") == 3
    folder = os.path.join(world, "images", "test")
    for name in os.listdir(folder):
        image = Image.open(os.path.join(folder, name)).convert("RGB")
        ImageOps.invert(image).save(os.path.join(folder, name))
    run_cli(env, out, *args)
    assert capsys.readouterr().out.count("reused 0 answers, generating 4") == 3
    rows = lines(out / "m0" / "answers_pope_random.jsonl")
    assert len(rows) == 8 and len({r["image_digest"] for r in rows}) > 1


def test_answers_of_an_adapter_checkpoint_follow_its_base(env, capsys):
    """An adapter checkpoint's source hashed its own folder's mtimes alone: after its base was
    trained again, its stored answers were reused (the model, never loaded, would have refused
    the changed base)."""
    import shutil
    base = env["root"] / "adapter_base"
    shutil.copytree(env["ckpts"][0], base)
    m = load_checkpoint(str(base))
    m.add_adapter("policy", 2, 4, 0.0)
    adapter = env["root"] / "adapter_run"
    save_checkpoint_files(m, str(adapter), base=str(base))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / f, adapter / f)
    out = env["root"] / "adapter_eval"
    args = ("--ckpt", str(adapter), "--benchmarks", "pope")
    run_cli(env, out, *args)
    capsys.readouterr()
    # (copytree kept the base's old mtimes: past the adapter's newest, whenever the fixture was
    # made; base + 10 s alone was not when the suite had run a while since)
    later = max(os.path.getmtime(d / f) for d in (base, adapter) for f in os.listdir(d)) + 10
    for f in os.listdir(base):  # the base written again (same bytes: the mtime is what moves)
        os.utime(base / f, (later, later))
    run_cli(env, out, *args)
    assert capsys.readouterr().out.count("reused 0 answers") == 3


@pytest.mark.parametrize("out_at", ["the checkpoint", "inside it"])
def test_answers_written_into_the_checkpoint_folder_are_reused(env, capsys, out_at):
    """An --out whose OUT/NAME is the checkpoint folder (--ckpt ck/m0 --out ck), or lies inside it
    (the lab's RUN/eval), dated the model by eval's own answers and scores: no answer was ever
    reused, and --rescore found 'answers of 2 runs'. Its own files date it now."""
    import shutil
    ckpt = env["root"] / f"own_{out_at[0]}" / "m0"
    shutil.copytree(env["ckpts"][0], ckpt)
    past = time.time() - 100  # (the model written well before any answer)
    for f in os.listdir(ckpt):
        os.utime(ckpt / f, (past, past))
    out = ckpt.parent if out_at == "the checkpoint" else ckpt / "eval"
    args = ("--ckpt", str(ckpt), "--benchmarks", "pope")
    run_cli(env, out, *args)
    assert capsys.readouterr().out.count("reused 0 answers, generating 4") == 3
    run_cli(env, out, *args)
    assert capsys.readouterr().out.count("reused 4 answers, generating 0") == 3
    run_cli(env, out, *args, "--rescore", "true")  # (one run's answers: no SystemExit)
    assert "pope" in json.load(open(out / "m0" / "scores.json"))


def test_rescore_of_one_run_refuses_settings_it_was_not_made_with(env, capsys):
    """With one run's answers stored, --rescore scored them whatever decoding flags were given:
    greedy answers read as sampled ones (the flags pick a run only among several)."""
    out = env["root"] / "one_run"
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "pope")
    greedy = run_cli(env, out, *args)["m0"]
    assert run_cli(env, out, *args, "--rescore", "true")["m0"]["pope"] == greedy["pope"]
    for flag, value in (("--temperature", "1.0"), ("--pope_max_new_tokens", "5"),
                        ("--template", "llava_v1")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            run_cli(env, out, *args, "--rescore", "true", flag, value)
        err = capsys.readouterr().err
        assert "--rescore: the stored pope_random answers were made otherwise" in err
        assert f"than {flag} {value} asks" in err, err
    # a flag given as the run was made is no mismatch, wherever the run was made
    lines = open(out / "m0" / "answers_pope_random.jsonl").read()
    (out / "m0" / "answers_pope_random.jsonl").write_text(lines.replace(" fp32 cpu ",
                                                                        " bf16 cuda "))
    assert run_cli(env, out, *args, "--rescore", "true", "--pope_max_new_tokens", "3")["m0"]
    # a --ckpt folder that is gone: the flags given are still checked (they were not)
    import shutil
    gone = env["root"] / "gone_one" / "m0"
    shutil.copytree(env["ckpts"][0], gone)
    out = env["root"] / "one_run_gone"
    args = ("--ckpt", str(gone), "--benchmarks", "pope")
    run_cli(env, out, *args)
    shutil.rmtree(gone)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(env, out, *args, "--rescore", "true", "--temperature", "1.0")
    assert "than --temperature 1.0 asks" in capsys.readouterr().err
    assert run_cli(env, out, *args, "--rescore", "true")["m0"]["pope"] == greedy["pope"]


def test_rescore_of_one_run_refuses_another_checkpoints_answers(env, capsys):
    """With one run's answers stored, --rescore scored them under --ckpt whoever made them:
    x/m0's answers (another checkpoint, the same folder name) as m0's scores. A moved tree, whose
    recorded path is gone, still counts."""
    import shutil
    other = env["root"] / "x" / "m0"
    shutil.copytree(env["ckpts"][0], other)
    out = env["root"] / "other_ckpt"
    made = run_cli(env, out, "--ckpt", str(other), "--benchmarks", "pope")["m0"]
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--rescore", "true")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(env, out, *args)
    err = capsys.readouterr().err
    assert "answers were made by another checkpoint (" + str(other) + ", still there)" in err, err
    shutil.rmtree(other)  # (moved away: its answers are the ones --ckpt scores)
    assert run_cli(env, out, *args)["m0"]["pope"] == made["pope"]
    # a run folder trained on since: its older checkpoint made them
    run = env["root"] / "trained_on"
    shutil.copytree(os.path.dirname(env["ckpts"][1] + "/checkpoint-000001/"), run / "checkpoint-1")
    args = ("--ckpt", str(run), "--benchmarks", "pope")
    run_cli(env, out, *args)
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-2")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(env, out, *args, "--rescore", "true")
    assert f"by another checkpoint ({run / 'checkpoint-1'}, still" in capsys.readouterr().err
    # beside a run of checkpoint-2's own: the older checkpoint's answers, made with the settings
    # asked, were the ones scored (any checkpoint-N inside --ckpt counted as its own)
    run_cli(env, out, *args, "--temperature", "1.0", "--limit", "2")
    got = run_cli(env, out, *args, "--rescore", "true")["trained_on"]["answers_from"]
    assert len(got) == 1 and "checkpoint-2@" in got[0], got


def test_rescore_reads_the_answers_of_one_run(env, capsys):
    """--rescore took the last line written per question from any source: two runs' answers in
    one file were scored as one."""
    from conftest import run_cli as run_stage
    out = env["root"] / "mixed"
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "pope")
    greedy = run_cli(env, out, *args)["m0"]
    sampled = run_cli(env, out, *args, "--temperature", "1.0", "--limit", "2")["m0"]
    again = run_cli(env, out, *args, "--rescore", "true")["m0"]  # these flags' answers
    assert again["pope"] == greedy["pope"] and len(again["answers_from"]) == 1
    assert "greedy" in again["answers_from"][0]
    again = run_cli(env, out, *args, "--rescore", "true", "--temperature", "1.0", "--limit", "2")
    assert again["m0"]["pope"] == sampled["pope"]
    # the checkpoint's files newer than both runs (a copy) and made on a GPU: the run of these
    # settings still counts (both were refused as 'answers of 2 runs')
    path = out / "m0" / "answers_pope_random.jsonl"
    text = re.sub(r"@\d+ vicuna_v1 fp32 cpu ", "@1 vicuna_v1 bf16 cuda ", path.read_text())
    path.write_text(text)
    again = run_cli(env, out, *args, "--rescore", "true", "--temperature", "1.0", "--limit", "2")
    unasked = lambda p: {s: {k: v for k, v in m.items() if k != "asked"} for s, m in p.items()}
    assert unasked(again["m0"]["pope"]) == unasked(sampled["pope"])  # (asked: made on cuda now)
    # a --ckpt that is gone: which run's answers count cannot be told
    gone = str(env["root"] / "gone" / "m0")
    argv = ["--ckpt", gone, "--benchmarks", "pope", "--world", env["world"], "--out", str(out),
            *FAST, "--rescore", "true"]
    code, _, err = run_stage("eval", argv)
    assert code == 2 and "--rescore: pope_random answers of 2 runs here" in err, err
    # ... but a --ckpt that made both runs, gone since: the run the flags ask for (it was refused
    # as 'answers of 2 runs' with those flags given)
    import shutil
    made = env["root"] / "made" / "m0"
    shutil.copytree(env["ckpts"][0], made)
    out = env["root"] / "made-out"
    args = ("--ckpt", str(made), "--benchmarks", "pope")
    run_cli(env, out, *args)
    sampled = run_cli(env, out, *args, "--temperature", "1.0", "--limit", "2")["m0"]
    shutil.rmtree(made)
    again = run_cli(env, out, *args, "--rescore", "true", "--temperature", "1.0", "--limit", "2")
    assert again["m0"]["pope"] == sampled["pope"]


def test_rescore_of_fewer_answers_than_questions_is_marked_partial(env, capsys):
    """--rescore after a --limit run scored the stored subset as if it were the benchmark: the
    table and scores.json now say which scores are of part of the questions."""
    out = env["root"] / "subset"
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "pope", "chair")
    run_cli(env, out, *args, "--limit", "2")
    capsys.readouterr()
    whole = run_cli(env, out, *args, "--limit", "2", "--rescore", "true")["m0"]
    printed = capsys.readouterr().out
    assert "partial" not in json.dumps(whole) and "partial" not in printed, printed
    part = run_cli(env, out, *args, "--limit", "4", "--rescore", "true")["m0"]
    printed = capsys.readouterr().out
    assert part["pope"]["random"]["partial"] == "2 of 4 questions"
    assert part["chair"]["partial"] == "2 of 4 questions" and part["chair"]["n"] == 2
    assert "partial" in part["pope"]["average"]
    assert "| m0 (partial) |" in printed and "warning: m0: scored the questions with stored " \
        "answers alone: pope_random 2 of 4 questions" in printed, printed
    stored = json.load(open(out / "m0" / "scores.json"))
    assert stored["pope"]["random"]["partial"] == "2 of 4 questions"
    # a LLaVA answers file of part of the questions, the same
    llava = out / "llava_answers.jsonl"
    llava.write_text("".join(json.dumps({"question_id": int(r["id"]), "prompt": r["prompt"],
                                         "text": r["answer"]}) + "\n"
                             for r in lines(out / "m0" / "answers_pope_random.jsonl")))
    part = run_cli(env, out, "--ckpt", "m0", "--benchmarks", "pope", "--pope_files",
                   os.path.join(env["world"], "pope_random.jsonl"), "--rescore", "true",
                   "--llava_answers", str(llava))["m0"]
    assert part["pope"]["random"]["partial"] == "2 of 4 questions", part
    # scored into a checkpoint's folder under its --ckpt, then that checkpoint run again: the
    # file's scores were kept beside the checkpoint's (nothing recorded whose they were)
    run_cli(env, out, *args, "--limit", "2", "--rescore", "true", "--llava_answers", str(llava),
            "--benchmarks", "pope")
    stored = json.load(open(out / "m0" / "scores.json"))
    assert stored["answers_from"] == [str(llava)] and stored["model"].startswith("file:")
    run_cli(env, out, *args, "--limit", "2", "--benchmarks", "chair")
    stored = json.load(open(out / "m0" / "scores.json"))
    assert "pope" not in stored and "chair" in stored, stored.keys()


def test_rescore_needs_no_images_for_mmhal_gavie_and_coco_chair(env, api, tmp_path):
    """--rescore scores the stored answers (and judge replies) without a model: POPE and
    LLaVA-Bench read no image there, but MMHal-Bench, GAVIE and COCO CHAIR still wanted every
    image file (LLaVA-RLHF's published MMHal answers could not be rescored without its images)."""
    world, real = env["world"], tmp_path / "real"
    shutil.copytree(os.path.join(world, "images", "test"), real / "images")
    shutil.copy(os.path.join(world, "mmhal.json"), real / "mmhal.json")  # images/ beside it
    names = sorted(os.listdir(real / "images"))[:4]
    (real / "gavie.json").write_text(json.dumps(
        [{"image_id": f"images/{n}", "question": "What is in the image?"} for n in names]))
    (real / "boxes.json").write_text(json.dumps(
        {f"images/{n}": [{"caption": "a shape", "bbox": [1, 2, 10, 10]}] for n in names}))
    (tmp_path / "synonyms.txt").write_text("\n".join(shapes.SHAPES) + "\n")
    judge = ["--judge", "openai", "--judge_url", api, "--judge_key", "k"]
    runs = {"mmhal": ["--mmhal_file", str(real / "mmhal.json"), *judge],
            "gavie": ["--gavie_file", str(real / "gavie.json"), "--gavie_annotations",
                      str(real / "boxes.json"), *judge],
            "chair": ["--chair_instances", os.path.join(world, "annotations.json"),
                      "--chair_synonyms", str(tmp_path / "synonyms.txt"),
                      "--chair_prompt", "Describe the image."]}
    folder = {"mmhal": [], "gavie": [], "chair": ["--image_folder", world]}
    scored = {b: run_cli(env, tmp_path / b, "--ckpt", env["ckpts"][0], "--benchmarks", b, *argv,
                         *folder[b])["m0"][b] for b, argv in runs.items()}
    shutil.move(real / "images", tmp_path / "gone")
    for b, argv in runs.items():
        again = run_cli(env, tmp_path / b, "--ckpt", "m0", "--rescore", "true", "--benchmarks", b,
                        *argv)["m0"][b]
        assert again == scored[b], b


def test_gavie_boxes_hold_numbers(env, tmp_path):
    """A box whose bbox held strings was printed into the judge's prompt as it was."""
    (tmp_path / "gavie.json").write_text(json.dumps([{"image_id": "7", "question": "What?"}]))
    cfg = E.Config(gavie_file=str(tmp_path / "gavie.json"), image_folder=str(tmp_path),
                   gavie_annotations=str(tmp_path / "boxes.json"), judge="openai")
    for bbox, ok in (([1, 2.5, 10, 10], True), (["a", "b", "c", "d"], False), ([1, True], False),
                     ([1], False)):
        (tmp_path / "boxes.json").write_text(json.dumps({"7": [{"caption": "x", "bbox": bbox}]}))
        if ok:
            assert len(benchmarks.gavie_questions(cfg, (env["world"], None, None))) == 1
            continue
        with pytest.raises(E.DataError, match=r"boxes.json: record '7' box 0: expected"):
            benchmarks.gavie_questions(cfg, (env["world"], None, None))
    # a JSON lines file of one question (an object) is its one record, as every reader takes it
    # (it was refused: "expected a list")
    (tmp_path / "gavie.json").write_text(json.dumps({"image_id": "7", "question": "What?"}) + "\n")
    box = {"caption": "x", "bbox": [1, 2, 3, 4]}
    (tmp_path / "boxes.json").write_text(json.dumps({"7": [box]}))
    assert len(benchmarks.gavie_questions(cfg, (env["world"], None, None))) == 1
    # a question without its image_id (or with a list for one) is named by that field (it was
    # named as field 'question')
    for record in ({"question": "What?"}, {"image_id": ["7"], "question": "What?"}):
        (tmp_path / "gavie.json").write_text(json.dumps([record]))
        with pytest.raises(E.DataError, match=r"gavie.json: record 0: field 'image_id': missing"):
            benchmarks.gavie_questions(cfg, (env["world"], None, None))


def test_pope_suffix_is_not_added_twice(env, tmp_path, capsys):
    """LLaVA-1.5's llava_pope_test.jsonl carries '\\nAnswer the question using a single word or
    phrase.' in its text; README's POPE command adds it with --pope_suffix, and the model read it
    twice. A question that ends with the suffix is asked as it is, and a note says so."""
    recs = [json.loads(x) for x in open(os.path.join(env["world"], "pope_random.jsonl"))][:4]
    suffix = "\nAnswer the question using a single word or phrase."
    carried = [dict(r, text=r["text"] + suffix) if i < 2 else r for i, r in enumerate(recs)]
    path = tmp_path / "llava_pope_random.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in carried))
    cfg = E.Config(pope_files=(str(path),), pope_suffix=suffix.replace("\n", "\\n"),
                   image_folder=env["world"])
    qs = benchmarks.pope_questions(cfg, (env["world"], None, None))["random"]
    assert [q["prompt"] for q in qs] == [r["text"] + suffix for r in recs]
    assert f"note: --pope_suffix: 2 of the 4 questions of {path} end with it already" in \
        capsys.readouterr().out


def test_a_name_stdout_cannot_write_is_printed_escaped(env, tmp_path):
    """Under a UTF-8 locale stdout is strict: an --out holding a byte that is not UTF-8 made eval's
    last line (where its scores went) a UnicodeEncodeError traceback once every answer had been
    made. It is printed escaped now, as stderr prints it."""
    out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"e\xff"))
    command = [sys.executable, os.path.join(HERE, "eval.py"), "--ckpt", env["ckpts"][0],
               "--world", env["world"], "--out", out, *FAST, "--benchmarks", "pope"]
    r = subprocess.run(command, capture_output=True, text=True, cwd=HERE, timeout=300,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert r.returncode == 0, r.stderr
    assert f"-> {tmp_path}/e\\udcff/m0/scores.json" in r.stdout


def test_a_pope_file_whose_name_is_not_utf8_is_one_line_before_any_answer(env, tmp_path):
    """The split of a --pope_files file without a 'category' is named by the file: a name holding
    a byte that is not UTF-8 ended --compare in a UnicodeEncodeError traceback writing compare.md,
    once every answer had been made."""
    from conftest import run_cli as run_stage
    pope = os.path.join(os.fsencode(tmp_path), b"coco_pope_\xffx.jsonl")
    shutil.copy(os.path.join(env["world"], "pope_random.jsonl"), pope)
    code, _, err = run_stage("eval", ["--compare", *env["ckpts"], "--world", env["world"],
                                      "--out", str(tmp_path / "o"), *FAST, "--benchmarks", "pope",
                                      "--pope_files", os.fsdecode(pope),
                                      "--image_folder", env["world"]])
    assert code == 2 and err.count("\n") == 1, err
    assert "coco_pope_\\udcffx.jsonl': its name, which names the split, is not UTF-8" in err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("flag", ["pope_suffix", "chair_prompt"])
def test_a_text_flag_holding_a_byte_that_is_not_utf8_is_one_line(env, tmp_path, capsys, flag):
    """A prompt typed in a Latin-1 terminal reaches Python as a surrogate escape ('\\udce9'): the
    tokenizer raised a TypeError traceback after the model had loaded."""
    bench = "pope" if flag == "pope_suffix" else "chair"
    (tmp_path / "synonyms.txt").write_text("\n".join(shapes.SHAPES) + "\n")
    extra = [] if bench == "pope" else [
        "--chair_instances", os.path.join(env["world"], "annotations.json"), "--chair_synonyms",
        str(tmp_path / "synonyms.txt"), "--image_folder", env["world"]]
    with pytest.raises(SystemExit) as e:
        run_cli(env, tmp_path / "out", "--ckpt", env["ckpts"][0], "--benchmarks", bench,
                *extra, f"--{flag}", os.fsdecode(b" D\xe9crivez"), "--limit", "2")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert f"--{flag} ' D\\udce9crivez': holds a byte that is not UTF-8" in err
    assert not os.path.exists(tmp_path / "out")


def test_a_missing_flag_is_named_not_the_file_beside_it(env, tmp_path):
    """An eval hunt: POPE questions without labels (LLaVA's llava_pope_test.jsonl) read "field
    'label': missing" with no word of --pope_labels; --gavie_file without --gavie_annotations
    blamed the question file ('expected --gavie_annotations ...' under its name)."""
    recs = [json.loads(x) for x in open(os.path.join(env["world"], "pope_random.jsonl"))][:2]
    path = tmp_path / "llava_pope_test.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n"
                            for r in recs))
    cfg = E.Config(pope_files=(str(path),), image_folder=env["world"])
    with pytest.raises(E.DataError, match="field 'label': missing: .* with --pope_labels"):
        benchmarks.pope_questions(cfg, (env["world"], None, None))
    # two label files of one split: the last one won without a word
    coco, aokvqa = tmp_path / "coco_pope_random.jsonl", tmp_path / "aokvqa_pope_random.jsonl"
    for f in (coco, aokvqa):
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = E.Config(pope_files=(str(path),), pope_labels=(str(coco), str(aokvqa)),
                   image_folder=env["world"])
    with pytest.raises(common.ConfigError, match="are both the 'random' split"):
        benchmarks.pope_questions(cfg, (env["world"], None, None))
    # the truth under 'answer' (another tool's layout): sent to --pope_labels, no help
    path.write_text("".join(json.dumps({"answer": r["label"], **r, "label": None}) + "\n"
                            for r in recs).replace(', "label": null', ""))
    cfg = E.Config(pope_files=(str(path),), image_folder=env["world"])
    with pytest.raises(E.DataError, match="'label': missing, and the records have 'answer'"):
        benchmarks.pope_questions(cfg, (env["world"], None, None))
    # (RUCAIBox/POPE's answers, once refused here, are read: test_rucaibox_answers_pair_by_order)
    gavie = tmp_path / "gavie.json"
    gavie.write_text(json.dumps([{"image_id": "a", "question": "What is there?"}]))
    with pytest.raises(common.ConfigError, match=r"--gavie_file .*: needs --gavie_annotations"):
        benchmarks.lrv_gavie_questions(E.Config(gavie_file=str(gavie)))


def test_rucaibox_answers_pair_by_order(env, tmp_path):
    """RUCAIBox/POPE's answers ({question, answer}, no id; its evaluate.py pairs them with its
    label file by line order) were refused. Paired by order with the one POPE file scored, they
    score as the same answers in LLaVA's layout; out of step, another count or two splits: one
    line, exit 2."""
    from conftest import run_cli as run_stage
    recs = [json.loads(x) for x in open(os.path.join(env["world"], "pope_random.jsonl"))][:5]
    split = tmp_path / "coco_pope_random.jsonl"
    split.write_text("".join(json.dumps(r) + "\n" for r in recs))
    texts = ["Yes", "No, there is not.", "yes", "There is no square.", "Not really"]
    rucai = [{"question": r["text"], "answer": t} for r, t in zip(recs, texts)]
    rucai[2]["question"] = rucai[2]["question"].lower()  # (as its README's example writes it)
    llava = [{"question_id": r["question_id"], "prompt": r["text"], "text": t}
             for r, t in zip(recs, texts)]
    scores = {}
    for layout, lines in (("rucai", rucai), ("llava", llava), ("swapped", [rucai[1], rucai[0],
                          *rucai[2:]]), ("short", rucai[:4]), ("two", rucai),
                         ("limit", rucai)):
        answers = tmp_path / f"{layout}.jsonl"
        answers.write_text("".join(json.dumps(r) + "\n" for r in lines))
        files = [str(split)] + ([str(tmp_path / "coco_pope_popular.jsonl")] if layout == "two"
                                else [])
        if layout == "two":
            shutil.copy(split, files[1])
        code, _, err = run_stage("eval", ["--rescore", "true", "--ckpt", "m", "--benchmarks",
                                          "pope", "--out", str(tmp_path / layout),
                                          "--llava_answers", str(answers), "--pope_files", *files,
                                          *(["--limit", "3"] if layout == "limit" else [])])
        if layout in ("rucai", "llava"):
            assert code == 0, err
            with open(tmp_path / layout / "m" / "scores.json") as f:
                got = json.load(f)["pope"]["random"]
            scores[layout] = {k: got[k] for k in ("tp", "fp", "tn", "fn", "f1", "n")}
            continue
        assert code == 2 and err.count("\n") == 1, err
        assert {"swapped": "record 0: field 'question': is not question 0 of",
                "short": "4 answers in RUCAIBox/POPE's answer layout",
                "two": "answers one POPE file; this run scores 2 POPE files",
                "limit": "5 answers in RUCAIBox/POPE's answer layout ({question, answer}, no id; "
                         "paired by line order) for the 3 questions scored (--limit 3) of"
                }[layout] in err, err
    assert scores["rucai"] == scores["llava"] and scores["rucai"]["n"] == 5, scores


def test_one_answer_is_not_scored_for_two_pope_files(env, tmp_path):
    """RUCAIBox/POPE's split files number their questions from 1 each: an answers file without
    prompts (or with the same question text in both, on another image) matched both splits by
    id, and each split was scored with the other's answers without a word. An answer now answers
    one question; one asked in two files (the same image and text) keeps it."""
    from conftest import run_cli as run_stage
    recs = [json.loads(line) for line in open(os.path.join(env["world"], "pope_random.jsonl"))]
    assert len({(r["image"], r["text"]) for r in recs[:12]}) == 12  # (12 questions, no two alike)
    files = []
    for split, part in (("random", recs[:6]), ("popular", recs[6:12])):
        files.append(str(tmp_path / f"coco_pope_{split}.jsonl"))
        with open(files[-1], "w") as f:
            f.writelines(json.dumps({**r, "question_id": i + 1}) + "\n" for i, r in enumerate(part))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i + 1, "text": "yes"}) + "\n"
                               for i in range(6)))
    args = ["--rescore", "true", "--ckpt", "m", "--benchmarks", "pope",
            "--llava_answers", str(answers), "--pope_files"]
    code, _, err = run_stage("eval", [*args, *files, "--out", str(tmp_path / "two")])
    assert code == 2 and err.count("\n") == 1, err
    assert "field 'question_id': answers question '1' of" in err and "coco_pope_popular" in err
    code, _, err = run_stage("eval", [*args, files[0], "--out", str(tmp_path / "one")])
    assert code == 0, err
    shutil.copy(files[0], files[1])  # the same questions in both files: one answer each
    code, _, err = run_stage("eval", [*args, *files, "--out", str(tmp_path / "same")])
    assert code == 0, err


def test_scores_of_separate_runs_into_one_folder_are_kept(env, tmp_path):
    """Real benchmarks need runs of their own (one --image_folder each), and each run into the same
    --out replaced scores.json with its own benchmarks: MMHal's scores were gone after a GAVIE
    run. The same checkpoint's other benchmarks are kept; another checkpoint of the same name is
    scored beside them (it replaced them)."""
    out = tmp_path / "o"
    pope = run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "pope")["m0"]["pope"]
    chair = run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "chair")["m0"]["chair"]
    scores = json.load(open(out / "m0" / "scores.json"))
    assert scores["pope"] == pope and scores["chair"] == chair
    other = tmp_path / "other" / "m0"  # another checkpoint, written to the same folder name
    shutil.copytree(env["ckpts"][0], other)
    run_cli(env, out, "--ckpt", str(other), "--benchmarks", "chair")
    assert json.load(open(out / "m0" / "scores.json")) == scores
    beside = json.load(open(out / "m0-1" / "scores.json"))
    assert "pope" not in beside and beside["ckpt"] == str(other)


def test_scores_json_says_how_each_benchmarks_answers_were_made(env, tmp_path):
    """A folder's scores.json keeps the same checkpoint's benchmarks from earlier runs, and
    recorded neither the decoding nor the number of questions any of them were scored from:
    POPE sampled on 2 questions beside CHAIR greedy on 4 read alike."""
    out = tmp_path / "o"
    run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--limit", "2",
            "--temperature", "0.7")
    run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "chair")
    made = json.load(open(out / "m0" / "scores.json"))["answers_made"]
    assert set(made) == {"pope_random", "pope_popular", "pope_adversarial", "chair"}, made
    [(pope, n_pope)] = made["pope_random"].items()
    [(chair, n_chair)] = made["chair"].items()
    assert "temperature=0.7" in pope and pope.endswith("max_new_tokens=3") and n_pope == 2, made
    assert " greedy " in chair and chair.endswith("max_new_tokens=6") and n_chair == 4, made
    assert env["ckpts"][0] not in pope + chair  # (the checkpoint is scores.json's "ckpt")
    # another checkpoint's run into the folder replaces them, its own alone recorded
    other = tmp_path / "other" / "m0"
    shutil.copytree(env["ckpts"][0], other)
    run_cli(env, out, "--ckpt", str(other), "--benchmarks", "chair")
    assert set(json.load(open(out / "m0-1" / "scores.json"))["answers_made"]) == {"chair"}


def test_judge_replies_are_reused_only_for_the_same_prompt():
    """Replies were keyed by (id, judge, answer): another question or reference under an id, or
    a longer --judge_max_tokens, got the stored reply back."""
    calls = []

    class Judge:
        name = "fake"

        def __call__(self, prompt, record):
            calls.append(prompt)
            return "Rating: 3"

    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "judge_mmhal.jsonl")
    q = {"id": "0", "prompt": "What is red?", "gt": "A circle.", "image": "x.png",
         "image_content": ["circle"], "qtype": "attribute"}
    lines_ = {"0": {"answer": "A square.", "image_digest": "ab"}}
    judge_state = {"judge": Judge(), "templates": {}}
    cfg = E.Config()
    for question in ("What is red?", "What is red?", "What is blue?"):
        E.judge_replies("mmhal", [dict(q, prompt=question)], lines_, path, judge_state, cfg,
                        "m0")
    assert len(calls) == 2 and "blue" in calls[1]
    E.judge_replies("mmhal", [q], {"0": dict(lines_["0"], image_digest="cd")}, path, judge_state,
                    cfg,
                    "m0")
    assert len(calls) == 3  # the same words about another image
    short = judges.OpenAIJudge(E.Config(judge="openai", judge_url="http://127.0.0.1:1/v1"))
    long = judges.OpenAIJudge(E.Config(judge="openai", judge_url="http://127.0.0.1:1/v1",
                                       judge_max_tokens=2048))
    assert short.name != long.name


def test_an_edited_answers_file_is_one_line_naming_the_record(env):
    """A reused answer that is not a string (a hand edit) was a traceback when scored; one question
    answered twice by the same model let the last line count without a word."""
    from conftest import run_cli as run_stage
    out = env["root"] / "edited"
    args = ["--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--world", env["world"],
            "--out", str(out), *FAST]
    assert run_stage("eval", args)[0] == 0
    path = out / "m0" / "answers_pope_random.jsonl"
    rows = lines(path)
    first = rows[0]["id"]
    for edited, want in (([dict(rows[0], answer=5)] + rows[1:], "field 'answer': expected a "
                          "string, got 5"),
                         (rows + [dict(rows[0], answer="No.")], "field 'id': answered twice"),
                         # (keys of the line: an unhashable-type traceback)
                         ([dict(rows[0], prompt=["x"])] + rows[1:], "field 'prompt': expected a "
                          "string, got ['x']"),
                         ([dict(rows[0], source={})] + rows[1:], "field 'source': expected a "
                          "string, got {}")):
        text = "".join(json.dumps(r) + "\n" for r in edited)
        path.write_text(text)
        code, _, err = run_stage("eval", args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "answers_pope_random.jsonl: record " in err and f"(id '{first}')" in err, err
        assert want in err and path.read_text() == text


def test_unreachable_or_garbage_judge_keeps_answers(env, capsys, api):
    out = env["root"] / "judge"
    base = ("--ckpt", env["ckpts"][0], "--benchmarks", "mmhal", "--judge", "openai",
            "--judge_backoff", "0.01")
    # garbage replies: counted and flagged, not a crash
    FakeAPI.script = [(200, "I cannot rate this.")] * 4
    scores = run_cli(env, out, *base, "--judge_url", api)["m0"]["mmhal"]
    # the reference scores them 0
    assert scores["unparsed"] == 4 and scores["n"] == 4 and scores["score"] == 0
    answers = open(out / "m0" / "answers_mmhal.jsonl").read()
    os.remove(out / "m0" / "judge_mmhal.jsonl")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(env, out, *base, "--judge_url", "http://127.0.0.1:9/v1", "--judge_retries", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "127.0.0.1:9" in err
    assert open(out / "m0" / "answers_mmhal.jsonl").read() == answers


def test_limit_needs_the_images_of_the_questions_asked_alone(env, tmp_path, capsys):
    """Every question's image was checked before --limit took the first N: a user with the
    images of the first 2 questions could not ask them. Beyond them a missing image still names
    its file, record and field."""
    recs = [json.loads(x) for x in open(os.path.join(env["world"], "pope_random.jsonl"))][:4]
    recs[3]["image"] = "gone.png"  # (the 4th question's image is not there)
    pope = tmp_path / "coco_pope_random.jsonl"
    pope.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--pope_files", str(pope),
            "--image_folder", env["world"])
    rows = run_cli(env, tmp_path / "o", *args, "--limit", "2")
    assert rows["m0"]["pope"]["random"]["n"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(env, tmp_path / "o", *args, "--limit", "4")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().endswith(
        f"{pope}: record 3 (id '4'): field 'image': image not found: "
        f"{os.path.join(env['world'], 'gone.png')}"), err
    # a folder where the image should be says so (it read 'image not found'); --rescore reads no
    # image, so an --image_folder gone since the answers were made is no error there
    recs[3]["image"] = "images"
    pope.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SystemExit):
        run_cli(env, tmp_path / "o", *args, "--limit", "4")
    assert "field 'image': a folder, not an image: " in capsys.readouterr().err
    rows = run_cli(env, tmp_path / "o", *args[:-1], str(tmp_path / "gone"), "--limit", "2",
                   "--rescore", "true")
    assert rows["m0"]["pope"]["random"]["n"] == 2


def test_a_question_too_long_or_an_image_that_does_not_decode_names_its_record(env, tmp_path,
                                                                              capsys):
    """A question longer than --max_len was cut at its end, 'ASSISTANT:' with it, and answered
    without a word (the model went on writing the question); an image that does not decode was
    named by the question's id as if it were the record's number (record 11 of a 3-line file)."""
    recs = [json.loads(x) for x in open(os.path.join(env["world"], "pope_random.jsonl"))][:3]
    for k, r in enumerate(recs):
        r["question_id"] = 7 + 2 * k
    pope = tmp_path / "coco_pope_random.jsonl"
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--pope_files", str(pope),
            "--image_folder", env["world"])
    long = dict(recs[1], text="Is there " + "a very " * 60 + "circle in the image?")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not an image")
    broken = dict(recs[2], image=str(tmp_path / "broken.png"))
    for records, want in (([recs[0], long, recs[2]], "record 1 (id '9'): the prompt does not "
                           "fit --max_len 100 (tokens, image included): raise it"),
                          ([recs[0], recs[1], broken], "record 2 (id '11'): field 'image': "
                           f"cannot decode image {tmp_path / 'broken.png'}")):
        pope.write_text("".join(json.dumps(r) + "\n" for r in records))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_cli(env, tmp_path / "o", *args, "--max_len", "100")
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{pope}: {want}" in err, err
    assert run_cli(env, tmp_path / "o", *args, "--max_len", "100", "--limit", "1")
    # past the model's positions (512): answered, with a note, as transformers warns
    longer = dict(long, text="Is there " + "a very " * 400 + "circle?")
    pope.write_text(json.dumps(longer) + "\n")
    capsys.readouterr()
    run_cli(env, tmp_path / "o", *args, "--max_len", "100000")
    assert "pass the model's 512 positions" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(env, tmp_path, capsys):
    a = env["ckpts"][0]
    bad_ckpt = tmp_path / "broken"
    bad_ckpt.mkdir()
    (bad_ckpt / "config.json").write_text("{not json")
    command = [sys.executable, os.path.join(HERE, "eval.py"), "--ckpt", str(bad_ckpt),
               "--world", env["world"], "--out", str(tmp_path / "o"), *FAST]
    r = subprocess.run(command, capture_output=True, text=True, cwd=HERE, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "broken" in r.stderr
    pope = os.path.join(env["world"], "pope_random.jsonl")
    cases = [(["--pope_files", pope, "--image_folder", str(tmp_path / "nowhere")],
              "nowhere"),  # missing folder
             (["--pope_files", os.path.join(env["world"], "sft.json")],
              "field 'question_id'"),  # wrong format
             (["--mmhal_file", os.path.join(env["world"], "pope_random.jsonl"), "--judge", "openai",
               "--judge_url", "http://127.0.0.1:9/v1"], "field 'question_type'"),
             (["--ckpt", str(tmp_path / "missing")], "missing"),
             # (a file given for its folder: it was 'checkpoint directory not found (train one')
             (["--ckpt", os.path.join(a, "config.json")], f"error: {a}/config.json: a file, not a "
              "checkpoint directory (pass the folder that holds it)\n"),
             (["--benchmarks", "mmhal", "--judge", "local", "--judge_max_tokens", "0"],
              "--judge_max_tokens 0 (no limit sent) is for --judge openai"),
             (["--benchmarks", "mmhal", "--judge", "local", "--judge_max_tokens", "0",
               "--rescore", "true"], "--judge_max_tokens 0 (no limit sent) is for --judge openai")]
    for extra, want in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            E.cli(merge_flags(["--ckpt", a, "--world", env["world"], "--out", str(tmp_path / "o"),
                               *FAST, *extra]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (extra, err)
        assert want in err, (extra, err)


def test_an_openai_judge_without_a_key_is_refused_before_any_answer(env, tmp_path, capsys,
                                                                   monkeypatch):
    """Without a key the OpenAI judge was found wanting only when first asked: after every answer
    of every benchmark had been generated (hours on a 7B model). --rescore reads stored replies
    and needs none."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "pope", "mmhal", "--judge",
                "openai")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines() == [
        "error: --judge openai: set OPENAI_API_KEY or pass --judge_key"]
    assert not out.exists() or not any(p.name.startswith("answers") for p in out.rglob("*"))


def test_run_names_are_unique():
    """--compare a/sft-2 b/sft c/sft: three folders (the third was named sft-2 again, writing
    into the first's folder: one row of the table lost); names already in use keep theirs."""
    assert E.run_names(["a/sft-2", "b/sft", "c/sft"]) == ["sft-2", "sft", "sft-3"]
    assert E.run_names(["a/sft", "b/sft"]) == ["sft", "sft-1"]
    # (names that differ only in case are one folder where the file system ignores case)
    assert E.run_names(["a/sft", "b/SFT", "c/Sft-1"]) == ["sft", "SFT-1", "Sft-1-2"]
    assert E.run_names(["ckpt/sft/checkpoint-000100"]) == ["sft-checkpoint-000100"]


def test_names_in_two_cases_scored_before_keep_their_folders(tmp_path):
    """--compare a/sft b/SFT run before on a file system that tells case apart wrote OUT/sft and
    OUT/SFT; numbering names that differ only in case sent b/SFT to SFT-1, where --rescore found
    no answers and a new run answered (and asked a judge) again. A folder holding this
    checkpoint's scores keeps its name; a fresh one is numbered."""
    ckpts = [str(tmp_path / side / name) for side, name in (("a", "sft"), ("b", "SFT"))]
    assert E.run_names(ckpts, str(tmp_path / "out")) == ["sft", "SFT-1"]
    for c in ckpts:
        os.makedirs(c)
        os.makedirs(tmp_path / "out" / os.path.basename(c))
        with open(tmp_path / "out" / os.path.basename(c) / "scores.json", "w") as f:
            json.dump({"ckpt": c, "ckpt_path": os.path.realpath(c)}, f)
    for rescore in (False, True):
        assert E.run_names(ckpts, str(tmp_path / "out"), rescore) == ["sft", "SFT"]


def test_a_later_ckpt_is_scored_beside_the_compare_run_of_its_name(env, capsys):
    """--compare x/run y/run scores y/run into run-1; a later --ckpt y/run into the same --out
    wrote into run (x/run's folder: its scores.json replaced by y/run's). It now finds run-1,
    says so, and reuses its answers; x/run's scores stay."""
    root = env["root"] / "names"
    for side, ckpt in (("x", env["ckpts"][0]), ("y", env["ckpts"][1])):
        shutil.copytree(ckpt, root / side / "run")
    x, y, out = str(root / "x" / "run"), str(root / "y" / "run"), root / "out"
    args = ("--benchmarks", "pope")
    run_cli(env, out, *args, "--compare", x, y)
    first = json.load(open(out / "run" / "scores.json"))
    capsys.readouterr()
    rows = run_cli(env, out, *args, "--ckpt", y)
    said = capsys.readouterr().out
    assert list(rows) == ["run-1"] and "generating 0" in said, said
    assert f"note: {out / 'run'} holds the scores of another checkpoint; {y} is scored into " \
        f"{out / 'run-1'}" in said
    assert json.load(open(out / "run" / "scores.json")) == first and first["ckpt"] == x
    assert json.load(open(out / "run-1" / "scores.json"))["ckpt"] == y
    assert E.run_names([x], str(out)) == ["run"] and E.run_names([y], str(out)) == ["run-1"]
    # --rescore finds it too (it was refused: run's answers are x/run's)
    assert list(run_cli(env, out, *args, "--ckpt", y, "--rescore", "true")) == ["run-1"]
    # the same path written otherwise is the same checkpoint; x/run deleted is still another
    assert E.run_names([os.path.join(str(root), ".", "y", "run")], str(out)) == ["run-1"]
    shutil.rmtree(x)
    assert E.run_names([y], str(out)) == ["run-1"]
    assert list(run_cli(env, out, *args, "--ckpt", y, "--rescore", "true")) == ["run-1"]
    # a --rescore of the deleted x/run keeps what names its folder's model
    assert list(run_cli(env, out, *args, "--ckpt", x, "--rescore", "true")) == ["run"]
    assert json.load(open(out / "run" / "scores.json"))["ckpt_path"] == first["ckpt_path"]
    assert E.run_names([y], str(out)) == ["run-1"]


def test_a_moved_project_is_the_same_checkpoint(env, tmp_path, monkeypatch):
    """scores.json records the resolved path; a project moved elsewhere (relative paths) is
    still the same checkpoint: its folder, its other benchmarks kept on a --rescore."""
    proj = tmp_path / "proj"
    shutil.copytree(env["ckpts"][0], proj / "ck" / "run")
    monkeypatch.chdir(proj)
    run_cli(env, "out", "--ckpt", "ck/run", "--benchmarks", "pope")
    run_cli(env, "out", "--ckpt", "./ck/run", "--benchmarks", "chair")  # (one checkpoint)
    assert {"pope", "chair"} <= set(json.load(open(proj / "out" / "run" / "scores.json")))
    os.rename(proj, tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    rows = run_cli(env, "out", "--ckpt", "ck/run", "--benchmarks", "chair", "--rescore", "true")
    assert list(rows) == ["run"] and E.run_names(["ck/run"], "out") == ["run"]
    assert "pope" in json.load(open(tmp_path / "moved" / "out" / "run" / "scores.json"))


def test_a_run_folders_newer_checkpoint_does_not_keep_the_older_ones_scores(env, tmp_path):
    """A run folder's scores were kept by its path: once the run wrote a newer checkpoint, an
    eval of another benchmark kept the older checkpoint's beside it in one scores.json, read as
    one model's. scores.json now names the model (its checkpoint and files' time)."""
    run = tmp_path / "run"
    shutil.copytree(os.path.join(env["ckpts"][1], "checkpoint-000001"), run / "checkpoint-000001")
    out = tmp_path / "o"
    run_cli(env, out, "--ckpt", str(run), "--benchmarks", "pope")
    first = json.load(open(out / "run" / "scores.json"))
    assert first["model"].startswith("checkpoint-000001@")
    run_cli(env, out, "--ckpt", str(run), "--benchmarks", "chair")  # (the same model: kept)
    assert {"pope", "chair"} <= set(json.load(open(out / "run" / "scores.json")))
    shutil.copytree(run / "checkpoint-000001", run / "checkpoint-000002")
    run_cli(env, out, "--ckpt", str(run), "--benchmarks", "chair")
    scores = json.load(open(out / "run" / "scores.json"))
    assert "pope" not in scores and scores["model"].startswith("checkpoint-000002@"), scores


def test_rescore_of_a_deleted_checkpoints_answers_under_another_is_refused(env, tmp_path, capsys):
    """x/m0 scored into o/m0, then deleted; --rescore --ckpt y/m0 (other weights, the same folder
    name) scored x/m0's answers as y/m0's and dropped x/m0's other benchmarks. Refused now (a
    moved tree keeps its checkpoint's name and files' time: test_a_moved_project_...)."""
    x, y, out = tmp_path / "x" / "m0", tmp_path / "y" / "m0", tmp_path / "o"
    shutil.copytree(env["ckpts"][0], x)
    shutil.copytree(env["ckpts"][1], y)
    run_cli(env, out, "--ckpt", str(x), "--benchmarks", "pope", "chair")
    before = open(out / "m0" / "scores.json").read()
    shutil.rmtree(x)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(env, out, "--ckpt", str(y), "--benchmarks", "pope", "--rescore", "true")
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"answers were made by another checkpoint ({x}, no longer " \
        f"there; not moved to --ckpt {y}: its name or files' time differ)" in err, err
    assert open(out / "m0" / "scores.json").read() == before


def test_a_folder_without_a_checkpoint_is_named_as_the_stages_name_it(env, tmp_path, capsys):
    """eval of an empty folder (a run that wrote no checkpoint-N yet) said "cannot read the
    checkpoint config (FileNotFoundError ...)"; the stages say what the folder is not."""
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as e:
        run_cli(env, tmp_path / "out", "--ckpt", str(tmp_path / "run"))
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'run'}: no config.json (not a "
                                       "checkpoint directory)\n")


def test_local_judge_past_its_context_is_one_clear_error(tiny_world, tmp_path):
    """--judge local with a model whose positions the prompt plus --judge_max_tokens pass: a
    JudgeError naming the question and the numbers (it was an IndexError inside the model)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    tok = AutoTokenizer.from_pretrained(os.path.join(tiny_world, "tokenizer"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    judge = judges.LocalJudge(E.Config(judge="local", judge_model=str(tmp_path / "judge"),
                                       judge_max_tokens=4))
    assert isinstance(judge("Is there a circle?", {"bench": "mmhal", "id": "0"}), str)
    assert judge.last_cut  # (4 tokens of a random model, no end token: stopped at the limit)
    # another model saved at the same path is another judge (its stored replies were reused)
    weights = tmp_path / "judge" / "model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 60))
    again = judges.LocalJudge(E.Config(judge="local", judge_model=str(tmp_path / "judge"),
                                       judge_max_tokens=4))
    assert again.name != judge.name and again.name.startswith(f"local:{tmp_path / 'judge'}@")
    generate = judge.model.generate  # a reply that ends with its end token is whole
    judge.model.generate = lambda ids, **kw: torch.cat(
        [ids, torch.tensor([[5, 5, 5, tok.eos_token_id]])], 1)  # (4 tokens, the last its end)
    judge("Is there a circle?", {"bench": "mmhal", "id": "0"})
    assert not judge.last_cut
    judge.model.generate = generate
    with pytest.raises(judges.JudgeError, match=r"mmhal question '7' is \d+ tokens; with "
                                                r"--judge_max_tokens 4 that passes the model's 32"):
        judge("Is there a circle? " * 10, {"bench": "mmhal", "id": "7"})


def test_a_judge_reply_without_llava_benchs_system_line_is_not_reused(tmp_path):
    """A judge's stored reply is reused for the same judge, prompt and image; what the judge reads
    includes LLaVA-Bench's system line, so a reply to the prompt alone (the local judge's before
    it sent the line) is asked again, while MMHal's replies are reused as before."""
    import hashlib
    calls = []

    class Judge:
        name = "local:j"

        def __call__(self, prompt, record):
            calls.append(record["bench"])
            return "8 7\nfine"

    q = {"id": "0", "prompt": "What is red?", "gt": "A circle.", "image_content": ["circle"],
         "context": "A red circle.", "reference": "A circle.", "category": "conv",
         "rule": {"role": "Assistant", "prompt": "Rate them."}}
    lines_ = {"0": {"answer": "A square.", "image_digest": "ab"}}
    for bench in ("llava_bench", "mmhal"):
        path = tmp_path / f"judge_{bench}.jsonl"
        prompt = judges.judge_prompt(bench, q, "A square.", {})
        old = hashlib.sha1(f"{prompt}|ab".encode()).hexdigest()[:16]  # (the prompt alone)
        path.write_text(json.dumps({"id": "0", "judge": "local:j", "answer": "A square.",
                                    "reply": "old", "prompt_digest": old}) + "\n")
        replies = E.judge_replies(bench, [q], lines_, str(path), {"judge": Judge()}, E.Config(),
                                  "m0")
        assert replies["0"] == ("8 7\nfine" if bench == "llava_bench" else "old"), bench
    assert calls == ["llava_bench"]


def test_local_judge_sends_llava_bench_system_line(tiny_world, tmp_path):
    """LLaVA's judge call for LLaVA-Bench opens with its system line (eval_gpt_review_visual.py);
    the local judge sent the user turn alone. Now: a system turn where the chat template has one,
    the line folded into the user turn where the template refuses a system role or drops it, the
    first paragraph of a plain LM's text; other benchmarks get the user turn alone."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    tok = AutoTokenizer.from_pretrained(os.path.join(tiny_world, "tokenizer"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=4096, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(tmp_path / "judge")
    cfg = E.Config(judge="local", judge_model=str(tmp_path / "judge"), judge_max_tokens=2)
    roles = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                 "{% endif %}" + roles)
    drops_system = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] }}: "
                    "{{ m['content'] }}\n{% endif %}{% endfor %}")
    system = {"role": "system", "content": judges.LLAVA_BENCH_SYSTEM}
    folded = [{"role": "user", "content": judges.LLAVA_BENCH_SYSTEM + "\n\nQ"}]
    for template, want_bench in ((roles, [system, {"role": "user", "content": "Q"}]),
                                 (no_system, folded), (drops_system, folded)):
        tok.chat_template = template
        tok.save_pretrained(tmp_path / "judge")
        judge = judges.LocalJudge(cfg)
        seen, render = [], judge.tok.apply_chat_template
        judge.tok.apply_chat_template = lambda m, **kw: (seen.append(m), render(m, **kw))[1]
        judge("Q", {"bench": "llava_bench", "id": "0"})
        judge("Q", {"bench": "mmhal", "id": "1"})
        assert seen[-2] == want_bench, template
        assert seen[-1] == [{"role": "user", "content": "Q"}]
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    judge = judges.LocalJudge(E.Config(judge="local", judge_model=str(tmp_path / "judge"),
                                       judge_max_tokens=2))
    judge.tok = AutoTokenizer.from_pretrained(tmp_path / "plain")
    sent, generate = [], judge.model.generate
    judge.model.generate = lambda ids, **kw: (sent.append(ids[0].tolist()), generate(ids, **kw))[1]
    judge("Q", {"bench": "llava_bench", "id": "0"})
    judge("Q", {"bench": "mmhal", "id": "1"})
    assert sent == [judge.tok(t).input_ids for t in (judges.LLAVA_BENCH_SYSTEM + "\n\nQ", "Q")]


# ------------------------------------------------------------------------------------ LLaVA-Bench

def test_llava_bench_judge_reply_prompt_and_summary_as_llava_reads_them():
    """parse_score of eval_gpt_review_visual.py (first line, commas to spaces, exactly two parts
    split at single spaces), and summarize_gpt_review.py's numbers: unparsed replies count as
    (-1, -1); means rounded to 3 places, relative = model / reference x 100 rounded to 1."""
    assert judges.parse_llava_bench("8 9\nAssistant 2 is more detailed.") == (8.0, 9.0)
    assert judges.parse_llava_bench("7.5,8") == (7.5, 8.0)
    for reply in ("8, 9", "8  9", "Scores: 8 9", "8\n9", "nan 9", "", "9"):
        assert judges.parse_llava_bench(reply) is None, reply
    qs = [{"id": "0", "category": "conv"}, {"id": "1", "category": "conv"},
          {"id": "2", "category": "detail"}, {"id": "3", "category": "complex"}]
    replies = {"0": "6 8\nok", "1": "8 8", "2": "no scores here", "3": "7 3"}
    got = judges.llava_bench_metrics(qs, replies)
    # all: reference (6 + 8 - 1 + 7) / 4 = 5.0, model (8 + 8 - 1 + 3) / 4 = 4.5
    assert {k: got[k] for k in ("relative", "reference", "model", "n")} == {
        "relative": 90.0, "reference": 50.0, "model": 45.0, "n": 4}
    per = got["per_category"]
    assert per["conv"] == {"relative": 114.3, "reference": 70.0, "model": 80.0, "n": 2}
    assert per["detail"]["relative"] is None  # (-1 / -1 would read 100)
    assert per["complex"]["relative"] == 42.9
    assert got["unparsed"] == 1 and got["unparsed_ids"] == ["2"]
    # a category may be called anything, 'all' and 'unparsed' too: its numbers are its own
    odd = [dict(q, category="all" if q["category"] == "conv" else "unparsed") for q in qs]
    got = judges.llava_bench_metrics(odd, replies)
    assert got["n"] == 4 and got["per_category"]["all"]["n"] == 2 and got["unparsed"] == 1
    assert got["per_category"]["unparsed"]["n"] == 2
    # a benchmark whose every reply failed keeps its column, its value '-'
    md, _ = E.table({"m": {"llava_bench": {"relative": None, "n": 3}}})
    assert md.splitlines()[0] == "| checkpoint | LLaVA-Bench |"
    assert md.splitlines()[2] == "| m | - |"
    # the image id in a name, as digits (5000 of them are no int Python converts)
    number = benchmarks.coco_number
    assert number("COCO_val2014_000000525439.jpg") == number("000000525439.jpg")
    assert number("1" * 5000 + ".jpg") == "1" * 5000 and number("a.jpg") is None
    assert number("000.png") == "0"
    q = {"context": "A dog.\n\ndog: [0.1, 0.2, 0.3, 0.4]", "prompt": "What is it?",
         "reference": "A dog.", "rule": {"role": "Helper", "prompt": "Rate them."}}
    assert judges.llava_bench_prompt(q, "A cat.") == (
        "[Context]\nA dog.\n\ndog: [0.1, 0.2, 0.3, 0.4]\n\n[Question]\nWhat is it?\n\n"
        "[Helper 1]\nA dog.\n\n[End of Helper 1]\n\n[Helper 2]\nA cat.\n\n[End of Helper 2]\n\n"
        "[System]\nRate them.\n\n")


def llava_bench_files(env, root, first_release=False, wild=False):
    """A LLaVA-Bench of 3 questions on 2 of the tiny world's test images: questions (qa90 layout,
    or the 30x3 layout with its references inline and COCO-style image names), references,
    context (caps_boxes layout; wild: In-the-Wild's context.jsonl, a caption as published, a
    string, and one as a list) and a rule file (LLaVA's layout)."""
    folder = os.path.join(env["world"], "images", "test")
    images = sorted(os.listdir(folder))[:2]
    os.makedirs(root, exist_ok=True)
    rows = [(0, images[0], "What shape is on the left?", "conv"),
            (1, images[0], "Describe the image in detail.", "detail"),
            (2, images[1], "Why might the shapes be arranged so?", "complex")]
    if first_release:  # (30x3: the image's id, not the question's; the file named COCO-style)
        for _, image, _, _ in rows:
            coco = os.path.join(root, f"COCO_val2014_{int(image.split('.')[0]):012d}.png")
            if not os.path.exists(coco):
                os.symlink(os.path.join(folder, image), coco)
        questions = [{"id": image, "image": f"COCO_val2014_{int(image.split('.')[0]):012d}.png",
                      "instruction": text, "output": f"Reference {i}.", "type": cat}
                     for i, image, text, cat in rows]
    else:
        questions = [{"question_id": i, "image": image, "text": text, "category": cat}
                     for i, image, text, cat in rows]
    context = [{"id": image, "image": image, "captions": [f"Shapes {k}.", "Some shapes."],
                "instances": [{"category": "circle", "bbox": [0.1, 0.2, 0.5, 0.6]}]}
               for k, image in enumerate(images)]
    if wild:
        context = [{"id": "001", "image": images[0], "caption": "Shapes 0 on grey."},
                   {"id": "002", "image": images[1], "caption": ["Shapes 1.", "Some shapes."]}]
    # (LLaVA's rule.json: the visual review reads the bare categories; its llava_bench_* entries
    # are the in-the-wild benchmark's)
    rule = {"conv": {"role": "Assistant", "prompt": "Rate conv."},
            "detail": {"role": "Assistant", "prompt": "Rate detail."},
            "complex": {"role": "Assistant", "prompt": "Rate complex."},
            "llava_bench_conv": {"role": "Assistant", "prompt": "Rate wild conv."},
            "llava_bench_detail": {"role": "Helper", "prompt": "Rate wild detail."},
            "llava_bench_complex": {"role": "Assistant", "prompt": "Rate wild complex."},
            "coding": {"role": "Assistant", "prompt": "Not ours."}}
    files = {"questions": questions, "references": [{"question_id": i, "text": f"Reference {i}."}
                                                    for i, _, _, _ in rows],
             "context": context}
    paths = {}
    for name, recs in files.items():
        paths[name] = os.path.join(root, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    paths["rule"] = os.path.join(root, "rule.json")
    with open(paths["rule"], "w") as f:
        json.dump(rule, f)
    flags = ["--benchmarks", "llava_bench", "--llava_bench_file", paths["questions"],
             "--llava_bench_context", paths["context"], "--llava_bench_rule", paths["rule"],
             "--image_folder", str(root) if first_release else folder]
    if not first_release:
        flags += ["--llava_bench_answers", paths["references"]]
    return paths, flags


def test_llava_bench_answers_judged_and_scored(env, api, capsys):
    """The model answers the three questions; the judge gets LLaVA's call (a system line,
    temperature 0.2) with context, question, reference as Assistant 1 and the answer as Assistant
    2, and the rule of the question's category; scores.json has the summary's numbers. A LLaVA
    answers file is scored the same way with --rescore, and the 30x3 layout reads alike."""
    paths, flags = llava_bench_files(env, env["root"] / "lb")
    judge = ["--judge", "openai", "--judge_url", api, "--judge_key", "k"]
    FakeAPI.script = [(200, "8 6\nok"), (200, "9 3\nok"), (200, "7 7\nok")]
    out = env["root"] / "lb_runs"
    scores = run_cli(env, out, "--ckpt", env["ckpts"][0], *flags, *judge,
                     "--export", "true")["m0"]["llava_bench"]
    sent = [b for _, _, b in FakeAPI.bodies]
    assert len(sent) == 3 and all(b["temperature"] == 0.2 for b in sent)
    assert all(b["messages"][0] == {"role": "system", "content": judges.LLAVA_BENCH_SYSTEM}
               for b in sent)
    answers = {r["id"]: r for r in lines(out / "m0" / "answers_llava_bench.jsonl")}
    first = sent[0]["messages"][1]["content"]
    assert first.startswith("[Context]\nShapes 0.\nSome shapes.\n\ncircle: [0.1, 0.2, 0.5, 0.6]"
                            "\n\n[Question]\nWhat shape is on the left?\n\n[Assistant 1]\n"
                            "Reference 0.\n\n[End of Assistant 1]\n\n[Assistant 2]\n")
    assert first.endswith(f"\n{answers['0']['answer']}\n\n[End of Assistant 2]\n\n[System]\n"
                          "Rate conv.\n\n")
    assert "Rate complex." in sent[2]["messages"][1]["content"]
    assert {k: scores[k] for k in ("relative", "reference", "model", "n")} == {
        "relative": 66.7, "reference": 80.0, "model": 53.3, "n": 3}
    per = scores["per_category"]
    assert per["conv"]["relative"] == 75.0 and per["detail"]["relative"] == 33.3
    assert "| LLaVA-Bench |" in capsys.readouterr().out
    # --export: model_vqa.py's layout, the question ids as the question file has them
    exported = lines(out / "m0" / "export" / "llava_bench.jsonl")
    assert [r["question_id"] for r in exported] == [0, 1, 2]
    assert exported[1]["prompt"] == "Describe the image in detail."
    assert exported[1]["text"] == answers["1"]["answer"] and exported[1]["model_id"] == "m0"
    assert len({r["answer_id"] for r in exported}) == 3
    # --rescore of a LLaVA answers file (model_vqa.py's layout), judged anew by another judge
    llava = env["root"] / "lb" / "llava_answers.jsonl"
    llava.write_text("".join(json.dumps({"question_id": int(i), "prompt": r["prompt"],
                                         "text": "A circle.", "answer_id": "x", "model_id": "m"})
                             + "\n" for i, r in answers.items()))
    FakeAPI.script = [(200, "8 8")] * 3
    rescored = run_cli(env, env["root"] / "lb_llava", "--ckpt", "llava", "--rescore", "true",
                       "--llava_answers", str(llava), *flags, *judge)["llava"]["llava_bench"]
    assert rescored["relative"] == 100.0
    assert "A circle." in FakeAPI.bodies[-1][2]["messages"][1]["content"]
    # the first release's file: references inline, ids by line, images matched by COCO id
    paths30, flags30 = llava_bench_files(env, env["root"] / "lb30", first_release=True)
    FakeAPI.script = [(200, "8 6\nok"), (200, "9 3\nok"), (200, "7 7\nok")]
    scores30 = run_cli(env, env["root"] / "lb30_runs", "--ckpt", env["ckpts"][0], *flags30,
                       *judge)["m0"]["llava_bench"]
    assert scores30 == scores


def test_llava_bench_in_the_wild_is_read_as_llavas_scripts_read_it(env, api, capsys, tmp_path):
    """LLaVA-Bench In-the-Wild (scripts/v1_5/eval/llavabench.sh): its context.jsonl ({"id",
    "image", "caption"}) was refused as "field 'captions': missing". Told by its fields, it is
    judged as eval_gpt_review_bench.py judges it: the context '\n'.join(caption) without boxes
    (a published caption, a string, one character a line), the rule 'llava_bench_' + category,
    and summarize_gpt_review.py's per-category names (its bad records:
    test_llava_bench_bad_input_is_one_line)."""
    paths, flags = llava_bench_files(env, tmp_path / "lbw", wild=True)
    judge = ["--judge", "openai", "--judge_url", api, "--judge_key", "k"]
    questions, refs = lines(paths["questions"]), lines(paths["references"])
    answers = tmp_path / "answers.jsonl"  # (model_vqa.py's layout)
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "prompt": q["text"],
                                           "text": f"Answer {q['question_id']}."}) + "\n"
                               for q in questions))
    rescore = ["--rescore", "true", "--llava_answers", str(answers), *flags, *judge]
    FakeAPI.script, FakeAPI.bodies[:] = [(200, "8 6\nok"), (200, "9 3\nok"), (200, "7 7\nok")], []
    scores = run_cli(env, tmp_path / "o", "--ckpt", "llava", *rescore)["llava"]["llava_bench"]
    # what eval_gpt_review_bench.py sends, from its format string
    rule = json.load(open(paths["rule"]))
    by_image = {c["image"]: c for c in lines(paths["context"])}
    for q, ref, (_, _, body) in zip(questions, refs, FakeAPI.bodies, strict=True):
        cap_str = "\n".join(by_image[q["image"]]["caption"])
        role, prompt = (rule["llava_bench_" + q["category"]][k] for k in ("role", "prompt"))
        assert body["messages"][1]["content"] == (
            f"[Context]\n{cap_str}\n\n[Question]\n{q['text']}\n\n"
            f"[{role} 1]\n{ref['text']}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\nAnswer {q['question_id']}.\n\n[End of {role} 2]\n\n"
            f"[System]\n{prompt}\n\n")
        assert body["messages"][0]["content"] == judges.LLAVA_BENCH_SYSTEM
    assert FakeAPI.bodies[0][2]["messages"][1]["content"].startswith("[Context]\nS\nh\na\n")
    assert FakeAPI.bodies[2][2]["messages"][1]["content"].startswith(
        "[Context]\nShapes 1.\nSome shapes.\n\n[Question]\n")
    assert {k: scores[k] for k in ("relative", "reference", "model", "n")} == {
        "relative": 66.7, "reference": 80.0, "model": 53.3, "n": 3}
    assert {c: v["relative"] for c, v in scores["per_category"].items()} == {
        "llava_bench_conv": 75.0, "llava_bench_detail": 33.3, "llava_bench_complex": 100.0}
    # no rule file: ours, without the boxes the context does not hold
    FakeAPI.script, FakeAPI.bodies[:] = [(200, "8 8")] * 3, []
    run_cli(env, tmp_path / "o2", "--ckpt", "llava", *rescore, "--llava_bench_rule", "")
    sent = FakeAPI.bodies[0][2]["messages"][1]["content"]
    assert sent.endswith(f"[System]\n{judges.LLAVA_BENCH_WILD_RULE['prompt']}\n\n")
    # --llava_bench_caption whole: the caption as lmms-eval's task sends it (a list still joined)
    FakeAPI.script, FakeAPI.bodies[:] = [(200, "8 8")] * 3, []
    run_cli(env, tmp_path / "o3", "--ckpt", "llava", *rescore, "--llava_bench_caption", "whole")
    for q, (_, _, body) in zip(questions, FakeAPI.bodies, strict=True):
        caption = by_image[q["image"]]["caption"]
        caption = caption if isinstance(caption, str) else "\n".join(caption)
        assert body["messages"][1]["content"].startswith(f"[Context]\n{caption}\n\n[Question]")
    from conftest import run_cli as run_stage
    _, coco_flags = llava_bench_files(env, tmp_path / "lbc")
    code, _, err = run_stage("eval", ["--world", env["world"], "--out", str(tmp_path / "o4"),
                                      *FAST, "--ckpt", "llava", *rescore, *coco_flags,
                                      "--llava_bench_caption", "whole"])
    assert code == 2 and "--llava_bench_caption whole: for In-the-Wild's context.jsonl" in err, err
    assert "bounding" not in sent and "bounding" in judges.LLAVA_BENCH_RULE["prompt"]


def test_export_is_what_llava_and_mmhal_scorers_read(env, tmp_path, capsys):
    """--export true writes POPE answers as LLaVA's model_vqa.py does (the question before the
    suffix, as LLaVA-RLHF's records it) and MMHal-Bench's response template with model_answer
    filled; --rescore of the exported POPE file gives the same scores (a LLaVA answers file whose
    prompt lacks --pope_suffix is the same question)."""
    suffix = ["--pope_suffix", "\\nAnswer yes or no."]
    out = tmp_path / "o"
    rows = run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "pope", "mmhal",
                   "--export", "true", *suffix)
    export = out / "m0" / "export"
    assert sorted(os.listdir(export)) == ["mmhal.json", "pope_adversarial.jsonl",
                                          "pope_popular.jsonl", "pope_random.jsonl"]
    questions = [json.loads(x) for x in open(os.path.join(env["world"], "pope_random.jsonl"))]
    exported = lines(export / "pope_random.jsonl")
    assert [r["question_id"] for r in exported] == [q["question_id"] for q in questions[:4]]
    assert [r["prompt"] for r in exported] == [q["text"] for q in questions[:4]]
    rescored = run_cli(env, tmp_path / "r", "--ckpt", "m0", "--rescore", "true", "--benchmarks",
                       "pope", "--pope_files", os.path.join(env["world"], "pope_random.jsonl"),
                       "--llava_answers", str(export / "pope_random.jsonl"), *suffix)
    scored = lambda r: {k: v for k, v in r["m0"]["pope"]["random"].items() if k != "asked"}
    assert scored(rescored) == scored(rows)  # (asked otherwise: from an answers file)
    mmhal = json.load(open(export / "mmhal.json"))
    template = json.load(open(os.path.join(env["world"], "mmhal.json")))[:4]
    answers = lines(out / "m0" / "answers_mmhal.jsonl")
    assert [r["model_answer"] for r in mmhal] == [a["answer"] for a in answers]
    assert [dict(r, model_answer="") for r in mmhal] == [dict(r, model_answer="") for r in template]
    # an MMHal-Bench answers file (model_vqa_mmhal.py's, as exported) is scored as ours was
    rescored = run_cli(env, tmp_path / "r", "--ckpt", "m0", "--rescore", "true", "--benchmarks",
                       "mmhal", "--llava_answers", str(export / "mmhal.json"))
    assert rescored["m0"]["mmhal"] == rows["m0"]["mmhal"]
    (tmp_path / "template.json").write_text(json.dumps(template))  # (model_answer empty)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(env, tmp_path / "r", "--ckpt", "m0", "--rescore", "true", "--benchmarks",
                "mmhal", "--llava_answers", str(tmp_path / "template.json"))
    assert capsys.readouterr().err.endswith("template.json: record 0: field 'model_answer': "
                                            "empty in every record: the template, not answers "
                                            "(model_vqa_mmhal.py fills it)\n")
    # one empty answer among the others is judged, as eval_gpt_mmhal.py does (it refused the
    # whole file: a model that stopped at once writes one)
    one_empty = [dict(r, model_answer="") if i == 1 else r for i, r in enumerate(mmhal)]
    (tmp_path / "one_empty.json").write_text(json.dumps(one_empty))
    capsys.readouterr()
    scored = run_cli(env, tmp_path / "r1", "--ckpt", "m0", "--rescore", "true", "--benchmarks",
                     "mmhal", "--llava_answers", str(tmp_path / "one_empty.json"))["m0"]["mmhal"]
    assert scored["n"] == 4 and "partial" not in scored, scored
    assert "1 empty model_answer judged as given" in capsys.readouterr().out
    # an answers file rescored from the export folder --export rewrites: refused, left whole (it
    # was rewritten with this run's answers, cut to --limit, while being read)
    before = (export / "pope_random.jsonl").read_bytes()
    with pytest.raises(SystemExit):
        run_cli(env, out, "--ckpt", "m0", "--rescore", "true", "--benchmarks", "pope",
                "--pope_files", os.path.join(env["world"], "pope_random.jsonl"), "--export",
                "true", "--llava_answers", str(export / "pope_random.jsonl"), "--limit", "2")
    err = capsys.readouterr().err
    assert err.startswith("error: --llava_answers ") and "which --export true rewrites" in err, err
    assert (export / "pope_random.jsonl").read_bytes() == before
    replies = lines(tmp_path / "r1" / "m0" / "judge_mmhal.jsonl")
    assert len(replies) == 4 and all(isinstance(r.get("reply"), str) for r in replies), replies
    # the template without the field at all (it was read as POPE's: "field 'text': expected
    # {question_id, prompt, text}")
    bare = [{k: v for k, v in r.items() if k != "model_answer"} for r in template]
    (tmp_path / "template.json").write_text(json.dumps(bare))
    with pytest.raises(SystemExit):
        run_cli(env, tmp_path / "r", "--ckpt", "m0", "--rescore", "true", "--benchmarks",
                "mmhal", "--llava_answers", str(tmp_path / "template.json"))
    assert "field 'model_answer': missing or not a string" in capsys.readouterr().err


def test_llava_bench_bad_input_is_one_line(env, tmp_path, capsys):
    paths, flags = llava_bench_files(env, tmp_path / "lb")
    ctx = [json.loads(x) for x in open(paths["context"])][:1]  # the second image has none
    (tmp_path / "ctx1.jsonl").write_text(json.dumps(ctx[0]) + "\n")
    (tmp_path / "refs.jsonl").write_text(json.dumps({"question_id": 0, "text": "R."}) + "\n")
    (tmp_path / "rule.json").write_text(json.dumps({"conv": {"role": "A",
                                                                        "prompt": "P"}}))
    paths30, flags30 = llava_bench_files(env, tmp_path / "lb30", first_release=True)
    (tmp_path / "mmhal.txt").write_text(MMHAL_TEMPLATE)
    first = [json.loads(x) for x in open(paths30["questions"])][0]["image"]
    number = first[len("COCO_val2014_"):-len(".png")].lstrip("0") or "0"
    thumb = dict(ctx[0], image=f"thumb_{number}.png")  # (another picture, the same number)
    (tmp_path / "ctx2.jsonl").write_text(open(paths30["context"]).read() + json.dumps(thumb) + "\n")
    pope = [json.loads(x) for x in open(os.path.join(env["world"], "pope_random.jsonl"))][:4]
    for k, r in enumerate(pope):  # (one file of two splits, as LLaVA-1.5's llava_pope_test.jsonl)
        r.update(category="random" if k < 2 else "popular", question_id=k if k < 3 else 2)
    (tmp_path / "pope_two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pope))
    dup = [json.loads(x) for x in open(paths["questions"])]
    dup[2]["question_id"] = dup[0]["question_id"]
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dup))
    # In-the-Wild's context.jsonl without a caption or image, or a caption no join() takes
    pathsw, flagsw = llava_bench_files(env, tmp_path / "lbw", wild=True)
    ctxw = [json.loads(x) for x in open(pathsw["context"])]
    drop = lambda r, k: {f: v for f, v in r.items() if f != k}
    wild = {"nocap": ([ctxw[0], drop(ctxw[1], "caption")], "record 1 (id '002'): field 'caption': "
                      "missing"),
            "number": ([ctxw[0], dict(ctxw[1], caption=7)], "record 1 (id '002'): field "
                       "'caption': expected a string or a list"),
            "noimage": ([drop(ctxw[0], "image")], "record 0 (id '001'): field 'image': missing")}
    for name, (recs, _) in wild.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "onlyone.jsonl").write_text(json.dumps(ctxw[0]) + "\n")
    # both layouts in one file: read as COCO's, the In-the-Wild record named as such
    (tmp_path / "mixed.jsonl").write_text(json.dumps(ctx[0]) + "\n" + json.dumps(ctxw[1]) + "\n")
    judge = ["--judge", "openai", "--judge_url", "http://127.0.0.1:9/v1", "--judge_key", "k"]
    cases = [([], "--judge oracle knows only the Shapes world"),
             *((flagsw + ["--llava_bench_context", str(tmp_path / f"{name}.jsonl")],
                f"{name}.jsonl: {want}") for name, (_, want) in wild.items()),
             (flagsw + ["--llava_bench_context", str(tmp_path / "onlyone.jsonl")],
              "lbw/questions.jsonl: record 2 (id 2): field 'image': "),
             (flagsw + ["--llava_bench_answers", str(tmp_path / "refs.jsonl")],
              "lbw/questions.jsonl: record 1 (id 1): field 'question_id': has no reference"),
             (flagsw + ["--llava_bench_rule", str(tmp_path / "rule.json")],
              "rule.json: record 'llava_bench_conv': no rule for the category 'llava_bench_conv'"),
             (["--llava_bench_file", ""], "--benchmarks llava_bench needs --llava_bench_file"),
             (["--llava_bench_answers", ""], "holds no reference answers: pass "
                                             "--llava_bench_answers"),
             (["--llava_bench_context", str(tmp_path / "ctx1.jsonl")],
              "questions.jsonl: record 2 (id 2): field 'image': "),
             (["--llava_bench_context", str(tmp_path / "mixed.jsonl")],
              "mixed.jsonl: record 1 (id '002'): field 'captions': missing: this record has "
              "In-the-Wild's 'caption'"),
             (["--llava_bench_answers", str(tmp_path / "refs.jsonl")],
              "record 1 (id 1): field 'question_id': has no reference answer"),
             (["--llava_bench_rule", str(tmp_path / "rule.json")],
              "rule.json: record 'detail': no rule for the category 'detail'"),
             (flags30 + ["--llava_bench_answers", paths["references"]],
              "references.jsonl: not read with"),
             (["--benchmarks", "pope", "--llava_bench_file", paths["questions"]],
              "questions.jsonl: not read without llava_bench in --benchmarks"),
             (["--judge_prompt", f"mmhal={tmp_path / 'mmhal.txt'}"],
              "--judge_prompt mmhal=...: mmhal is not in --benchmarks"),
             (["--benchmarks", "gavie", "--export", "true"],
              "--export true: not read without pope, chair, mmhal or llava_bench"),
             (flags30 + ["--llava_bench_context", str(tmp_path / "ctx2.jsonl"),
                         "--llava_bench_answers", ""],
              f"record 0 (id 0): field 'image': {first} has 2 records ("),
             (["--llava_bench_file", str(tmp_path / "dup.jsonl")],
              "dup.jsonl: record 2 (id '0'): field 'question_id': given twice (first at record "
              "0 there"),
             (["--llava_bench_answers", paths["questions"]],
              "questions.jsonl: record 0 (id 0): field 'image': a question file's field"),
             (["--rescore", "true", "--llava_answers", paths["questions"]],
              "questions.jsonl: record 0: field 'image': a question file's field"),
             (["--rescore", "true", "--llava_answers", paths["references"], "--compare", "a", "b"],
              "--llava_answers scores one answers file: name it with --ckpt, not --compare")]
    for extra, want in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_cli(env, tmp_path / "o", "--ckpt", env["ckpts"][0], *flags,
                    *(judge if extra else []), *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (extra, err)
        assert want in err, (extra, err)
    # a duplicate id in the second split of a file holding two: its record in that file
    with pytest.raises(SystemExit) as e:
        run_cli(env, tmp_path / "o", "--ckpt", env["ckpts"][0], "--benchmarks", "pope",
                "--pope_files", str(tmp_path / "pope_two.jsonl"), "--image_folder", env["world"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().endswith(
        "pope_two.jsonl: record 3 (id '2'): field 'question_id': given twice (first at record 2 "
        "there; answers are stored by id)"), err


def test_eval_of_an_unfinished_run_is_said_on_a_real_benchmark(tiny_world, tiny_sft, tmp_path):
    """--ckpt of a run folder whose run stopped before its last step: eval said so only where it
    read the Shapes world; on a POPE file of its own it scored the newest checkpoint unsaid."""
    from conftest import run_cli as run_stage
    cut = tmp_path / "cut"
    shutil.copytree(tiny_sft, cut)
    config = cut / os.path.basename(common.latest_checkpoint(str(cut))) / "config.json"
    meta = json.load(open(config))
    meta["run_config"]["max_steps"] = 1200  # (as if stopped at step 3 of 1200)
    config.write_text(json.dumps(meta))
    pope = os.path.join(tiny_world, "pope_random.jsonl")
    code, out, err = run_stage("eval", [
        "--ckpt", str(cut), "--benchmarks", "pope", "--limit", "2", "--out", str(tmp_path / "o"),
        "--pope_files", pope, "--image_folder", tiny_world])
    assert code == 0 and f"note: --ckpt {cut}: its run stopped at step 3 of 1200 (unfinished)" \
        in out, err


def test_a_checkpoint_trained_with_another_template_gets_a_note(tiny_world, tiny_sft, tmp_path):
    """eval, dpo, reward and vigc prompted a checkpoint of ours with another --template than it
    was trained with, without a word (only PPO checks its pair); now a note says so."""
    from conftest import run_cli as run_stage
    base = ["--world", tiny_world, "--max_steps", "1", "--batch_size", "4"]
    runs = {"eval": ["--ckpt", tiny_sft, "--world", tiny_world, "--benchmarks", "pope",
                     "--limit", "2"],
            "dpo": ["--init", tiny_sft, *base, "--eval_n", "4"],
            "vigc": ["--init", tiny_sft, *base, "--generate", "0"],
            "reward": ["--init", tiny_sft, *base, "--eval_prompt", "short", "--eval_size", "4"]}
    for script, argv in runs.items():
        for template, noted in (("vicuna_v1", False), ("llava_v1", True)):
            out = str(tmp_path / f"{script}-{template}")
            code, stdout, err = run_stage(script, argv + ["--out", out, "--template", template])
            assert code == 0, err
            note = ("was trained with --template vicuna_v1; this run prompts it with --template "
                    "llava_v1")
            assert (note in stdout) == noted, (script, template, stdout[-500:])


def test_llava_bench_names_without_digits_match_only_themselves(tmp_path):
    """The COCO-id fallback is for names that end in digits: a question's 'cat.jpg' took the
    context of another digitless 'dog.jpg' (both read as the same 'no number')."""
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 0, "image": "cat.jpg",
                                                  "text": "What?", "category": "conv"}) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"question_id": 0, "text": "A cat."}) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "dog.jpg", "captions": ["A dog."],
                                                  "instances": []}) + "\n")
    cfg = E.Config(rescore=True, llava_bench_file=str(tmp_path / "q.jsonl"),
                   llava_bench_answers=str(tmp_path / "r.jsonl"),
                   llava_bench_context=str(tmp_path / "c.jsonl"))
    with pytest.raises(E.DataError, match="field 'image': cat.jpg has no record in"):
        benchmarks.llava_bench_questions(cfg, None)


def test_a_full_disk_while_answering_is_one_line(env, tmp_path, monkeypatch, capsys):
    """A disk filling up while an answers file (or metrics, or a world's image) was written ended
    in a traceback: the failed write names no file, and only OSErrors naming one were said. Now
    one line and exit 2; the answers written before it are kept and reused."""
    import builtins
    argv = ["--ckpt", env["ckpts"][0], "--benchmarks", "pope"]

    def opened(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(f) if mode == "a" and str(path).endswith(".jsonl") else f
    monkeypatch.setattr(E, "open", opened, raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(env, tmp_path / "o", *argv)
    err = capsys.readouterr().err
    answers = tmp_path / "o" / "m0" / "answers_pope_random.jsonl"  # (named since)
    assert e.value.code == 2 and err.startswith(f"error: {answers}: No space left on device while "
                                                "writing: free some space and run again"), err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    run_cli(env, tmp_path / "o", *argv)
    assert len(lines(tmp_path / "o" / "m0" / "answers_pope_random.jsonl")) == 4


def test_answers_about_other_images_and_a_moved_trees_two_runs_are_read(env, tmp_path):
    """One answers file holding answers about two sets of images (another --image_folder, or COCO
    then A-OKVQA POPE into one --out) refused a later run of fewer questions: "answered twice for
    the same prompt and image" of lines about other images, for questions it did not ask. A moved
    checkpoint's folder holding two runs could not be rescored with any flags. A LLaVA answers
    record with a prompt of [] was a traceback."""
    from PIL import Image
    from conftest import run_cli as run_stage
    other = tmp_path / "other"
    shutil.copytree(env["world"], other)
    for name in os.listdir(other / "images" / "test"):  # (the same names, other pixels)
        path = other / "images" / "test" / name
        Image.eval(Image.open(path).convert("RGB"), lambda v: 255 - v).save(path)
    pope = os.path.join(env["world"], "pope_random.jsonl")
    args = ["--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--pope_files", pope, "--world",
            env["world"], "--out", str(tmp_path / "o"), *FAST]
    for folder in (env["world"], str(other)):
        code, out, err = run_stage("eval", args + ["--image_folder", folder])
        assert code == 0 and "generating 4" in out, err
    code, out, err = run_stage("eval", args + ["--image_folder", str(other), "--limit", "2"])
    assert code == 0 and "reused 2 answers, generating 0" in out, err
    # a moved tree with two runs: the one these flags made is rescored
    tree = tmp_path / "tree"
    shutil.copytree(env["ckpts"][0], tree / "a" / "m0")
    args = ["--ckpt", str(tree / "a" / "m0"), "--benchmarks", "pope", "--world", env["world"],
            "--out", str(tmp_path / "t"), *FAST]
    greedy = run_stage("eval", args)
    sampled = run_stage("eval", args + ["--temperature", "1.0"])
    assert greedy[0] == sampled[0] == 0, greedy[2] + sampled[2]
    os.rename(tree / "a", tree / "b")
    moved = [a.replace(str(tree / "a"), str(tree / "b")) for a in args] + ["--rescore", "true"]
    for flags, made in (([], "greedy"), (["--temperature", "1.0"], "temperature=1.0")):
        code, out, err = run_stage("eval", moved + flags)
        assert code == 0 and "reused 4 answers" in out, err
        used = json.load(open(tmp_path / "t" / "m0" / "scores.json"))["answers_from"]
        assert len(used) == 1 and made in used[0], used
    llava = tmp_path / "llava.jsonl"
    llava.write_text(json.dumps({"question_id": 1, "prompt": [], "text": "No"}) + "\n")
    code, _, err = run_stage("eval", ["--ckpt", "m0", "--benchmarks", "pope", "--pope_files", pope,
                                      "--world", env["world"], "--out", str(tmp_path / "l"),
                                      "--rescore", "true", "--llava_answers", str(llava), *FAST])
    assert code == 2 and "field 'prompt': expected a string, got []" in err, err
    # a judge file's line with a key that is not a string (a hand edit): one line, not a traceback
    args = ["--ckpt", env["ckpts"][0], "--benchmarks", "mmhal", "--world", env["world"],
            "--out", str(tmp_path / "j"), *FAST]
    assert run_stage("eval", args)[0] == 0
    judged = tmp_path / "j" / "m0" / "judge_mmhal.jsonl"
    rows = lines(judged)
    judged.write_text("".join(json.dumps(r) + "\n" for r in [dict(rows[0], prompt_digest={})]
                              + rows[1:]))
    code, _, err = run_stage("eval", args)
    assert code == 2 and "judge_mmhal.jsonl: record 0" in err, err
    assert "field 'prompt_digest': expected a string, got {}" in err, err


def test_compile_decode_gives_the_eager_answers(env, tmp_path, monkeypatch):
    """eval.py --compile_decode true decodes through the compiled step (model.generate(compile=
    True)): the same answers as eager decoding, and the step compiled (a counting backend stands in
    for inductor, which takes tens of seconds to compile on a CPU)."""
    counter = count_decode_compiles(monkeypatch)
    a = env["ckpts"][0]
    for name, extra in (("eager", []), ("compiled", ["--compile_decode", "true"])):
        run_cli(env, tmp_path / name, "--ckpt", a, "--benchmarks", "pope,chair", *extra)
    assert counter.frame_count >= 1
    for f in ("answers_pope_adversarial.jsonl", "answers_chair.jsonl"):
        eager, comp = lines(tmp_path / "eager" / "m0" / f), lines(tmp_path / "compiled" / "m0" / f)
        assert [x["answer"] for x in comp] == [x["answer"] for x in eager] and len(eager) == 4


def test_answers_end_at_any_eos_id_the_config_lists(env):
    """A Llama 3 config lists its turn end (<|eot_id|>) beside the tokenizer's eos; eval, VIGC and
    the reports (common.generate_answers) stopped at the tokenizer's alone and wrote on past the
    turn's end. Any id of the config's list ends an answer now; a config of one id is as before."""
    model, tok = common.load_model_and_tokenizer(env["ckpts"][0])
    model.eval()
    turns = [{"from": "human", "value": "<image>\nIs there a circle in the image?"}]
    size = model.config.image_size
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    item = common.prompt_item(tok, model, turns, image)
    first = model.generate(item["pixel_values"][None], item["input_ids"][None],
                           max_new_tokens=1, eos_token_id=-1).tokens[0, 0]
    assert int(first) != tok.eos_token_id
    texts, ended = common.generate_answers(model, tok, [item], max_new_tokens=6, show=False,
                                           return_finished=True)
    assert ended == [False]  # (a random model: six tokens, no eos)
    model.config.eos_token_id = [tok.eos_token_id, int(first)]
    texts, ended = common.generate_answers(model, tok, [item], max_new_tokens=6, show=False,
                                           return_finished=True)
    assert ended == [True] and texts[0] == tok.decode([int(first)], skip_special_tokens=True)


def test_local_judge_is_named_by_its_files_and_ends_where_its_model_ends(tiny_world, tmp_path,
                                                                          monkeypatch):
    """A hunt of the local judge: a folder without tokenizer files loaded an empty tokenizer and
    failed deep inside generate after every answer was made, a CLIP folder after them too (both
    one line before any answer now); a hub id from the local cache was named by a made-up path
    and time 0 (its stored replies were reused after the cache moved to another model), and a
    model saved over another with its time set back kept the old name, and its precision was not
    in its name; generate stopped at the generation config's end tokens alone, and a reply ending
    at one of a list read as cut."""
    from huggingface_hub import constants
    from transformers import AutoTokenizer, CLIPVisionConfig, GPT2Config, GPT2LMHeadModel
    tok = AutoTokenizer.from_pretrained(os.path.join(tiny_world, "tokenizer"))

    def save(folder, seed=0, with_tokenizer=True, **config):
        torch.manual_seed(seed)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=4096, n_embd=16, n_layer=1,
                                   n_head=2, **config)).save_pretrained(folder)
        if with_tokenizer:
            tok.save_pretrained(folder)
        return str(folder)
    cfg = lambda path, **kw: E.Config(judge="local", judge_model=path, judge_max_tokens=4, **kw)
    no_tok = save(tmp_path / "notok", with_tokenizer=False)
    with pytest.raises(common.ConfigError, match="notok: no tokenizer beside the model"):
        judges.local_judge_config(no_tok)
    CLIPVisionConfig(hidden_size=16, num_attention_heads=2).save_pretrained(tmp_path / "clip")
    with pytest.raises(common.ConfigError, match="is a CLIPVisionConfig, not a causal LM's"):
        judges.local_judge_config(str(tmp_path / "clip"))
    # a hub id in the local cache: named by its snapshot, so another snapshot is another judge
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--fake--judge"
    names = []
    for seed, commit in ((0, "a" * 40), (1, "b" * 40)):
        save(repo / "snapshots" / commit, seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        names.append(judges.LocalJudge(cfg("fake/judge")).name)
    assert commit in names[1] and names[0] != names[1]
    # other weights copied over the old ones, their time set back (nothing else touched): another
    # judge; a file it does not load (a README) changes nothing
    path = save(tmp_path / "judge")
    first = judges.LocalJudge(cfg(path))
    weights = tmp_path / "judge" / "model.safetensors"
    times = (weights.stat().st_atime_ns, weights.stat().st_mtime_ns)
    (tmp_path / "judge" / "README.md").write_text("notes")
    assert judges.LocalJudge(cfg(path)).name == first.name
    save(tmp_path / "other", seed=1, with_tokenizer=False)
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    os.utime(weights, ns=times)
    assert judges.LocalJudge(cfg(path)).name != first.name
    # the precision it runs at is its saved one (a bf16 judge is not loaded at twice its size),
    # and names it; the generation config's end tokens and the tokenizer's end a reply
    half = save(tmp_path / "half")
    GPT2LMHeadModel.from_pretrained(half).to(torch.bfloat16).save_pretrained(half)
    judge = judges.LocalJudge(cfg(half))
    assert judge.model.dtype == torch.bfloat16 and judge.name.endswith("|cpu|torch.bfloat16")
    listed = save(tmp_path / "listed", eos_token_id=[7, 9])
    judge = judges.LocalJudge(cfg(listed))
    assert judge.eos == sorted({7, 9, tok.eos_token_id})
    kwargs = []
    judge.model.generate = lambda ids, **kw: (kwargs.append(kw), torch.cat(
        [ids, torch.tensor([[5, 5, 5, 9]])], 1))[1]  # (4 tokens, the last a listed end)
    judge("Is there a circle?", {"bench": "mmhal", "id": "0"})
    assert not judge.last_cut and kwargs[0]["eos_token_id"] == judge.eos


def test_pope_splits_scored_in_separate_runs_are_kept_together(env, tmp_path):
    """--pope_files random, then popular, into one --out: the second run's scores.json replaced
    the first's split, and its 'average' was one split's numbers without a word. Splits of the
    same checkpoint, of one question set and asked alike, are kept and averaged together now (the
    average says which); a split of another set (another folder, A-OKVQA's beside COCO's) or asked
    otherwise (--limit, sampled answers even when rescored without flags) is not."""
    world, other = env["world"], tmp_path / "other"
    other.mkdir()
    shutil.copy(os.path.join(world, "pope_popular.jsonl"), other / "pope_popular.jsonl")
    out = tmp_path / "o"
    one = lambda path: run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "pope",
                               "--image_folder", world, "--pope_files", str(path))["m0"]
    first = one(os.path.join(world, "pope_random.jsonl"))
    second = one(os.path.join(world, "pope_popular.jsonl"))
    saved = json.load(open(out / "m0" / "scores.json"))
    assert list(saved["pope"]) == ["random", "popular", "average"] == list(second["pope"])
    assert saved["pope"]["random"] == first["pope"]["random"]
    assert saved["pope"]["average"]["splits"] == ["random", "popular"]
    f1 = [saved["pope"][s]["f1"] for s in ("random", "popular")]
    assert saved["pope"]["average"]["f1"] == pytest.approx(sum(f1) / 2)
    assert set(saved["answers_made"]) == {"pope_random", "pope_popular"}
    one(other / "pope_popular.jsonl")  # (another folder: the Shapes random split is not kept)
    saved = json.load(open(out / "m0" / "scores.json"))
    assert list(saved["pope"]) == ["popular", "average"]
    assert saved["pope"]["average"]["splits"] == ["popular"]
    # nor a split of another question set in the same folder, nor one asked otherwise (--limit)
    shutil.copy(os.path.join(world, "pope_random.jsonl"), other / "aokvqa_pope_random.jsonl")
    one(other / "aokvqa_pope_random.jsonl")
    assert list(json.load(open(out / "m0" / "scores.json"))["pope"]) == ["random", "average"]
    one(os.path.join(world, "pope_random.jsonl"))
    run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--image_folder", world,
            "--pope_files", os.path.join(world, "pope_popular.jsonl"), "--limit", "2")
    assert list(json.load(open(out / "m0" / "scores.json"))["pope"]) == ["popular", "average"]
    # a --rescore is asked as its scored answers were made, not as its own flags say: sampled
    # answers rescored without --temperature are not averaged with greedy ones
    sampled = tmp_path / "sampled"
    args = ("--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--image_folder", world)
    popular = os.path.join(world, "pope_popular.jsonl")
    run_cli(env, sampled, *args, "--pope_files", popular, "--temperature", "0.7", "--seed", "3")
    run_cli(env, sampled, *args, "--pope_files", os.path.join(world, "pope_random.jsonl"))
    run_cli(env, sampled, *args, "--pope_files", popular, "--rescore", "true")
    assert list(json.load(open(sampled / "m0" / "scores.json"))["pope"]) == ["popular", "average"]
    # files whose names hold no split word are each a set of their own
    for name in ("coco.jsonl", "aokvqa.jsonl"):
        shutil.copy(os.path.join(world, "pope_random.jsonl"), other / name)
        one(other / name)
    assert list(json.load(open(out / "m0" / "scores.json"))["pope"]) == ["aokvqa", "average"]


def test_a_judge_file_that_cannot_be_written_is_named_and_a_judges_own_error_is_not(tmp_path,
                                                                                     monkeypatch):
    """A judge reply that could not be appended for want of space named no file; the name is put
    on the write alone: an error of the judge's own (a local judge reading its files) is not the
    judge file's."""
    import errno

    class Judge:
        name = "fake"

        def __init__(self, error=None):
            self.error = error

        def __call__(self, prompt, q):
            if self.error:
                raise self.error
            return "Rating: 5"
    q = {"id": "1", "prompt": "What is it?", "gt": "a cat", "image_content": ["cat"]}
    lines = {"1": {"answer": "A cat."}}
    path = str(tmp_path / "judge_mmhal.jsonl")
    gone = OSError(errno.ENOENT, "No such file or directory")
    with pytest.raises(OSError) as e:
        E.judge_replies("mmhal", [q], lines, path, {"judge": Judge(gone)}, None, "m")
    assert e.value.filename is None
    full = io.StringIO()
    full.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left"))
    real = open
    monkeypatch.setattr(E, "open", lambda p, *a, **k: full if p == path else real(p, *a, **k),
                        raising=False)
    with pytest.raises(OSError) as e:
        E.judge_replies("mmhal", [q], lines, path, {"judge": Judge()}, None, "m")
    assert e.value.filename == path


def test_an_eval_folder_copied_with_hard_links_answers_into_its_own_files(env, tmp_path):
    """`cp -al` of an eval --out, then more questions answered in the copy: the answers were
    appended to the original's file too (one file, two names). The copy's is its own now."""
    import filecmp
    out, copy = tmp_path / "out", tmp_path / "copy"
    run_cli(env, out, "--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--limit", "2")
    shutil.copytree(out, copy, copy_function=os.link)
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run_cli(env, copy, "--ckpt", env["ckpts"][0], "--benchmarks", "pope", "--limit", "4")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    answers = [p for p in copy.rglob("answers*") if p.is_file()]
    assert answers and not all(filecmp.cmp(p, out / p.relative_to(copy), shallow=False)
                               for p in answers)
