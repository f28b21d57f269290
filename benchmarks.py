"""Where each benchmark's questions come from: the Shapes world's and the published files'
readers. Each question is {"id", "image", "prompt", "file", + what scoring needs}.

    load_benchmarks: every benchmark's questions (and the flags and judge that go with them), read
        and checked before any model is loaded; --limit taken, ids checked, images found
    pope_questions (POPE's files, LLaVA-1.5's llava_pope_test.jsonl with --pope_labels:
        read_llava_pope_test), chair_questions (COCO instances: coco_chair_questions),
        mmhal_questions, gavie_questions (LRV's evaluation set: lrv_gavie_questions),
        llava_bench_questions: one benchmark's questions, the Shapes world's when no file is given

eval.py asks them and keeps the answers; formats.py and data.py read each public file's records.
"""
import math
import os
import re

import common
import rundir
import shapes
from data import IMAGE, DataError, load_json, read_any_conversations, read_mmhal, read_pope
from formats import (TAG_IN_TEXT, read_llava_bench, read_llava_bench_answers,
                     read_llava_bench_context, record_label, windows_hint)
from judges import (check_judge_url, llava_bench_rule, load_llava_bench_rules,
                    local_judge_config, openai_key)
from metrics import coco_objects, load_synonyms

JUDGED = ("mmhal", "gavie", "llava_bench")
# Shapes: the whole test split (0), GAVIE 60
SHAPES_LIMITS = {"pope": 0, "chair": 0, "mmhal": 0, "gavie": 60}
POPE_SPLITS = ("random", "popular", "adversarial")


# ----------------------------------------------------------------------------------------
# benchmark questions: {"id", "image", "prompt", "file", + what scoring needs}
# ----------------------------------------------------------------------------------------

def shapes_benchmarks(cfg):
    """{benchmark: whether its questions are the Shapes world's (no public file given)}."""
    return {"pope": not cfg.pope_files, "chair": not cfg.chair_instances,
            "mmhal": not cfg.mmhal_file, "gavie": not cfg.gavie_file, "llava_bench": False}


def shapes_world_read(cfg):
    return any(shapes_benchmarks(cfg)[b] for b in cfg.benchmarks)


def load_benchmarks(cfg):
    """All questions, read and checked before any model is loaded (the images of those --limit
    takes: _take)."""
    if cfg.image_folder and not cfg.rescore and not os.path.isdir(cfg.image_folder):
        # (--rescore reads no image: the folder only joins the question files' image paths)
        raise common.ConfigError(f"--image_folder {cfg.image_folder}: no such directory")
    on_shapes = shapes_benchmarks(cfg)
    if all(on_shapes[b] for b in cfg.benchmarks):  # (the world's images are found by the world)
        rundir.refuse_unread(cfg, ["image_folder"], "when every benchmark is the Shapes world's "
                             "(no --pope_files, --chair_instances, --mmhal_file or --gavie_file); "
                             "drop it")
    judged = [b for b in JUDGED if b in cfg.benchmarks]
    if cfg.judge == "oracle" and any(not on_shapes[b] for b in judged):
        raise common.ConfigError("--judge oracle knows only the Shapes world; "
                                 "pass --judge openai or --judge local")
    if judged and cfg.judge == "local" and not cfg.judge_max_tokens:  # (--rescore too: it
        # judges the stored answers without a stored reply)
        raise common.ConfigError("--judge_max_tokens 0 (no limit sent) is for --judge openai; "
                                 "the local judge needs a limit (1 or more)")
    if judged and not cfg.rescore:  # a judge that cannot work, named before every answer is
        # generated (it is made on first use, after them); --rescore reads stored replies
        if cfg.judge == "openai":
            check_judge_url(cfg.judge_url)
        if cfg.judge == "openai" and not openai_key(cfg) and "api.openai.com" in cfg.judge_url:
            raise common.ConfigError("--judge openai: set OPENAI_API_KEY or pass --judge_key")
        if cfg.judge == "local":
            local_judge_config(cfg.judge_model)
    world = None
    if shapes_world_read(cfg):
        # written on first use, else checked as every stage checks it (another seed's world was
        # scored as if it were --world_seed's)
        shapes.ensure_world(cfg.world, seed=cfg.world_seed)
        loaded = shapes.load_world(cfg.world)  # (folder, objects by file, image id by file)
        world = (cfg.world, loaded["by_file"],
                 {img["file_name"]: img["id"] for img in loaded["images"]})
    make = {"pope": pope_questions, "chair": chair_questions, "mmhal": mmhal_questions,
            "gavie": gavie_questions, "llava_bench": llava_bench_questions}
    out = {}
    for b in cfg.benchmarks:
        qs = make[b](cfg, world)
        take = lambda v: _take(v, cfg, b, on_shapes[b])  # noqa: E731
        out[b] = {split: take(v) for split, v in qs.items()} if b == "pope" else take(qs)
    return out


def _take(qs, cfg, bench, on_shapes):
    """The first --limit questions (Shapes: SHAPES_LIMITS by default); ids must be unique."""
    n = cfg.limit or (SHAPES_LIMITS[bench] if on_shapes else 0)
    qs = qs[:n] if n else qs
    seen, counts = {}, {}  # id -> (file, its record number there); file -> questions so far
    for q in qs:
        k = counts[q["file"]] = counts.get(q["file"], -1) + 1  # (a file's questions in its order)
        k = q.get("record", k)  # (a file of several POPE splits: its own numbering)
        q["where"] = f"{k} (id {q['id']!r:.60})"  # (as errors name it, here and when answered)
        # the images of the questions asked alone (--limit 50 needs 50 images, not the
        # benchmark's); --rescore needs none
        if not cfg.rescore and not os.path.isfile(q["image"]):
            raise DataError(q["file"], q["where"], q.get("image_field", "image"),
                            image_missing(q["image"]))
        if q["id"] in seen:
            file, first = seen[q["id"]]
            where = f"record {first} there" if file == q["file"] else f"{file} record {first}"
            message = f"given twice (first at {where}; answers are stored by id)"
            field = q.get("id_field", "id")
            raise DataError(q["file"], q["where"], field, message)
        seen[q["id"]] = (q["file"], k)
    return qs


def _shapes_question(r, path, world, **extra):
    """A question from a Shapes test file (LLaVA layout), with the image's objects from the
    annotation."""
    prompt = r["conversations"][0]["value"].replace(IMAGE, "").strip()
    return {"id": r["id"], "image": r["image"], "file": path, "prompt": prompt,
            "objects": world[1][os.path.relpath(r["image"], world[0])], **extra}


def pope_questions(cfg, world):
    """{split: questions}; the split comes from a 'category' field (LLaVA-1.5's
    llava_pope_test.jsonl) or from the file name (coco_pope_adversarial.jsonl). A question file
    without labels takes them from --pope_labels. --rescore needs no images."""
    files = cfg.pope_files or [os.path.join(world[0], f"pope_{s}.jsonl") for s in POPE_SPLITS]
    splits, named_by = {}, {}  # named_by: split -> the file whose name gave it
    labelled = 0  # files labelled from --pope_labels
    for path in files:
        folder = (cfg.image_folder or None) if cfg.pope_files else world[0]
        first = load_json(path)
        first = first[0] if isinstance(first, list) and first else first
        if cfg.pope_labels and isinstance(first, dict) and "label" not in first:
            recs = read_llava_pope_test(path, cfg.pope_labels, folder, check_images=False)
            labelled += 1
        elif isinstance(first, dict) and "label" not in first and "question_id" in first:
            message = ("missing: questions without labels (LLaVA's llava_pope_test.jsonl) are "
                       "scored with --pope_labels naming POPE's labelled files")
            if "answer" in first:  # (a file of another layout: --pope_labels was no help)
                message = ("missing, and the records have 'answer': POPE's files (RUCAIBox/POPE's "
                           "output, LLaVA's and LLaVA-RLHF's copies) hold the truth as 'label', "
                           "'yes' or 'no': rename the field")
            raise DataError(path, record_label(0, first), "label", message)
        else:
            recs = read_pope(path, folder, check_images=False)  # (_take: the questions asked)
        _nonempty(recs, path)
        suffix = cfg.pope_suffix.replace("\\n", "\n")
        # LLaVA-1.5's llava_pope_test.jsonl carries the suffix in its text already: not twice
        carried = sum(bool(suffix) and r["text"].endswith(suffix) for r in recs)
        if carried:
            print(f"note: --pope_suffix: {carried} of the {len(recs)} questions of {path} end "
                  "with it already; it is not added to them again")
        for i, r in enumerate(recs):
            split = r.get("category")
            if split in (None, ""):
                split = _split_of(path)
                # (compare.md, which names the splits, failed once every answer was made; checked
                # on a file's first record without a category, not on each)
                if split not in named_by and not common.is_utf8(split):
                    raise common.ConfigError(f"--pope_files {path!r}: its name, which names the "
                                             "split, is not UTF-8: rename it")
                other = named_by.setdefault(split, path)
                if other != path:  # (merged, then --limit cut the second file away unasked)
                    raise common.ConfigError(f"--pope_files: {other} and {path} are both the "
                                             f"'{split}' split (by their names); POPE scores one "
                                             "file per split: evaluate them in separate runs")
            elif not (isinstance(split, str) and re.fullmatch(r"[A-Za-z0-9_-]+", split)):
                message = ("expected a split name (letters, digits, '_', '-'; LLaVA's: random, "
                           f"popular, adversarial), got {split!r:.40}")  # (a file name part)
                raise DataError(path, record_label(i, r), "category", message)
            question = {"id": str(r["question_id"]), "image": r["image"], "file": path,
                        "label": r["label"],
                        "prompt": r["text"] + ("" if r["text"].endswith(suffix) else suffix),
                        "question_id": r["question_id"], "text": r["text"], "record": i,
                        "id_field": "question_id"}
            splits.setdefault(split, []).append(question)
    if cfg.pope_labels and not labelled:  # (it would be ignored without a word)
        raise common.ConfigError("--pope_labels: not read (every --pope_files file carries its "
                                 "own labels); drop it")
    return splits


def _nonempty(recs, path):
    """recs, unless a question file holds none: a benchmark of no question scores nothing (and
    CHAIR would read 0.0, a perfect score)."""
    if not recs:
        raise DataError(path, message="no records: expected a non-empty list of questions")
    return recs


def _split_of(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    return next((s for s in POPE_SPLITS if s in stem), stem)


def read_llava_pope_test(path, label_files, image_folder=None, check_images=True):
    """LLaVA-1.5's llava_pope_test.jsonl ({"question_id", "image", "text", "category"}, no labels),
    each question labelled from its category's file (coco_pope_<category>.json(l)): the k-th
    question of a category takes the k-th label there, the pairing of LLaVA's eval_pope.py. Each
    label record must ask the same thing (same image, its question a prefix of ours), else the files
    do not belong together."""
    labels = {}
    for f in label_files:  # (two files of one split: the last won without a word)
        split = _split_of(f)
        if split in labels:
            raise common.ConfigError(f"--pope_labels: {labels[split][0]} and {f} are both the "
                                     f"'{split}' split (by their names): give one per split")
        labels[split] = (f, read_pope(f, check_images=False))
    recs = load_json(path)
    recs = [recs] if isinstance(recs, dict) else recs  # JSON lines with one line
    if not isinstance(recs, list):
        raise DataError(path, message="expected JSON lines of {question_id, image, text, category}")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    seen, out = {}, []
    for i, r in enumerate(recs):
        where = f"{i} (id {r.get('question_id')!r:.60})" if isinstance(r, dict) else str(i)
        if not isinstance(r, dict):
            raise DataError(path, where, None, "expected a JSON object")
        for key in ("image", "text", "category"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise DataError(path, where, key, "missing or not a non-empty string")
        qid = r.get("question_id")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise DataError(path, where, "question_id", "missing or not an integer or string")
        if IMAGE in r["text"]:
            raise DataError(path, where, "text", TAG_IN_TEXT)
        if r["category"] not in labels:
            message = (f"'{r['category']}' has no label file in --pope_labels "
                       f"(have: {', '.join(labels) or 'none'})")
            raise DataError(path, where, "category", message)
        file, recs_of = labels[r["category"]]
        k = seen[r["category"]] = seen.get(r["category"], -1) + 1
        if k >= len(recs_of):
            message = (f"more '{r['category']}' questions than the {len(recs_of)} "
                       f"labels in {file}")
            raise DataError(path, where, "category", message)
        lab = recs_of[k]
        same_image = os.path.basename(lab["image"]) == os.path.basename(r["image"])
        if not same_image or not r["text"].startswith(lab["text"]):
            message = (f"does not ask what record {k} of {file} asks "
                       f"({lab['text']!r:.60} about {os.path.basename(lab['image'])})")
            raise DataError(path, where, "text", message)
        image = r["image"] if os.path.isabs(r["image"]) else os.path.join(folder, r["image"])
        if check_images and not os.path.isfile(image):
            raise DataError(path, where, "image", f"file not found: {image}{windows_hint(image)}")
        out.append(dict(r, image=image, label=lab["label"]))
    for cat, (file, recs_of) in labels.items():
        if seen.get(cat, -1) + 1 != len(recs_of):
            n_questions = seen.get(cat, -1) + 1
            message = (f"{len(recs_of)} labels but {n_questions} '{cat}' questions "
                       f"in {path} (LLaVA's eval_pope.py pairs them by order)")
            raise DataError(file, message=message)
    return out


def chair_questions(cfg, world):
    if cfg.chair_instances:
        return coco_chair_questions(cfg)
    path = os.path.join(world[0], "test_describe.json")
    recs = _nonempty(read_any_conversations(path, world[0]), path)
    qs = [_shapes_question(r, path, world) for r in recs]  # (an image the annotations lack: one
    # line naming them, from the objects' lookup)
    for q in qs:  # image_id: the annotations' (the instances file a CHAIR script reads), as coco's
        q["image_id"] = world[2][os.path.relpath(q["image"], world[0])]
    return qs


def mmhal_questions(cfg, world):
    """MMHal-Bench records; on Shapes the images are world/images/test and the objects are
    known."""
    path = cfg.mmhal_file or os.path.join(world[0], "mmhal.json")
    if cfg.mmhal_file:
        folder = cfg.image_folder or None
    else:
        folder = os.path.join(world[0], "images", "test")
    recs = _nonempty(read_mmhal(path, folder, check_images=False), path)  # (_take: the asked)
    return [{"id": str(i), "image": r["image"], "file": path, "prompt": r["question"],
             "image_field": "image_src",
             "question_type": r["question_type"],
             "gt": r["gt_answer"], "image_content": r["image_content"],
             "objects": None if cfg.mmhal_file else world[1][r["image_src"]],
             "template": {k: v for k, v in r.items() if k != "image"}}
            for i, r in enumerate(recs)]


def gavie_questions(cfg, world):
    """Shapes: an equal share of each held-out question type (test_<type>.json), boxes from the
    annotation."""
    if cfg.gavie_file:
        return lrv_gavie_questions(cfg)
    n = cfg.limit or SHAPES_LIMITS["gavie"]
    per = math.ceil(n / len(shapes.QUESTION_TYPES))
    by_type = []
    for qt in shapes.QUESTION_TYPES:
        path = os.path.join(world[0], f"test_{qt}.json")
        recs = _nonempty(read_any_conversations(path, world[0]), path)[:per]
        by_type.append([(path, qt, r) for r in recs])
    # the first n taken a type at a time (round robin), then kept in type order: a --limit below
    # the 6 types asks one of each of the first types, not several of the first (it asked 2
    # descriptions, 2 yes/no, 2 counts and 1 colour question for --limit 7)
    rounds = [group[k] for k in range(per) for group in by_type if k < len(group)]
    order = shapes.QUESTION_TYPES.index  # (a stable sort: each type's questions stay in order)
    qs = []
    for path, qt, r in sorted(rounds[:n], key=lambda x: order(x[1])):
        q = _shapes_question(r, path, world, qtype=qt, gt=r["conversations"][1]["value"])
        qs.append(dict(q, boxes=[(shapes.noun_phrase(o), o["bbox"]) for o in q["objects"]]))
    return qs


def llava_bench_questions(cfg, world):
    """LLaVA-Bench questions, each with its reference answer (inline in the 30x3 file, else from
    --llava_bench_answers by question_id) and the judge's context for its image (by file name, or
    by the COCO image id in it: the 30x3 file names COCO_val2014_000000525439.jpg what the context
    file calls 000000525439.jpg). COCO's, or In-the-Wild's when the context file is its
    context.jsonl (the same questions and answers layouts)."""
    path = cfg.llava_bench_file
    recs = _nonempty(read_llava_bench(path, cfg.image_folder or None, check_images=False), path)
    inline = recs[0]["reference"] is not None
    if inline:
        rundir.refuse_unread(cfg, ["llava_bench_answers"], f"with {path}, whose records hold "
                             "their reference answers ('output'); drop it")
    elif not cfg.llava_bench_answers:
        raise common.ConfigError(f"--llava_bench_file {path} holds no reference answers: pass "
                                 "--llava_bench_answers (qa90_gpt4_answer.jsonl)")
    refs = {} if inline else read_llava_bench_answers(cfg.llava_bench_answers)
    whole = cfg.llava_bench_caption == "whole"
    context, wild = read_llava_bench_context(cfg.llava_bench_context, whole)
    if whole and not wild:
        raise common.ConfigError(f"--llava_bench_caption whole: for In-the-Wild's context.jsonl; "
                                 f"{cfg.llava_bench_context} is COCO's (captions and boxes)")
    rules = load_llava_bench_rules(cfg.llava_bench_rule, wild)
    by_number = {}  # the image id in a name (its digits, leading zeros dropped) -> names
    for name in context:
        if coco_number(name) is not None:  # (a name without digits matches only itself)
            by_number.setdefault(coco_number(name), []).append(name)
    qs = []
    for i, r in enumerate(recs):
        where = f"{i} (id {r['question_id']!r:.60})"
        name = os.path.basename(r["image"])
        names = [name] if name in context else by_number.get(coco_number(name), [])
        if len(names) != 1:
            found = f"{len(names)} records ({', '.join(names[:3])}) by its image id" if names \
                else "no record"
            raise DataError(path, where, "image", f"{name} has {found} in "
                            f"{cfg.llava_bench_context} (the judge's context)")
        ctx = context[names[0]]
        ref = r["reference"] if inline else refs.get(str(r["question_id"]))
        if ref is None:
            raise DataError(path, where, "question_id", "has no reference answer in "
                            f"{cfg.llava_bench_answers}")
        # (In-the-Wild: eval_gpt_review_bench.py's rule and review category, which the summary
        # prints: 'llava_bench_' + the question's)
        category = f"llava_bench_{r['category']}" if wild else r["category"]
        rule = llava_bench_rule(rules, category, path, i, cfg.llava_bench_rule)
        qs.append({"id": str(r["question_id"]), "question_id": r["question_id"],
                   "id_field": "question_id",
                   "image": r["image"], "file": path, "prompt": r["text"],
                   "category": category, "reference": ref, "context": ctx, "rule": rule})
    return qs


def coco_number(name):
    """The image id a file name ends in ('COCO_val2014_000000525439.jpg' and '000000525439.jpg':
    '525439'), as digits (a name of 5000 digits is no integer Python converts); None without."""
    m = re.search(r"(\d+)\.\w+$", name)
    return m[1].lstrip("0") or "0" if m else None


def _image_file(folder, name, file, record, field, check=True):
    """folder/name, which must be a file unless not `check` (--rescore needs no images)."""
    path = os.path.join(folder, name)
    if check and not os.path.isfile(path):
        raise DataError(file, record, field, image_missing(path))
    return path


def image_missing(path):
    """Why an image path that is not a file names no image: a folder, or nothing (and where its
    '/' spelling is, for a record written on Windows)."""
    what = "a folder, not an image" if os.path.isdir(path) else "image not found"
    return f"{what}: {path}{windows_hint(path)}"


def coco_chair_questions(cfg):
    if not cfg.chair_synonyms or not (cfg.image_folder or cfg.rescore):
        raise common.ConfigError("--chair_instances needs --chair_synonyms and --image_folder "
                                 "(the COCO images; not with --rescore true)")
    syn = load_synonyms(cfg.chair_synonyms, cfg.chair_counting)
    path = cfg.chair_instances
    ann = load_json(path)
    if not isinstance(ann, dict):
        raise DataError(path, message="not a COCO instances file "
                                      "(expected an object with images, annotations, categories)")
    objects = shapes.objects_from_coco(ann, path)  # {image_id: [{"name", "bbox", ...}]}
    for name in {o["name"] for objs in objects.values() for o in objs}:
        # a category the synonym file lacks stands for itself
        syn.setdefault(name.lower(), name.lower())
    if not ann["images"]:  # (CHAIR of no image would read 0.0, a perfect score)
        raise DataError(path, field="images", message="no images to describe")
    n = cfg.limit or len(ann["images"])
    imgs = ann["images"][:n]
    present = {img["id"]: {syn[o["name"].lower()] for o in objects[img["id"]]} for img in imgs}
    if cfg.chair_captions:  # CHAIR also takes the objects that the reference captions name
        caps = load_json(cfg.chair_captions)
        if not isinstance(caps, dict) or not isinstance(caps.get("annotations"), list):
            raise DataError(cfg.chair_captions, field="annotations", message="expected a COCO "
                            "captions file ({\"annotations\": [{\"image_id\", \"caption\"}]})")
        matched = 0
        for i, c in enumerate(caps["annotations"]):
            iid = c.get("image_id") if isinstance(c, dict) else None
            if not isinstance(iid, (int, str)) or not isinstance(c.get("caption"), str):
                raise DataError(cfg.chair_captions, i, "annotations",
                                "expected {\"image_id\", \"caption\": string}")
            if iid in present:
                present[iid].update(coco_objects(c["caption"], syn, cfg.chair_counting))
                matched += 1
        if not matched:  # (CHAIR would run without the captions' objects, saying nothing)
            message = (f"no caption's image_id is one of the {len(imgs)} images scored from "
                       f"{path} (e.g. {imgs[0]['id']!r:.60}): captions of another split?")
            raise DataError(cfg.chair_captions, field="annotations", message=message)
    return [{"id": str(img["id"]), "image_id": img["id"], "file": path, "prompt": cfg.chair_prompt,
             "record": i, "id_field": "images.id",
             "objects": present[img["id"]], "syn": syn,
             "image": _image_file(cfg.image_folder, img["file_name"], path, i, "images.file_name",
                                  check=not cfg.rescore)}
            for i, img in enumerate(imgs)]


def lrv_gavie_questions(cfg):
    path = cfg.gavie_file
    folder = cfg.image_folder or os.path.dirname(os.path.abspath(cfg.gavie_file))
    items = load_json(path)
    items = [items] if isinstance(items, dict) and "question" in items else items  # (one line)
    boxes = load_json(cfg.gavie_annotations) if cfg.gavie_annotations else None
    if not isinstance(items, list):
        raise DataError(path, message="expected a list of {image_id, question}")
    if boxes is None:  # (the question file was named as what is wrong)
        raise common.ConfigError(f"--gavie_file {path}: needs --gavie_annotations (LRV's "
                                 "{image_id: [{caption, bbox}]}: the facts GAVIE's judge reads)")
    if not isinstance(boxes, dict):
        raise DataError(cfg.gavie_annotations, message="expected --gavie_annotations "
                                                       "{image_id: [{caption, bbox}]}")
    if not items:
        raise DataError(path, message="no records: expected a non-empty list of "
                                      "{image_id, question}")
    qs = []
    for i, r in enumerate(items):
        has_question = isinstance(r, dict) and isinstance(r.get("question"), str)
        if not has_question or not r["question"].strip():
            raise DataError(path, i, "question", "expected {\"image_id\", \"question\"}")
        if not isinstance(r.get("image_id"), (int, str)) or isinstance(r["image_id"], bool):
            # (it was named as the question; a list was looked up as its text)
            raise DataError(path, i, "image_id", "missing or not the image's id (a string, as "
                            "LRV's evaluation_set.json writes it, or an integer)")
        if IMAGE in r["question"]:
            raise DataError(path, i, "question", TAG_IN_TEXT)
        iid = str(r["image_id"])
        if not isinstance(boxes.get(iid), list):
            raise DataError(cfg.gavie_annotations, iid, None, "no annotations for this image_id")
        for j, b in enumerate(boxes[iid]):  # the judge prompt lists them after the answers
            bbox = b.get("bbox", []) if isinstance(b, dict) else None
            numbers = isinstance(bbox, list) and len(bbox) in (0, 4) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in bbox)
            ok = numbers and all(isinstance(b.get(k), (str, type(None)))
                                 for k in ("caption", "name"))
            if not ok:
                raise DataError(cfg.gavie_annotations, f"{iid!r:.60} box {j}", None,
                                "expected {\"caption\": string, \"bbox\": [x, y, w, h]}")
        name = iid if os.path.splitext(iid)[1] else iid + ".jpg"  # Visual Genome <image_id>.jpg
        image_boxes = [(b.get("caption") or b.get("name") or "object", b.get("bbox", []))
                       for b in boxes[iid]]
        qs.append({"id": str(i), "file": path, "prompt": r["question"], "gt": None, "qtype": None,
                   "objects": None,
                   "image": _image_file(folder, name, path, i, "image_id", False),
                   "image_field": "image_id",
                   "boxes": image_boxes})
    return qs
