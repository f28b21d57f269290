"""Data: the conversation template, tokenization with label masking, image preprocessing,
collation, and the generators that make data from object annotations (LRV negative
instructions, POVID hallucination injection and diffusion noise). The readers and converters
for the public file formats live in formats.py and are re-exported here.
"""
import os
import re

import numpy as np
import torch

# DataError: one-line user errors, see formats.py
from formats import DataError, IMAGE, JSON_NAMES, read_text, record_label  # noqa: F401
from formats import not_found, windows_hint
from formats import (read_llava, read_lrv, read_any_conversations,  # noqa: F401
                     read_llava_rlhf_preference, read_rl_prompts, read_povid, read_pope,
                     read_mmhal, load_json, vqav2_to_conversations, aokvqa_to_conversations,
                     flickr30k_to_conversations, pair_format)

IGNORE = -100  # label of tokens that are not learned

# ----------------------------------------------------------------------------------------
# conversation template (LLaVA's conv_vicuna_v1 / conv_llava_v1: sep " ", sep2 "</s>")
# ----------------------------------------------------------------------------------------

SYSTEM = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    "llava_v1": (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
}
EOS_TEXT = "</s>"  # LLaVA's sep2 (Llama's eos); a tokenizer with another eos: its own (end_text)


def render(turns, template="vicuna_v1", eos=EOS_TEXT):
    """The prompt string and the character spans of each assistant answer (its end text included).

    "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>". A conversation that
    ends with a human turn ends with "ASSISTANT:" (a prompt to generate from). eos: the text that
    ends an answer, the tokenizer's eos token (end_text): a Llama 3 tokenizer's '</s>' is text
    ('<', '/', 's', '>'), never its end id, and no answer learned to end."""
    if template == "plain":  # LLaVA's stage-1 alignment (conv_llava_plain, preprocess_plain)
        return render_plain(turns)
    if template not in SYSTEM:
        raise ValueError(f"unknown template '{template}' (choose from {', '.join(SYSTEM)}, plain)")
    text, spans = SYSTEM[template] + " ", []
    for t in turns:
        if t["from"] == "human":
            text += f"USER: {t['value']} "
        else:
            text += "ASSISTANT: "
            start = len(text)
            text += t["value"] + eos
            spans.append((start, len(text)))
    if turns and turns[-1]["from"] == "human":
        text += "ASSISTANT:"
    return text, spans


def end_text(tokenizer):
    """The text that ends an answer in the templates: the tokenizer's eos token ('</s>' for
    Llama/Vicuna/Mistral, as LLaVA's conv templates write it)."""
    return tokenizer.eos_token or EOS_TEXT


def render_plain(turns):
    """LLaVA's feature-alignment format: "<image>{caption}\n", the human text dropped, the caption
    and its "\n" learned (no system prompt, no roles, no </s>). One human + one gpt turn."""
    if len(turns) != 2 or turns[0]["from"] != "human" or IMAGE not in turns[0]["value"]:
        raise ValueError("the plain template takes one human turn with <image> and one answer")
    text = IMAGE + turns[1]["value"] + "\n"
    return text, [(len(IMAGE), len(text))]


# ----------------------------------------------------------------------------------------
# tokenization with label masking
# ----------------------------------------------------------------------------------------

def _tokenize_with_offsets(tokenizer, text):
    """ids and char offsets of one text (_tokenize_many_with_offsets)."""
    return _tokenize_many_with_offsets(tokenizer, [text])[0]


def _tokenize_many_with_offsets(tokenizer, texts):
    """(ids, char offsets as an (n, 2) array) of each text, tokenized the way LLaVA's
    tokenizer_image_token does: split at '<image>', each chunk tokenized on its own (the first with
    BOS), one placeholder id (None) where '<image>' was. A chunk after '<image>' is tokenized as it
    reads after a special token (behind BOS, which is then dropped), so it gets what transformers'
    LlavaProcessor gives the same text: legacy Llama tokenizers prepend '▁' there (as LLaVA's
    sentencepiece chunks do), tokenizers whose pre-tokenizer adds '▁' only at the start of the
    text do not ('\nWhat', not '▁\nWhat'). All chunks go to the tokenizer in two batch calls (a
    fast tokenizer encodes each text of a batch alone: the ids of one call per chunk; the per-call
    overhead was most of sft.py's start-up)."""
    bos = tokenizer.bos_token or ""
    chunks = [text.split(IMAGE) for text in texts]
    firsts = [c[0] for c in chunks]
    rests = [bos + chunk for c in chunks for chunk in c[1:]]
    first_enc = _encode_batch(tokenizer, firsts, add_special_tokens=True)
    rest_enc = iter(_encode_batch(tokenizer, rests, add_special_tokens=False))
    out = []
    for text_chunks, (first_ids, first_offsets) in zip(chunks, first_enc):
        ids, offsets = list(first_ids), [np.asarray(first_offsets, dtype=np.int64).reshape(-1, 2)]
        base = len(text_chunks[0]) + len(IMAGE)
        for chunk in text_chunks[1:]:
            ids.append(None)
            offsets.append(np.array([[base - len(IMAGE), base]], dtype=np.int64))
            chunk_ids, chunk_offsets = next(rest_enc)
            shift = len(bos)
            if bos and chunk_ids[:1] == [tokenizer.bos_token_id]:  # BOS split off: drop it
                chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
            elif bos:  # BOS did not split off: the chunk alone
                enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True,
                                verbose=False)
                chunk_ids, chunk_offsets, shift = enc["input_ids"], enc["offset_mapping"], 0
            ids += chunk_ids
            chunk_offsets = np.asarray(chunk_offsets, dtype=np.int64).reshape(-1, 2)
            offsets.append(chunk_offsets + (base - shift))
            base += len(chunk) + len(IMAGE)
        out.append((ids, np.concatenate(offsets)))
    return out


def _encode_batch(tokenizer, texts, add_special_tokens):
    """[(ids, char offsets)] of each text, in one call of the tokenizer. (verbose=False, here and
    for a chunk alone: for a text past the tokenizer's model_max_length transformers said on stderr
    that running it "will result in indexing errors"; the callers cut at --max_len and count what
    they cut or dropped.)"""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    verbose=False)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def tokenize_conversation(tokenizer, turns, image_token_id, num_image_tokens, max_len=2048,
                          template="vicuna_v1", train_on="all"):
    """Token ids and labels for a conversation. Only assistant answers and their eos carry labels
    (train_on='all': every answer; 'last': only the final answer, as DPO and reward scoring need).
    '<image>' becomes num_image_tokens copies of image_token_id. If the text is longer than max_len
    it is cut at the end; never inside the image tokens, and at least part of the first learned
    answer must survive, else None is returned (the caller counts the drop).
    A conversation ending with a human turn gives a generation prompt (no labels learned)."""
    return tokenize_conversations(tokenizer, [turns], image_token_id, num_image_tokens, max_len,
                                  template, train_on)[0]


# conversations per batch call: the tokenizer's Python lists of ids and offsets for LLaVA's 665k
# conversations at once would take tens of GB; the tensors made from them take a few
TOKENIZE_CHUNK = 1024


def tokenize_conversations(tokenizer, conversations, image_token_id, num_image_tokens,
                           max_len=2048, template="vicuna_v1", train_on="all"):
    """tokenize_conversation of each conversation (a list of turn lists), the texts tokenized
    together (the same ids and labels as one call each, about twice as fast). A conversation the
    template cannot render raises render's ValueError, its .index the conversation's."""
    out = []
    for at in range(0, len(conversations), TOKENIZE_CHUNK):
        part = conversations[at:at + TOKENIZE_CHUNK]
        rendered = []
        for i, turns in enumerate(part):
            try:
                rendered.append(render(turns, template, end_text(tokenizer)))
            except ValueError as e:
                e.index = at + i
                raise
        tokenized = _tokenize_many_with_offsets(tokenizer, [text for text, _ in rendered])
        out += [_label(turns, text, spans, raw, offsets, image_token_id, num_image_tokens, max_len,
                       train_on)
                for turns, (text, spans), (raw, offsets) in zip(part, rendered, tokenized)]
    return out


def _label(turns, text, spans, raw, offsets, image_token_id, num_image_tokens, max_len, train_on):
    """tokenize_conversation's ids and labels from the text's tokens (or None: see there)."""
    if train_on == "last":
        spans = spans[-1:]
    # LLaVA's mask (train.py preprocess_v1: instruction_len = len(tok("... ASSISTANT: ")) - 2)
    # learns every token after "ASSISTANT:", so also a lone '▁' for the space when the answer
    # starts with a digit, a newline or a character that has no merged '▁X' piece: the separating
    # space belongs to the answer.
    spans = [(s - 1 if s > 0 and text[s - 1] == " " else s, e) for s, e in spans]
    # a token is learned when it covers a character (b > a) inside an answer span
    a, b = offsets.T
    starts, ends = np.asarray(spans, dtype=np.int64).reshape(-1, 2).T
    learned = (b > a) & ((a[:, None] < ends) & (b[:, None] > starts)).any(axis=1)
    image = np.array([t is None for t in raw], dtype=bool)
    tokens = np.array([image_token_id if t is None else t for t in raw], dtype=np.int64)
    # the image placeholder -> num_image_tokens copies of image_token_id, never learned
    copies = np.where(image, num_image_tokens, 1)
    ids = np.repeat(tokens, copies)
    labels = np.repeat(np.where(learned & ~image, tokens, IGNORE), copies)
    if len(ids) > max_len:
        image_at = np.flatnonzero(ids == image_token_id)
        image_end = int(image_at[-1]) + 1 if len(image_at) else 0
        label_at = np.flatnonzero(labels != IGNORE)
        first_label = int(label_at[0]) if len(label_at) else None
        if image_end > max_len or (first_label is not None and first_label >= max_len) or \
                (first_label is None and turns[-1]["from"] == "gpt"):
            return None
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


def load_tokenizer(path):
    """The tokenizer files in a checkpoint (or world) directory, local files only."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        if not os.path.exists(path):  # (transformers calls it an invalid hub repo id)
            raise DataError(path, message=not_found(path, "tokenizer directory")) from None
        raise tokenizer_fault(path, e) from None
    # (transformers 5 builds a LlamaTokenizer from tokenizer_config.json alone: its special tokens
    # and nothing else, every text encoded to [], trained on and answered with without a word)
    if len(tok.get_vocab()) <= len(set(tok.all_special_tokens)):
        raise DataError(path, message="the tokenizer has no tokens beside its special ones "
                                      "(tokenizer.json or tokenizer.model missing?)")
    if tok.eos_token_id is None:  # (answers end with it: training learns it, decoding stops at it)
        raise DataError(path, message="the tokenizer has no eos token (is tokenizer_config.json "
                                      "missing, or without 'eos_token'?)")
    if tok.pad_token_id is None:  # LLaVA pads with <unk> when the tokenizer has no pad token
        tok.pad_token = tok.unk_token if tok.unk_token_id is not None else tok.eos_token
    return tok


# the JSON files transformers reads from a tokenizer folder (tokenizer.json last: the model)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json")


def tokenizer_fault(path, error):
    """What is wrong with a tokenizer folder that will not load, naming the file and field where
    they can be told (a file that is not JSON, or not an object; tokenizer.json's 'model' and
    'added_tokens'), else the folder and transformers' first line."""
    kind_of = lambda x: JSON_NAMES.get(type(x).__name__, type(x).__name__)
    specs = {}
    for name in TOKENIZER_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            specs[name] = load_json(file)  # (a DataError naming the file, line and column)
            if not isinstance(specs[name], dict):
                return DataError(file, message=f"expected a JSON object, got "
                                               f"{kind_of(specs[name])}")
    file, spec = os.path.join(path, "tokenizer.json"), specs.get("tokenizer.json")
    for field, kind in (("model", dict), ("added_tokens", list)) if spec is not None else ():
        if field not in spec:
            return DataError(file, None, field, "missing")
        if not isinstance(spec[field], kind):
            return DataError(file, None, field,
                             f"expected {JSON_NAMES[kind.__name__]}, got {kind_of(spec[field])}")
    first_line = str(error).splitlines()[0] if str(error) else ''
    if spec is not None and re.search(r" at line \d+ column \d+$", first_line):  # (serde's, on
        # tokenizer.json: a field of the wrong kind deeper down)
        return DataError(file, message=f"not a tokenizer the tokenizers library reads "
                                       f"({first_line})")
    # after the files' own faults: a broken tokenizer_config.json beside it is that file's
    missing = _needs_sentencepiece(path)
    if missing is not None:
        return missing
    why = f"{type(error).__name__}: {first_line}"
    return DataError(path, message=f"cannot load a tokenizer from this directory ({why})")


def _needs_sentencepiece(path):
    """tokenizer.model without tokenizer.json and no sentencepiece installed: named (LLaVA's
    releases ship it alone; transformers falls back to tiktoken, and its 'tiktoken is required'
    sent users after the wrong package). Else None."""
    import importlib.util
    sp_model = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(sp_model) or os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    if importlib.util.find_spec("sentencepiece") is not None:
        return None
    return DataError(sp_model, message="reading it needs the sentencepiece package (not "
                                       "installed: pip install sentencepiece), or save the "
                                       "tokenizer with its tokenizer.json beside it")


# ----------------------------------------------------------------------------------------
# images: LLaVA's 'pad' preprocessing with PIL and numpy
# ----------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Pillow's modes of 16-bit grey (PNG, TIFF). Not "I" (32-bit integers, how older Pillow
# opened such a PNG): its range is not known from the mode, and an "I" image of 8-bit values
# scaled by 1/257 would be read black; it converts as LLaVA's does.
WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im):
    """A PIL image of any mode in RGB, as LLaVA's `Image.open(f).convert('RGB')` (alpha dropped,
    palette, grey and CMYK expanded), except two grey modes convert() reads as one flat colour.
    16-bit grey: convert() clips each value to 255, and an image of values above 255 (all but the
    darkest) was trained on as a white square; scaled to 8 bits instead, as a viewer shows it.
    Floating-point grey ("F", a float TIFF) whose values lie in [0, 1]: convert() takes them as
    0-255 and cuts each to 0 or 1, black; scaled by 255 instead, the [0, 1] range float images
    are shown in (OpenCV's imshow, scikit-image, GIMP). One with a value above 1 (0-255, as
    Pillow reads floats) converts as LLaVA's; NaN reads as 0."""
    from PIL import Image
    if im.mode in WIDE_GREY:
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        if values.size and values.max() <= 1:
            im = Image.fromarray(np.clip(np.rint(values * 255), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_image(path, file=None, record=None):
    """An RGB PIL image (to_rgb); a file that is missing or will not decode is a DataError naming
    the record."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(file or path, record, "image",
                        f"file not found: {path}{windows_hint(path)}")
    except Exception as e:
        message = f"cannot decode image {path} ({_undecoded(path, e, type(e).__name__)})"
        raise DataError(file or path, record, "image", message)


def expand_to_square(img, fill=tuple(int(m * 255) for m in CLIP_MEAN)):
    """Pad to a square with the CLIP mean colour, image centred (LLaVA's expand2square)."""
    from PIL import Image
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def image_to_unit(img, size):
    """PIL image -> (3, size, size) float tensor in [0, 1]: pad to square, bicubic resize."""
    from PIL import Image
    img = expand_to_square(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def normalize(unit):
    """[0, 1] pixels -> CLIP-normalised pixels (works on (3,H,W) and (B,3,H,W))."""
    mean = torch.tensor(CLIP_MEAN, dtype=unit.dtype, device=unit.device).view(-1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=unit.dtype, device=unit.device).view(-1, 1, 1)
    return (unit - mean) / std


def preprocess_image(img, size):
    """A PIL image of any mode -> (3, size, size) CLIP-normalised pixels (to_rgb first)."""
    return normalize(image_to_unit(img if img.mode == "RGB" else to_rgb(img), size))


class ImageCache:
    """Decoded, resized [0,1] image tensors by path, the first ones that fit in `budget_mb`
    (default: a whole Shapes world at its small image size; a few thousand images at 336 px; the
    rest are decoded every time)."""

    def __init__(self, size, budget_mb=2048):
        image_bytes = 3 * size * size * 4  # float32 channels x pixels
        self.size, self.store = size, {}
        self.capacity = budget_mb * 2**20 // image_bytes

    def unit(self, path, file=None, record=None):
        if path in self.store:
            return self.store[path]
        x = image_to_unit(load_image(path, file, record), self.size)
        if len(self.store) < self.capacity:
            self.store[path] = x
        return x


def _decodes(path):
    """None if the image decodes to its last pixel, else why not (verify() alone reads no pixel
    data)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
        return None
    # PIL raises many kinds (OSError, SyntaxError, ValueError, zlib.error...)
    except Exception as e:
        return _undecoded(path, e, f"{type(e).__name__}: {str(e)[:80]}")


def _undecoded(path, error, otherwise):
    """Why an image did not decode, in words where PIL's are misleading: a zero-byte file (a
    download cut short) was "cannot identify image file", a folder or a missing file an errno."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a file"
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "an empty file, 0 bytes"
    return otherwise


def require_records(records, file, what):
    """records, or a DataError naming file when it holds none: a stage of no data has no step to
    take, and a validation file of none would report nothing without saying so."""
    if not records:
        raise DataError(file, message=f"no records: expected a non-empty JSON list of {what}")
    return records


CHECK_IMAGES_SAID = 5000  # images from which check_images shows its progress


def check_images(records, file, on_error="raise", field="image", decoded=(), d=None,
                 record=True):
    """Decode every record's image once before training starts (threads: decoding mostly releases
    the GIL), so a broken file stops the run (or is skipped and counted) naming the data file,
    record and field before any step, never in the middle; `decoded`: paths already checked (with
    another file of the run), not decoded again. Under torchrun (`d`, every rank calling) each
    rank decodes its share and the broken ones are gathered: every rank skips or stops alike.
    record: the images go into the run's record (run.json's 'images', which --resume compares);
    False for an input free to change at --resume (vigc's generation images), which would make
    such a resume refused as "other images". Returns (good records, skipped lines)."""
    from concurrent.futures import ThreadPoolExecutor
    # (common and rundir read formats, not this)
    from common import progress
    from rundir import note_images_read, rank_states
    paths = sorted({r["image"] for r in records if r.get("image")} - set(decoded))
    if record:  # (the run records them: run.json's images, which --resume compares)
        note_images_read(paths)
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    share = paths[rank::world]  # (LLaVA's ~350k images, decoded by every rank, took minutes each)
    first = rank == 0 if d is not None else os.environ.get("RANK", "0") == "0"
    show = len(paths) >= CHECK_IMAGES_SAID and first  # (said once, by the first process)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        whys = progress(pool.map(_decodes, share), total=len(share), enabled=show,
                        desc=f"{os.path.basename(file)}: decoding each image once"
                             + (f" ({world} processes, a share each)" if world > 1 else ""))
        broken = {p: why for p, why in zip(share, list(whys)) if why}
    if world > 1:
        broken = {p: why for part in rank_states(broken, d) for p, why in part.items()}
    good, skipped = [], []
    for i, r in enumerate(records):
        if r.get("image") in broken:
            err = DataError(file, record_label(i, r), field,
                            f"cannot decode image {r['image']} ({broken[r['image']]})")
            if on_error == "raise":
                raise err
            skipped.append(str(err))
            continue
        good.append(r)
    return good, skipped


# ----------------------------------------------------------------------------------------
# collation
# ----------------------------------------------------------------------------------------

def collate(items, pad_id, side="right"):
    """Pad a list of {'input_ids', 'labels'?, 'pixel_values'?} to one batch. Right padding for
    training, left padding for generation. pixel_values are stacked for the items that have an image
    (in order), matching the image tokens in input_ids."""
    T = max(len(x["input_ids"]) for x in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long) if "labels" in items[0] else None
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl] = x["input_ids"]
        mask[i, sl] = 1
        if labels is not None:
            labels[i, sl] = x["labels"]
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = labels
    pix = [x["pixel_values"] for x in items if x.get("pixel_values") is not None]
    out["pixel_values"] = torch.stack(pix) if pix else None
    return out


def pack(items):
    """The items of collate() as one row, end to end, with no padding: {'input_ids', 'labels',
    'attention_mask'} of shape (1, total), 'pixel_values' stacked in order, and 'seq_lens'. The
    model runs attention within each sequence (model.backbone), so every logit, label and loss is
    the one of the right-padded batch. A sequence's first label must be IGNORE (it holds BOS / the
    prompt): the last token of one sequence then predicts nothing in the next."""
    for x in items:
        if "labels" in x and int(x["labels"][0]) != IGNORE:
            raise ValueError("pack: a sequence whose first token carries a label")
    out = {"input_ids": torch.cat([x["input_ids"] for x in items])[None],
           "seq_lens": [len(x["input_ids"]) for x in items]}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "labels" in items[0]:
        out["labels"] = torch.cat([x["labels"] for x in items])[None]
    pix = [x["pixel_values"] for x in items if x.get("pixel_values") is not None]
    out["pixel_values"] = torch.stack(pix) if pix else None
    return out


# ----------------------------------------------------------------------------------------
# The Fact-RLHF evaluation turn the reward model reads (reward.py and ppo.py); LLaVA-RLHF
# RLHF/prompts/fact_rlhf_reward_prompt.txt and data_utils/constants.py FACTUAL_PROMPT, verbatim.
# ----------------------------------------------------------------------------------------

EVAL_QUESTION = (
    "Please evaluate the quality of your last response. "
    "There are several dimensions you should consider in your evaluation:\n\n"
    "1. Accurate: The AI should provide factual and accurate information from the image, "
    "and refrain from making statements that are not supported by the image "
    "or inconsistent with the image.{facts}\n"
    "2. Helpful: The AI\u2019s response should precisely serve the user's needs and interests, "
    "while grounding the response in the image.\n"
    "3. Language Natural: The AI should employ language that flows smoothly "
    "and is free from repetitive or awkward constructs.\n"
    "4. Concise: The AI should efficiently address the task or answer the question, "
    "communicating the necessary information with brevity and clarity.\n\n"
    "A good response should be accurate, helpful, language natural, and concise.")
# --eval_prompt short: half the tokens (CPU runs on Shapes)
EVAL_QUESTION_SHORT = ("Please evaluate the quality of your last response: "
                       "it should be accurate, helpful, natural and concise.{facts}")
FACTS_INTRO = (" Specifically, the AI's response should be fully supported by "
               "the combination of the following captions:\n")
EVAL_ANSWER = "Following your definitions, the quality score of my last response is"


def eval_question(captions, rng, wording="llava-rlhf"):
    """The evaluation turn; with captions (Fact-RLHF) they are shuffled by `rng` and listed one per
    line as '  - caption' (LLaVA-RLHF: FACTUAL_PROMPT + one '  - {caption}\\n' per caption)."""
    question = {"llava-rlhf": EVAL_QUESTION, "short": EVAL_QUESTION_SHORT}[wording]
    if captions is None:
        return question.format(facts="")
    caps = list(captions)
    rng.shuffle(caps)
    return question.format(facts=FACTS_INTRO + "".join(f"  - {c}\n" for c in caps))


def reward_item(tokenizer, model_config, prompt, response, captions, rng, template="vicuna_v1",
                max_len=1024, wording="llava-rlhf", space=False):
    """Token ids the reward model reads: the conversation, the response, the evaluation turn and the
    start of its answer ("... the quality score of my last response is"). LLaVA-RLHF renders that
    answer as a finished turn and drops the final eos token, so the score sits on the last prompt
    token. None when longer than max_len (never cut: the score position would move).
    space=True: '...{response}</s> USER: Please evaluate...', verbatim LLaVA-RLHF (it appends
    ' ' + fact_rlhf_reward_prompt.txt to the text); False: our template's '</s>USER:' (what matters
    is that reward model and PPO agree; with LLaVA-RLHF's released reward weights, use True).
    An '<image>' spelled out in the response (PPO samples it piece by piece) is read as a space, as
    VIGC's generated text is: it would become image slots with no image."""
    turns = list(prompt) + [{"from": "gpt", "value": response.replace(IMAGE, " ")}]
    if space:
        text = render(turns, template, end_text(tokenizer))[0] + " " + \
            eval_turn(captions, rng, wording)
        ids = torch.tensor([i if i is not None else model_config.image_token_id
                            for i in _tokenize_with_offsets(tokenizer, text)[0]], dtype=torch.long)
        ids = _expand_image(ids, model_config)
        return None if len(ids) > max_len else {"input_ids": ids}
    question = eval_question(captions, rng, wording)
    turns += [{"from": "human", "value": question}, {"from": "gpt", "value": EVAL_ANSWER}]
    t = tokenize_conversation(tokenizer, turns, model_config.image_token_id,
                              model_config.num_image_tokens, max_len=1 << 30, template=template)
    ids = t["input_ids"]
    if int(ids[-1]) == tokenizer.eos_token_id:
        ids = ids[:-1]
    return None if len(ids) > max_len else {"input_ids": ids}


def eval_turn(captions, rng, wording="llava-rlhf"):
    """The evaluation turn as LLaVA-RLHF's reward prompt file writes it (no leading space, no final
    '</s>')."""
    return f"USER: {eval_question(captions, rng, wording)} ASSISTANT: {EVAL_ANSWER}"


def _expand_image(ids, model_config):
    """One image placeholder id -> num_image_tokens copies (tokenize_conversation's image
    expansion)."""
    at = (ids == model_config.image_token_id).nonzero()[:, 0].tolist()
    if not at:
        return ids
    n_image = model_config.num_image_tokens
    img = torch.full((n_image,), model_config.image_token_id, dtype=torch.long)
    return torch.cat([ids[:at[0]], img, ids[at[0] + 1:]])


def reward_item_from_ids(tokenizer, prompt_ids, response_ids, captions, rng, max_len=1 << 30,
                         wording="llava-rlhf", space=True):
    """LLaVA-RLHF's PPO input to the reward model (ppo_trainer.py rollout): the prompt's token ids,
    the sampled response ids as they are ('</s>' only when it was sampled; never decoded and
    re-tokenized), then the evaluation turn tokenized on its own without special tokens
    (' USER: Please evaluate ... is')."""
    tail = (" " if space else "") + eval_turn(captions, rng, wording)
    turn = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if not space:  # ('</s>USER:', as a reward model trained without the space read it: alone,
        # the turn's first word took a word-start mark, '</s> USER')
        after_end = tokenizer(tokenizer.eos_token + tail, add_special_tokens=False)["input_ids"]
        turn = after_end[1:] if after_end[:1] == [tokenizer.eos_token_id] else turn
    ids = torch.cat([prompt_ids.cpu(), response_ids.cpu(), torch.tensor(turn, dtype=torch.long)])
    return None if len(ids) > max_len else {"input_ids": ids}


# ----------------------------------------------------------------------------------------
# generators from object annotations: LRV negative instructions, POVID hallucination
# injection, POVID diffusion noise (and the English helpers they share with shapes.py).
# They take normalised object lists,
#   objects = [{"name": "circle", "color": "red" or None, "size": "large" or None,
#               "bbox": [x, y, w, h], "row": r or None, "col": c or None,
#               "position": "top left" or None}]
# (plain COCO instances have only name and bbox) and a numpy Generator `rng`, so the same seed
# gives the same text. On the Shapes world every answer they write is checked by oracle.oracle.
# ----------------------------------------------------------------------------------------

NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right",
             "left", "center", "right",
             "bottom left", "bottom", "bottom right")
IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep",
                     "skis": "skis", "scissors": "scissors", "broccoli": "broccoli", "man": "men",
                     "woman": "women", "child": "children"}

# -----------------------------------------------------------------------------
# English helpers (shared with shapes.py so there is one spelling of everything)


def plural(name):
    head, _, last = name.rpartition(" ")  # "wine glass" -> "wine glasses"
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def article(phrase):
    return "an" if phrase[:1] in "aeiou" else "a"


def a(phrase):
    return f"{article(phrase)} {phrase}"


def number_word(n):
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def count_phrase(n, name):
    """2, circle -> 'two circles'; 1 -> 'one circle'; 0 -> 'no circles'."""
    return f"{number_word(n)} {name if n == 1 else plural(name)}"


def there_are(n, name):
    return f"there {'is' if n == 1 else 'are'} {count_phrase(n, name)}"


def join_and(items):
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def cell_position(row, col, grid):
    """The position word of a cell of a grid x grid picture (grid 2 or 3), by the third of the
    picture its centre falls in: grid 3 names each cell, grid 2 its four corners."""
    third = lambda i: min(2, (2 * i + 1) * 3 // (2 * grid))
    return POSITIONS[3 * third(row) + third(col)]


def grid_positions(grid):
    """The position words of a grid x grid picture's cells in reading order: grid 3 all of
    POSITIONS, grid 2 its four corners (a "center" or "top" a 2 x 2 grid lacks would be a wrong
    place that is no cell, and "top" holds a top corner's object)."""
    return tuple(cell_position(r, c, grid) for r in range(grid) for c in range(grid))


def position_of(o):
    """The position word of an object: its own, or from its 3x3 grid cell, or None (plain COCO)."""
    if o.get("position"):
        return o["position"]
    if o.get("row") is None or o.get("col") is None:
        return None
    return POSITIONS[3 * min(2, max(0, o["row"])) + min(2, max(0, o["col"]))]


def pos_phrase(position):
    phrases = {"left": "on the left", "right": "on the right", "center": "in the center"}
    return phrases.get(position, f"at the {position}")


def noun_phrase(o, size=True, color=True):
    words = [o.get("size") if size else None, o.get("color") if color else None, o["name"]]
    return " ".join(w for w in words if w)


def list_objects(objects):
    """'a large red circle and a small blue square'; objects without attributes are grouped by name
    with counts ('two people and a car') so big COCO images stay readable."""
    if all(o.get("color") for o in objects):
        return join_and(a(noun_phrase(o)) for o in objects)
    counts = {}
    for o in objects:
        counts[o["name"]] = counts.get(o["name"], 0) + 1
    return join_and(a(n) if c == 1 else count_phrase(c, n) for n, c in counts.items())


def _pick(rng, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _matching(objects, name=None, color=None, size=None, position=None):
    return [o for o in objects
            if (name is None or o["name"] == name)
            and (color is None or o.get("color") == color)
            and (size is None or o.get("size") == size)
            and (position is None or position_of(o) == position)]


def unique_ref(o, objects, use=("size", "color")):
    """Shortest noun phrase ('circle', 'large circle', 'red circle', ...) naming only `o`, from the
    attributes in `use`; None if no such phrase exists."""
    options = [{}] + [{k: o.get(k)} for k in use if o.get(k)]
    if len(use) == 2 and o.get(use[0]) and o.get(use[1]):
        options.append({k: o.get(k) for k in use})
    for attrs in options:
        if len(_matching(objects, o["name"], attrs.get("color"), attrs.get("size"))) == 1:
            return " ".join(w for w in [attrs.get("size"), attrs.get("color"), o["name"]] if w)
    return None

# -----------------------------------------------------------------------------
# LRV-Instruction negative instructions (Liu et al. 2023, Sec. 3): nonexistent element
# manipulation (task "negative") and existent element manipulation (task "negative_existent").


def lrv_negatives(objects, rng, all_names, colors=None, positions=POSITIONS):
    """Negative instructions for one image: a list of (question, answer, task), one per kind of
    manipulation possible here, in random order. Answers say what is not there and what is.

    task "negative": a nonexistent object, a nonexistent color of a present object, a present
    object at a position where it is not. task "negative_existent": a present object with a wrong
    color, size or count; the answer corrects it. Without colors (plain COCO) only nonexistent
    objects and wrong counts are made. positions: the picture's cell names (grid_positions), where
    a present object is said not to be."""
    out = []
    names = [o["name"] for o in objects]
    absent = [n for n in all_names if n not in names]
    if objects:
        shows = f"The image shows {list_objects(objects)}."
    else:
        shows = "The image shows no objects."
    if absent:  # nonexistent object
        x = _pick(rng, absent)
        questions = [f"Is there {a(x)} in the image?", f"Describe the {x} in the image.",
                     f"Where is the {x} in the image?"]
        if colors:
            questions.append(f"What color is the {x}?")
        q = _pick(rng, questions)
        ans = f"There is no {x} in the image. {shows}"
        reply = "No, " + ans[0].lower() + ans[1:] if q.startswith("Is ") else ans
        out.append((q, reply, "negative"))
    if colors and objects and objects[0].get("color"):
        o = _pick(rng, objects)
        wrong = [c for c in colors if not _matching(objects, o["name"], c)]
        if wrong:  # a color that no object of this shape has
            c = _pick(rng, wrong)
            q = _pick(rng, [f"Is there {a(c + ' ' + o['name'])} in the image?",
                            f"Describe the {c} {o['name']}."])
            same_shape = list_objects(_matching(objects, o['name']))
            ans = f"There is no {c} {o['name']} in the image. The image shows {same_shape}."
            reply = "No, " + ans[0].lower() + ans[1:] if q.startswith("Is ") else ans
            out.append((q, reply, "negative"))
        pos = position_of(o)
        free = [p for p in positions if pos and not _matching(objects, o["name"], position=p)]
        if free:  # the object, somewhere it is not
            p = _pick(rng, free)
            q = _pick(rng, [f"What color is the {o['name']} {pos_phrase(p)}?",
                            f"Describe the {o['name']} {pos_phrase(p)}."])
            the_object = a(noun_phrase(o)).capitalize()
            ans = f"There is no {o['name']} {pos_phrase(p)}. {the_object} is {pos_phrase(pos)}."
            out.append((q, ans, "negative"))
        ref = unique_ref(o, objects, use=("size",))
        wrong = [c for c in colors if ref and c != o["color"]]
        if wrong:  # existent object, wrong color
            c = _pick(rng, wrong)
            q = _pick(rng, [f"Is the {ref} {c}?", f"Why is the {ref} {c}?",
                            f"The {ref} is {c}. Where is it?"])
            ans = f"The {ref} is {o['color']}, not {c}."
            out.append((q, "No, t" + ans[1:] if q.startswith("Is ") else ans, "negative_existent"))
        ref = unique_ref(o, objects, use=("color",))
        if ref and o.get("size"):  # existent object, wrong size
            s = [z for z in SIZES if z != o["size"]][0]
            q = _pick(rng, [f"Is the {ref} {s}?", f"Why is the {ref} so {s}?"])
            ans = f"The {ref} is {o['size']}, not {s}."
            out.append((q, "No, t" + ans[1:] if q.startswith("Is ") else ans, "negative_existent"))
    if objects:  # existent object, wrong count
        x = _pick(rng, sorted(set(names)))
        n = names.count(x)
        m = _pick(rng, [k for k in range(1, n + 3) if k != n])
        if m > 1:
            yes_no = f"Are there {count_phrase(m, x)} in the image?"
        else:
            yes_no = f"Is there only one {x} in the image?"
        q = _pick(rng, [yes_no, f"Describe the {count_phrase(m, x)} in the image."])
        ans = f"{there_are(n, x).capitalize()} in the image, not {number_word(m)}."
        reply = "No, t" + ans[1:] if q.startswith(("Is ", "Are ")) else ans
        out.append((q, reply, "negative_existent"))
    order = rng.permutation(len(out))
    return [out[i] for i in order]

# -----------------------------------------------------------------------------
# POVID hallucination injection (Zhou et al. 2024, Sec. 3.1): turn a ground-truth answer into a
# dispreferred one with a co-occurring object, a wrong attribute, or a wrong relation/logic.

SENT = re.compile(r"[^.!?]+[.!?]*")
NEG = re.compile(r"\b(no|not|none|without)\b|n't\b", re.I)
REL_FLIP = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}


def _word(name):
    return re.compile(rf"\b({re.escape(name)}|{re.escape(plural(name))})\b")


def _names_re(names):
    """Alternation of names and their plurals, longest first (so 'crosses' wins over 'cross')."""
    words = {re.escape(w) for n in names for w in (n, plural(n))}
    return "|".join(sorted(words, key=len, reverse=True)) or "\0"


def _base(word, names):
    return next(n for n in names if word in (n, plural(n)))


def _fix_articles(text):
    def fixed(m):
        n = "n " if m.group(2).lower() in "aeiou" else " "
        return m.group(1) + n + m.group(2)
    return re.sub(r"\b([Aa])n? (\w)", fixed, text)


def _np_at(sentence, start, names):
    """The object noun phrase nearest to character `start` in a sentence: (name, color, size)
    from the words just before the noun (e.g. 'large red circle')."""
    best = None
    for n in names:
        for m in _word(n).finditer(sentence):
            d = abs(m.start() - start)
            if best is None or d < best[0]:
                best = (d, n, m.start())
    if best is None:
        return None
    words = sentence[:best[2]].lower().split()[-2:]
    return best[1], words


def _filter_by_words(objects, name, words, colors):
    color = next((w for w in words if colors and w in colors), None)
    size = next((w for w in words if w in SIZES), None)
    return _matching(objects, name, color, size)


def _inject_object(answer, objects, rng, all_names, cooc_partners, colors, positions=POSITIONS):
    names = sorted({o["name"] for o in objects})
    absent = [n for n in (all_names or []) if n not in names]
    partners = [p for n in names for p in (cooc_partners or {}).get(n, []) if p in absent]
    cands = partners or absent
    denial = r"\b(No, t|T)here (?:is|are) no ((?:\w+ )*?)(" + _names_re(all_names or []) + r")\b"
    m = re.search(denial, answer)
    # "No, there is no X" (true) -> "Yes, there is a X"
    if m and _base(m.group(3), all_names) not in names:
        head = "Yes, t" if m.group(1) == "No, t" else "T"
        claim = f"here is {a(m.group(2) + _base(m.group(3), all_names))}"
        return answer[:m.start()] + head + claim + answer[m.end():]
    affirmation = r"Yes, there (?:is|are) (?:an?|\w+) ((?:\w+ )*?)(" + _names_re(names) + r")\b"
    m = re.match(affirmation, answer)
    if m:  # "Yes, there is a X" (true) -> "No, there is no X": denies a present object
        return f"No, there is no {m.group(1)}{_base(m.group(2), names)}" + answer[m.end():]
    if not cands:
        return None
    x = _pick(rng, cands)
    present = [n for n in names if _word(n).search(answer)]
    if present and not NEG.search(answer) and rng.random() < 0.5:  # replace a present object by x
        old = _pick(rng, present)
        swapped = _word(old).sub(lambda w: x if w.group(1) == old else plural(x), answer)
        return _fix_articles(swapped)
    o = _pick(rng, objects) if objects else {}
    color = _pick(rng, colors) if colors and o.get("color") else None
    where = position_of(o) and pos_phrase(_pick(rng, positions))
    new_object = a(" ".join(filter(None, [color, x])))
    added = " ".join(w for w in ["There is also", new_object, where or "in the image"] if w)
    return answer.rstrip() + " " + added + "."


def _inject_attribute(answer, objects, rng, all_names, cooc_partners, colors, positions=POSITIONS):
    names = sorted({o["name"] for o in objects})
    edits = []  # (start, end, replacement)
    for s in SENT.finditer(answer):
        sent, off = s.group(0), s.start()
        if NEG.search(sent):
            continue  # a swapped word inside a negation can stay true
        words = (colors or []) + (list(SIZES) if any(o.get("size") for o in objects) else [])
        word_re = r"\b(" + "|".join(map(re.escape, words)) + r")\b"
        for m in re.finditer(word_re, sent) if words else []:
            np_ = _np_at(sent, m.start(), names)
            if np_ is None:
                continue
            name, mods = np_
            w = m.group(1)
            if w in SIZES:
                other = [z for z in SIZES
                         if z != w and not _filter_by_words(objects, name, [z] + mods, colors)]
            else:
                other = [c for c in colors
                         if c != w and c not in sent and not _matching(objects, name, c)]
            if other:
                edits.append((off + m.start(), off + m.end(), _pick(rng, other)))
        numbers = "|".join(NUMBER_WORDS[1:])
        pat = r"\b(?:([Tt]here) (?:is|are) )?(" + numbers + r") ((?:\w+ ){0,2}?)(\w+)\b"
        for m in re.finditer(pat, sent):
            noun = m.group(4)
            base = next((n for n in names + ["object", "shape"] if noun in (n, plural(n))), None)
            if base is None:
                continue
            n = NUMBER_WORDS.index(m.group(2))
            k = _pick(rng, [j for j in range(1, max(n + 3, 5)) if j != n])
            noun_k = base if k == 1 else plural(base)
            head = f"{m.group(1)} {'is' if k == 1 else 'are'} " if m.group(1) else ""
            new = f"{head}{number_word(k)} {m.group(3)}{noun_k}"
            edits.append((off + m.start(), off + m.end(), new))
    if not edits:
        return None
    i, j, new = edits[int(rng.integers(len(edits)))]
    return answer[:i] + new + answer[j:]


def _inject_relation(answer, objects, rng, all_names, cooc_partners, colors, positions=POSITIONS):
    names = sorted({o["name"] for o in objects})
    # without one (plain COCO) flips are unverified
    grid = bool(objects) and objects[0].get("row") is not None
    edits = []
    for s in SENT.finditer(answer):
        sent, off = s.group(0), s.start()
        if NEG.search(sent) and not sent.startswith("No, the"):
            continue
        for m in re.finditer(r"\b(to the left of|to the right of|above|below)\b", sent):
            a_np = _np_at(sent[:m.start()], m.start(), names)
            b_np = _np_at(sent[m.end():], 0, names)
            if a_np is None or b_np is None or not grid:
                if not grid:
                    edits.append((off + m.start(), off + m.end(), REL_FLIP[m.group(1)]))
                continue
            A = _filter_by_words(objects, a_np[0], a_np[1], colors)
            B = _filter_by_words(objects, b_np[0], b_np[1], colors)
            new = REL_FLIP[m.group(1)]
            keys = {"to the left of": ("col", -1), "to the right of": ("col", 1),
                    "above": ("row", -1), "below": ("row", 1)}
            key = keys[new]
            holds = any(x is not y and (x[key[0]] - y[key[0]]) * key[1] > 0 for x in A for y in B)
            if A and B and not holds:  # the flipped relation is false for every pair
                edits.append((off + m.start(), off + m.end(), new))
        places = "top left|top right|bottom left|bottom right|top|bottom|left|right|center"
        for m in re.finditer(r"\b(at|in|on) the (" + places + r")\b", sent, re.IGNORECASE):
            # "A red circle is at the top left." or "At the top left there is a red circle."
            first = not sent[:m.start()].strip()
            if first:
                np_ = _np_at(sent[m.end():], 0, names)
            else:
                np_ = _np_at(sent[:m.start()], m.start(), names)
            if np_ is None or not grid:
                continue
            cand = _filter_by_words(objects, np_[0], np_[1], colors)
            free = [p for p in positions
                    if p != m.group(2).lower() and not any(position_of(o) == p for o in cand)]
            if cand and free:
                new = pos_phrase(_pick(rng, free))
                if first:
                    new = new[:1].upper() + new[1:]
                edits.append((off + m.start(), off + m.end(), new))
    if not edits:
        return None
    i, j, new = edits[int(rng.integers(len(edits)))]
    return answer[:i] + new + answer[j:]


INJECTORS = {"object": _inject_object, "attribute": _inject_attribute, "relation": _inject_relation}


def inject_hallucination(answer, objects, rng, kind=None, all_names=None, cooc_partners=None,
                         colors=None, positions=POSITIONS):
    """POVID-style dispreferred answer: returns (new_answer, kind) or None when `kind` (or, with
    kind=None, every kind tried in random order) is impossible for this answer.

    object: "No, there is no X" -> "Yes, there is a X"; "Yes, there is a X" -> "No, there is no X";
      or a present object replaced by / joined with an absent one, preferring absent co-occurring
      partners (cooc_partners: {name: [names that often appear with it]}).
    attribute: a color or size swapped for one that no such object has, or a count changed.
    relation: left/right or above/below flipped where the flipped relation holds for no pair, or a
      position moved to a cell where no such object is (objects without grid cells, i.e. plain
      COCO: relation words are flipped unverified).
    positions: the picture's cell names (grid_positions): where objects are moved or added.
    """
    kinds = [kind] if kind else [str(k) for k in rng.permutation(list(INJECTORS))]
    for k in kinds:
        color_list = list(colors) if colors else None
        new = INJECTORS[k](answer, objects, rng, all_names, cooc_partners, color_list, positions)
        if new is not None and new != answer:
            return new, k
    return None

# -----------------------------------------------------------------------------
# POVID diffusion noise (train_dpo_inherent.py add_diffusion_noise): the DDPM forward step.


def ddpm_noise(image01, t=500, generator=None, num_steps=1000):
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps on a [0,1] image tensor (C,H,W) or
    (B,C,H,W), betas = sigmoid(linspace(-6, 6, num_steps)) * (5e-3 - 1e-5) + 1e-5,
    abar = cumprod(1 - betas). t is 0-based (t=500 is abar[500], as POVID's alphas_bar_sqrt[t] with
    noise_step 500). Not clamped: the raw tensor (values outside [0, 1]); povid_noisy_image makes
    POVID's 8-bit image of it."""
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[t]
    device = generator.device if generator is not None else image01.device
    eps = torch.randn(image01.shape, generator=generator, device=device, dtype=torch.float32)
    eps = eps.to(image01.device)
    return abar.sqrt() * image01 + (1 - abar).sqrt() * eps.to(image01.dtype)


def to_pil_bytes(image01):
    """torchvision's ToPILImage on a float tensor, (C,H,W) -> (H,W,C) uint8: `pic.mul(255).byte()`.
    The float -> uint8 cast truncates toward zero and wraps modulo 256 (it does not clip):
    1.2 -> 50, -0.5 -> 129."""
    wrapped = torch.remainder(torch.trunc(image01.float() * 255), 256)
    return wrapped.to(torch.uint8).permute(1, 2, 0).numpy()


def povid_noisy_image(img, size, t=500, generator=None):
    """POVID stage 2's noised image, as train_dpo_inherent.py (LazySupervisedDataset.__getitem__)
    makes it: ToTensor of the image at its original size, the DDPM step (ddpm_noise), ToPILImage
    (8-bit, values outside [0, 1] wrap around: 33-47% of the pixels at t = 500), and only then
    LLaVA's preprocessing: pad to a square with the clean CLIP-mean colour, resize, normalise.
    Returns CLIP-normalised (3, size, size)."""
    from PIL import Image
    unit = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    noisy = Image.fromarray(to_pil_bytes(ddpm_noise(unit, t, generator)))
    return normalize(image_to_unit(noisy, size))
