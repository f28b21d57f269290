"""Data: the conversation templates, tokenization with label masking against LLaVA's own
preprocess, truncation, image preprocessing against CLIPImageProcessor, collation."""
import logging
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
from conftest import two_ranks


SYS_V = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
         "gives helpful, detailed, and polite answers to the user's questions.")
SYS_L = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
         "gives helpful, detailed, and polite answers to the human's questions.")
CONV = [{"from": "human", "value": "<image>\nIs there a circle?"},
        {"from": "gpt", "value": "Yes, there is a circle."},
        {"from": "human", "value": "How many squares are there?"},
        {"from": "gpt", "value": "There are two squares."}]


def test_template_strings_are_llavas():
    text, spans = data.render(CONV, "vicuna_v1")
    assert text == (SYS_V + " USER: <image>\nIs there a circle? "
                     "ASSISTANT: Yes, there is a circle.</s>"
                     "USER: How many squares are there? ASSISTANT: There are two squares.</s>")
    answers = ["Yes, there is a circle.</s>", "There are two squares.</s>"]
    assert [text[a:b] for a, b in spans] == answers
    first_prompt = SYS_L + " USER: <image>\nIs there a circle? ASSISTANT:"
    assert data.render(CONV[:1], "llava_v1")[0] == first_prompt
    assert data.render(CONV[:3])[0].endswith("</s>USER: How many squares are there? ASSISTANT:")


def llava_reference_preprocess(tok, turns, legacy):
    """LLaVA's preprocess_v1 (llava/train/train.py) written out from its definition:
    tokenizer_image_token over the whole prompt (chunks around <image> tokenized separately,
    IMAGE_TOKEN_INDEX between them), then per round (split at '</s>') the instruction part up to
    'ASSISTANT: ' is masked. The text after <image> is tokenized as transformers' LlavaProcessor
    tokenizes it (the whole text, <image> a special token), so an exported model sees what training
    saw; with a legacy Llama tokenizer this is exactly tokenizer_image_token's split-and-tokenize (a
    '▁' after <image>), with the Shapes tokenizer ('▁' only at the start of a text) it is '\nIs',
    not '▁\nIs'."""
    def tokenizer_image_token(prompt):
        image_id = tok.convert_tokens_to_ids("<image>")
        return [-200 if t == image_id else t for t in tok(prompt).input_ids]
    prompt = data.render(turns)[0]
    ids = tokenizer_image_token(prompt)
    target = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:1] = [-100]
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou))
        instruction_len = len(tokenizer_image_token(parts[0])) - 2
        if i != 0 and not legacy:  # LLaVA's fix for tokenizers that add no prefix space after </s>
            round_len -= 1
            instruction_len -= 1
        target[cur:cur + instruction_len] = [-100] * instruction_len
        cur += round_len
    target[cur:] = [-100] * (len(target) - cur)
    return ids, target


def test_a_tokenizer_folder_without_tokenizer_json_is_named_as_the_folder(tiny_world, tmp_path):
    """tokenizer.json's field checks read another file's fields where the folder had none
    ("tokenizer.json: field 'model': missing" for a folder of tokenizer_config.json alone)."""
    import shutil
    shutil.copy(os.path.join(tiny_world, "tokenizer", "tokenizer_config.json"), tmp_path)
    with pytest.raises(data.DataError) as e:
        data.load_tokenizer(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path}: cannot load a tokenizer from this directory")


def test_a_tokenizer_model_alone_without_sentencepiece_names_the_package(tmp_path, monkeypatch):
    """LLaVA's releases ship tokenizer.model without tokenizer.json: without sentencepiece the
    error was transformers' fallback's ("`tiktoken` is required"), the wrong package. A broken
    tokenizer_config.json beside it is named as that file's fault, not the package's."""
    import importlib.util
    find_spec = importlib.util.find_spec
    # (sentencepiece not installed, wherever the test runs: an unparsable tokenizer.model fails
    # with it as well)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentencepiece" else find_spec(name, *a))
    from test_interop import llama_tokenizer
    llama_tokenizer(legacy=True).save_pretrained(tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x05hello")
    with pytest.raises(data.DataError) as e:
        data.load_tokenizer(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'tokenizer.model'}: reading it needs the "
                                   "sentencepiece package"), str(e.value)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(data.DataError) as e:
        data.load_tokenizer(str(tmp_path))
    assert str(e.value) == f"{tmp_path / 'tokenizer_config.json'}: expected a JSON object, got " \
        "a list", str(e.value)


def test_a_llama_tokenizer_config_without_its_vocabulary_is_refused(tmp_path):
    """tokenizer_config.json naming LlamaTokenizer (as LLaVA's and llava-hf's do) with neither
    tokenizer.json nor tokenizer.model: transformers 5 built a tokenizer of its special tokens
    alone, which encoded every text to [] (loaded without a word)."""
    from test_interop import llama_tokenizer
    llama_tokenizer(legacy=True).save_pretrained(tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(data.DataError, match="no tokens beside its special ones"):
        data.load_tokenizer(str(tmp_path))


def test_labels_match_llava_preprocess(tiny_world):
    tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    legacy = len(tok("USER: x").input_ids) == len(tok("</s>USER: x").input_ids) - 1
    digits = [CONV[0], {"from": "gpt", "value": "3 circles."},
              CONV[2], {"from": "gpt", "value": "\n(A) two."}]
    # answers that start with a digit, a newline, a '(': a lone '▁' first
    for turns in (CONV, CONV[:2], digits):
        got = data.tokenize_conversation(tok, turns, image_token_id=4, num_image_tokens=9,
                                         max_len=4096)
        ids, labels = got["input_ids"].tolist(), got["labels"].tolist()
        first = ids.index(4)
        assert ids[first:first + 9] == [4] * 9 and labels[first:first + 9] == [-100] * 9
        ids = ids[:first] + [-200] + ids[first + 9:]  # LLaVA keeps one placeholder
        labels = labels[:first] + [-100] + labels[first + 9:]
        ref_ids, ref_labels = llava_reference_preprocess(tok, turns, legacy)
        assert ids == ref_ids
        assert labels == ref_labels
        learned = tok.decode([t for t in labels if t != -100])
        assert "circle" in learned and "USER" not in learned and "ASSISTANT" not in learned
        # LLaVA learns the token after 'ASSISTANT:'
        after = ids.index(tok.convert_tokens_to_ids("▁ASSISTANT:")) + 1
        assert labels[after] == ids[after]
        if turns is digits:
            assert tok.convert_ids_to_tokens(ids[after]) == "▁"
        n_answers = sum(t["from"] == "gpt" for t in turns)
        assert sum(1 for t in labels if t == tok.eos_token_id) == n_answers


def test_plain_template_matches_llava_preprocess_plain(tiny_world):
    """LLaVA's stage-1 format (preprocess_plain): "<image>" + caption + "\n", the human text
    dropped, everything after the image learned."""
    tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    turns = [{"from": "human", "value": "Describe the image.\n<image>"},
             {"from": "gpt", "value": "A red circle."}]
    assert data.render(turns, "plain") == ("<image>A red circle.\n", [(7, 21)])
    got = data.tokenize_conversation(tok, turns, image_token_id=4, num_image_tokens=9,
                                     template="plain")
    ids, labels = got["input_ids"].tolist(), got["labels"].tolist()
    # after BOS and <image>, as LlavaProcessor
    caption = tok("<image>A red circle.\n").input_ids[2:]
    ref_ids = [tok.bos_token_id] + [4] * 9 + caption
    assert ids == ref_ids and labels == [-100] * 10 + caption
    with pytest.raises(ValueError, match="the plain template takes one human turn"):
        data.render(CONV, "plain")  # one caption per image


def test_train_on_last_and_truncation(tiny_world):
    tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    last = data.tokenize_conversation(tok, CONV, 4, 9, train_on="last")
    learned = tok.decode([t for t in last["labels"].tolist() if t != -100])
    assert "two squares" in learned and "circle" not in learned
    full = data.tokenize_conversation(tok, CONV, 4, 9)
    n = len(full["input_ids"])
    first_label = next(i for i, label in enumerate(full["labels"].tolist()) if label != -100)
    cut = data.tokenize_conversation(tok, CONV, 4, 9, max_len=first_label + 2)
    assert len(cut["input_ids"]) == first_label + 2
    assert torch.equal(cut["input_ids"], full["input_ids"][:first_label + 2])
    # no answer token left: dropped
    assert data.tokenize_conversation(tok, CONV, 4, 9, max_len=first_label) is None
    # would cut the image tokens
    assert data.tokenize_conversation(tok, CONV, 4, 9, max_len=5) is None
    assert n > first_label + 2


def test_a_text_past_the_tokenizers_length_is_cut_without_a_transformers_warning(tiny_world):
    """transformers said "... will result in indexing errors" on stderr for a record longer than
    the tokenizer's model_max_length (4096; LLaVA's: 2048), though the text is cut at max_len and
    the stages count what they cut."""
    tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    said, handler = [], logging.Handler()
    handler.emit = said.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        long = [CONV[0], {"from": "gpt", "value": "Yes. " * (tok.model_max_length + 1)}]
        cut = data.tokenize_conversation(tok, long, 4, 9, max_len=64)
    finally:
        logger.removeHandler(handler)
    assert len(cut["input_ids"]) == 64 and not said, [r.getMessage() for r in said]


def per_chunk_reference(tok, turns, max_len, template, train_on):
    """tokenize_conversation as it was before batching: one tokenizer call per chunk, each token's
    label from its character span."""
    text, spans = data.render(turns, template)
    spans = spans[-1:] if train_on == "last" else spans
    spans = [(s - 1 if s > 0 and text[s - 1] == " " else s, e) for s, e in spans]
    ids, labels, base = [], [], 0
    for i, chunk in enumerate(text.split(data.IMAGE)):
        if i > 0:
            ids, labels = ids + [4] * 9, labels + [-100] * 9
        enc, shift = None, 0
        if i > 0 and tok.bos_token:
            enc = tok(tok.bos_token + chunk, add_special_tokens=False, return_offsets_mapping=True)
            enc = {k: v[1:] for k, v in enc.items()} \
                if enc["input_ids"][:1] == [tok.bos_token_id] else None
            shift = len(tok.bos_token) if enc else 0
        enc = enc or tok(chunk, add_special_tokens=(i == 0), return_offsets_mapping=True)
        for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            a, b = a + base - shift, b + base - shift
            ids.append(t)
            labels.append(t if b > a and any(a < e and b > s for s, e in spans) else -100)
        base += len(chunk) + len(data.IMAGE)
    if len(ids) > max_len:
        first_label = next((i for i, x in enumerate(labels) if x != -100), None)
        image_end = max((i + 1 for i, t in enumerate(ids) if t == 4), default=0)
        no_answer = first_label is None and turns[-1]["from"] == "gpt"
        if image_end > max_len or no_answer or (first_label or 0) >= max_len:
            return None
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def test_batched_tokenization_equals_one_call_per_chunk(tiny_world, monkeypatch):
    """tokenize_conversations sends every chunk of every text to the tokenizer in two batch calls:
    the same ids, labels and drops as one call per chunk, with BOS (Shapes, Llama legacy or not),
    without BOS, with a BOS that does not split off, for texts with 0, 1 and 2 images, cut or
    dropped at max_len, in batches of 4 (the six conversations split over two)."""
    import json
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from test_interop import llama_tokenizer
    shapes_tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    spec = json.loads(shapes_tok.backend_tokenizer.to_str())
    spec["post_processor"] = None  # no BOS added
    no_bos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                     eos_token="</s>", unk_token="<unk>")
    odd_bos = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    odd_bos.bos_token = "Is"  # not one token: "Is" + chunk does not start with its id
    two_images = [{"from": "human", "value": "<image>\nLeft. <image> Right: same?"},
                  {"from": "gpt", "value": "Yes."}]
    no_image = [{"from": "human", "value": "Is there a circle?"},
                {"from": "gpt", "value": "7 circles."}]
    prompt = [{"from": "human", "value": "<image>\nDescribe."}]
    convs = [CONV, CONV[:2], two_images, no_image, prompt, CONV[:3]]
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 4)
    for tok in (shapes_tok, llama_tokenizer(True), llama_tokenizer(False), no_bos, odd_bos):
        for max_len, train_on in ((4096, "all"), (4096, "last"), (30, "all"), (50, "all"),
                                  (64, "last"), (80, "all")):
            got = data.tokenize_conversations(tok, convs, 4, 9, max_len, "vicuna_v1", train_on)
            assert len(got) == len(convs)
            for turns, g in zip(convs, got):
                ref = per_chunk_reference(tok, turns, max_len, "vicuna_v1", train_on)
                assert (g is None) == (ref is None), (tok.bos_token, turns)
                if g is not None:
                    assert g["input_ids"].tolist() == ref[0] and g["labels"].tolist() == ref[1]
    plain = [[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red circle."}]]
    got = data.tokenize_conversations(shapes_tok, plain * 3, 4, 9, 4096, "plain")
    assert got[2]["input_ids"].tolist() == per_chunk_reference(shapes_tok, plain[0], 4096, "plain",
                                                               "all")[0]
    with pytest.raises(ValueError) as e:  # the conversation the template cannot render is named
        data.tokenize_conversations(shapes_tok, plain * 5 + [CONV], 4, 9, 4096, "plain")
    assert e.value.index == 5  # (in the second batch of 4)


def test_image_preprocessing_matches_clip_processor():
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # not square: padded
    ours = data.preprocess_image(img, 42)
    ref_proc = CLIPImageProcessorPil(size={"shortest_edge": 42},
                                     crop_size={"height": 42, "width": 42})
    ref = ref_proc(data.expand_to_square(img), return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, 42, 42)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    padded = data.expand_to_square(img)
    mean_colour = tuple(int(m * 255) for m in data.CLIP_MEAN)
    assert padded.size == (50, 50) and padded.getpixel((0, 0)) == mean_colour
    # centred: 10 rows of padding on top
    assert padded.getpixel((25, 10 + 15)) == img.getpixel((25, 15))


def test_a_16_bit_or_float_grey_image_is_read_as_its_8_bit_grey(tmp_path):
    """Pillow's convert('RGB') (LLaVA's) clips 16-bit grey to 255: a PNG of depth maps, scans or
    microscopy was read as a white square. A float TIFF of values in [0, 1] was read black (each
    value taken as 0-255, cut to 0 or 1); one of 0-255 values reads as LLaVA's."""
    from PIL import Image
    grey = np.random.default_rng(0).integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    rgb = np.asarray(data.load_image(str(tmp_path / "wide.png")))
    assert rgb.shape == (6, 5, 3) and (rgb == grey[..., None]).all()
    Image.fromarray(grey.astype(np.float32) / 255, "F").save(tmp_path / "unit.tif")
    Image.fromarray(grey.astype(np.float32), "F").save(tmp_path / "bytes.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    rgb = np.asarray(data.load_image(str(tmp_path / "unit.tif")))
    assert rgb.shape == (6, 5, 3) and (rgb == grey[..., None]).all()
    rgb = np.asarray(data.load_image(str(tmp_path / "bytes.tif")))
    assert (rgb == np.asarray(Image.open(tmp_path / "bytes.tif").convert("RGB"))).all()
    assert (rgb == grey[..., None]).all()


def test_collate_pads_right_for_training_and_left_for_generation():
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]),
         "pixel_values": torch.ones(3, 2, 2)}
    b = {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}
    r = data.collate([a, b], pad_id=3)
    assert r["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert r["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert r["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert r["pixel_values"].shape == (1, 3, 2, 2)
    left = data.collate([a, b], pad_id=3, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [3, 3, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_check_images_names_a_broken_file_and_skips_the_decoded(tmp_path):
    """A file that does not decode stops (or is skipped) naming file, record and field; a path in
    `decoded` (checked with another file of the run) is not decoded again."""
    broken = str(tmp_path / "broken.png")
    open(broken, "w").write("not a png")
    recs = [{"id": "a", "image": broken}, {"id": "b"}]
    with pytest.raises(data.DataError) as e:
        data.check_images(recs, "read.json")
    assert "read.json" in str(e.value) and "record 0 (id 'a')" in str(e.value)
    assert "cannot decode" in str(e.value)
    good, skipped = data.check_images(recs, "read.json", on_error="skip")
    assert good == recs[1:] and len(skipped) == 1
    assert data.check_images(recs, "read.json", decoded={broken}) == (recs, [])


def test_an_empty_image_file_or_a_folder_is_named_so(tmp_path):
    """A zero-byte image (a download cut short) read "cannot identify image file"; a folder named
    like an image an errno."""
    open(tmp_path / "empty.jpg", "wb").close()
    (tmp_path / "dir.png").mkdir()
    recs = [{"id": "e", "image": str(tmp_path / "empty.jpg")},
            {"id": "d", "image": str(tmp_path / "dir.png")}]
    skipped = data.check_images(recs, "read.json", on_error="skip")[1]
    assert skipped[0].endswith("(an empty file, 0 bytes)"), skipped
    assert skipped[1].endswith("(a folder, not a file)"), skipped
    with pytest.raises(data.DataError, match=r"empty.jpg \(an empty file, 0 bytes\)$"):
        data.load_image(recs[0]["image"], "read.json", 0)


def _check_images_rank(rank, d, recs):
    decoded, decodes = [], data._decodes
    data._decodes = lambda path: decoded.append(path) or decodes(path)
    good, skipped = data.check_images(recs, "mix.json", on_error="skip", d=d)
    return [r["id"] for r in good], skipped, decoded


def test_check_images_under_torchrun_decodes_a_share_per_rank(tmp_path):
    """Every rank decoded every image (LLaVA's ~350k, minutes, on each of 8 GPUs' processes): each
    decodes its share now, and every rank skips (or stops on) the broken ones any rank found."""
    from PIL import Image
    recs = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (4, 4)).save(path)
        recs.append({"id": str(i), "image": str(path)})
    (tmp_path / "5.png").write_bytes(b"not a png")  # in rank 1's share (sorted paths, 1::2)
    want = data.check_images(recs, "mix.json", on_error="skip")
    got = two_ranks(_check_images_rank, recs)
    for rank in (0, 1):
        good, skipped, _ = got[rank]
        assert good == [r["id"] for r in want[0]] and skipped == want[1] and len(skipped) == 1
    shares = [set(got[rank][2]) for rank in (0, 1)]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == {r["image"] for r in recs}
    assert str(tmp_path / "5.png") in shares[1]


def test_check_images_says_its_progress_on_many(tmp_path, monkeypatch, capsys):
    """Decoding LLaVA's ~350k images before the first step took minutes without a word: from
    CHECK_IMAGES_SAID images on, the first process says its progress (the others do not)."""
    from PIL import Image
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (4, 4)).save(paths[-1])
    recs = [{"id": str(i), "image": p} for i, p in enumerate(paths)]
    monkeypatch.setattr(data, "CHECK_IMAGES_SAID", 3)
    assert data.check_images(recs, "/x/mix.json") == (recs, [])
    assert "mix.json: decoding each image once 3/3" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    data.check_images(recs, "/x/mix.json")
    monkeypatch.setenv("RANK", "0")
    data.check_images(recs[:2], "/x/mix.json")
    assert capsys.readouterr().err == ""


def test_answers_end_with_the_tokenizers_own_end_token(tiny_world):
    """The templates ended every answer with the text '</s>': a tokenizer whose eos is another
    token (Llama 3's <|eot_id|>) read it as '<', '/', 's', '>', so no answer learned to end (every
    stage trained on, and every answer ran to, its length limit), the reward model scored at '>'
    and the export's chat template wrote '</s>'. The end text is the tokenizer's eos now; for a
    '</s>' tokenizer nothing changes."""
    import jinja2
    from interop import chat_template
    tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    before = data.tokenize_conversation(tok, CONV, 4, 9)
    tok.add_special_tokens({"eos_token": "<|eot_id|>"})
    eot = tok.eos_token_id
    assert eot != tok.convert_tokens_to_ids("</s>")
    t = data.tokenize_conversation(tok, CONV, 4, 9)
    ends = [i for i, x in enumerate(t["input_ids"].tolist()) if x == eot]
    assert len(ends) == 2 and ends[-1] == len(t["input_ids"]) - 1
    assert all(int(t["labels"][i]) == eot for i in ends)  # (learned: the answers end)
    assert "</s>" not in tok.decode(t["input_ids"]) and data.end_text(tok) == "<|eot_id|>"
    assert t["input_ids"].tolist() == [eot if x == 2 else x for x in before["input_ids"].tolist()]
    item = data.reward_item(tok, SimpleNamespace(image_token_id=4, num_image_tokens=9), CONV[:1],
                            "Yes.", None, random.Random(0), space=True)
    assert eot in item["input_ids"].tolist() and "</s>" not in tok.decode(item["input_ids"])
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]
    text = jinja2.Template(chat_template("vicuna_v1", tok.eos_token)).render(
        messages=messages, add_generation_prompt=False)
    turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Yes."}]
    assert text == data.render(turns, "vicuna_v1", "<|eot_id|>")[0] and text.endswith("<|eot_id|>")


def test_an_image_tag_spelled_out_in_a_response_is_not_an_image(tiny_world):
    """PPO's reward input (--rm_input text) renders the sampled answer's decoded text again: an
    '<image>' the policy spelled out piece by piece became a second block of image slots, and the
    step ended in 'N image tokens in input_ids, but ...'."""
    tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    config = SimpleNamespace(image_token_id=4, num_image_tokens=9)
    for space in (True, False):
        item = data.reward_item(tok, config, CONV[:1], "Look: <image> here.", None,
                                random.Random(0), space=space)
        assert item["input_ids"].tolist().count(4) == 9
        plain = data.reward_item(tok, config, CONV[:1], "Look:   here.", None, random.Random(0),
                                 space=space)
        assert item["input_ids"].tolist() == plain["input_ids"].tolist()
