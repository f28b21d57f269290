"""Tests for vigc.py: the VIG parser, VIC tokenization and correction loop, the CLI and its output
file."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

import common
import rundir
from checkpoint import save_checkpoint_files
import vigc
from conftest import run_cli
from data import IGNORE
from formats import read_llava


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_world):
    """A fresh `tiny` model with the world's tokenizer, saved as a checkpoint (faster than an SFT
    run)."""
    torch.manual_seed(0)
    tok_dir = os.path.join(tiny_world, "tokenizer")
    model, tok = common.load_model_and_tokenizer("", "tiny", tokenizer_dir=tok_dir)
    out = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    save_checkpoint_files(model, out)
    tok.save_pretrained(out)
    return out


def test_parse_vig_good_and_broken():
    assert vigc.parse_vig("Question: Is there a circle? Answer: Yes, there is a circle.") == \
        ("Is there a circle?", "Yes, there is a circle.")
    assert vigc.parse_vig("  question :How many squares?\nANSWER:There are two squares. ") == \
        ("How many squares?", "There are two squares.")
    assert vigc.parse_vig("QUESTION:what color is the ring?answer:  red.") == \
        ("what color is the ring?", "red.")
    for bad in ["", None, "Is there a circle? Yes.", "Question: Is there a circle?", "Answer: Yes.",
                "Question:   Answer: Yes.", "Question: Is there a circle? Answer:   ",
                "Answer: Yes. Question: Why?", "Question: a? Answer: b. Question: c? Answer: d.",
                "Question: a? Answer: b. Answer: c."]:
        assert vigc.parse_vig(bad) is None, bad
    assert vigc.sentences("There are 2.5 objects. A red circle! Is it? yes") == \
        ["There are 2.5 objects.", "A red circle!", "Is it?", "yes"]
    assert vigc.parse_vig(vigc.vig_target("Is it red?", "No. It is blue.")) == \
        ("Is it red?", "No. It is blue.")


def test_vic_example_learns_only_the_rest_and_prompt_is_its_prefix(tiny_ckpt):
    model, tok = common.load_model_and_tokenizer(tiny_ckpt)
    mc = model.config
    q = "Describe the image in detail."
    prefix = "There are two objects."
    rest = "A red circle is on the left."
    full = vigc.encode(tok, mc, q, prefix, rest)
    learned = full["input_ids"][full["labels"] != IGNORE].tolist()
    assert learned[-1] == tok.eos_token_id
    assert tok.decode(learned, skip_special_tokens=True).strip() == rest
    p = vigc.encode(tok, mc, q, prefix)  # the generation prompt ends with the answer so far
    assert torch.equal(full["input_ids"][:len(p["input_ids"])], p["input_ids"])
    prompt_text = tok.decode(p["input_ids"].tolist(), skip_special_tokens=True)
    assert prompt_text.rstrip().endswith("ASSISTANT: " + prefix)
    # k = 0: the SFT format, whole answer learned
    plain = vigc.encode(tok, mc, q, "", prefix + " " + rest)
    plain_learned = plain["input_ids"][plain["labels"] != IGNORE].tolist()
    assert tok.decode(plain_learned, skip_special_tokens=True).strip() == prefix + " " + rest


def scripted(fn):
    """common.generate_answers (vigc generates through it) answering from
    fn(items, temperature, num_beams): a list of (text, finished)."""
    def fake(model, tokenizer, items, batch_size=32, max_new_tokens=64, temperature=0.0, *args,
             num_beams=1, return_finished=False, **kw):
        out = fn(items, temperature, num_beams)
        texts, finished = [t for t, _ in out], [f for _, f in out]
        return (texts, finished) if return_finished else texts
    return fake


def test_sampled_correction_draws_from_the_seeded_stream(tiny_ckpt, tiny_world, tmp_path,
                                                         monkeypatch):
    """At --vic_temperature > 0 VIC drew from torch's global stream (VIG from its seeded one), so
    what ran before the generation (training steps, a resume) changed the corrected answers."""
    model, tok = common.load_model_and_tokenizer(tiny_ckpt)
    # (an untrained model's VIG output names no question: every one parsed as asked)
    monkeypatch.setattr(vigc, "parse_vig", lambda text: ("Is there a circle?", "Yes."))
    unlabeled = os.path.join(tiny_world, "images", "unlabeled")
    imgs = [(n, os.path.join(unlabeled, n)) for n in sorted(os.listdir(unlabeled))[:3]]
    instructions = vigc.load_instructions(os.path.join(tiny_world, "vigc_instructions.json"))
    got = []
    for before in (1, 2):  # (the global stream left in two states)
        cfg = vigc.Config(out=str(tmp_path / f"g{before}"), generate=3, max_new_tokens=8,
                          max_correction_steps=2, temperature=1.0, vic_temperature=1.0)
        os.makedirs(cfg.out)
        torch.manual_seed(before)
        vigc.generate_data(model, tok, cfg, imgs, instructions)
        got.append(json.load(open(os.path.join(cfg.out, "vigc_data.json"))))
    assert len(got[0]) == 3 and got[0] == got[1]


def test_correction_feeds_back_kept_sentences(tiny_ckpt, tiny_world, monkeypatch):
    from data import ImageCache
    model, tok = common.load_model_and_tokenizer(tiny_ckpt)
    cfg = vigc.Config(max_correction_steps=3, max_new_tokens=8, gen_batch_size=3,
                      vic_temperature=1.0)
    cache = ImageCache(model.config.image_size)
    unlabeled = os.path.join(tiny_world, "images", "unlabeled")
    units = [cache.unit(os.path.join(unlabeled, f"00000{i}.png")) for i in range(3)]
    questions = ["Is there a circle?", "How many squares are there?",
                 "Describe the image in detail."]
    prompts, outputs = [], []
    real_prompt, real_generate = vigc.prompt, common.generate_answers

    def spy_prompt(tokenizer, model, question, prefix, unit, cfg):
        item = real_prompt(tokenizer, model, question, prefix, unit, cfg)
        text = tokenizer.decode(item["input_ids"].tolist(), skip_special_tokens=True)
        prompts.append((question, prefix, text))
        return item

    def spy_generate(*args, **kw):
        out = real_generate(*args, **kw)
        outputs.extend(zip(*out))  # (texts, finished): vigc.correct asks for both
        return out
    monkeypatch.setattr(vigc, "prompt", spy_prompt)
    monkeypatch.setattr(common, "generate_answers", spy_generate)
    gen = torch.Generator().manual_seed(0)
    answers, steps = vigc.correct(model, tok, questions, units, cfg, gen)
    assert len(prompts) == len(outputs) == sum(steps) and max(steps) == 3
    kept = {q: [] for q in questions}
    norm = lambda s: " ".join(s.split())
    for (q, prefix, text), (out, _) in zip(prompts, outputs):
        # prompt k+1 holds exactly the sentences kept at steps 1..k
        assert prefix == " ".join(kept[q])
        # ... and they are in the tokens the model reads
        assert norm(text).endswith(norm("ASSISTANT: " + prefix))
        kept[q] += vigc.sentences(out)[:1]
    assert answers == [" ".join(kept[q]) for q in questions]
    prompts.clear(), outputs.clear()
    again, _ = vigc.correct(model, tok, questions, units, cfg, torch.Generator().manual_seed(0))
    assert again == answers  # fixed seed: the same answers


def test_correction_stops_at_eos_and_at_the_step_limit(monkeypatch):
    script = []  # one list of (text, finished) per call, for the active items in order

    def fake(items, temperature, num_beams):
        out = script.pop(0)
        assert len(out) == len(items)
        return out
    monkeypatch.setattr(vigc, "prompt", lambda tokenizer, model, q, prefix, unit, cfg: (q, prefix))
    monkeypatch.setattr(common, "generate_answers", scripted(fake))
    cfg = vigc.Config(max_correction_steps=4)
    script[:] = [[("One. Two.", False), ("Alpha.", True), ("", True)],
                 [("Two. Three.", True)],
                 [("Three.", True)]]
    answers, steps = vigc.correct(None, None, ["a", "b", "c"], [None] * 3, cfg)
    assert answers == ["One. Two. Three.", "Alpha.", ""] and steps == [3, 1, 1] and not script
    # never ends: stops after max_correction_steps sentences
    script[:] = [[("More. Words.", False)]] * 4
    assert vigc.correct(None, None, ["a"], [None], cfg) == (["More. More. More. More."], [4])
    assert not script
    script[:] = [[("More. Words.", False)]] * 4
    cfg.last_infer_all = True  # VIGC's option: the last step keeps the whole generation
    assert vigc.correct(None, None, ["a"], [None], cfg)[0] == ["More. More. More. More. Words."]


def test_reference_correction_continues_the_vig_turn_for_exactly_answer_length_steps(monkeypatch):
    """VIGC llava_150k_gen.py by hand: each step continues 'Question: q Answer: <kept>' of the job's
    instruction by beam search and keeps the text up to the first '.' (none: nothing), 4 steps, EOS
    or not."""
    script, calls = [], []

    def fake(items, temperature, num_beams):
        calls.append((items, temperature, num_beams))
        return script.pop(0)
    monkeypatch.setattr(vigc, "prompt", lambda tokenizer, model, q, prefix, unit, cfg: (q, prefix))
    monkeypatch.setattr(common, "generate_answers", scripted(fake))
    cfg = vigc.Config(vic_mode="reference")
    jobs = [{"instruction": "Ask about the image.", "q": "What is there?", "unit": None},
            {"instruction": "Describe it.", "q": "Describe the image.", "unit": None}]
    script[:] = [[("A red circle. It is big", True), ("Two shapes", False)],
                 [("It is big. Yes", True), ("A square. And", True)],
                 [("no period here", True), ("A ring.", True)],
                 [("Done. More", True), ("", True)]]
    answers, steps = vigc.correct_reference(None, None, jobs, cfg)
    assert answers == ["A red circle. It is big. Done.", "A square. A ring."]
    assert steps == [4, 4] and not script
    ask = "Ask about the image."
    turn = "Question: What is there? Answer:"
    assert [c[0][0] for c in calls] == [(ask, turn),
                                        (ask, turn + " A red circle."),
                                        (ask, turn + " A red circle. It is big."),
                                        (ask, turn + " A red circle. It is big.")]
    assert all(t == 0.0 and b == 5 for _, t, b in calls)  # greedy beam search, 5 beams
    examples, _ = vigc.build_examples([{"image": "x.png", "conversations": [], "pairs": [
        ("What is there?", "A red circle. It is big. It is on the left.", "conversation")]}],
        {"conversation": ["Ask."]}, vigc.Config(vic_mode="reference", sft_share=0))
    vic = [e for e in examples if e["question"] == "What is there?"]
    # question -> the full answer
    assert vic == [{"image": "x.png", "question": "What is there?", "prefix": "",
                    "target": "A red circle. It is big. It is on the left."}]
    # as written: its paragraph breaks were joined into spaces (VIGC learns the answer as it is)
    answer = "A red circle.\n\nIt is big.  Also:\n- one\n- two"
    examples, _ = vigc.build_examples([{"image": "x.png", "conversations": [], "pairs": [
        ("What is there?", answer, "conversation")]}],
        {"conversation": ["Ask."]}, vigc.Config(vic_mode="reference", sft_share=0))
    assert [e["target"] for e in examples if e["question"] == "What is there?"] == [answer]


def test_cli_reference_vic_mode_runs_beam_search(tiny_world, tiny_ckpt, tmp_path, monkeypatch):
    beams = []
    real = common.generate_answers

    def spy(*args, **kw):
        beams.append((kw.get("num_beams", 1), kw.get("repetition_penalty", 1.0)))
        return real(*args, **kw)
    monkeypatch.setattr(common, "generate_answers", spy)
    # an untrained model's VIG
    monkeypatch.setattr(vigc, "parse_vig", lambda text: ("Is there a circle?", "Yes."))
    asked, real_prompt = set(), vigc.prompt

    def asking(tokenizer, model, instruction, *args):
        asked.add(instruction)
        return real_prompt(tokenizer, model, instruction, *args)
    monkeypatch.setattr(vigc, "prompt", asking)
    out = str(tmp_path / "ref")
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--generate", "3", "--max_new_tokens", "6", "--out", out, "--vic_mode", "reference",
            "--answer_length", "2", "--num_beams", "3"]
    code, stdout, err = run_cli("vigc", argv)
    assert code == 0, err
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["vic_mode"] == "reference" and report["images"] == report["parsed"] == 3
    # VIG and 2 correction steps: each a beam search with LAVIS's repetition penalty (VIGC's
    # valid_step)
    assert report["correction_steps_per_answer"] == 2 and beams == [(3, 1.5)] * 3
    # one fixed phrasing per type at generation, as VIGC's generation asks (it drew one of the
    # world's per image, as --vic_mode ours does)
    phrasings = json.load(open(os.path.join(tiny_world, "vigc_instructions.json")))
    assert asked and set(asked) <= {phrasings[t][0] for t in vigc.TYPES.values()}, asked


def test_trains_on_examples_that_fit_every_step(tiny_world, tiny_ckpt, tmp_path):
    """Examples with no answer token left at --max_len are left out before training, counted: a
    step whose drawn examples all were dropped logged loss 0 and trained nothing."""
    out = tmp_path / "fit"
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--generate", "0", "--max_len", "41",
            "--batch_size", "1", "--max_steps", "3", "--log_every", "1", "--out", str(out)]
    code, stdout, err = run_cli("vigc", argv)
    assert code == 0, err
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert len(rows) == 3 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows), rows
    # said once, before training, with the count (it was said after, as drawn examples; the
    # count restarted on --resume and was rank 0's alone under torchrun)
    said = [x for x in stdout.splitlines() if "do not fit --max_len 41" in x]
    assert len(said) == 1 and said[0].startswith("warning: ") and " of the " in said[0], stdout
    assert stdout.index(said[0]) < stdout.index("training examples (VIG")


def test_examples_measured_together_fit_as_each_alone(tiny_world, tiny_ckpt, monkeypatch):
    """The fit check before training tokenized each example alone (one call each: minutes for
    LLaVA-sized data); measured together in parts, each gets make_item's verdict."""
    model, tok = common.load_model_and_tokenizer(tiny_ckpt)
    world = dataclasses.replace(vigc.Config(), data=os.path.join(tiny_world, "sft.json"),
                                image_folder=tiny_world,
                                instructions=os.path.join(tiny_world, "vigc_instructions.json"))
    instructions = vigc.load_instructions(world.instructions)
    examples = vigc.build_examples(vigc.load_records(world)[:30], instructions, world)[0]
    cfg = dataclasses.replace(world, max_len=41)
    alone = [vigc.make_item(dict(e, image=""), tok, model.config, cfg, None) is not None
             for e in examples]
    assert any(alone) and not all(alone) and {"conversations" in e for e in examples} == {1, 0}
    assert any(e.get("prefix") for e in examples)
    monkeypatch.setattr(vigc, "FIT_PART", 7)
    assert vigc.fitting(examples, tok, model.config, cfg) == alone


def test_report_with_nothing_parsed_says_null_steps(tiny_world, tiny_ckpt, tmp_path,
                                                    monkeypatch):
    """No VIG output parsed: nothing was corrected, so no steps per answer (it read 0.0)."""
    monkeypatch.setattr(vigc, "parse_vig", lambda text: None)
    out = str(tmp_path / "none")
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--generate", "2", "--max_new_tokens", "4", "--out", out]
    code, stdout, err = run_cli("vigc", argv)
    assert code == 0, err
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["parsed"] == 0 and report["correction_steps_per_answer"] is None, report
    assert "VIC: nothing to correct" in stdout
    # (and it says that vigc_data.json is empty: exit 0 with '[]', which sft.py refused later)
    assert "warning: no generated instruction was kept: vigc_data.json holds no records" in stdout
    assert json.load(open(os.path.join(out, "vigc_data.json"))) == []


def test_cli_trains_and_generates(tiny_world, tiny_ckpt, tmp_path):
    out = str(tmp_path / "vigc")
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "2", "--batch_size", "8",
            "--generate", "4", "--max_new_tokens", "16", "--out", out, "--log_every", "1"]
    code, stdout, err = run_cli("vigc", argv)
    assert code == 0, err
    assert os.path.exists(os.path.join(out, "checkpoint-000002", "model.safetensors"))
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["images"] == 4 and report["parsed"] + report["dropped_unparsed"] == 4
    assert "hallucinations_per_100" in report["vic"]
    assert "hallucinations_per_100" in report["vig_only"]
    for name in ("vigc_data.json", "vig_only.json"):
        read_llava(os.path.join(out, name), tiny_world)
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--sft_share", "1", "--out", out]
    code, _, err = run_cli("vigc", argv)
    assert code == 2 and "--sft_share" in err


def test_images_lists_a_folders_image_files_alone_or_one_image(tmp_path):
    """A folder copied from a Mac holds '._NAME.jpg' metadata files, and a folder may hold one
    named like an image: either stopped the run as an image that does not decode."""
    for name in ("b.png", "A.JPG", "._b.png", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "sub.png").mkdir()
    cfg = dataclasses.replace(vigc.Config(), images=str(tmp_path))
    assert vigc.image_list(cfg) == [(str(tmp_path / n), str(tmp_path / n)) for n in ("A.JPG",
                                                                                       "b.png")]
    # one image: it was read as a list of names ("not UTF-8 text: byte 0x89 at offset 0")
    one = str(tmp_path / "b.png")
    assert vigc.image_list(dataclasses.replace(cfg, images=one)) == [(one, one)]
    # a JSON file (LLaVA's questions): its lines were images named '[' and '{'
    (tmp_path / "q.json").write_text('[\n{"id": 1}\n]')
    with pytest.raises(common.ConfigError, match="q.json': a JSON file; expected a folder"):
        vigc.image_list(dataclasses.replace(cfg, images=str(tmp_path / "q.json")))


def test_a_data_file_of_text_only_records_is_named(tiny_world, tiny_ckpt, tmp_path):
    """Nothing to learn VIG from: the line named no file ("no training examples ...")."""
    records = json.load(open(os.path.join(tiny_world, "sft.json")))[:2]
    for r in records:
        del r["image"]
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "")
    (tmp_path / "text.json").write_text(json.dumps(records))
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--data", str(tmp_path / "text.json"),
            "--generate", "0", "--max_steps", "1", "--out", str(tmp_path / "vigc")]
    code, _, err = run_cli("vigc", argv)
    assert code == 2 and err == f"error: --data {tmp_path / 'text.json'}: no training examples " \
        "(no record has an image and a question/answer pair)\n", err


def test_missing_world_image_list_says_how_to_get_it_back(tiny_world, tiny_ckpt, tmp_path):
    # the world's vigc_images.txt deleted: the error blamed a user's --data ("not a folder or a
    # file list (with your own --data, pass --images ...)"); it names the world's file instead
    world = tmp_path / "w"
    shutil.copytree(tiny_world, world)
    os.remove(world / "vigc_images.txt")
    argv = ["--init", tiny_ckpt, "--world", str(world), "--max_steps", "1", "--generate", "2",
            "--out", str(tmp_path / "vigc")]
    code, _, err = run_cli("vigc", argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--images {world / 'vigc_images.txt'}: the world's list of unlabeled images is " \
        "missing; shapes.py writes it with the world: write the world again (python shapes.py " \
        f"--out {world} --seed 0 with the params in its world.json), or pass --images" in err


def test_generated_file_loads_and_trains_sft(tiny_world, tiny_ckpt, tmp_path, monkeypatch):
    """VIG/VIC outputs scripted (a 3-step tiny model writes no parsable text): the parser drops the
    broken ones, and the file is LLaVA instruct data that formats.read_llava and sft.py accept."""
    n_vig = [0]

    def fake(items, temperature, num_beams):
        out = []
        for it in items:
            text = tok.decode(it["input_ids"].tolist(), skip_special_tokens=True)
            if "Generate" in text or "Ask" in text:  # a VIG prompt (the world's type instructions)
                # the answer starts with its marker
                assert text.rstrip().endswith("ASSISTANT: Question:")
                n_vig[0] += 1
                good = "Is there a triangle? Answer: Yes, there is a triangle. It is red."
                out.append(("no markers here" if n_vig[0] % 3 == 0 else good, True))
            elif text.rstrip().endswith("ASSISTANT:"):
                out.append(("There is a large blue square. It is in the center.", False))
            else:
                out.append(("It is in the center.", True))
        return out
    tok = common.load_model_and_tokenizer(tiny_ckpt)[1]
    monkeypatch.setattr(common, "generate_answers", scripted(fake))
    out = str(tmp_path / "gen")
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "0", "--generate", "6",
            "--out", out]
    code, stdout, err = run_cli("vigc", argv)
    assert code == 0, err
    # (it said it had training examples, at --max_steps 0)
    assert "no training (--max_steps 0) | model" in stdout and "training examples" not in stdout
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["parsed"] == 4 and report["dropped_unparsed"] == 2
    assert report["vig_only"]["hallucinations_per_100"] >= 0 and len(report["samples"]) == 3
    path = os.path.join(out, "vigc_data.json")
    recs = read_llava(path, tiny_world)
    assert len(recs) == 4
    assert all(r["conversations"][0]["value"] == "<image>\nIs there a triangle?" for r in recs)
    answer = "There is a large blue square. It is in the center."
    assert all(r["conversations"][1]["value"] == answer for r in recs)
    assert all(os.path.isfile(r["image"]) and "unlabeled" in r["image"] for r in recs)
    vig = read_llava(os.path.join(out, "vig_only.json"), tiny_world)
    assert vig[0]["conversations"][1]["value"] == "Yes, there is a triangle. It is red."
    argv = ["--init", tiny_ckpt, "--data", path, "--image_folder", tiny_world,
            "--max_steps", "2", "--batch_size", "4", "--report", "false",
            "--out", str(tmp_path / "sft_on_vigc")]
    monkeypatch.undo()  # (sft trains with the real generate_answers, in this process)
    code, stdout, err = run_cli("sft", argv)
    assert code == 0, err
    assert "4 training conversations" in stdout


def test_a_folder_of_the_worlds_images_gets_oracle_counts(tiny_world, tiny_ckpt, tmp_path,
                                                           monkeypatch):
    """--images '{world}/images/unlabeled' (a folder: absolute names) trained and generated, then
    failed at the oracle ("no image '/.../000000.png', which a file of the world names"): the
    names are now looked up relative to the world, and an image the annotations lack is refused
    before any step."""
    import shutil
    good = "Is there a triangle? Answer: Yes, there is a triangle."
    monkeypatch.setattr(common, "generate_answers", scripted(
        lambda items, temperature, num_beams: [(good, True) for _ in items]))
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "0", "--generate", "4",
            "--images", "{world}/images/unlabeled", "--out", str(tmp_path / "gen")]
    code, _, err = run_cli("vigc", argv)
    assert code == 0, err
    report = json.load(open(tmp_path / "gen" / "report.json"))
    assert report["vig_only"]["hallucinations_per_100"] is not None, report
    world = tmp_path / "world"  # a copy, with an image the annotations lack in that folder
    shutil.copytree(tiny_world, world)
    unlabeled = world / "images" / "unlabeled"
    shutil.copy(unlabeled / sorted(os.listdir(unlabeled))[0], unlabeled / "stray.png")
    argv = ["--init", tiny_ckpt, "--world", str(world), "--max_steps", "2", "--generate", "4",
            "--images", "{world}/images/unlabeled", "--out", str(tmp_path / "gen2")]
    code, _, err = run_cli("vigc", argv)
    assert code == 2 and "stray.png is not an image of the world's annotations" in err, err
    assert not os.path.exists(tmp_path / "gen2" / "metrics.jsonl")


@pytest.mark.parametrize("bad", ["file", "folder", "working directory"])
def test_a_folder_image_whose_name_is_not_utf8_is_refused_before_any_step(tiny_world, tiny_ckpt,
                                                                        tmp_path, monkeypatch,
                                                                        bad):
    """A file name with a byte that is not UTF-8 in an --images folder trained and generated, then
    was written as a lone surrogate escape ('\\udcff') that sft.py refuses in the data it made.
    Such a byte in the folder's name or the working directory's was blamed on the file name."""
    good = "Is there a triangle? Answer: Yes, there is a triangle."
    monkeypatch.setattr(common, "generate_answers", scripted(
        lambda items, temperature, num_beams: [(good, True) for _ in items]))
    work = os.path.join(os.fsencode(tmp_path), b"w\xffd" if bad == "working directory" else b"w")
    folder = os.path.join(work, b"im\xffgs" if bad == "folder" else b"imgs")
    os.makedirs(folder)
    monkeypatch.chdir(work)
    unlabeled = os.path.join(tiny_world, "images", "unlabeled")
    first = os.path.join(unlabeled, sorted(os.listdir(unlabeled))[0])
    shutil.copy(first, os.path.join(folder, b"a\xff.png" if bad == "file" else b"a.png"))
    out = tmp_path / "gen"
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--generate", "2",
            "--images", os.fsdecode(os.path.basename(folder)), "--out", str(out)]
    code, _, err = run_cli("vigc", argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    # (the path as the line prints it: repr of its surrogate escapes, '\\udcff')
    path = os.fsdecode(os.path.join(folder, b"a\xff.png") if bad == "file" else folder)
    what = "the file name is" if bad == "file" else "a folder on this path has a name that is"
    assert f"error: --images: {path!r}: {what} not UTF-8" in err, err
    assert not os.path.exists(out / "metrics.jsonl")


def test_only_the_images_generation_reads_are_decoded_before_any_step(tiny_world, tiny_ckpt,
                                                                     tmp_path, monkeypatch):
    """Every image of an --images folder was decoded before any step, those --generate never
    reaches too (a COCO folder's 118k for --generate 1000: minutes). The first --generate (cycled
    through) are decoded: a broken one among them is still refused before any step."""
    good = "Is there a triangle? Answer: Yes, there is a triangle."
    monkeypatch.setattr(common, "generate_answers", scripted(
        lambda items, temperature, num_beams: [(good, True) for _ in items]))
    unlabeled = os.path.join(tiny_world, "images", "unlabeled")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, src in zip(("a.png", "b.png"), sorted(os.listdir(unlabeled))):
        shutil.copy(os.path.join(unlabeled, src), folder / name)
    (folder / "z.png").write_bytes(b"not an image")  # (last in the folder's order)
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--images",
            str(folder)]
    code, _, err = run_cli("vigc", argv + ["--generate", "2", "--out", str(tmp_path / "two")])
    assert code == 0, err
    made = json.load(open(tmp_path / "two" / "vigc_data.json"))
    assert sorted(os.path.basename(r["image"]) for r in made) == ["a.png", "b.png"]
    code, _, err = run_cli("vigc", argv + ["--generate", "3", "--out", str(tmp_path / "three")])
    assert code == 2 and "record 2" in err and "cannot decode image" in err, err
    assert not os.path.exists(tmp_path / "three" / "metrics.jsonl")


def test_images_are_checked_before_the_data_is_read(tiny_world, tiny_ckpt, tmp_path,
                                                   monkeypatch):
    """A mistyped --images was named only once --data was read and its images decoded (LLaVA's
    665k records: minutes)."""
    def read(*args, **kw):
        raise AssertionError("--data read before --images was checked")
    monkeypatch.setattr(vigc, "load_records", read)
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--generate", "2",
            "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "vigc")]
    code, _, err = run_cli("vigc", argv)
    assert code == 2 and f"--images '{tmp_path / 'nope'}': not a folder or a file list" in err, err


def test_oracle_report_counts_nothing_as_null_not_zero(tiny_world):
    """A VIGC run where no generated output parsed reported 0.0 hallucinations per 100 answers (a
    perfect score over no answer), and lab.py tabulated it; a type with no answer read 0.0 too."""
    import shapes
    report = vigc.oracle_report(tiny_world, [])
    for key in ("vig_only", "vic"):
        r = report[key]
        assert r["hallucinations_per_100"] is None and r["answers_with_hallucination"] is None
        assert r["sentences_per_answer"] is None
        assert set(r["hallucinations_per_100_by_type"].values()) == {None}
    image = sorted(shapes.load_world(tiny_world)["by_file"])[0]
    one = {"image": image, "type": "conversation", "q": "What is there?",
           "vig": "There is a purple ring.", "vic": "There is a purple ring."}
    by_type = vigc.oracle_report(tiny_world, [one])["vic"]["hallucinations_per_100_by_type"]
    assert by_type["conversation"] is not None and by_type["detailed description"] is None


def test_vic_is_not_credited_for_an_emptied_answer(tiny_world):
    """An empty VIC correction (dropped from vigc_data.json) counted as an answer without a
    hallucination: VIC halved VIG's rate by deleting one of two wrong answers. Both sides are now
    counted on the questions VIC answered."""
    import shapes
    objs = shapes.load_world(tiny_world)["by_file"]
    image = next(f for f, o in sorted(objs.items()) if all(x["name"] != "ring" for x in o))
    wrong = "There is a purple ring."  # (no ring in this image)
    two = [{"image": image, "type": "conversation", "q": "What is there?", "vig": wrong,
            "vic": v} for v in ("", wrong)]
    report = vigc.oracle_report(tiny_world, two)
    assert report["vig_only"]["hallucinations_per_100"] == \
        report["vic"]["hallucinations_per_100"] > 0
    assert report["compared_answers"] == 1 and report["left_out_empty_correction"] == 1


def test_generation_settings_are_recorded_as_given(tiny_world, tiny_ckpt, tmp_path):
    """A resumed run may generate with other settings than it trained with: the checkpoint's
    run_config said the defaults (temperature 0.7, 200 images) whatever was given, and no file
    said how vigc_data.json was made."""
    out = str(tmp_path / "vigc")
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--generate", "0", "--out", out]
    code, _, err = run_cli("vigc", argv)
    assert code == 0, err
    argv += ["--max_steps", "2", "--resume", "true", "--generate", "3", "--temperature", "0.5",
             "--max_new_tokens", "8", "--gen_batch_size", "2"]
    code, _, err = run_cli("vigc", argv)
    assert code == 0, err
    made = json.load(open(os.path.join(out, "report.json")))["generation"]
    assert (made["generate"], made["temperature"], made["max_new_tokens"]) == (3, 0.5, 8)
    assert (made["gen_batch_size"], made["seed"]) == (2, 0)
    assert made["images"] == os.path.join(tiny_world, "vigc_images.txt")
    assert "num_beams" not in made  # (--vic_mode ours does not read it)
    config = json.load(open(os.path.join(out, "checkpoint-000002", "config.json")))
    assert config["run_config"]["temperature"] == 0.5
    assert config["run_config"]["generate"] == 3


def test_resume_with_other_generation_images_goes_on(tiny_world, tiny_ckpt, tmp_path):
    """--generate and --images may change at --resume (GEN_FIELDS): run.json recorded the images
    generation decoded with those of the training data, and the --images list with the data
    files, and such a resume was refused as "other images" (the 63 the data files name are not
    the 60...) or "other data". The training data's images are still recorded and compared."""
    out = str(tmp_path / "vigc")
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--generate", "2", "--max_new_tokens", "4", "--out", out]
    code, _, err = run_cli("vigc", argv)
    assert code == 0, err
    run = json.load(open(os.path.join(out, "run.json")))
    listed = os.path.join(tiny_world, "vigc_images.txt")  # (the default --images)
    assert listed not in run["data"]  # (its digest was compared: another list was refused)
    code, _, err = run_cli("vigc", argv + ["--max_steps", "2", "--resume", "true", "--generate",
                                           "3", "--images", "{world}/images/unlabeled"])
    assert code == 0, err
    assert json.load(open(os.path.join(out, "run.json")))["images"] == run["images"]
    # a run recorded before 2026-12-06 holds the list with its data: it resumes on that list
    run["data"][listed] = rundir.file_digests([listed])[listed]
    common.write_json(run, os.path.join(out, "run.json"))
    code, _, err = run_cli("vigc", argv + ["--max_steps", "3", "--resume", "true"])
    assert code == 0, err


def test_a_data_file_named_twice_is_refused_without_the_weight_hint(tiny_world, tiny_ckpt,
                                                                     tmp_path):
    """The refusal of --data naming one file twice ended "(sft.py reads one twice as FILE:2)":
    in vigc.py FILE:x is a type (conv, desc, comp), so the hint misled there."""
    data = os.path.join(tiny_world, "sft.json")
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--generate", "0",
            "--data", f"{data},{data}", "--out", str(tmp_path / "vigc")]
    code, _, err = run_cli("vigc", argv)
    assert code == 2 and "is named twice: its records would be read twice" in err, err
    assert "FILE:2" not in err, err


def test_generation_runs_after_the_process_group_is_gone(tiny_world, tiny_ckpt, tmp_path,
                                                         monkeypatch):
    """Under torchrun rank 0 generated alone while the others waited in the closing barrier: a
    generation past the process group's 30-minute timeout failed the whole run before its data was
    written. The ranks part before it now (--fsdp: a process group even in one process)."""
    import torch.distributed as dist
    seen = []

    def generate_data(*args, **kwargs):
        seen.append(dist.is_initialized())
        return real(*args, **kwargs)
    real = vigc.generate_data
    monkeypatch.setattr(vigc, "generate_data", generate_data)
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--generate", "2", "--max_new_tokens", "4", "--fsdp", "true",
            "--out", str(tmp_path / "vigc")]
    code, _, err = run_cli("vigc", argv)
    assert code == 0 and seen == [False], (seen, err)
    assert os.path.exists(tmp_path / "vigc" / "vigc_data.json")


def test_grad_checkpoint_recomputes_and_trains_the_same(tiny_world, tiny_ckpt, tmp_path,
                                                        monkeypatch):
    """vigc.py had no --grad_checkpoint (the README's 7B command needs it): each decoder layer is
    recomputed in the backward pass now, to the same weights; a run may turn it on at --resume."""
    from safetensors.torch import load_file
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "2", "--batch_size", "4",
            "--generate", "0", "--save_every", "1"]
    weights = {}
    for flag in ("false", "true"):
        out = str(tmp_path / flag)
        code, _, err = run_cli("vigc", argv + ["--out", out, "--grad_checkpoint", flag])
        assert code == 0, err
        weights[flag] = load_file(os.path.join(out, "checkpoint-000002", "model.safetensors"))
        assert bool(calls) == (flag == "true")
    assert all(torch.equal(weights["false"][k], weights["true"][k]) for k in weights["false"])
    # (on at --resume: the same math)
    shutil.rmtree(os.path.join(tmp_path, "false", "checkpoint-000002"))
    code, _, err = run_cli("vigc", argv + ["--out", str(tmp_path / "false"), "--resume", "true",
                                           "--grad_checkpoint", "true"])
    assert code == 0, err
    resumed = load_file(os.path.join(tmp_path, "false", "checkpoint-000002", "model.safetensors"))
    assert all(torch.equal(weights["false"][k], resumed[k]) for k in resumed)


def test_resume_on_a_finished_lora_run_is_refused(tiny_world, tiny_ckpt, tmp_path):
    """Its last checkpoint holds the merged weights and no optimizer state: a resumed run trained
    a fresh adapter on top of them, not what the uninterrupted run does."""
    out = str(tmp_path / "vigc")
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--generate", "0", "--lora_r", "4", "--out", out]
    code, _, err = run_cli("vigc", argv)
    assert code == 0, err
    code, _, err = run_cli("vigc", argv + ["--max_steps", "2", "--resume", "true"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "this run finished and merged its 'vigc' adapter" in err
    # (a run stopped while generating is in this state: the advice goes on with generation alone,
    # where '--init CKPT' alone trained 400 steps more)
    assert err.strip().endswith(f"--init {out}/checkpoint-000001 --max_steps 0 and its "
                                "generation flags alone (no training flag: generation from its "
                                "model)"), err
    # (and the advice runs: a review found the run's training flags beside --max_steps 0 refused)
    code, _, err = run_cli("vigc", ["--init", f"{out}/checkpoint-000001", "--world", tiny_world,
                                    "--max_steps", "0", "--generate", "2", "--max_new_tokens", "4",
                                    "--out", str(tmp_path / "gen")])
    assert code == 0, err


def test_a_pair_holding_the_vig_markers_makes_no_vig_example():
    """A question or answer holding 'Answer:' made a VIG target ('Question: q Answer: ... Answer:
    a') that parse_vig cannot read back: VIG learnt to write outputs its own generation drops.
    Such a pair makes VIC examples only; another pair of the type is drawn for VIG; counted."""
    cfg = vigc.Config(sft_share=0)
    marked = ("Which is right? Answer: A or B", "A.", "conversation")
    plain = ("What is there?", "A red circle.", "conversation")
    examples, unreadable = vigc.build_examples(
        [{"image": "x.png", "conversations": [], "pairs": [marked]},
         {"image": "y.png", "conversations": [], "pairs": [marked, plain]}],
        {"conversation": ["Ask."]}, cfg)
    vig = [e for e in examples if e["question"] == "Ask."]
    assert unreadable == 1 and [e["image"] for e in vig] == ["y.png"], examples
    assert vig[0]["target"] == "Question: What is there? Answer: A red circle."
    assert vigc.parse_vig(vig[0]["target"]) == plain[:2]
    assert {e["image"] for e in examples if e["question"] != "Ask."} == {"x.png", "y.png"}


def test_an_unknown_question_type_is_refused(tiny_world, tiny_ckpt, tmp_path):
    """A record's qtypes naming a type the world does not know was read as a conversation
    question without a word; now one line naming the file, record and field, before any step.
    VIGC's own type names are read as themselves."""
    world = tmp_path / "w"
    shutil.copytree(tiny_world, world)
    data = json.load(open(world / "sft.json"))
    j = next(i for i, r in enumerate(data) if r.get("qtypes"))
    data[j]["qtypes"][0] = "detailed description"
    json.dump(data, open(world / "sft.json", "w"))
    cfg = dataclasses.replace(vigc.Config(), data=str(world / "sft.json"), image_folder=str(world),
                              instructions="")
    import formats
    parsed, parse = [], formats.load_json
    with pytest.MonkeyPatch.context() as m:  # (read once: it was parsed twice, for the qtypes)
        for module in (formats, vigc):
            m.setattr(module, "load_json", lambda path: parsed.append(path) or parse(path))
        records = vigc.load_records(cfg)
    assert records[j]["pairs"][0][2] == "detailed description"
    assert parsed == [str(world / "sft.json")]
    data[j]["qtypes"][0] = "describ"
    json.dump(data, open(world / "sft.json", "w"))
    out = tmp_path / "vigc"
    argv = ["--init", tiny_ckpt, "--world", str(world), "--max_steps", "1", "--generate", "2",
            "--out", str(out)]
    code, _, err = run_cli("vigc", argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{world / 'sft.json'}" in err and f"record {j}" in err and "qtypes" in err, err
    assert "unknown question type 'describ'" in err and not out.exists(), err
    # a file given a type (`:conv`): every pair is of it, its qtypes not read (it was refused)
    conv = dataclasses.replace(cfg, data=str(world / "sft.json") + ":conv")
    assert {t for r in vigc.load_records(conv) for _, _, t in r["pairs"]} == {"conversation"}
    # the world's instructions file names the types its qtypes map to: read from there
    info = json.load(open(world / "vigc_instructions.json"))
    info["qtype_to_type"]["describ"] = "detailed description"
    json.dump(info, open(world / "vigc_instructions.json", "w"))
    cfg = dataclasses.replace(cfg, instructions=str(world / "vigc_instructions.json"))
    assert vigc.load_records(cfg)[j]["pairs"][0][2] == "detailed description"
    info["qtype_to_type"]["describ"] = "essay"
    json.dump(info, open(world / "vigc_instructions.json", "w"))
    with pytest.raises(vigc.DataError, match="field 'qtype_to_type': 'describ': expected"):
        vigc.load_records(cfg)


def test_an_instructions_file_of_one_type_serves_a_run_of_that_type(tiny_world, tiny_ckpt,
                                                                    tmp_path):
    """An --instructions file holding the conversation type alone (a VIGC set made from one file,
    as conversation_58k.json:conv) was refused for lacking the other types even where the run
    reads no other: a run of conversation pairs generating conversations runs; one that would
    generate descriptions is refused naming the type."""
    info = json.load(open(os.path.join(tiny_world, "vigc_instructions.json")))
    one = tmp_path / "conv_only.json"
    one.write_text(json.dumps({"conversation": info["conversation"]}))
    argv = ["--init", tiny_ckpt, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--data", f"{os.path.join(tiny_world, 'sft.json')}:conv", "--image_folder", tiny_world,
            "--instructions", str(one), "--generate", "2", "--max_new_tokens", "4",
            "--gen_types", "conv", "--images", os.path.join(tiny_world, "vigc_images.txt")]
    code, _, err = run_cli("vigc", argv + ["--out", str(tmp_path / "conv")])
    assert code == 0, err
    code, _, err = run_cli("vigc", argv + ["--gen_types", "desc", "--out", str(tmp_path / "d")])
    assert code == 2 and "conv_only.json: field 'detailed description': missing" in err, err
