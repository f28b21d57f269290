"""The exact oracle of the Shapes world: reads a free-text answer and returns the objects,
attributes and relations it claims, and which of them are false for the image's objects.

CHAIR (chair_counts), the POPE-style yes/no check (score_answer), reward.py's oracle-ranked
pairs, PPO's and VIGC's hallucination reports and judges.py's MMHal/GAVIE oracle judge all read
answers through `oracle(text, objects)`. An object is a dict with "name", "color", "size" and,
when it has a place, "row" and "col" (shapes.py writes them; see shapes.objects_from_coco).
"""
import re

from data import NUMBER_WORDS, POSITIONS, plural, position_of

# The world's words. shapes.py draws these shapes in these colours (test_oracle checks both lists).
SYNONYMS = {"circle": ["circle", "disc", "disk", "dot"], "square": ["square", "box", "block"],
            "triangle": ["triangle"], "cross": ["cross", "plus"], "diamond": ["diamond", "rhombus"],
            "ring": ["ring", "donut", "doughnut", "hoop"]}
# (SYNONYMS: the surface words per category; CHAIR counts them)
COLORS = ("red", "green", "blue", "yellow", "purple", "white")

WORD2SHAPE = {w: k for k, ws in SYNONYMS.items() for w0 in ws for w in (w0, plural(w0))}
GENERIC_NOUNS = ["object", "shape", "item", "thing", "figure"]
GENERIC = {w: "object" for w0 in GENERIC_NOUNS for w in (w0, plural(w0))}
SIZE_WORDS = {"large": "large", "big": "large", "small": "small", "little": "small",
              "tiny": "small"}
NUMS = {**{w: i for i, w in enumerate(NUMBER_WORDS) if i},
        **{str(i): i for i in range(100)},
        "single": 1}
DETS = {"a", "an", "the", "any", "some", "this", "that", "these", "those", "no", "colorful",
        "colored", "coloured", "other", "another", "more", "only", "exactly", "just"}
NEGATORS = {"not", "no", "never", "without", "nor", "isn't", "aren't", "wasn't", "weren't", "don't",
            "doesn't", "didn't", "can't", "cannot", "couldn't", "won't"}
NEG_SKIP = {"is", "are", "was", "were", "be", "there", "see", "find", "spot", "notice", "observe",
            "seem", "seems", "to", "appear", "appears", "i", "we", "you", "can", "could", "do",
            "does", "really"}
COPULA = {"is", "are", "was", "were", "be", "located", "placed", "positioned", "situated", "sits",
          "lies", "appears", "seems", "looks", "also", "both", "all", "each", "colored", "drawn",
          "shown"}
RELATIONS = [(["to", "the", "left", "of"], "left"), (["to", "the", "right", "of"], "right"),
             (["on", "the", "left", "of"], "left"), (["on", "the", "right", "of"], "right"),
             (["left", "of"], "left"), (["right", "of"], "right"),
             (["above"], "above"), (["over"], "above"),
             (["below"], "below"), (["under"], "below"), (["beneath"], "below"),
             (["underneath"], "below")]
ROW_WORDS, COL_WORDS = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}, {"left": 0, "right": 2}
MID_WORDS = {"middle", "center", "centre", "central"}
CLAUSE_BREAK = r"[,;:]|\b(?:but|while|whereas|however|although|though|instead|except)\b"
REL_TEST = {"left": lambda x, y: x["col"] < y["col"], "right": lambda x, y: x["col"] > y["col"],
            "above": lambda x, y: x["row"] < y["row"], "below": lambda x, y: x["row"] > y["row"]}


def _match_relation(toks, j):
    rels, k = [], j
    while True:
        hit = next(((pat, r) for pat, r in RELATIONS if toks[k:k + len(pat)] == pat), None)
        if hit is None:
            break
        rels.append(hit[1])
        k += len(hit[0])
        another = k < len(toks) - 1 and toks[k] == "and" and \
            any(toks[k + 1:k + 1 + len(p)] == p for p, _ in RELATIONS)
        if not another:  # 'above and to the left of': one more relation follows
            break
        k += 1
    return (rels, k) if rels else None


def _match_position(toks, j):
    if toks[j] not in ("at", "in", "on"):
        return None
    k = j + 2 if toks[j + 1:j + 2] == ["the"] else j + 1
    row = col = None
    start = k
    while k < len(toks) and (toks[k] in ROW_WORDS or toks[k] in COL_WORDS or toks[k] in MID_WORDS):
        row = ROW_WORDS.get(toks[k], row)
        col = COL_WORDS.get(toks[k], col)
        k += 1
    if k == start:
        return None
    while k < len(toks) and toks[k] in ("corner", "side", "part", "edge", "area", "cell"):
        k += 1
    if toks[k:k + 2] == ["of", "the"] and toks[k + 2:k + 3] in (["image"], ["picture"], ["grid"]):
        k += 3
    return POSITIONS[3 * (1 if row is None else row) + (1 if col is None else col)], k


def _parse_clause(toks, mentions, relations):
    nps = []
    for k, t in enumerate(toks):
        if t in WORD2SHAPE or t in GENERIC:
            s = k
            while s > 0 and any(toks[s - 1] in words for words in (DETS, COLORS, SIZE_WORDS, NUMS)):
                s -= 1
            nps.append((s, k))
    # "At the top left there is a red circle"
    lead = _match_position(toks, 0) if len(toks) > 1 else None
    filler = ("there", "is", "are", "lies", "sits", "we", "see", "can", "you")
    if lead and nps and all(t in filler or t in DETS
                            for t in toks[lead[1]:nps[0][0]]):
        lead = lead[0]
    else:
        lead = None
    idx = []
    for s, k in nps:
        mods = toks[s:k]
        is_plural = toks[k] != WORD2SHAPE.get(toks[k], GENERIC.get(toks[k]))  # not its own singular
        m = {"name": WORD2SHAPE.get(toks[k]), "colors": [w for w in mods if w in COLORS],
             "sizes": [SIZE_WORDS[w] for w in mods if w in SIZE_WORDS],
             "count": None, "position": None,
             "not_colors": [], "not_sizes": [], "not_positions": [], "all": [],
             "negated": "no" in mods, "other": any(w in ("other", "another", "more") for w in mods),
             "plural": is_plural or s > 0 and toks[s - 1] == "all"}
        m["count"] = next((NUMS[w] for w in mods if w in NUMS), None)
        j, back = s - 1, 0  # "there is not a circle", "I can't see any circle"
        while j >= 0 and back < 4 and toks[j] not in NEGATORS and toks[j] in NEG_SKIP:
            j, back = j - 1, back + 1
        m["negated"] |= j >= 0 and toks[j] in NEGATORS and back < 4
        if lead and not idx and not m["negated"]:
            m["position"] = lead
        mentions.append(m)
        idx.append(len(mentions) - 1)
    for n, (s, k) in enumerate(nps):
        m, j, cop, neg = mentions[idx[n]], k + 1, False, False
        while j < len(toks):
            t = toks[j]
            if t in NEGATORS:
                neg, cop, j = True, cop or t.endswith("n't"), j + 1
                continue
            later = [i for i, (s2, _) in enumerate(nps) if s2 == j]
            if later and cop and m["name"] is None:  # 'the object at the top is a red circle'
                relations.append({"a": idx[n], "rels": ["is"], "b": idx[later[0]], "negated": neg})
                break
            rel = _match_relation(toks, j)
            if rel:
                later = [i for i, (s2, _) in enumerate(nps) if s2 >= rel[1]]
                if later:
                    relations.append({"a": idx[n], "rels": rel[0], "b": idx[later[0]],
                                      "negated": neg})
                break
            pos = _match_position(toks, j) if j + 1 < len(toks) else None
            if pos:
                if neg:
                    m["not_positions"].append(pos[0])
                else:
                    m["position"] = pos[0]
                j = pos[1]
                continue
            if t in ("in", "on") and toks[j + 1:j + 3] in (["the", "image"], ["the", "picture"]):
                j += 3
            elif t in COPULA:
                cop, j = True, j + 1
            elif cop and (t in COLORS or t in SIZE_WORDS):
                key, v = ("color", t) if t in COLORS else ("size", SIZE_WORDS[t])
                if m["plural"] and not neg:  # 'all circles are red': every circle
                    m["all"].append((key, v))
                else:
                    m[("not_" if neg else "") + key + "s"].append(v)
                j += 1
            elif cop and t in ("present", "visible", "there", "here", "seen") or \
                    t in ("absent", "missing"):
                m["negated"] |= neg or t in ("absent", "missing")
                j += 1
            elif cop and t == "and":
                j += 1
            else:
                break


def _candidates(m, objects):
    """Objects that fit the mention (name, colors, sizes, position); the first failing attribute."""
    c = [o for o in objects if m["name"] is None or o["name"] == m["name"]]
    if m["name"] is not None and not c:
        return [], "object"
    for key, vals in (("color", m["colors"]), ("size", m["sizes"])):
        for v in vals:
            c = [o for o in c if o.get(key) == v]
            if not c:
                return [], key
    if m["position"]:
        c = [o for o in c if position_of(o) == m["position"]]
        if not c:
            return [], "position"
    return c, None


def _label(m):
    return " ".join(m["sizes"] + m["colors"] + [m["name"] or "object"])


def oracle(text, objects):
    """Read a free-text answer and check every claim it makes against `objects`.

    Claims are read sentence by sentence (questions, i.e. sentences ending in '?', are skipped),
    clause by clause (split at , ; : and but/while/however...). Per clause, every shape noun
    (SYNONYMS, singular or plural) or generic noun (object, shape, ...) starts a mention; the words
    before it give color, size, a count (number words / digits / 'single'; 'a'/'the' are no count)
    and negation ('no circle', 'there is not a circle', "I can't see any circle"); the words after
    it give predicates: 'is red', 'is not red', 'is large', 'at/in/on the <position>',
    'is (not) present', relations
    'is (above|below|to the left of|to the right of)( and ...) <noun>'.

    Returns a dict:
      mentions: every shape mention with its attributes and 'error' (None, 'object', 'color',
        'size', 'position', 'count', 'false_negative');
      hallucinated_objects: shape names mentioned positively but absent (unique, in order);
      hallucinated_attributes: claims about present shapes (or generic objects) with a wrong color,
        size, position or count, e.g. 'circle color=blue', 'object count=3' (unique strings);
      hallucinated_relations: false relation claims between present objects, e.g.
        'circle left square';
      false_negatives: claimed absences of present things ('No, there is no circle' with a circle);
      num_mentions: distinct shape categories mentioned positively (CHAIR's object words);
      num_hallucinated_objects = len(hallucinated_objects);
      num_hallucinations = objects + attributes + relations + false negatives.
    A relation is only checked when both ends are present and fit their attributes (no double
    count).
    'The circle is red' with two circles is true if some circle is red; 'is not red' is wrong only
    if every such circle is red. Junk text gives empty lists, never an exception."""
    mentions, relations = [], []
    for sent in re.findall(r"[^.!?\n]+[.!?]*", str(text or "")):
        if sent.rstrip().endswith("?"):
            continue
        for clause in re.split(CLAUSE_BREAK, sent.lower()):
            _parse_clause(re.findall(r"[a-z]+(?:'[a-z]+)?|\d+", clause), mentions, relations)
    halluc_obj, attrs, fnegs = [], [], []
    for m in mentions:
        m["error"] = None
        if m["other"] and m["name"] is None:
            continue  # 'no other objects' cannot be checked
        c, err = _candidates(m, objects)
        if m["negated"]:
            if c and not (m["name"] is None and not (m["colors"] or m["sizes"] or m["position"])):
                m["error"] = "false_negative"
                fnegs.append(_label(m))
            continue
        if err == "object":
            m["error"] = "object"
            halluc_obj.append(m["name"])
        elif err:
            m["error"] = err
            val = {"color": m["colors"], "size": m["sizes"], "position": [m["position"]]}[err]
            what = _label(m) if err == "position" else m["name"] or "object"
            attrs.append(f"{what} {err}={' '.join(val)}")
        else:
            for key, vals in (("color", m["not_colors"]), ("size", m["not_sizes"])):
                for v in vals:
                    if c and all(o.get(key) == v for o in c):
                        m["error"] = key
                        attrs.append(f"{_label(m)} {key}!={v}")
            if any(c and all(position_of(o) == v for o in c) for v in m["not_positions"]):
                m["error"] = "position"
                attrs.append(f"{_label(m)} position!={m['not_positions'][0]}")
            for key, v in m["all"]:
                if any(o.get(key) != v for o in c):
                    m["error"] = key
                    attrs.append(f"{_label(m)} all {key}={v}")
            if m["count"] is not None and len(c) != m["count"]:
                m["error"] = "count"
                attrs.append(f"{_label(m)} count={m['count']}")
    bad_rel = []
    for r in relations:
        ma, mb = mentions[r["a"]], mentions[r["b"]]
        A, B = _candidates(ma, objects)[0], _candidates(mb, objects)[0]
        if r["rels"] != ["is"]:
            A = [o for o in A if o.get("row") is not None]  # placed objects only
            B = [o for o in B if o.get("row") is not None]
        if ma["negated"] or mb["negated"] or ma["error"] or mb["error"] or not A or not B:
            continue
        if r["rels"] == ["is"]:  # identity: every (plural) or some (singular) such object is a B
            fits = [x in B for x in A]
            if not r["negated"] and not (all(fits) if ma["plural"] else any(fits)):
                bad_rel.append(f"{_label(ma)} is {_label(mb)}")
            continue
        pairs = [(x, y) for x in A for y in B if x is not y]
        holds = [all(REL_TEST[k](x, y) for k in r["rels"]) for x, y in pairs]
        if pairs and (all(holds) if r["negated"] else not any(holds)):
            said = ("not " if r["negated"] else "") + "+".join(r["rels"])
            bad_rel.append(f"{_label(ma)} {said} {_label(mb)}")
    uniq = lambda xs: list(dict.fromkeys(xs))
    shown = ("name", "colors", "sizes", "count", "position", "negated", "error")
    out = {"mentions": [{k: m[k] for k in shown} for m in mentions if m["name"]],
           "hallucinated_objects": uniq(halluc_obj), "hallucinated_attributes": uniq(attrs),
           "hallucinated_relations": uniq(bad_rel), "false_negatives": uniq(fnegs)}
    out["num_mentions"] = len(uniq(m["name"] for m in mentions if m["name"] and not m["negated"]))
    out["num_hallucinated_objects"] = len(out["hallucinated_objects"])
    claims = ("hallucinated_objects", "hallucinated_attributes", "hallucinated_relations",
              "false_negatives")
    out["num_hallucinations"] = sum(len(out[k]) for k in claims)
    return out


def chair_counts(text, objects):
    """CHAIR for one caption: (number of distinct object categories mentioned, how many of them are
    not in the image). CHAIR_i = sum of the second / sum of the first; CHAIR_s = share of captions
    whose second number is > 0. Negated mentions ('no circle') are not object words."""
    r = oracle(text, objects)
    return r["num_mentions"], r["num_hallucinated_objects"]


def _yes_no(text):
    m = re.search(r"\b(yes|no)\b", str(text or "").lower())
    return m.group(1) if m else None


def score_answer(qtype, text, answer_key):
    """Exact-match accuracy of a model answer for the test_<qtype>.json files."""
    text = str(text or "")
    low = text.lower()
    if qtype in ("yesno", "relation"):
        return _yes_no(text) == str(answer_key).lower()
    if qtype == "count":
        rest = re.sub(r"^\W*(yes|no)\b\W*", "", low)
        m = re.search(r"\b(no|zero|" + "|".join(NUMBER_WORDS[1:]) + r"|\d+)\b", rest)
        if not m:
            return False  # (int(answer_key) is never None)
        word = m.group(1)
        n = 0 if word in ("no", "zero") else NUMS.get(word) or int(word)
        return n == int(answer_key)
    if qtype == "color":
        colors = "|".join(COLORS)
        m = re.search(r"\b(?:is|are)\s+(" + colors + r")\b", low) or \
            re.search(r"\b(" + colors + r")\b", low)
        return bool(m) and m.group(1) == answer_key
    if qtype == "mc":
        m = re.search(r"correct option is\s*\(?([A-D])\b", text) or \
            re.match(r"\W*\(?([A-D])(?:[.:)]|\s|$)", text)
        return bool(m) and m.group(1) == answer_key
    if qtype == "describe":  # the same set of described objects (size, color, shape, position)
        def described(t):
            mentions = oracle(t, [])["mentions"]
            return sorted((m["name"], tuple(m["sizes"]), tuple(m["colors"]), m["position"] or "")
                          for m in mentions if not m["negated"])
        return described(text) == described(answer_key)
    raise ValueError(f"unknown question type {qtype}")
