"""How answers become numbers, without a judge: POPE's yes/no parser and metrics, and CHAIR's
object mentions and rates, each as the reference scripts compute them (named where implemented).
eval.py generates the answers and calls these; judges.py scores the benchmarks a judge reads."""
import functools
import os
import re

import oracle
from data import DataError, read_text


def mean(xs):
    """The mean, or None for no values (a metric of nothing is not 0)."""
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------

# POPE (Li et al. 2023, arXiv 2305.10355): yes/no questions about objects, 50% present; the
# negatives are drawn at random, among the most frequent objects (popular) or among the objects that
# co-occur most with the present ones (adversarial). Prompt: "<image>\n" + question + --pope_suffix.
# LLaVA-1.5 (llava_pope_test.jsonl questions) and LLaVA-RLHF (Eval/eval_scripts/eval_pope.sh,
# --test-prompt) both append "\nAnswer the question using a single word or phrase."; the Shapes
# model was trained without it, so the default is empty.

def pope_yes_no(text):
    """The reference parser (RUCAIBox/POPE evaluate.py = LLaVA eval_pope.py = LLaVA-RLHF
    summarize_eval_pope.py): keep the text before the first '.', delete ',', split at ' '; 'no' if a
    word is exactly 'No', 'not' or 'no', else 'yes'. So 'Not really', 'NO' and 'No!' are 'yes', as
    there."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_metrics(preds, labels):
    """'yes' is the positive class: accuracy, precision TP/(TP+FP), recall TP/(TP+FN), F1, yes-ratio
    (TP+FP)/N. A zero denominator gives 0 (the reference divides by zero)."""
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(preds, labels))
    n = max(len(labels), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": len(labels), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# ----------------------------------------------------------------------------------------
# CHAIR (Rohrbach et al. 2018, LisaAnne/Hallucination utils/chair.py) over descriptions.
# --chair_counting reference (default; what published CHAIR numbers used): chair.py's procedure.
# Every mention counts, repeated or negated ("a dog chases a dog" is 2 mentions, "no dog" is 1).
# COCO: the caption lower-cased, tokenized (nltk.word_tokenize there; words, digits and hyphenated
# words here), each token singularized with pattern.en's rules (so 'glass' -> 'glas', and 'bus'
# -> 'bu', which is then no object word: as in chair.py), its fixed two-word list merged ('hot dog',
# 'baby bird' -> bird, 'wine glas' -> wine glass, ...), 'seat' dropped when 'toilet' is there, and
# every remaining word that is a synonyms.txt entry mapped to its category. synonyms.txt is read as
# chair.py reads it: each line stripped and split at ", " (an entry written with a leading space, as
# ' motor bike', never matches). Shapes: every shape noun the oracle reads (oracle.oracle mentions;
# it skips questions).
# --chair_counting ours: a category once per description, 'no circle' is not a mention on Shapes,
# and plurals singularised only to known object words ('bus' stays a bus); kept because it does not
# reward or punish repetition and negation, but it is not the metric the papers report.
# Present objects = the instance categories (+ objects named by --chair_captions, as chair.py
# adds).
# ----------------------------------------------------------------------------------------

IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child",
             "mice": "mouse", "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife",
             "leaves": "leaf", "shelves": "shelf"}
# 'baby elephant' is an elephant, not a person (as CHAIR's rules)
QUALIFIERS = {"baby", "adult", "passenger"}
PAIR_TO_WORD = {"toilet seat": "toilet", "bow tie": "tie"}

# chair.py's two-word rules: {pair: the word it is read as}
CHAIR_DOUBLE_WORDS = {w: w for w in (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track")}
for _w in ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
           "animal", "cub"):
    CHAIR_DOUBLE_WORDS.update({f"baby {_w}": _w, f"adult {_w}": _w})
CHAIR_DOUBLE_WORDS.update({"passenger jet": "jet", "passenger train": "train", "bow tie": "tie",
                           "toilet seat": "toilet", "wine glas": "wine glass"})

# pattern.en singularize (the version chair.py imports), the parts that English captions reach: a
# word that ends a listed uninflected/uncountable word stays; '-ies' words of the ie list lose the
# 's'; irregular endings; then the first matching suffix rule.
_UNCHANGED = (
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn "
    "high-jinks proceedings whiting britches eland homework rabies wildebeest carp elk innings "
    "salmon chassis flounder jackanapes scissors christmas gallows mackerel series clippers "
    "georgia measles shears cod graffiti mews species contretemps mumps swine corps news swiss "
    "advice equipment happiness luggage software bread fruit information mathematics progress "
    "understanding butter furniture ketchup mayonnaise research water cheese garbage knowledge "
    "meat rice electricity gravel love mustard sand").split()
# '^pie' and '^tie' are literal strings there: 'ties' -> 'ty'
_IE = (
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie "
    "eyrie indie oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie "
    "laddie pixie techie bombie groupie laramie quickie ^tie collie hankie lingerie reverie "
    "toughie cookie hippie meanie rookie valkyrie").split()
_IRREGULAR_END = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris",
    "feet": "foot", "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie",
    "graffiti": "graffito", "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf",
    "men": "man", "mongooses": "mongoose", "monies": "money", "moves": "move", "mythoi": "mythos",
    "numena": "numen", "occipita": "occiput", "octopodes": "octopus", "opera": "opus",
    "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis", "penises": "penis",
    "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon"}
_SUFFIX_RULES = [(re.compile(a), b) for a, b in (
    (r"(.)ae$", r"\1a"), (r"(.)itis$", r"\1itis"), (r"(.)eaux$", r"\1eau"), (r"(quiz)zes$", r"\1"),
    (r"(matr)ices$", r"\1ix"), (r"(ap|vert|ind)ices$", r"\1ex"), (r"^(ox)en", r"\1"),
    (r"(alias|status)es$", r"\1"), (r"([octop|vir])i$", r"\1us"), (r"(cris|ax|test)es$", r"\1is"),
    (r"(shoe)s$", r"\1"), (r"(o)es$", r"\1"), (r"(bus)es$", r"\1"), (r"([m|l])ice$", r"\1ouse"),
    (r"(x|ch|ss|sh)es$", r"\1"), (r"(m)ovies$", r"\1ovie"), (r"(.)ombies$", r"\1ombie"),
    (r"(s)eries$", r"\1eries"), (r"([^aeiouy]|qu)ies$", r"\1y"), (r"([aeo]l)ves$", r"\1f"),
    (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"), (r"([nlw]i)ves$", r"\1fe"),
    (r"([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"), (r"(sive)s$", r"\1"), (r"(tive)s$", r"\1"),
    (r"(hive)s$", r"\1"), (r"([^f])ves$", r"\1fe"), (r"(^analy)ses$", r"\1sis"),
    (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1sis"),
    (r"(.)opses$", r"\1opsis"), (r"(.)yses$", r"\1ysis"), (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(.)oses$", r"\1osis"), (r"([ti])a$", r"\1um"), (r"(n)ews$", r"\1ews"), (r"s$", ""))]


@functools.lru_cache(maxsize=1 << 16)  # (a word's rules ran at every mention: ~2 ms per caption)
def singularize_like_pattern(word):
    """pattern.en.singularize on a lower-case word ('dogs' -> 'dog', 'glass' -> 'glas',
    'bus' -> 'bu')."""
    if any(x.endswith(word) for x in _UNCHANGED):
        return word
    if any(word.endswith(x + "s") for x in _IE):
        return word
    for end, single in _IRREGULAR_END.items():
        if word.endswith(end):
            return word[:len(word) - len(end)] + single
    for rule, repl in _SUFFIX_RULES:
        m = rule.search(word)
        if m:
            # an optional group that did not take part reads as ''
            for k, group in enumerate(m.groups(), 1):
                repl = repl.replace(f"\\{k}", "") if group is None else repl
            return rule.sub(repl, word)
    return word


def load_synonyms(path, counting="reference"):
    """CHAIR synonyms.txt -> {word or phrase: canonical category} (later lines win, as in chair.py).
    reference: entries exactly as chair.py splits them (", "); ours: split at commas, spaces
    normalised."""
    if not os.path.isfile(path):
        raise DataError(path, message="file not found")
    syn = {}
    for line in read_text(path).splitlines():
        if counting == "reference":
            words = [w for w in line.strip().split(", ") if w]
        else:
            words = [" ".join(w.lower().split()) for w in line.split(",") if w.strip()]
        syn.update({w: words[0] for w in words} if words else {})
    if not syn:
        message = "no synonyms (expected lines 'category, synonym, synonym, ...')"
        raise DataError(path, message=message)
    return syn


def singular(word, vocab):
    """The word if it is known, else its first simple singular form that is known."""
    if word in vocab:
        return word
    cands = [IRREGULAR.get(word, "")]
    cands += [word[:-3] + "y"] if word.endswith("ies") else []
    cands += [word[:-3] + "f", word[:-3] + "fe"] if word.endswith("ves") else []
    cands += [word[:-2]] if word.endswith("es") else []
    cands += [word[:-1]] if word.endswith("s") and not word.endswith("ss") else []
    return next((c for c in cands if c in vocab), word)


# a word's character: a letter or digit, or any character beyond ASCII but a space and the quotes
# and dashes nltk's word_tokenize splits off ('«“‘„»”’', U+2012-U+2015): it keeps 'dogé', 'dog，'
# and 'dog\u200bcat' whole (no dog), where splitting at each of them read a dog
# (one class, ASCII but 0-9 and a-z excluded by ranges: an alternation of two classes matches
# the same tokens, but at nearly twice the time on long texts)
_WORD = r"[^\x00-\x2f:-`{-\x7f\s«“‘„»”’\u2012-\u2015]"
_TOKEN = re.compile(rf"{_WORD}+(?:-{_WORD}+)*|\S")


def coco_objects(text, syn, counting="reference"):
    """The canonical COCO objects a caption names, in order: every mention (reference, chair.py's
    caption_to_words) or each category once (ours)."""
    if counting == "reference":
        # punctuation kept as tokens, as nltk's word_tokenize keeps them: no two-word object forms
        # across one ('her baby, dog' is a person and a dog; it read a dog alone)
        tokens = _TOKEN.findall(text.lower())
        words = [singularize_like_pattern(w) for w in tokens]
        merged, i = [], 0
        while i < len(words):
            pair = " ".join(words[i:i + 2])
            merged.append(CHAIR_DOUBLE_WORDS.get(pair, words[i]))
            i += 2 if pair in CHAIR_DOUBLE_WORDS else 1
        if "toilet" in merged and "seat" in merged:  # 'the seat of the toilet' is no chair
            merged = [w for w in merged if w != "seat"]
        return [syn[w] for w in merged if w in syn]
    vocab = {w for phrase in syn for w in phrase.split()}
    toks = [singular(w, vocab) for w in re.findall(r"[a-z]+", text.lower())]
    found, i = [], 0
    while i < len(toks):
        pair = " ".join(toks[i:i + 2]) if i + 1 < len(toks) else ""
        if pair in syn or PAIR_TO_WORD.get(pair) in syn:
            found.append(syn[pair] if pair in syn else syn[PAIR_TO_WORD[pair]])
            i += 2
            continue
        qualifies_next = toks[i] in QUALIFIERS and i + 1 < len(toks) and toks[i + 1] in syn
        if toks[i] in syn and not qualifies_next:
            found.append(syn[toks[i]])
        i += 1
    return list(dict.fromkeys(found))


def chair_counts(q, text, counting="reference"):
    """(object mentions, how many name an object that is not in the image) for one description."""
    if "syn" not in q:  # Shapes: the oracle reads the shape nouns
        if counting == "ours":
            return oracle.chair_counts(text, q["objects"])
        present = {o["name"] for o in q["objects"]}
        names = [m["name"] for m in oracle.oracle(text, q["objects"])["mentions"] if m["name"]]
        return len(names), sum(n not in present for n in names)
    objs = coco_objects(text, q["syn"], counting)
    return len(objs), sum(o not in q["objects"] for o in objs)


def chair_metrics(counts, n_words):
    """CHAIR_i = hallucinated object mentions / object mentions; CHAIR_s = descriptions with a
    hallucinated object / descriptions (Rohrbach et al., EMNLP 2018). CHAIR_i is None without a
    single mention (it read 0.0, a perfect score of nothing)."""
    mentions, halluc = sum(m for m, _ in counts), sum(h for _, h in counts)
    return {"chair_i": halluc / mentions if mentions else None,
            "chair_s": sum(h > 0 for _, h in counts) / max(len(counts), 1),
            "n": len(counts), "mentions": mentions, "hallucinated": halluc,
            "answer_words": sum(n_words) / max(len(n_words), 1)}
