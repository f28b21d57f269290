"""Readers with validation for the public data formats, and the LLaVA-SFT+ converters.
(data.py re-exports them; they live here so that data.py stays readable in one sitting.)

Conventions shared by every reader and converter:
- A file is a JSON list of records or JSON lines (one record per line); both are accepted
  everywhere.
- Every problem raises DataError(file, record, field, message); record is the index i of data[i]
  (0-based, JSON lines: the i-th non-blank line), plus its id when it has one: "3 (id 'abc')".
- on_error="raise" (default) returns a list of normalised dicts. on_error="skip" drops bad records
  and returns (records, skipped), skipped being the one-line error messages. A file that is missing
  or does not parse always raises.
- Image paths are relative to image_folder (default: the data file's folder) or absolute; they are
  returned as full paths. check_images=True checks that the file exists; decoding is checked at
  load time.
"""
import errno
import hashlib
import json
import math
import os
import random
import re


class DataError(Exception):
    """A problem with user data. str() is one line naming the file, the record and the field;
    stage scripts turn it into that line on stderr and exit code 2 (no traceback)."""

    def __init__(self, file, record=None, field=None, message=""):
        self.file, self.record, self.field, self.message = file, record, field, message
        parts = [str(file)] if file is not None else []
        if record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(": ".join(parts + [message]))


IMAGE = "<image>"
# user/assistant: cheap to accept
ROLES = {"human": "human", "gpt": "gpt", "user": "human", "assistant": "gpt"}
JSON_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "list": "a list",
              "dict": "an object", "bool": "a boolean", "NoneType": "null"}
# LLaVA's brief-description instructions (LLaVA paper, arXiv 2304.08485, Table 8); Flickr30k
# prompts pick one.
BRIEF_PROMPTS = [
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the "
                                                              "image.",
    "Give a short and clear explanation of the subsequent image.", "Share a concise interpretation "
                                                                   "of the image provided.",
    "Present a compact description of the photo's key features.", "Relay a brief, clear account of "
                                                                  "the picture shown.",
    "Render a clear and concise summary of the photo.", "Write a terse but informative summary of "
                                                        "the picture.",
    "Create a compact narrative representing the image presented."]
# LLaVA-1.5's multiple-choice suffix
MC_DIRECT = "Answer with the option's letter from the given choices directly."

# -------------------------------------------------------------------------- file and field helpers

def _bad(field, message):
    # record-level problem; _each() adds the file and the record
    return DataError(None, None, field, message)


# absolute path -> sha256 of the bytes read_text read from it first (a run records its data files
# as read: one changed while the run decoded its images is recorded as what it trained on)
digests_read = {}


def read_text(path):
    """A text file's contents; bytes that are not UTF-8 are a DataError naming the file and the byte
    offset (a UTF-8 byte order mark is dropped)."""
    with open(path, "rb") as f:
        raw = f.read()
    digests_read.setdefault(os.path.abspath(path), hashlib.sha256(raw).hexdigest())
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, message=f"not UTF-8 text: byte {raw[e.start]:#04x} at offset "
                                      f"{e.start} ({e.reason})") from None


def not_found(path, what="file"):
    """Why `path` names nothing: a symbolic link on it that loops, or one that names what is not
    there (both read as 'not found', though `ls` lists the link), or `what` not found."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link on this path loops (links that name each other, or itself)"
        if os.path.islink(path):
            return f"a symbolic link to {os.readlink(path)}, which is not there"
    return f"{what} not found"


def windows_hint(path):
    """A note for a path not found that holds '\\' where its '/' spelling names a file (a record
    written on Windows: 'images\\train\\0.png'), else ''. On Linux '\\' is a character of a
    name, so the record is not read as the other file: it says where that one is."""
    slashed = path.replace("\\", "/")
    if slashed != path and os.path.exists(slashed):
        return f" (Windows separators? {slashed} exists: write '/' in the record)"
    return ""


def load_json(path):
    """Parse a JSON file or a JSON lines file. Returns the parsed object (JSON lines -> list)."""
    if not os.path.isfile(path):
        raise DataError(path, message="a folder, not a file" if os.path.isdir(path) else
                        "not a regular file (a pipe or device): give a file, which a run records "
                        "and reads again" if os.path.exists(path) else not_found(path))
    text = read_text(path)
    if not text.strip():
        raise DataError(path, message="file is empty")
    try:
        obj = _parse_json(path, text)
        # JSON may escape half of a UTF-16 pair ("\ud800"): valid JSON, not text (a tokenizer
        # fails on it mid-run); only a file with such escapes is walked
        if SURROGATE.search(text):
            _check_surrogates(path, obj)
        return obj
    except RecursionError:  # nested deeper than Python's stack (a damaged file: '[[[[...')
        raise DataError(path, message="invalid JSON: nested too deeply to read") from None
    except ValueError as e:  # (not JSONDecodeError) an integer past Python's 4300-digit limit
        raise DataError(path, message=f"invalid JSON: {str(e).split(':')[0]}") from None


SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_surrogates(path, obj):
    """A DataError naming the record and field of the first string (or key) that is not text."""
    def bad(x):
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return []
            return None
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, v in items:
            where = bad(k)  # (an int or list index: None)
            where = where if where is not None else bad(v)
            if where is not None:
                return [k] + where
        return None
    where = bad(obj)
    if where is None:
        return
    message = "a string holding half of a UTF-16 surrogate pair (a lone \\udXXX escape): not text"
    def name(keys):  # (a key may be the bad string: printed escaped)
        return ".".join(str(k) for k in keys).encode("utf-8", "backslashreplace").decode() or None
    if isinstance(obj, list):
        raise DataError(path, record_label(where[0], obj[where[0]]), name(where[1:]), message)
    raise DataError(path, None, name(where), message)


def json_lines(text):
    """The lines of a JSON lines text: they end at \n, \r\n or \r, as the references' text-mode
    `for line in open(f)` reads them (no JSON string holds a raw CR), not at U+2028, U+2029 or
    U+0085, which may stand in a string as they are."""
    return re.split(r"\r\n?|\n", text)


def _parse_json(path, text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        whole = e
    # (a file of old Mac line ends was 'Extra data')
    lines = json_lines(text)
    try:  # JSON lines if the first non-blank line is a JSON value by itself
        json.loads(next(line for line in lines if line.strip()))
    except json.JSONDecodeError:
        raise DataError(path, message=f"invalid JSON at line {whole.lineno} column {whole.colno}: "
                                      f"{whole.msg}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(path, message=f"line {n}: invalid JSON (JSON lines file): {e.msg} "
                                              f"at column {e.colno}") from None
    return out


def _records_in(value):
    """Whether a value is a list of objects other than turns: records under a wrapper of another
    name (the other VQA-v2 file, {"data": [...]}), not a record's own conversation (LLaVA's turns,
    or chat-template ones, {"role", "content"}: a one-record file of those was refused as "the
    records under 'messages' (give that list itself)")."""
    return isinstance(value, list) and bool(value) and all(isinstance(x, dict) for x in value) \
        and not all({"from", "value"} <= set(x) or {"role", "content"} <= set(x) for x in value)


# a record's own fields, which no published wrapper ({"annotations": [...]}, VQA-v2's files) has:
# an object holding one is a record, whatever lists of objects it holds besides
RECORD_KEYS = {"conversations", "image", "image_id", "question"}


def _records(path, wrapper=None, obj=None):
    """The list of records in a file; `wrapper` names the key of a published {"key": [...]} wrapper.
    obj: the file as load_json parsed it already."""
    obj = load_json(path) if obj is None else obj
    if isinstance(obj, dict) and wrapper in obj:
        obj = obj[wrapper]
    elif isinstance(obj, dict) and (not any(map(_records_in, obj.values()))
                                    or RECORD_KEYS & set(obj)):
        obj = [obj]  # a JSON lines file with a single line (a record: checked as the others)
    if not isinstance(obj, list):
        if wrapper:
            want = f"a JSON list of records or {{'{wrapper}': [...]}}"
        else:
            want = "a JSON list of records (or JSON lines)"
        got = JSON_NAMES.get(type(obj).__name__, 'something else')
        # ({"data": [...]} as some tools export: it was read as one record, "record 0: field
        # 'conversations': missing")
        under = [k for k, v in obj.items() if _records_in(v)] if isinstance(obj, dict) else []
        if under:
            got += f" with the records under {under[0]!r:.40} (give that list itself)"
        raise DataError(path, message=f"expected {want}, got {got}")
    return obj


def pair_format(path):
    """'povid' or 'llava_rlhf': the preference format of a file, by its first record's fields."""
    records = _records(path)
    if not records:
        raise DataError(path, message="no records: expected a non-empty JSON list of preference "
                                      "pairs (or JSON lines)")
    keys = set(records[0]) if isinstance(records[0], dict) else set()
    if {"rejected_conversations", "output_1"} <= keys:  # (POVID's read, output_1 dropped)
        raise DataError(path, 0, None, "holds both 'rejected_conversations' (POVID) and "
                                       "'output_1' (LLaVA-RLHF): keep one pair (for --data, "
                                       "--format picks one)")
    if "rejected_conversations" in keys:
        return "povid"
    if "output_1" in keys:
        return "llava_rlhf"
    raise DataError(path, 0, None, "cannot tell the format: expected 'rejected_conversations' "
                                   "(POVID) or 'output_1'/'output_2'/'preference' (LLaVA-RLHF); "
                                   "or pass --format")


def record_label(i, r):
    for k in ("id", "question_id", "filename"):
        value = r.get(k) if isinstance(r, dict) else None
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return f"{i} (id {r[k]!r:.40})"
    return str(i)


def _each(path, items, fn, on_error):
    """Apply fn to every record; wrap its errors with the file and record. Returns (records,
    skipped)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out, skipped = [], []
    for i, r in enumerate(items):
        try:
            if not isinstance(r, dict):
                raise _bad(None, "expected a JSON object, got "
                                 f"{JSON_NAMES.get(type(r).__name__, type(r).__name__)}")
            v = fn(r)
            if v is not None:  # None: left out on purpose (e.g. another split)
                out.append(v)
        except DataError as e:
            err = DataError(path, record_label(i, r), e.field, e.message)
            if on_error == "raise":
                raise err from None
            skipped.append(str(err))
    return out, skipped


def _ret(out, skipped, on_error):
    return out if on_error == "raise" else (out, skipped)


def _field(r, key):
    if r.get(key) is None:
        raise _bad(key, "missing")
    return r[key]


def _typed(r, key, kind, optional=False, default=None):
    """r[key] checked to be of `kind` (bool is never an int); strings must not be blank."""
    if r.get(key) is None and optional:
        return default
    v, kinds = _field(r, key), kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) or not isinstance(v, kinds):
        names = " or ".join(JSON_NAMES[k.__name__] for k in kinds)
        raise _bad(key, f"expected {names}, got "
                        f"{JSON_NAMES.get(type(v).__name__, type(v).__name__)}")
    if isinstance(v, str) and not v.strip():
        raise _bad(key, "empty")
    return v


# a free text (a question, an answer, a prompt) is put after the image: a tag in it would be a
# second image placeholder with no image (the model refuses the count after loading, far from here)
TAG_IN_TEXT = "'<image>' in a text placed after the image (the image goes in once, first)"


def no_image_tag(text, field):
    """text, unless it holds '<image>' (a DataError for `field` of the record)."""
    if IMAGE in text:
        raise _bad(field, TAG_IN_TEXT)
    return text


def _number(r, key, default=None):
    """r[key] as a finite float (JSON allows NaN and Infinity literals; a loss would not survive
    them)."""
    v = default if r.get(key) is None else r[key]
    if type(v) not in (int, float):
        raise _bad(key, f"expected a number, got {v!r:.40}")
    try:
        f = float(v)
    except OverflowError:  # an integer beyond a float's range (JSON sets no limit)
        raise _bad(key, f"expected a finite number, got an integer of {len(str(v))} digits")
    if not math.isfinite(f):
        raise _bad(key, f"expected a finite number, got {v!r:.40}")
    return f


def _strlist(r, key, optional=False):
    v = _typed(r, key, list, optional, default=[])
    if not all(isinstance(x, str) and x.strip() for x in v):
        raise _bad(key, "expected a list of non-empty strings")
    return [x.strip() for x in v]


def image_path(folder, name, check_images, field="image"):
    """Full path of an image named in a record (relative to folder, or absolute)."""
    path = name if os.path.isabs(name) else os.path.join(folder, name)
    if check_images and not os.path.isfile(path):
        raise _bad(field, f"file not found: {path}{windows_hint(path)}")
    return path


def _image(r, folder, check_images, optional=False):
    if optional and "image" not in r:
        return None  # text-only record
    return image_path(folder, _typed(r, "image", str), check_images)


def _folder(path, image_folder):
    return image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))

# ----------------------------------------------------------------------------------- conversations

def _unwrapped(turns):
    """LLaVA-RLHF's reward data may wrap the turns in one more list."""
    if isinstance(turns, list) and len(turns) == 1 and isinstance(turns[0], list):
        return turns[0]
    return turns


def conversation(turns, has_image, field="conversations", end="gpt"):
    """Validate and normalise LLaVA turns [{"from": "human"|"gpt", "value": str}, ...].

    Starts with human, alternates, ends with gpt when end="gpt" (end=None: either). With an image,
    "<image>" appears at most once, in the first human turn, and is moved to its start the way
    LLaVA's preprocess_multimodal does: ("<image>\\n" + text_without_tag.strip()).strip(). When the
    tag is missing it is added: LLaVA would silently drop the image, our template needs one
    placeholder. A text-only record must not contain "<image>".
    """
    turns = _unwrapped(turns)
    if not isinstance(turns, list) or not turns:
        raise _bad(field, "expected a non-empty list of turns")
    out = []
    for j, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise _bad(field, f"turn {j}: expected an object with 'from' and 'value'")
        if "from" not in t:  # (a chat-template turn, {"role", "content"}, read "'from' is None")
            raise _bad(field, f"turn {j}: no 'from'; expected LLaVA's turns, {{'from': 'human' or "
                              f"'gpt', 'value': text}}, got the keys {sorted(t)!r:.60}")
        role = ROLES.get(t["from"].strip().lower()) if isinstance(t.get("from"), str) else None
        if role is None:
            raise _bad(field, f"turn {j}: 'from' is {t.get('from')!r:.40}, expected 'human' "
                             "or 'gpt'")
        want = "human" if j % 2 else "gpt"
        if role != want:  # (LLaVA silently drops a leading gpt turn; we say so instead)
            raise _bad(field, f"turn {j} is from {role!r}, expected {want!r}")
        value = t.get("value")
        if not isinstance(value, str):
            raise _bad(field, f"turn {j}: 'value' must be a string")
        if not value.replace(IMAGE, "").strip() and not (j == 1 and has_image and IMAGE in value):
            raise _bad(field, f"turn {j}: empty value")
        out.append({"from": role, "value": value})
    n = sum(t["value"].count(IMAGE) for t in out)
    if n and not has_image:
        raise _bad(field, "'<image>' in a record without an 'image'")
    if n > 1:
        raise _bad(field, f"'<image>' appears {n} times, expected once (in the first human turn)")
    if n == 1 and IMAGE not in out[0]["value"]:
        k = next(j for j, t in enumerate(out, 1) if IMAGE in t["value"])
        raise _bad(field, f"'<image>' is in turn {k}, expected it in the first human turn")
    if has_image:
        out[0]["value"] = (IMAGE + "\n" + out[0]["value"].replace(IMAGE, "").strip()).strip()
    if end == "gpt" and out[-1]["from"] != "gpt":
        raise _bad(field, "ends with a 'human' turn, expected a final 'gpt' answer")
    return out


def _prompt(conv):
    # the turns a model answers: everything before a final gpt turn
    return conv[:-1] if conv[-1]["from"] == "gpt" else conv


def _prompt_turns(turns, first_only=False):
    """The turns of a preference or RL record that are read, for conversation() to check: a final
    gpt turn is dropped (LLaVA-RLHF's reward data puts each output in its place, its PPO data a
    "\n"), and with first_only all but the first turn (its PPO keeps conversations[:2]). An empty
    or tagged turn there was refused, though never read."""
    turns = _unwrapped(turns)
    if not isinstance(turns, list) or not turns:
        return turns  # (conversation() says what is wrong)
    if first_only:
        return turns[:1]
    last = turns[-1].get("from") if isinstance(turns[-1], dict) else None
    final_answer = isinstance(last, str) and ROLES.get(last.strip().lower()) == "gpt"
    return turns[:-1] if final_answer and len(turns) > 1 else turns

# -------------------------------------------------------------------------- LLaVA instruct and LRV

def _llava_fn(folder, check_images):
    def fn(r):
        image = _image(r, folder, check_images, optional=True)
        conv = conversation(_field(r, "conversations"), image is not None)
        qtypes = {"qtypes": r["qtypes"]} if "qtypes" in r else {}  # (the Shapes world's; vigc's)
        return {"id": r.get("id"), "image": image, "conversations": conv, **qtypes}
    return fn


def _lrv_fn(folder, check_images):
    def fn(r):
        image_id = str(_typed(r, "image_id", (str, int))).strip()
        q, a = _typed(r, "question", str), _typed(r, "answer", str)
        # Visual Genome <image_id>.jpg
        name = image_id if os.path.splitext(image_id)[1] else image_id + ".jpg"
        image = image_path(folder, name, check_images, "image_id")
        return {"id": f"lrv_{image_id}_{r['_index']}", "image": image,
                "task": r.get("task"), "conversations": [
                    {"from": "human", "value": IMAGE + "\n" + q.replace(IMAGE, "").strip()},
                    {"from": "gpt", "value": no_image_tag(a, "answer").strip()}]}
    return fn


def _indexed(items):
    # LRV records have no id; give each its index so ids are unique and stable
    return [dict(r, _index=i) if isinstance(r, dict) else r for i, r in enumerate(items)]


def read_llava(path, image_folder=None, check_images=True, on_error="raise"):
    """LLaVA instruct: [{"id", "image" (absent for text-only), "conversations": [{"from",
    "value"}]}] -> {"id", "image": path|None, "conversations": [{"from": "human"|"gpt", "value"}]}.
    """
    to_record = _llava_fn(_folder(path, image_folder), check_images)
    out, skipped = _each(path, _records(path), to_record, on_error)
    return _ret(out, skipped, on_error)


def read_lrv(path, image_folder=None, check_images=True, on_error="raise"):
    """LRV-Instruction: {"annotations": [{"image_id": "2392588", "question", "answer", "task"}]}
    (the published filter_cap.json wrapper) or a plain list -> single-turn LLaVA records with "task"
    kept. Images are Visual Genome <image_id>.jpg in image_folder (an id with an extension is used
    as given)."""
    items = _indexed(_records(path, "annotations"))
    out, skipped = _each(path, items, _lrv_fn(_folder(path, image_folder), check_images), on_error)
    return _ret(out, skipped, on_error)


def read_any_conversations(path, image_folder=None, fmt="auto", check_images=True,
                           on_error="raise"):
    """LLaVA instruct or LRV-Instruction (fmt "llava" | "lrv" | "auto": by the first record's
    fields) -> LLaVA instruct records."""
    items = _records(path, "annotations")
    if not items:
        return _ret([], [], on_error)
    if fmt == "auto":
        first = items[0]
        if not isinstance(first, dict) or "conversations" in first:  # (_each names a non-object)
            fmt = "llava"
        elif {"image_id", "question"} <= set(first):
            fmt = "lrv"
        else:
            raise DataError(path, record_label(0, first), "conversations",
                            "missing (expected LLaVA instruct 'conversations', or "
                            "LRV-Instruction 'image_id', 'question', 'answer')")
    if fmt not in ("llava", "lrv"):
        raise ValueError(f"fmt must be 'auto', 'llava' or 'lrv', got {fmt!r}")
    fn = (_llava_fn if fmt == "llava" else _lrv_fn)(_folder(path, image_folder), check_images)
    out, skipped = _each(path, items if fmt == "llava" else _indexed(items), fn, on_error)
    return _ret(out, skipped, on_error)

# -------------------------------------------------------------------------- preference and RL data

def load_caption_map(path):
    """LLaVA-RLHF's image_to_caption.json: {"000000123456.jpg": [captions], "aok_000000123456.jpg":
    [rationales]} (or keyed by the image as a record writes it, as the Shapes world's). Every entry
    is checked, read or not, as the '<image>' one is: a list of non-empty caption strings."""
    obj = load_json(path)
    if not isinstance(obj, dict):
        raise DataError(path, message="expected an object {image file name: [captions]}")
    for k, v in obj.items():
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise DataError(path, repr(k), None, "expected a list of caption strings")
        if not all(x.strip() for x in v):  # (else blamed on the data file's record that reads it)
            raise DataError(path, repr(k), None, "an empty caption")
        if any(IMAGE in x for x in v):  # (the facts go in the prompt, after the image)
            raise DataError(path, repr(k), None, TAG_IN_TEXT)
    return obj


def _captions(r, caption_map, key, need, fix="pass --captions FILE, or --facts false"):
    if r.get("captions") is None and caption_map is not None and key in caption_map:
        r = {"captions": caption_map[key]}
    caps = [no_image_tag(c, "captions") for c in _strlist(r, "captions", optional=True)]
    if need and not caps:
        where = ""
        if caption_map is not None and key is None:  # (keyed by the image: a text-only record)
            where = " (none inline; a record without an image has no key in the captions file)"
        elif caption_map is not None:
            where = f" (none inline, none under {key!r:.80} in the captions file)"
            base = os.path.basename(key)
            if base != key and base in caption_map:  # (reward.py keys as LLaVA-RLHF's RM does)
                where = where[:-1] + (f"; it has {base!r:.80}: key it by the image as the record "
                                      "writes it)")
        message = f"no captions{where}: Fact-RLHF facts need captions; add them, {fix}"
        raise _bad("captions", message)
    return caps


def read_llava_rlhf_preference(path, image_folder=None, check_images=True, on_error="raise",
                               captions_path=None, need_captions=False, image_required=False):
    """LLaVA-RLHF human preference: [{"id", "image", "conversations", "output_1": {"value"},
    "output_2": {"value"}, "preference": 1|2}]. The published conversations end with the gpt turn
    that the outputs replace (a file ending with the human turn is accepted too). preference 1 =
    output_1 is better. Captions (facts) come from an inline "captions" list or from captions_path
    keyed by the record's "image" as written (as LLaVA-RLHF's reward model does). -> {"id", "image",
    "prompt": [turns ending with human], "chosen", "rejected", "captions": [...], "preference": 1|2
    (which output was chosen: a held-out tie counts by it)}. image_required:
    a record without "image" is bad data (text-only otherwise). Two outputs alike are kept: the
    reference trains on them (the stages count them)."""
    folder = _folder(path, image_folder)
    caption_map = load_caption_map(captions_path) if captions_path else None

    def output(r, key):
        o = _typed(r, key, dict)
        if not isinstance(o.get("value"), str) or not o["value"].strip():
            raise _bad(key, "expected {\"value\": non-empty string}")
        return no_image_tag(o["value"].strip(), key)

    def fn(r):
        image = _image(r, folder, check_images, optional=not image_required)
        turns = _prompt_turns(_field(r, "conversations"))
        prompt = _prompt(conversation(turns, image is not None, end=None))
        outs = [output(r, "output_1"), output(r, "output_2")]
        p = _field(r, "preference")
        # (1.0 and 2.0 too, as the reference's {1: 0, 2: 1}[preference] reads them: a column
        # written through pandas with one gap holds floats)
        if type(p) not in (int, float) or p not in (1, 2):
            raise _bad("preference", f"must be the number 1 or 2, got {p!r:.40}")
        p = int(p)
        caps = _captions(r, caption_map, r.get("image"), need_captions)
        return {"id": r.get("id"), "image": image, "prompt": prompt, "chosen": outs[p - 1],
                "rejected": outs[2 - p], "captions": caps, "preference": p}

    out, skipped = _each(path, _records(path), fn, on_error)
    return _ret(out, skipped, on_error)


# (ppo.py reads facts or not from its --reward's checkpoint)
RL_FIX = "pass --captions FILE, or a --reward trained with reward.py --facts false"


def read_rl_prompts(path, image_folder=None, check_images=True, on_error="raise",
                    captions_path=None, need_captions=True, first_turn_only=True):
    """LLaVA-RLHF RL prompts: [{"id", "image", "conversations", "caption_type", "length_bonus"}]
    plus captions inline ("captions": [...]) or from captions_path (image_to_caption.json, keyed by
    the image file name, "aok_" + name for caption_type 2-5, as LLaVA-RLHF's PPO trainer does;
    else by the image as written, as reward.py reads it).
    caption_type defaults to 1 and length_bonus to 1.0 (LLaVA-RLHF's defaults). first_turn_only
    keeps only the first human turn (LLaVA-RLHF keeps conversations[:2] and drops the answer);
    otherwise the prompt is every turn before a final gpt turn. -> {"id", "image", "prompt": [turns
    ending with human], "captions", "caption_type", "length_bonus"}."""
    folder = _folder(path, image_folder)
    caption_map = load_caption_map(captions_path) if captions_path else None

    def fn(r):
        image = _image(r, folder, check_images)
        conv = conversation(_prompt_turns(_field(r, "conversations"), first_turn_only), True,
                            end=None)
        ct = 1 if r.get("caption_type") is None else r["caption_type"]  # null = absent
        if type(ct) is not int or not 1 <= ct <= 7:
            raise _bad("caption_type", "must be an integer 1-7 (1 general, 2-5 answer A-D, 6 "
                                       f"answer No, 7 answer Yes), got {ct!r:.40}")
        lb = _number(r, "length_bonus", 1.0)
        prefix = "aok_" if 2 <= ct <= 5 else ""
        key = prefix + os.path.basename(r["image"])
        if caption_map is not None and key not in caption_map:  # (a map keyed by the image as
            # written: reward.py reads it so, and the world's is keyed so)
            key = prefix + r["image"] if prefix + r["image"] in caption_map else key
        prompt = conv[:1] if first_turn_only else _prompt(conv)
        return {"id": r.get("id"), "image": image, "prompt": prompt,
                "captions": _captions(r, caption_map, key, need_captions, RL_FIX),
                "caption_type": ct,
                "length_bonus": float(lb)}

    out, skipped = _each(path, _records(path), fn, on_error)
    return _ret(out, skipped, on_error)


def read_povid(path, image_folder=None, check_images=True, on_error="raise", image_required=False):
    """POVID preference: [{"id", "image", "conversations", "rejected_conversations"}], both ending
    with the gpt answer and sharing the turns before it (POVID's train_dpo.py builds the prompt from
    the first human turn of "conversations"). -> {"id", "image", "prompt", "chosen", "rejected"}.
    image_required: a record without "image" is bad data (text-only otherwise). A chosen equal to
    its rejected is kept, as POVID keeps it (dpo.py drops and counts it)."""
    folder = _folder(path, image_folder)

    def fn(r):
        image = _image(r, folder, check_images, optional=not image_required)
        conv = conversation(_field(r, "conversations"), image is not None)
        rej = conversation(_field(r, "rejected_conversations"), image is not None,
                           "rejected_conversations")
        if conv[:-1] != rej[:-1]:
            raise _bad("rejected_conversations", "prompt turns differ from 'conversations'")
        chosen, rejected = conv[-1]["value"].strip(), rej[-1]["value"].strip()
        return {"id": r.get("id"), "image": image, "prompt": conv[:-1], "chosen": chosen,
                "rejected": rejected}

    out, skipped = _each(path, _records(path), fn, on_error)
    return _ret(out, skipped, on_error)

# -------------------------------------------------------------------------------------- benchmarks

def read_pope(path, image_folder=None, check_images=True, on_error="raise"):
    """POPE (JSON lines): {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
    "text": "Is there a snowboard in the image?", "label": "yes"} -> the same dict, full image path,
    label lower-cased (must be yes/no); other fields are kept."""
    folder = _folder(path, image_folder)

    def fn(r):
        _typed(r, "question_id", (int, str))
        image, text = _image(r, folder, check_images), _typed(r, "text", str)
        no_image_tag(text, "text")
        label = _typed(r, "label", str).strip().lower()
        if label not in ("yes", "no"):
            raise _bad("label", f"must be 'yes' or 'no', got {r['label']!r:.40}")
        return dict(r, image=image, text=text, label=label)

    out, skipped = _each(path, _records(path), fn, on_error)
    return _ret(out, skipped, on_error)


def read_mmhal(path, image_folder=None, check_images=True, on_error="raise"):
    """MMHal-Bench response_template.json: [{"question_type", "question_topic", "image_id",
    "image_src" (an URL), "image_content": [...], "question", "gt_answer", "model_answer"}] -> the
    same dicts plus "image" = image_folder/<basename of image_src> (default image_folder: "images"
    beside the file, the layout of the published data set). model_answer may be absent or empty (the
    template)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    folder = image_folder if image_folder is not None else beside

    def fn(r):
        for k in ("question_type", "question_topic", "question", "gt_answer"):
            _typed(r, k, str)
        no_image_tag(r["question"], "question")
        _typed(r, "image_id", (str, int))
        content = _strlist(r, "image_content")
        if not isinstance(r.get("model_answer") or "", str):
            raise _bad("model_answer", "expected a string")
        src = _typed(r, "image_src", str)
        image = image_path(folder, src.rstrip("/").split("/")[-1], check_images, "image_src")
        return dict(r, image=image, image_content=content, model_answer=r.get("model_answer") or "")

    out, skipped = _each(path, _records(path), fn, on_error)
    return _ret(out, skipped, on_error)


def read_llava_bench(path, image_folder=None, check_images=True, on_error="raise"):
    """LLaVA-Bench (COCO) questions, JSON lines in either published layout -> {"question_id" (an
    integer or string, as published), "image" (full path), "text", "category", "reference"
    (GPT-4's answer, or None)}: qa90_questions.jsonl {"question_id", "image", "text", "category"}
    (LLaVA's and LLaVA-RLHF's Eval/llava; the reference answers are another file,
    qa90_gpt4_answer.jsonl), or the first
    release's coco2014_val_gpt4_qa_30x3.jsonl {"id" (the image's), "image", "instruction",
    "output" (the reference), "type"}, whose questions have no id of their own: a question's id is
    its line number there."""
    folder = _folder(path, image_folder)
    items = _records(path)
    first = items[0] if items and isinstance(items[0], dict) else {}
    first_release = "instruction" in first and "text" not in first

    def fn(r):
        image = _image(r, folder, check_images)
        if first_release:
            text, category = _typed(r, "instruction", str), _typed(r, "type", str)
            qid, reference = r["_index"], _typed(r, "output", str)
        else:
            text, category = _typed(r, "text", str), _typed(r, "category", str)
            qid, reference = _typed(r, "question_id", (int, str)), None
        no_image_tag(text, "instruction" if first_release else "text")
        # (as published: model_vqa.py asks the text as it is, the judge reads the answer so)
        return {"question_id": qid, "image": image, "text": text, "category": category,
                "reference": reference}

    out, skipped = _each(path, _indexed(items) if first_release else items, fn, on_error)
    return _ret(out, skipped, on_error)


# a questions file where answers were asked for (its questions would be read as the answers)
QUESTIONS_NOT_ANSWERS = ("a question file's field: answer files ({\"question_id\", \"text\", ...}) "
                         "have none; pass the answers")


def read_llava_bench_answers(path):
    """Reference answers of LLaVA-Bench (qa90_gpt4_answer.jsonl, JSON lines {"question_id",
    "text", ...}) -> {question_id as a string: text}."""
    out = {}

    def fn(r):
        qid = str(_typed(r, "question_id", (int, str)))
        if "image" in r:  # (the questions file: the judge would read the question as reference)
            raise _bad("image", QUESTIONS_NOT_ANSWERS)
        if qid in out:  # (the last one would win without a word)
            raise _bad("question_id", "given twice")
        out[qid] = _typed(r, "text", str)

    _each(path, _records(path), fn, "raise")
    return out


def read_llava_bench_context(path, whole=False):
    """What LLaVA-Bench's judge knows of each image -> ({image file name: the context text}, wild),
    in either published layout, told apart by its fields: COCO's caps_boxes_coco2014_val_80.jsonl
    (JSON lines {"image", "captions": [..], "instances": [{"category", "bbox"}]}: captions one per
    line, a blank line, then a 'category: bbox' line per instance, as eval_gpt_review_visual.py
    writes it), or In-the-Wild's context.jsonl ({"id", "image", "caption"}, no record with
    'captions'; wild True): '\n'.join(caption) as eval_gpt_review_bench.py writes it, which puts
    a published caption (a string) one character a line, as LLaVA's judge read it; whole: a
    string caption as it is (lmms-eval's llava-in-the-wild task sends it so)."""
    out, items = {}, _records(path)
    wild = any(isinstance(r, dict) and "caption" in r for r in items) and \
        not any(isinstance(r, dict) and "captions" in r for r in items)

    def fn(r):
        name = os.path.basename(_typed(r, "image", str))
        if wild:
            caption = _typed(r, "caption", (str, list))
            if isinstance(caption, list):
                _strlist(r, "caption")  # (a string in each place: join() takes nothing else)
            text = caption if whole and isinstance(caption, str) else "\n".join(caption)
        else:
            if "caption" in r and "captions" not in r:  # (one layout per file: told by fields)
                raise _bad("captions", "missing: this record has In-the-Wild's 'caption', others "
                                       "COCO's 'captions' (one layout per file)")
            _strlist(r, "captions")  # (checked; written as they are, as the reference writes them)
            boxes = []
            for k, x in enumerate(_typed(r, "instances", list)):
                ok = isinstance(x, dict) and isinstance(x.get("category"), str)
                if not ok or not isinstance(x.get("bbox"), list):
                    raise _bad(f"instances.{k}", "expected {\"category\": string, \"bbox\": [..]}")
                boxes.append(f"{x['category']}: {x['bbox']}")  # (Python's list repr, as LLaVA's)
            text = "\n".join(r["captions"]) + "\n\n" + "\n".join(boxes)
        if name in out:
            raise _bad("image", f"{name} given twice")
        out[name] = text

    _each(path, items, fn, "raise")
    return out, wild

# --------------------------------------------------------------------------- LLaVA-SFT+ converters

def _written_image(folder, name, check_images, field):
    """A converter's record's image: absolute, so a file written from the records reads it from
    anywhere, --image_folder given or not (a relative folder was joined again with the one the
    file was read with: coco2017/coco2017/...); folder "": the name alone, as LLaVA's files hold
    it (relative to the --image_folder the file is read with; not checked)."""
    if folder == "":
        return name
    return os.path.abspath(image_path(folder, name, check_images, field))


def _sentence(s):
    s = s.strip()
    s = s[:1].upper() + s[1:]
    return s if s.endswith((".", "!", "?")) else s + "."


def vqav2_to_conversations(questions_path, annotations_path, image_folder, image_pattern=None,
                           yes_no_only=True, max_rounds=None, check_images=True, on_error="raise"):
    """VQA-v2 {"questions": [{"image_id", "question", "question_id"}]} + {"annotations":
    [{"question_id", "image_id", "answer_type", "multiple_choice_answer", "answers"}]} -> one
    multi-round LLaVA record per image (questions in file order, at most max_rounds; None = all),
    answers "Yes." / "No." (other answers: the multiple_choice_answer capitalised, with a full
    stop). caption_type is 7/6 when the first answer is Yes/No, else 1 (LLaVA-RLHF's PPO uses the
    first round only). image_pattern None: COCO's name for the questions file's data_subtype
    (COCO_val2014_... for the val file; train2014 where it names none)."""
    if max_rounds is not None and max_rounds < 1:  # (it was an IndexError on an empty group)
        raise ValueError(f"max_rounds {max_rounds}: at least 1, or None for all")
    questions = load_json(questions_path)
    if image_pattern is None:
        subtype = questions.get("data_subtype") if isinstance(questions, dict) else None
        subtype = subtype if isinstance(subtype, str) and subtype.strip() else "train2014"
        image_pattern = f"COCO_{subtype.strip()}_{{image_id:012d}}.jpg"

    def ann_fn(a):
        return (_typed(a, "question_id", int), _typed(a, "answer_type", str),
                _typed(a, "multiple_choice_answer", str).strip())
    annotations = _records(annotations_path, "annotations")
    anns, skipped = _each(annotations_path, annotations, ann_fn, on_error)
    by_qid = {qid: (atype, ans) for qid, atype, ans in anns}

    def q_fn(q):
        qid, image_id = _typed(q, "question_id", int), _typed(q, "image_id", int)
        text = _typed(q, "question", str).strip()
        if qid not in by_qid:
            raise _bad("question_id", f"no annotation in {annotations_path}")
        name = image_pattern.format(image_id=image_id)
        image = _written_image(image_folder, name, check_images, "image_id")
        return image_id, image, text, by_qid[qid]
    records = _records(questions_path, "questions", questions)
    qs, skipped_q = _each(questions_path, records, q_fn, on_error)

    groups = {}  # image_id -> (image, [(question, answer)]), in first-seen order
    for image_id, image, text, (atype, ans) in qs:
        yes_no = ans.lower() in ("yes", "no")
        if yes_no_only and not (yes_no and atype == "yes/no"):
            continue
        pairs = groups.setdefault(image_id, (image, []))[1]
        if max_rounds is None or len(pairs) < max_rounds:
            pairs.append((text, ans.capitalize() + "." if yes_no else _sentence(ans)))
    out = []
    for image_id, (image, pairs) in groups.items():
        conv = []
        for k, (q, a) in enumerate(pairs):
            question = (IMAGE + "\n" if k == 0 else "") + q
            conv += [{"from": "human", "value": question}, {"from": "gpt", "value": a}]
        first = pairs[0][1]
        out.append({"id": f"vqav2_{image_id}", "image": image, "conversations": conv,
                    "caption_type": {"Yes.": 7, "No.": 6}.get(first, 1)})
    return _ret(out, skipped + skipped_q, on_error)


def aokvqa_to_conversations(path, image_folder, image_pattern="{image_id:012d}.jpg", cot=True,
                            seed=0, check_images=True, on_error="raise"):
    """A-OKVQA [{"question_id", "image_id", "question", "choices", "correct_choice_idx",
    "direct_answers", "rationales"}] -> single-turn LLaVA records. Human: "<image>\\n{question}\\nA.
    {c0}\\nB. {c1}..." (cot=False adds LLaVA-1.5's "Answer with the option's letter from the given
    choices directly."). Answer: cot=True one rationale (seeded pick) + " So the correct option is
    B." (the phrase LLaVA-RLHF's PPO correctness bonus looks for); cot=False just "B". The
    rationales are kept as "captions" (Fact-RLHF facts) and "caption_type" is 2-5 for answer A-D."""
    rng = random.Random(seed)

    def fn(r):
        qid, image_id = _typed(r, "question_id", (str, int)), _typed(r, "image_id", int)
        question, choices = _typed(r, "question", str).strip(), _strlist(r, "choices")
        if not 2 <= len(choices) <= 26:
            raise _bad("choices", f"expected 2 to 26 choices, got {len(choices)}")
        idx = _typed(r, "correct_choice_idx", int)
        if not 0 <= idx < len(choices):
            raise _bad("correct_choice_idx", f"{idx} is out of range for {len(choices)} choices")
        rationales = _strlist(r, "rationales", optional=not cot)
        if cot and not rationales:
            raise _bad("rationales", "empty; cot=True needs a rationale")
        name = image_pattern.format(image_id=image_id)
        image = _written_image(image_folder, name, check_images, "image_id")
        letter = chr(ord("A") + idx)
        options = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
        human = f"{IMAGE}\n{question}\n" + options
        human += "" if cot else "\n" + MC_DIRECT
        if cot:
            answer = f"{_sentence(rng.choice(rationales))} So the correct option is {letter}."
        else:
            answer = letter
        return {"id": f"aokvqa_{qid}", "image": image, "captions": rationales,
                "caption_type": 2 + idx if idx < 4 else 1,
                "conversations": [{"from": "human", "value": human},
                                  {"from": "gpt", "value": answer}]}

    out, skipped = _each(path, _records(path), fn, on_error)
    return _ret(out, skipped, on_error)


def _detok(s):
    # Flickr30k's token file is tokenised ("a man 's hat ."): join punctuation back
    return _sentence(re.sub(r"\s+([.,!?;:]|'s\b|n't\b)", r"\1", s.strip()))


def _flickr_token_file(path):
    """results_20130124.token lines "1000092795.jpg#0<TAB>caption" -> [{"filename", "sentences"}].
    """
    groups = {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        m = re.match(r"^([^#\t]+)#\d+\t(.+)$", line)
        if not m or not m.group(2).strip():
            raise DataError(path, message=f"line {n}: expected 'image.jpg#N<TAB>caption'")
        groups.setdefault(m.group(1).strip(), []).append({"raw": _detok(m.group(2))})
    return [{"filename": k, "sentences": v} for k, v in groups.items()]


def flickr30k_to_conversations(path, image_folder, split="train", seed=0, check_images=True,
                               on_error="raise"):
    """Flickr30k captions -> description records: human "<image>\\n" + a brief-description prompt
    (seeded pick from BRIEF_PROMPTS), gpt = one caption (seeded pick); all captions kept as
    "captions". Accepts the Karpathy split JSON {"images": [{"filename", "sentences": [{"raw"}],
    "split"}]} (records of other splits are left out; split=None keeps all) and the original token
    file."""
    if not os.path.isfile(path):
        raise DataError(path, message="file not found")
    is_json = read_text(path).lstrip().startswith("{")
    items = _records(path, "images") if is_json else _flickr_token_file(path)
    rng = random.Random(seed)

    def fn(r):
        if split is not None and r.get("split", split) != split:
            return None
        name = _typed(r, "filename", str)
        sents = _typed(r, "sentences", list)
        def is_caption(s):
            return isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()
        if not sents or not all(is_caption(s) for s in sents):
            raise _bad("sentences", "expected a non-empty list of {\"raw\": caption}")
        caps = [_sentence(s["raw"]) for s in sents]
        image = _written_image(image_folder, name, check_images, "filename")
        prompt, caption = rng.choice(BRIEF_PROMPTS), rng.choice(caps)
        stem = os.path.splitext(os.path.basename(name))[0]
        return {"id": f"flickr30k_{stem}", "image": image, "captions": caps,
                "conversations": [{"from": "human", "value": f"{IMAGE}\n{prompt}"},
                                  {"from": "gpt", "value": caption}]}

    out, skipped = _each(path, items, fn, on_error)
    return _ret(out, skipped, on_error)
