"""The judged benchmarks: MMHal-Bench, GAVIE and LLaVA-Bench, each as a judge prompt, a parser of
the judge's reply and the benchmark's metrics; and the judges that read the prompts: the exact
oracle (Shapes), any OpenAI-compatible endpoint, and a local causal LM. eval.py generates the
answers, stores the replies (judge_replies) and calls these."""
import datetime
import email.utils
import http.client
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

import common
import oracle
import shapes
from data import DataError, load_json, read_text
from metrics import mean

MMHAL_TYPES = ("attribute", "adversarial", "comparison", "counting",
               "relation", "environment", "holistic", "other")


class JudgeError(Exception):
    """A judge that cannot be reached or loaded (one line, exit 2; answers and replies so far are
    kept)."""


# ----------------------------------------------------------------------------------------
# MMHal-Bench (LLaVA-RLHF, arXiv 2309.14525, MMHal-Bench-eval/eval_gpt4.py): 96 questions of 8
# types; a judge reads the image contents, the question, the standard answer and the response,
# explains, then rates 0-6. GAVIE (LRV-Instruction, arXiv 2306.14565, Evaluation/evaluate.py): a
# judge reads the object annotations (boxes), the instruction and the answer and scores relevancy
# and accuracy 0-10. The templates below follow their structure in our own words.
# ----------------------------------------------------------------------------------------

MMHAL_PROMPT = """You are an impartial and objective judge. Evaluate the response that a Large \
Multimodal Model (LMM) gave to a user's question about an image. Base your evaluation on two \
things: how informative the response is, and whether it contains hallucination. Here, \
hallucination means that the response states something that is neither present in nor implied by \
the image or the conversation: a false claim about an object, its attributes, number or position, \
an action, an emotion, or any other detail the image does not support.

Some examples:

### Example 1:
- Image Contents: Dog, Frisbee, Grass
- Question: How many dogs are in the picture?
- Standard Human-Generated Answer: There is one dog, jumping for a frisbee.
- LMM Response to Evaluate: Two dogs are playing with a frisbee on the grass.
- Analysis: The response claims two dogs where the image has one; that is a false claim.
- Hallucination: Yes.

### Example 2:
- Image Contents: Bicycle, Person, Street
- Question: What is the person doing?
- Standard Human-Generated Answer: A man is riding a bicycle down a city street.
- LMM Response to Evaluate: The person is cycling along a street, perhaps commuting; cycling is a \
healthy way to get around a city.
- Analysis: Every claim about the image is supported; the extra reasoning is general and invents \
nothing about the image.
- Hallucination: No.

### Example 3:
- Image Contents: Building, Sign, Person
- Question: In which city was this photo taken?
- Standard Human-Generated Answer: The sign reads "Welcome to Boston", so the photo was taken in \
Boston.
- LMM Response to Evaluate: It is a city street with a sign, but I cannot tell which city it is.
- Analysis: The response does not fully answer the question, but it makes no false claim. \
Expressing uncertainty, or leaving out details that the standard answer has, is not hallucination.
- Hallucination: No.

With these examples in mind, evaluate whether the response below is informative and whether it \
contains hallucination, by comparing it with the image contents, the question and the standard \
human-generated answer. The standard answer is factual but may be brief and may not mention every \
object or attribute in the image, so be careful before calling a claim false. Detailed analysis or \
reasoning in the response is a good thing as long as it makes no false claim.

First give a short explanation. Then rate the response by choosing exactly one of these options:
- Rating: 6, very informative with good analysis or reasoning, no hallucination
- Rating: 5, very informative, no hallucination
- Rating: 4, somewhat informative, no hallucination
- Rating: 3, not informative, no hallucination
- Rating: 2, very informative, with hallucination
- Rating: 1, somewhat informative, with hallucination
- Rating: 0, not informative, with hallucination

### Image Contents
{contents}

### Question
{question}

### Standard Human-Generated Answer
{gt}

### LMM Response to Evaluate
{answer}
"""

GAVIE_PROMPT = """You are a careful teacher. You cannot see the image, but you are given its \
annotations: each line is an object with its bounding box, the top-left corner (X, Y) and the size \
(Width, Height) in pixels. Strongly overlapping boxes may be the same object.

Objects in the image:
{boxes}

Instruction for the image:
{question}

Answer to grade:
{answer}

Score the answer from 0 to 10 on two criteria:
1. Relevancy: does the answer directly follow the instruction?
2. Accuracy: is the answer correct about the image content (no objects, attributes, numbers or \
positions that the annotations contradict)?

Reply in exactly this format:
Relevancy: <score 0-10>
Accuracy: <score 0-10>
Reason: <one or two sentences>
"""


def mmhal_prompt(q, answer):
    contents = ", ".join(q["image_content"])
    return MMHAL_PROMPT.format(contents=contents, question=q["prompt"], gt=q["gt"], answer=answer)


def gavie_prompt(q, answer):
    return GAVIE_PROMPT.format(boxes=gavie_boxes(q), question=q["prompt"], answer=answer)


def gavie_boxes(q):
    # (LRV's script writes Width again as Height; we write the height)
    lines = [f"{name} X:{b[0]} Y:{b[1]} Width:{b[2]} Height:{b[3]}" if len(b) == 4 else name
             for name, b in q["boxes"]]
    return "\n".join(lines)


# --judge_prompt: a user's copy of the official prompt (MMHal-Bench's eval_gpt_mmhal.py `template`,
# LRV's Evaluation/evaluate.py lines) with named placeholders; only these are filled, every other
# brace stays.
PLACEHOLDERS = {"mmhal": ("image_content", "question", "gt_answer", "answer"),
                "gavie": ("boxes", "question", "answer")}


def load_judge_prompts(entries):
    """{'mmhal' | 'gavie': template text} from --judge_prompt BENCH=FILE entries; each template must
    hold {question} and {answer} and no placeholder of the other benchmark."""
    out = {}
    for entry in entries:
        bench, sep, path = str(entry).partition("=")
        if not sep or bench not in PLACEHOLDERS or not path:
            raise common.ConfigError(f"--judge_prompt {entry}: expected mmhal=FILE or gavie=FILE")
        if bench in out:  # (the first was passed over without a word)
            raise common.ConfigError(f"--judge_prompt: {bench}= given twice; one file each")
        if not os.path.isfile(path):
            raise DataError(path, message="file not found (--judge_prompt)")
        text = read_text(path)
        known = {n for names in PLACEHOLDERS.values() for n in names}
        used = set(re.findall(r"\{(\w+)\}", text)) & known
        missing = [n for n in ("question", "answer") if n not in used]
        foreign = sorted(used - set(PLACEHOLDERS[bench]))
        if missing or foreign:
            allowed = ", ".join("{" + n + "}" for n in PLACEHOLDERS[bench])
            lacking = "; missing " + ", ".join(missing) if missing else ""
            not_ours = "; not for " + bench + ": " + ", ".join(foreign) if foreign else ""
            message = (f"a {bench} judge prompt needs {{question}} and {{answer}} and may hold "
                       f"{allowed}{lacking}{not_ours}")
            raise DataError(path, message=message)
        out[bench] = text
    return out


def fill_judge_prompt(template, bench, q, answer):
    """The template with its named placeholders filled from the record (MMHal: image contents
    joined with ', ' as eval_gpt_mmhal.py joins them; GAVIE: one box per line)."""
    values = {"question": q["prompt"], "answer": answer}
    if bench == "mmhal":
        values.update(image_content=", ".join(q["image_content"]), gt_answer=q["gt"])
    else:
        values.update(boxes=gavie_boxes(q))
    placeholder = r"\{(" + "|".join(PLACEHOLDERS[bench]) + r")\}"
    return re.sub(placeholder, lambda m: values[m.group(1)], template)


def judge_prompt(bench, q, answer, templates):
    if bench == "llava_bench":
        return llava_bench_prompt(q, answer)
    if bench in templates:
        return fill_judge_prompt(templates[bench], bench, q, answer)
    return (mmhal_prompt if bench == "mmhal" else gavie_prompt)(q, answer)


def parse_rating(reply, rule="reference"):
    """The one rating 0-6 a judge reply gives, or None when it gives none or several different
    ones. reference (eval_gpt_mmhal.py): the k in 0..6 for which the text 'rating: k' occurs in the
    lower-cased reply ('Rating:5' is none, 'Rating: 60' reads as 6). ours: 'rating:' then any spaces
    and one digit 0-6 not followed by another digit. Either way the same value repeated counts
    once."""
    text = str(reply).lower()
    if rule == "reference":
        found = {k for k in range(7) if f"rating: {k}" in text}
    else:
        found = {int(k) for k in re.findall(r"rating:\s*([0-6])(?!\d)", text)}
    return found.pop() if len(found) == 1 else None


def parse_gavie(reply):
    """{'relevancy': x, 'accuracy': y} from 'Relevancy: x' and 'Accuracy: y' (the format our prompt
    asks for), or from LRV's official output formats ('Relevancy:\\nscore of the answer1: x\\n
    reason: ...', as evaluate.py asks; 'score of answer1: x', as prompts/GAVIE.txt asks); each
    exactly one value in 0-10, else None. Markdown emphasis ('**Relevancy**: 8'), a full-width
    colon, and 'Relevancy score: 8' at a line's start are read alike; where both labels start a
    line, a section runs from one to the other (its reason may say 'accuracy:')."""
    text, out = str(reply).lower().replace("*", "").replace("\uff1a", ":"), {}
    line = r"^[ \t#]*"
    starts = r"(?:relevancy|accuracy)\s*:"
    lined = len(re.findall(rf"{line}{starts}", text, re.M)) >= 2
    for key in ("relevancy", "accuracy"):
        label = rf"\b{key}\s*:"
        scored = rf"{line}{key}\s+score\s*:"  # (at a line's start: 'overall accuracy score: 7' is
        # a sentence)
        # (a number ends there: '1e3' or '1.5.2' is no score, not a 1)
        number = r"\s*(\d+(?:\.\d+)?)(?!\d|\.\d|e[+-]?\d)"
        anywhere = {float(v) for v in re.findall(rf"(?:{label}|{scored}){number}", text, re.M)}
        # where both labels start a line, a score there comes first, then LRV's 'score of the
        # answer1' in the section, then one anywhere (a reason's 'accuracy: 3 items' overrode the
        # section's own score; scores given on one line before a line of reasons each are read)
        found = {float(v) for v in re.findall(rf"(?:{line}{label}|{scored}){number}", text,
                                              re.M)} if lined else anywhere
        section = lined and re.search(rf"{line}{label}(.*?)(?={line}{starts}|\Z)", text,
                                      re.S | re.M)
        section = section or re.search(rf"{label}(.*?)(?=\b{starts}|\Z)", text, re.S)
        if not found and section:
            answer1 = r"score of (?:the )?answer\s*1\s*:" + number
            found = {float(v) for v in re.findall(answer1, section.group(1))}
        found = found or anywhere
        if len(found) != 1 or not 0 <= min(found) <= 10:
            return None
        out[key] = found.pop()
    return out


def mmhal_metrics(qs, replies, rule="reference"):
    """score = mean rating; hallucination rate = share rated < 3; per-type means (as
    eval_gpt_mmhal.py). A reply without exactly one rating (`unparsed`) scores 0 and so counts as a
    hallucination, as the reference scores it (rule 'reference'); with rule 'ours' it is left out of
    every mean and counted (a judge's format slip is not the model's hallucination;
    `score_unparsed_as_0` gives the other view)."""
    parsed = {q["id"]: parse_rating(replies[q["id"]], rule) for q in qs if q["id"] in replies}
    bad = [i for i, k in parsed.items() if k is None]
    as_0 = {i: 0 if k is None else k for i, k in parsed.items()}
    ratings = as_0 if rule == "reference" else {i: k for i, k in parsed.items() if k is not None}
    vals = list(ratings.values())
    types = list(MMHAL_TYPES) + sorted({q["question_type"] for q in qs} - set(MMHAL_TYPES))
    per_type = {t: mean([ratings[q["id"]] for q in qs
                         if q["question_type"] == t and q["id"] in ratings])
                for t in types}
    return {"score": mean(vals), "hallucination_rate": mean([float(v < 3) for v in vals]),
            "per_type": {t: v for t, v in per_type.items() if v is not None}, "n": len(vals),
            "unparsed": len(bad), "unparsed_ids": bad[:20],
            "score_unparsed_as_0": mean(list(as_0.values()))}


def gavie_metrics(qs, replies):
    parsed = {q["id"]: parse_gavie(replies[q["id"]]) for q in qs if q["id"] in replies}
    bad = [i for i, s in parsed.items() if s is None]
    scores = [s for s in parsed.values() if s is not None]
    return {"accuracy": mean([s["accuracy"] for s in scores]),
            "relevancy": mean([s["relevancy"] for s in scores]),
            "n": len(scores), "unparsed": len(bad), "unparsed_ids": bad[:20]}


# ----------------------------------------------------------------------------------------
# LLaVA-Bench (COCO; LLaVA, arXiv 2304.08485, and LLaVA-RLHF beside MMHal-Bench): a text-only
# judge reads the image's captions and boxes, the question, a reference answer (GPT-4's, as
# Assistant 1) and the model's (Assistant 2), and gives each 1-10 on its first line; the score is
# the model's mean relative to the reference's, per category (conv, detail, complex) and over all.
# The layout and the judge call are eval_gpt_review_visual.py's (its --max-tokens: 1024); the
# default rule is ours, in our own words; --llava_bench_rule takes LLaVA's table/rule.json.
# ----------------------------------------------------------------------------------------

# the system line and temperature of LLaVA's judge call (eval_gpt_review_visual.py)
LLAVA_BENCH_SYSTEM = ("You are a helpful and precise assistant for checking the quality of the "
                      "answer.")
LLAVA_BENCH_TEMPERATURE = 0.2


def system_line(bench):
    """The system line a judge reads beside the prompt: LLaVA-Bench's, else none."""
    return LLAVA_BENCH_SYSTEM if bench == "llava_bench" else ""
LLAVA_BENCH_RULE = {"role": "Assistant", "prompt": (
    "Two AI assistants answered the user's question above about an image. You cannot see the "
    "image: the context describes it in a few sentences and lists its objects with their "
    "bounding boxes. Rate each answer's helpfulness, relevance, accuracy and level of detail "
    "with one overall score from 1 to 10, higher being better.\nOn the first line write only the "
    "two scores, Assistant 1's and then Assistant 2's, separated by one space. From the next line "
    "on, explain the scores without bias: neither the order of the answers nor their length may "
    "sway you.")}


# In-the-Wild's judge knows a few sentences, no boxes
LLAVA_BENCH_WILD_RULE = {"role": "Assistant", "prompt": LLAVA_BENCH_RULE["prompt"].replace(
    "in a few sentences and lists its objects with their bounding boxes", "in a few sentences")}


def load_llava_bench_rules(path, wild=False):
    """{category: {"role", "prompt"}} from LLaVA's rule.json, read as eval_gpt_review_visual.py
    reads it: the entry named by the question's category (conv, detail, complex: the words for
    captions and boxes; its llava_bench_* entries are the in-the-wild benchmark's, which
    eval_gpt_review_bench.py reads, and its coding, math and default ones text-only reviews');
    no file: {None: our rule}, for every category (In-the-Wild's without boxes)."""
    if not path:
        return {None: LLAVA_BENCH_WILD_RULE if wild else LLAVA_BENCH_RULE}
    rules = load_json(path)
    if not isinstance(rules, dict):
        raise DataError(path, message="expected LLaVA's rule.json: {name: {\"role\", \"prompt\"}}")
    return rules


def llava_bench_rule(rules, category, path, i, rule_file):
    """The rule for a question's category, checked where it is used (one line naming it)."""
    rule = rules.get(category, rules.get(None))
    if rule is None:  # (eval_gpt_review_visual.py stops at it)
        raise DataError(rule_file, f"{category!r:.60}", None,
                        f"no rule for the category {category!r:.60} of {path} record {i}")
    texts = isinstance(rule, dict) and all(isinstance(rule.get(k), str) for k in ("role", "prompt"))
    if not texts:
        raise DataError(rule_file, f"{category!r:.60}", None, "expected {\"role\": string, "
                                                         "\"prompt\": string}")
    return {"role": rule["role"], "prompt": rule["prompt"]}


def llava_bench_prompt(q, answer):
    """What eval_gpt_review_visual.py sends: context, question, the two answers, the rule."""
    role, rule = q["rule"]["role"], q["rule"]["prompt"]
    return (f"[Context]\n{q['context']}\n\n[Question]\n{q['prompt']}\n\n"
            f"[{role} 1]\n{q['reference']}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule}\n\n")


def parse_llava_bench(reply):
    """(reference's score, model's) read as eval_gpt_review_visual.py's parse_score reads a reply:
    its first line, commas made spaces, split at single spaces into exactly two numbers; else None
    (a value that is not finite too: the reference would average a NaN in)."""
    parts = str(reply).split("\n")[0].replace(",", " ").split(" ")
    try:
        pair = tuple(float(x) for x in parts) if len(parts) == 2 else None
    except ValueError:
        return None
    return pair if pair and all(math.isfinite(x) for x in pair) else None


def llava_bench_metrics(qs, replies):
    """Per category and over all (summarize_gpt_review.py): the mean of each score, a reply
    without a pair counted as (-1, -1) as the reference counts it; relative = model / reference x
    100 from the means rounded to 3 places, then to 1, as it prints them (scores x 10)."""
    parsed = {q["id"]: parse_llava_bench(replies[q["id"]]) for q in qs if q["id"] in replies}
    bad = [i for i, p in parsed.items() if p is None]
    pairs = {i: p or (-1.0, -1.0) for i, p in parsed.items()}
    per_category = {}
    for q in qs:
        if q["id"] in pairs:
            per_category.setdefault(q["category"], []).append(pairs[q["id"]])

    def summary(group):
        ref, model = (round(mean([p[k] for p in group]), 3) for k in (0, 1))
        # (a reference mean <= 0: only unparsed replies weigh, -1 each; the reference prints
        # 100.0 for those alone, a ratio of negatives, or divides by 0)
        relative = round(model / ref * 100, 1) if ref > 0 else None
        return {"relative": relative, "reference": round(ref * 10, 1),
                "model": round(model * 10, 1), "n": len(group)}

    overall = summary(list(pairs.values())) if pairs else {"relative": None, "n": 0}
    return {**overall, "per_category": {c: summary(g) for c, g in per_category.items()},
            "unparsed": len(bad), "unparsed_ids": bad[:20]}


# ----------------------------------------------------------------------------------------
# judges: judge(prompt, record) -> reply text
# ----------------------------------------------------------------------------------------

POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top",
                  "bottom": "bottom", "lower": "bottom", "center": "center", "centre": "center",
                  "middle": "center", "above": "above", "below": "below"}


def facts(text):
    """The checkable words of a Shapes answer: shapes (canonical), colors, sizes, numbers,
    positions."""
    out = set()
    for w in re.findall(r"[a-z]+|\d+", str(text).lower()):
        v = (oracle.WORD2SHAPE.get(w)
             or (w if w in oracle.COLORS else None)
             or oracle.SIZE_WORDS.get(w)
             or (str(oracle.NUMS[w]) if w in oracle.NUMS else None)
             or POSITION_WORDS.get(w))
        if v:
            out.add(v)
    return out


def yes_no(text):
    m = re.match(r"\W*(yes|no)\b", str(text).lower())
    return m.group(1) if m else None


def _errors(answer, q):
    """oracle.oracle's hallucinations, plus one for a yes/no verdict opposite to the ground
    truth's."""
    r = oracle.oracle(answer, q["objects"])
    errs = common.oracle_errors(r)
    if q.get("gt") and yes_no(q["gt"]) and yes_no(answer) and yes_no(answer) != yes_no(q["gt"]):
        errs.append(f"answered {yes_no(answer)}")
    return r, errs


def oracle_mmhal(q, answer):
    """Deterministic MMHal rubric. hallucination: oracle.oracle finds a false claim, or the yes/no
    verdict is opposite to the standard answer's. informative: the share of the standard answer's
    facts (shape, color, size, number, position words; its yes/no) that the answer states: all =
    very, some = somewhat, none = not. 6 = very informative, no hallucination, and it correctly
    names more shapes than the standard answer (extra correct detail)."""
    r, errs = _errors(answer, q)
    want = facts(q["gt"]) | ({yes_no(q["gt"])} - {None})
    got = facts(answer) | ({yes_no(answer)} - {None})
    cover = len(want & got) / len(want) if want else float(bool(got))
    level = "very" if cover >= 1 else "somewhat" if cover > 0 else "not"
    extra = r["num_mentions"] > oracle.oracle(q["gt"], q["objects"])["num_mentions"]
    if errs:
        scale = {"very": 2, "somewhat": 1, "not": 0}
    else:
        scale = {"very": 6 if extra else 5, "somewhat": 4, "not": 3}
    rating = scale[level]
    listed = " (" + "; ".join(errs) + ")" if errs else ""
    return (f"Analysis: {len(errs)} hallucination(s){listed}; "
            f"states {len(want & got)} of {len(want)} facts of the standard answer "
            f"({level} informative).\nRating: {rating}")


def oracle_gavie(q, answer):
    """Deterministic GAVIE rubric. accuracy = 10 - 3 per hallucination (not below 0), and 0 when
    the answer states nothing checkable. relevancy = 10 when the answer has the form the instruction
    asks for (yes/no question -> starts with yes/no; count -> a number; color -> a color; where -> a
    position; multiple choice -> a letter; describe -> names a shape), 5 when it is about the image
    in another form, 0 otherwise."""
    _, errs = _errors(answer, q)
    said, low, qq = facts(answer), answer.lower(), q["prompt"].lower()
    accuracy = max(0, 10 - 3 * len(errs)) if said or yes_no(answer) else 0
    if re.match(r"(is|are|does|do|can|could)\b", qq):
        ok = yes_no(answer) is not None
    elif q["qtype"] == "count" or qq.startswith("how many"):
        ok = any(f.isdigit() for f in said) or re.search(r"\b(no|zero|none)\b", low)
    elif q["qtype"] == "color":
        ok = bool(said & set(oracle.COLORS))
    elif q["qtype"] == "mc":
        ok = (re.search(r"option is\s*\(?[A-D]\b", answer)
              or re.match(r"\W*\(?[A-D](?:[.:)]|\s|$)", answer))
    elif qq.startswith("where") or q["qtype"] == "relation":
        ok = bool(said & set(POSITION_WORDS.values()))
    else:
        ok = bool(said & set(shapes.SHAPES))
    relevancy = 10 if ok else 5 if said or yes_no(answer) else 0
    listed = " (" + "; ".join(errs) + ")" if errs else ""
    has = "has" if ok else "lacks"
    return (f"Relevancy: {relevancy}\nAccuracy: {accuracy}\nReason: {len(errs)} hallucination(s)"
            f"{listed}; the answer {has} the asked-for form.")


class OracleJudge:
    """Shapes only: exact and deterministic; it reads the record, not the prompt."""
    name = "oracle"

    def __call__(self, prompt, record):
        rubric = oracle_mmhal if record["bench"] == "mmhal" else oracle_gavie
        return rubric(record, record["answer"])


def local_judge_dir(path):
    """The folder a local judge is read from: --judge_model itself, or a hub id's snapshot in the
    local cache (never the network), so that the judge is named by the files it is."""
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, local_files_only=True)
    except Exception as e:
        raise not_a_local_model(path, e) from None


def not_a_local_model(path, error):
    """The one line for a --judge_model that is neither a folder nor a model in the local cache
    (or whose config does not read), with the first line of what went wrong."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return common.ConfigError(f"--judge_model {path}: not a local model folder (nor in the local "
                              f"cache): --judge local reads a causal LM from disk ({first[:120]})")


def tokenizer_files(folder):
    """The files of a folder a tokenizer's vocabulary is read from (tokenizer.json, a
    sentencepiece *.model, vocab.*, merges.txt, tekken.json, *.tiktoken): without any, transformers
    made an empty tokenizer and the first prompt failed deep inside generate."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [n for n in names if n in ("tokenizer.json", "merges.txt", "tekken.json")
            or n.startswith("vocab.") or n.endswith((".model", ".tiktoken"))]


def judge_files(folder):
    """The files a local judge is loaded from (its config, weights, tokenizer and generation
    config), not what else its folder holds (a README, .git: its name would change with them)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    loaded = [n for n in names if n.endswith((".json", ".safetensors", ".bin", ".jinja"))]
    return [os.path.join(folder, n) for n in sorted(set(loaded + tokenizer_files(folder)))]


def local_judge_config(path):
    """The judge's config.json, as LocalJudge finds it (a folder, or a model in the local cache;
    never the network), checked to be a causal LM's with a tokenizer beside it: read before any
    answer is generated."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    folder = local_judge_dir(path)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise not_a_local_model(path, e) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise common.ConfigError(f"--judge_model {path}: its config.json is a "
                                 f"{type(config).__name__}, not a causal LM's (--judge local "
                                 "reads one that generates text)")
    if not tokenizer_files(folder):
        raise common.ConfigError(f"--judge_model {path}: no tokenizer beside the model (no "
                                 "tokenizer.json, *.model, vocab.* or merges.txt): save the "
                                 "tokenizer there too")
    return config


def openai_key(cfg):
    """--judge_key, else $OPENAI_API_KEY, as http.client's putheader sends it: Latin-1 (a space, a
    tab or 'é' go as they are), a CR or LF only where a space or tab follows (a folded line). A CR
    left by a key file saved on Windows, or a letter beyond U+00FF, made urllib's ValueError, read
    as a bad reply and retried --judge_retries times before 'not a chat-completions reply'."""
    key = cfg.judge_key or os.environ.get("OPENAI_API_KEY", "")
    bad = re.search(r"[^\x00-\xff]|\n(?![ \t])|\r(?![ \t\n])", key)
    if bad:  # (the key itself is not said)
        where = "--judge_key" if cfg.judge_key else "OPENAI_API_KEY"
        raise common.ConfigError(f"{where}: holds {bad[0]!r} at position {bad.start()} (an HTTP "
                                 "header carries Latin-1, a CR or LF only before a space or tab: "
                                 "a CR of a Windows file?)")
    return key


def key_header(url, key):
    """The header that carries the key: 'Authorization: Bearer KEY', as OpenAI's API reads it,
    but 'api-key: KEY' for a host under .azure.com: Azure OpenAI's REST reference sends its API
    keys so, and its Authorization header carries Microsoft Entra ID tokens (a JWT: three
    dot-joined base64url parts, 'eyJ...'), which go as Bearer there too (not checked against a
    live Azure endpoint)."""
    if not key:
        return {}
    host = urllib.parse.urlsplit(url).hostname or ""
    token = re.fullmatch(r"eyJ[\w-]*\.[\w-]+\.[\w-]*", key)
    if host.endswith(".azure.com") and not token:
        return {"api-key": key}
    return {"Authorization": f"Bearer {key}"}


def check_judge_url(url):
    """--judge_url as urllib can send it: an http(s) address without spaces or control characters,
    a host (Unicode: sent as IDNA) and a port of 0-65535, its path and query in ASCII. Each of
    these (InvalidURL, UnicodeEncodeError, ValueError, a port 99999 sent to 34463) was taken for
    a bad reply or a dead server, retried, and said once every answer had been generated."""
    bad = [c for c in url if c.isspace() or not c.isprintable()]
    if bad:  # (before urlsplit, which strips them)
        raise common.ConfigError(f"--judge_url {url!r}: holds {bad[0]!r} (no space or control "
                                 "character; percent-encode a path)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # (a ValueError where it is no number or out of range)
    except ValueError as e:  # (a port 'abc' or 99999, an unclosed '[')
        raise common.ConfigError(f"--judge_url {url!r}: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise common.ConfigError(f"--judge_url {url!r}: not an http:// or https:// address")
    if not parts.hostname:
        raise common.ConfigError(f"--judge_url {url!r}: no host")
    if "@" in parts.netloc:  # (urllib takes 'user:pw@host' for the host's name)
        raise common.ConfigError(f"--judge_url {url!r}: a user or password before the host "
                                 "(urllib sends none)")
    try:  # (as the socket sends it: 'a..b' was a UnicodeError, read as a bad reply)
        parts.hostname.encode("idna")
    except UnicodeError as e:
        raise common.ConfigError(f"--judge_url {url!r}: host {parts.hostname!r}: {e}") from None
    bad = [c for c in parts.path + parts.query if not c.isascii()]
    if bad:
        raise common.ConfigError(f"--judge_url {url!r}: holds {bad[0]!r} (percent-encode a path "
                                 "or query)")


def chat_completions_url(url):
    """--judge_url (a base URL, '.../v1') with '/chat/completions' put at the end of its path: a
    query ('?x=1') stays after it (it was appended after the query). A URL whose path ends in
    '/chat/completions' already is the endpoint, used as given (it was doubled: a 404).
    Neither scheme nor host holds '?' or '#'."""
    cut = re.search(r"[?#]|$", url).start()
    path = url[:cut].rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return path + url[cut:]


class OpenAIJudge:
    """Any OpenAI-compatible chat-completions endpoint, standard library only."""

    def __init__(self, cfg):
        check_judge_url(cfg.judge_url)
        self.url = chat_completions_url(cfg.judge_url)
        self.model, self.cfg = cfg.judge_model, cfg
        # who judged: the model at its endpoint, and how long a reply may be
        self.name = f"openai:{cfg.judge_model}@{self.url}|max_tokens={cfg.judge_max_tokens}"
        self.key = openai_key(cfg)
        self.last_cut = False  # the last reply stopped at --judge_max_tokens (finish 'length')
        self.last_finish = None  # the last reply's finish_reason (said when it is empty)
        if not self.key and "api.openai.com" in self.url:
            raise common.ConfigError("--judge openai: set OPENAI_API_KEY or pass --judge_key")

    def __call__(self, prompt, record):
        messages, temperature = [{"role": "user", "content": prompt}], 0
        system = system_line(record.get("bench"))
        if system:  # (LLaVA's call, as its scores were made)
            messages = [{"role": "system", "content": system}] + messages
            temperature = LLAVA_BENCH_TEMPERATURE
        body = {"model": self.model, "messages": messages, "temperature": temperature}
        if self.cfg.judge_max_tokens:  # (0: none sent, as LLaVA-RLHF's eval_gpt_mmhal.py)
            body["max_tokens"] = self.cfg.judge_max_tokens
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **key_header(self.url, self.key)}
        what = f"{record.get('bench')} question {record.get('id')!r:.60}"
        err, wait = "", 0.0
        for attempt in range(self.cfg.judge_retries + 1):
            if attempt:  # (at most an hour: the doubling reached past what a float holds)
                time.sleep(max(min(self.cfg.judge_backoff * 2 ** min(attempt - 1, 40), MAX_WAIT),
                               wait))
            wait = 0.0
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                data = json.loads(self._read(req).decode("utf-8"))
                if isinstance(data, dict) and "choices" not in data and "error" in data:
                    err = f"an error in a 200 reply: {self._detail(json.dumps(data))}"
                    if lasting_error(data["error"]):  # (a wrong model or key: asking again
                        raise JudgeError(f"judge {self.url}: {err} on {what}")  # cannot help)
                    continue
                choice = data["choices"][0]
                content = choice["message"].get("content") or ""
                if isinstance(content, list):  # (content parts, as some servers send them)
                    content = "".join(p["text"] for p in content if p.get("type") == "text")
                if not isinstance(content, str):  # (a number, an object: no verdict to read)
                    raise TypeError(f"content {content!r:.40}")
                self.last_cut = choice.get("finish_reason") == "length"  # (MMHal's rating: last)
                self.last_finish = choice.get("finish_reason")
                return content
            except urllib.error.HTTPError as e:
                detail = self._detail(e.body_text)  # (read by _read, within the deadline)
                if 300 <= e.code < 400:  # (not followed: the key would go to the other host, and
                    # urllib resends the POST as a GET without the prompt)
                    raise JudgeError(f"judge {self.url}: HTTP {e.code}: the server redirects to "
                                     f"{e.headers.get('Location')!r:.200}; give that address "
                                     "as --judge_url") from None
                # (a quota spent reads as 429 too, and waiting does not refill it)
                lasting = e.code not in (408, 409, 429) and e.code < 500 or \
                    "insufficient_quota" in detail
                if lasting:  # a request that can never succeed: stop now
                    raise JudgeError(f"judge {self.url}: HTTP {e.code} {e.reason} on {what}: "
                                     f"{detail}") from None
                err, wait = f"HTTP {e.code} {e.reason}: {detail}", retry_after(e.headers)
                if wait > MAX_WAIT:
                    raise JudgeError(f"judge {self.url}: HTTP {e.code}: the server asks to wait "
                                     f"{wait:.0f} s (Retry-After); answers and judge replies so "
                                     "far are kept: re-run then") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                err = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                err = f"not a chat-completions reply ({type(e).__name__})"
        tries = self.cfg.judge_retries + 1
        raise JudgeError(f"judge {self.url}: no reply after {tries} tries on {what} ({err}); "
                         "answers and judge replies so far are kept: re-run to continue")

    def _read(self, req):
        """The reply's bytes, within --judge_timeout in all: connecting, the headers and the whole
        body, or an error's body (urlopen's timeout bounds each read alone: a reply, its headers,
        or an error's text dripping in a byte at a time held the run without limit). The request
        runs in a thread, left behind where it is not done by then; an HTTPError comes back with
        its text read as `body_text` ('' where it was cut off)."""
        done = {}

        def fetch():
            try:
                with _NO_REDIRECT.open(req, timeout=self.cfg.judge_timeout) as r:
                    done["body"] = r.read()
            except urllib.error.HTTPError as e:
                try:
                    e.body_text = e.read().decode("utf-8", "replace")
                except (OSError, http.client.HTTPException):  # (a 500 whose text was cut off:
                    e.body_text = ""  # retried as the 500 it is, not a traceback)
                done["error"] = e
            except BaseException as e:  # (raised in the caller's thread, as if made there)
                done["error"] = e
        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()
        thread.join(self.cfg.judge_timeout)
        if thread.is_alive():
            raise TimeoutError(f"no whole reply within --judge_timeout "
                               f"{self.cfg.judge_timeout:g} s")
        if "error" in done:
            raise done["error"]
        return done["body"]

    def _detail(self, text):
        """A server's error text, one line, without our key (servers echo a wrong one back)."""
        text = " ".join(text.split())[:300]
        # (a key of a few characters, as a local server's, would blank its letters in every word)
        return text.replace(self.key, "(the key)") if len(self.key or "") >= 8 else text


# the error types and codes of OpenAI-compatible servers that no retry can change
LASTING_ERRORS = {"invalid_request_error", "authentication_error", "permission_error",
                  "not_found_error", "invalid_api_key", "model_not_found", "insufficient_quota"}


def lasting_error(error):
    """Whether a reply's "error" object names a kind that asking again cannot mend."""
    if not isinstance(error, dict):
        return False
    return bool({str(error.get("type")), str(error.get("code"))} & LASTING_ERRORS)


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # (urllib then raises the 3xx as an HTTPError)


_NO_REDIRECT = urllib.request.build_opener(_KeepRedirects)


def retry_after(headers):
    """Seconds a Retry-After header asks for (a number or an HTTP date), 0 without one."""
    value = (headers or {}).get("Retry-After")
    if not value:
        return 0.0
    try:
        seconds = float(value)
        return seconds if seconds >= 0 else 0.0  # (nan: none)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max((when - datetime.datetime.now(datetime.timezone.utc)).total_seconds(), 0.0)


MAX_WAIT = 3600.0  # seconds: the longest wait between tries (eval.py's --judge_backoff at most)


class LocalJudge:
    """A causal LM directory (transformers, local files only), greedy."""

    def __init__(self, cfg):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        local_judge_config(cfg.judge_model)  # (a folder that is not a causal LM's: one line)
        path = local_judge_dir(cfg.judge_model)
        self.cfg = cfg
        # (the newest change of the files it is loaded from, and their sizes: another model saved
        # at the same path, even with its old time set back (ctime cannot be), or a hub id's cache
        # moved to another snapshot, got the old one's stored replies); what the replies depend
        # on besides: the limit, and the device and precision it runs at (its saved one)
        stats = [os.stat(f) for f in judge_files(path) if os.path.isfile(f)]
        stamp = max((max(st.st_mtime_ns, st.st_ctime_ns) for st in stats), default=0)
        size = sum(st.st_size for st in stats)
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            self.model = model.to(cfg.device).eval()
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise JudgeError(f"{path}: cannot load a causal LM judge ({type(e).__name__}: {first})")
        if len(self.tok) < 2:  # (a tokenizer made of nothing: every prompt is no token)
            raise JudgeError(f"{path}: the judge's tokenizer has {len(self.tok)} token(s)")
        self.name = (f"local:{os.path.abspath(path)}@{stamp}:{size}|max_tokens="
                     f"{cfg.judge_max_tokens}|{cfg.device}|{self.model.dtype}")
        # a reply ends at the tokenizer's end token or at any its generation config lists
        # (generate stopped at the latter alone, and a reply went on past the tokenizer's)
        listed = getattr(self.model.generation_config, "eos_token_id", None)
        listed = listed if isinstance(listed, list) else [listed]
        self.eos = sorted({i for i in [self.tok.eos_token_id, *listed] if isinstance(i, int)})

    def chat_text(self, prompt, system):
        """The chat template's text: the system line as a system turn where the template keeps
        one, else first in the user turn (a template without a system role raises, e.g. Gemma's,
        or drops it without a word)."""
        from jinja2 import TemplateError
        render = lambda messages: self.tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False)
        user = {"role": "user", "content": prompt}
        if system:
            try:
                text = render([{"role": "system", "content": system}, user])
                if system in text:
                    return text
            except TemplateError:
                pass
            user = {"role": "user", "content": f"{system}\n\n{prompt}"}
        return render([user])

    @torch.no_grad()
    def __call__(self, prompt, record):
        # LLaVA-Bench: LLaVA's system line, as its judge call sends it (greedy here: LLaVA's
        # temperature 0.2 is --judge openai's; a local judge's replies reproduce exactly)
        system = system_line(record.get("bench"))
        if getattr(self.tok, "chat_template", None):  # (as apply_chat_template tokenizes)
            text = self.chat_text(prompt, system)
            ids = self.tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:  # (a plain LM reads the system line as the text's first paragraph)
            text = f"{system}\n\n{prompt}" if system else prompt
            ids = self.tok(text, return_tensors="pt").input_ids
        ids = ids.to(self.cfg.device)
        c = self.model.config  # (past its positions: an IndexError deep inside the model)
        positions = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        if positions and ids.shape[1] + self.cfg.judge_max_tokens > positions:
            raise JudgeError(f"{self.cfg.judge_model}: the judge prompt for {record['bench']} "
                             f"question {record['id']!r:.60} is {ids.shape[1]} tokens; with "
                             f"--judge_max_tokens {self.cfg.judge_max_tokens} that passes the "
                             f"model's {positions} positions (a judge with a longer context?)")
        pad = self.tok.eos_token_id if self.tok.pad_token_id is None else self.tok.pad_token_id
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=self.cfg.judge_max_tokens, do_sample=False,
                                  pad_token_id=pad, eos_token_id=self.eos or None)
        new = out[0, ids.shape[1]:]
        # stopped at --judge_max_tokens, not at an end-of-sequence token
        self.last_cut = len(new) >= self.cfg.judge_max_tokens and int(new[-1]) not in self.eos
        self.last_finish = "length" if self.last_cut else "its end token"
        return self.tok.decode(new, skip_special_tokens=True)


def make_judge(cfg):
    if cfg.judge == "oracle":
        return OracleJudge()
    if cfg.judge == "openai":
        return OpenAIJudge(cfg)
    return LocalJudge(cfg)
