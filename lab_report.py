"""The lab's report: each run's numbers read back, the tables, the verdicts and their rule, the
plots."""
import json
import math
import os
import platform
import statistics
import time
from urllib.parse import quote

from PIL import Image, ImageDraw

import common
from formats import DataError, json_lines, read_text


# the claims, and the variants each compares: the report's rows (lab.py's Config and plan
# read them too: the runs)
CLAIMS = ("lrv", "rlhf", "povid", "vigc")
LRV_RATIOS = (0.0, 0.25, 0.5)
PPO_VARIANTS = {"facts": ("facts", []), "no-facts": ("nofacts", []),
                "no-length-penalty": ("facts", ["--length_penalty", "0"]),
                "no-correctness": ("facts", ["--correctness", "0"])}


def rlhf_seeds(cfg):
    return cfg.seeds[:cfg.rlhf_seeds]


TITLE = "# Results: the hallucination lab"  # a report's first line: lab.py replaces only these


# ----------------------------------------------------------------------------- reading results
def load(path):
    try:
        with open(path, encoding="utf-8-sig") as f:  # (an editor's BOM, as the stages read it)
            return json.load(f)
    except (OSError, ValueError):
        return None


def number(path, record, key):
    """record[key] where it is a number, None where it is null or absent; anything else is one line
    naming the file and field (a hand edit, a report of another format: it was a TypeError)."""
    x = record.get(key)
    if x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)):
        return x
    raise DataError(path, field=key, message=f"expected a number, got {x!r:.40}")


def read_records(path):
    """The JSON objects of a JSON-lines file, one a line; a line that is not one (a cut file) is
    one line naming the file and the line (it was a JSONDecodeError traceback)."""
    records = []
    # (read as the stages read the world's files: an editor's BOM, which eval takes, was a bad
    # first line; a byte that is not UTF-8 a traceback; a CR alone ends a line)
    for i, line in enumerate(json_lines(read_text(path))):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if not isinstance(r, dict):
            raise DataError(path, record=i + 1, message=f"not a JSON object: "
                            f"{line.strip()!r:.60} (fix or delete the line)")
        records.append(r)
    return records


def metric_rows(runs, names):
    """The headline numbers of each eval'd run (from the scores.json its eval run wrote)."""
    pick = {"POPE F1 random": ("pope", "random", "f1"),
            "POPE F1 popular": ("pope", "popular", "f1"),
            "POPE F1 adversarial": ("pope", "adversarial", "f1"),
            "POPE yes-ratio": ("pope", "average", "yes_ratio"),
            "POPE accuracy": ("pope", "average", "accuracy"),
            "CHAIR_i": ("chair", "chair_i"),
            "CHAIR_s": ("chair", "chair_s"),
            "MMHal score": ("mmhal", "score"),
            "MMHal halluc. rate": ("mmhal", "hallucination_rate"),
            "answer words": ("chair", "answer_words")}
    out = {}
    for n in names:
        s = load(runs[n + "/eval"][2]) if n + "/eval" in runs else None
        if s is None:
            continue
        row = {}
        for k, keys in pick.items():
            v = s
            for key in keys:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                row[k] = float(v)
        # LRV's and POPE's reading: a calibrated model says yes half the time
        if "POPE yes-ratio" in row:
            row["POPE |yes-ratio - 0.5|"] = abs(row["POPE yes-ratio"] - 0.5)
        out[n] = row
    return out


def measured(x):
    """A number a mean can take: not None, NaN or inf (JSON files may hold both: an inf ended
    the report in an AttributeError inside statistics.stdev)."""
    return x is not None and math.isfinite(x)


def mean_sd(xs):
    xs = [x for x in xs or [] if measured(x)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


class BySeed(list):
    """A metric's values over seeds (a list: mean_sd and the tables read it as one) that keeps each
    value's seed, so that a verdict can also compare two variants seed by seed."""

    def __init__(self):
        super().__init__()
        self.seeds = []

    def add(self, seed, x):
        self.append(x)
        self.seeds.append(seed)


def add_value(groups, variant, metric, seed, x):
    """groups[variant][metric] gets x, measured with seed (None: the one SFT baseline)."""
    groups.setdefault(variant, {}).setdefault(metric, BySeed()).add(seed, x)


def run_seed(run):
    """The seed in a run's name ('lrv/neg0.5-s1' -> 1); None for one without ('sft')."""
    tail = run.rsplit("-s", 1)[1:]
    return int(tail[0]) if tail and tail[0].isdecimal() else None


def group(rows_by_run, variant_of):
    """{variant: {metric: values over seeds (BySeed)}}."""
    out = {}
    for run, row in rows_by_run.items():
        for k, x in row.items():
            add_value(out, variant_of(run), k, run_seed(run), x)
    return out


def fmt(xs, f=".3f"):
    m, sd, n = mean_sd(xs or [])
    return "-" if m is None else f"{m:{f}} ± {sd:{f}}" if n > 1 else f"{m:{f}}"


def md_table(groups, metrics, order, fmts=None):
    # (a '|' in a name, as in |yes-ratio - 0.5|, would split its cell: escaped)
    names = [m.replace("|", "\\|") for m in metrics]
    lines = ["| | " + " | ".join(names) + " | seeds |", "|---" * (len(metrics) + 2) + "|"]
    for v in order:
        if v in groups:
            # (measured values: a seed whose metric is None or NaN does not count)
            n = max((mean_sd(x)[2] for x in groups[v].values()), default=0)
            cells = [fmt(groups[v].get(m), (fmts or {}).get(m, ".3f")) for m in metrics]
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


def verdict(groups, a, b, metric, lower_better, claim):
    """One sentence: does b improve on a in `metric` by more than the seeds' spread?"""
    if a not in groups or b not in groups:
        return f"- {claim}: not measured (runs missing)."
    if metric not in groups[a] or metric not in groups[b]:  # (e.g. no generated answer parsed)
        return f"- {claim}: not measured ({metric} missing from the runs)."
    (ma, sa, na), (mb, sb, nb) = mean_sd(groups[a][metric]), mean_sd(groups[b][metric])
    if ma is None or mb is None:  # every run of a side lacks the number (e.g. a NaN score)
        return f"- {claim}: not measured ({metric} missing from the runs)."
    # (equal values averaged over seeds may differ in the last bit: no move)
    tie = abs(mb - ma) <= 1e-9 * max(1.0, abs(ma), abs(mb))
    better = not tie and (mb < ma if lower_better else mb > ma)
    # the SFT baseline is one deterministic checkpoint (n = 1, no spread): the seeds of the other
    # side judge; a seeded side needs 2 measured seeds (one has no spread: it read as none)
    clear = not tie and abs(mb - ma) > max(sa, sb)
    thin = [v for v, n in ((a, na), (b, nb)) if seeded(groups[v][metric]) and n < 2]
    if thin:  # (the others' runs failed, or lack the number)
        word = f"not judged (one measured seed of {' and '.join(thin)}: no spread to judge by)"
    elif max(na, nb) == 1:
        word = "not judged (one seed: no spread to judge the move by)"
    elif better and clear:
        word = "held"
    elif better or not clear:
        word = "not shown (within the seed spread)"
    else:
        word = "did not hold"
    yes = mean_sd(groups[b].get("POPE yes-ratio"))[0]
    caveat = ""
    if yes is not None and abs(yes - 0.5) > 0.45:
        answer = "yes" if yes > 0.5 else "no"
        caveat = (f" Caveat: {b} answers POPE with '{answer}' almost always (yes-ratio {yes:.3f}), "
                  "so its POPE numbers reflect a collapsed answer, not better seeing.")
    before = f"{fmt(groups[a][metric])} ({a})"
    after = f"{fmt(groups[b][metric])} ({b})"
    paired = paired_text(groups[a][metric], groups[b][metric], lower_better)
    seeds = f"{na} and {nb} seeds" if seeded(groups[a][metric]) else f"{nb} seeds"
    return (f"- {claim}: **{word}** here: {metric} {before} -> {after}, {seeds}.{paired}"
            f"{caveat}")


def seeded(xs):
    """Whether values were measured over seeds (not the one SFT baseline)."""
    return any(s is not None for s in getattr(xs, "seeds", []))


def paired_text(xs, ys, lower_better):
    """Beside the verdict (which it does not change): ys - xs seed by seed, where both sides were
    run with the same seeds (not against the one SFT baseline). The rule above compares the two
    means against the larger spread; a difference that goes the claimed way on every seed can
    still be "not shown" by it."""
    x_at = dict(zip(getattr(xs, "seeds", []), xs))
    pairs = [(x_at[s], y) for s, y in zip(getattr(ys, "seeds", []), ys)
             if s is not None and s in x_at]
    pairs = [(x, y) for x, y in pairs if measured(x) and measured(y)]
    if len(pairs) < 2:
        return ""
    diffs = [y - x for x, y in pairs]
    claimed = sum(d < 0 if lower_better else d > 0 for d in diffs)
    mean, sd, n = mean_sd(diffs)
    return (f" Paired by seed: the claimed way on {claimed} of {n} (difference {mean:+.3f} ± "
            f"{sd:.3f}).")


# ----------------------------------------------------------------------------- plots
# (PIL, no extra dependency)
COLOURS = [(66, 133, 244), (219, 68, 55), (244, 180, 0),
           (15, 157, 88), (171, 71, 188), (0, 172, 193)]


def bar_plot(path, title, groups, metrics, order):
    """Grouped bars (mean over seeds) with a whisker of +- one standard deviation, a group per
    metric."""
    order = [v for v in order if v in groups]
    W, H, pad = 180 * len(metrics) + 120, 360, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 10), title, fill="black")
    vals = [mean_sd(groups[v].get(m)) for m in metrics for v in order]
    top = max([m + s for m, s, _ in vals if m is not None] + [1e-9]) * 1.15
    y0, y1 = H - 60, 40
    d.line([(pad, y0), (W - 20, y0)], fill="black")
    for t in range(5):
        y = y0 - (y0 - y1) * t / 4
        d.text((5, y - 6), f"{top * t / 4:.2f}", fill="gray")
    bw = 150 / max(len(order), 1)
    for i, m in enumerate(metrics):
        x = pad + 10 + i * 180
        for j, v in enumerate(order):
            mu, sd, _ = mean_sd(groups[v].get(m))
            if mu is None:
                continue
            h = (y0 - y1) * mu / top
            colour = COLOURS[j % len(COLOURS)]
            d.rectangle([x + j * bw, y0 - h, x + (j + 1) * bw - 3, y0], fill=colour)
            cx, e = x + (j + 0.5) * bw - 1, (y0 - y1) * sd / top
            d.line([(cx, y0 - h - e), (cx, y0 - h + e)], fill="black", width=2)
        d.text((x, y0 + 8), m, fill="black")
    for j, v in enumerate(order):
        colour = COLOURS[j % len(COLOURS)]
        d.rectangle([pad + j * 150, H - 25, pad + j * 150 + 10, H - 15], fill=colour)
        d.text((pad + j * 150 + 14, H - 27), v, fill="black")
    save_figure(img, path)


def save_figure(img, path):
    """A figure written whole, or the one before left as it was (a temp file renamed onto path):
    a full disk left a torn PNG, and a line naming no file."""
    common.write_whole(path, lambda f: img.save(f, format="PNG"), binary=True)


def line_plot(path, title, curves, ylabel):
    """curves: {label: [[y per step] per seed]} -> the mean over seeds per step, one line per
    label."""
    W, H, pad = 640, 360, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 10), f"{title} ({ylabel}, mean over seeds)", fill="black")
    means = {k: [statistics.fmean(c[i] for c in cs if i < len(c)) for i in range(max(map(len, cs)))]
             for k, cs in curves.items() if cs and any(cs)}
    ys = [y for m in means.values() for y in m]
    if not ys:
        save_figure(img, path)
        return
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1
    n = max(map(len, means.values()))
    y0, y1, x0, x1 = H - 60, 40, pad, W - 20
    d.line([(x0, y0), (x1, y0)], fill="black")
    for t in range(5):
        d.text((5, y0 - (y0 - y1) * t / 4 - 6), f"{lo + (hi - lo) * t / 4:.1f}", fill="gray")
    x_of = lambda i: x0 + (x1 - x0) * i / max(n - 1, 1)  # step index -> pixel
    y_of = lambda y: y0 - (y0 - y1) * (y - lo) / (hi - lo)  # value -> pixel
    for j, (k, m) in enumerate(means.items()):
        pts = [(x_of(i), y_of(y)) for i, y in enumerate(m)]
        colour = COLOURS[j % len(COLOURS)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        else:  # (one logged step: a line of one point drew nothing, the figure looked empty)
            (x, y), r = pts[0], 3
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        d.rectangle([pad + j * 150, H - 25, pad + j * 150 + 10, H - 15], fill=colour)
        d.text((pad + j * 150 + 14, H - 27), k, fill="black")
    d.text((x1 - 60, y0 + 5), f"step {n}", fill="gray")
    save_figure(img, path)


# ----------------------------------------------------------------------------- the report
def setting(run):
    """A run's configuration: its name without the seed ('lrv/neg0.5-s1' -> 'lrv/neg0.5')."""
    return run.rsplit("-s", 1)[0]


def trained_runs(runs, prefix):
    """The runs whose name starts with prefix, without their eval runs."""
    return [n for n in runs if n.startswith(prefix) and not n.endswith("/eval")]


def plot_path(cfg, file):
    return os.path.join(cfg.plots, file)


def plot_link(cfg, label, file):
    """Markdown for a plot, its path relative to the results file (URL-quoted: a space or a
    parenthesis in --plots ended the link early, and no figure showed)."""
    results_dir = os.path.dirname(os.path.abspath(cfg.results)) or "."
    return f"![{label}]({quote(os.path.relpath(plot_path(cfg, file), results_dir))})"


def wall_clock_entries(path):
    """The invocations in wall_clock.json (one written before invocations were kept is one). The
    lab's own bookkeeping: an entry that cannot be read (a hand edit, a cut file; it ended the
    report in a TypeError) is left out with a note, and dropped when the file is next written."""
    record = load(path)
    entries = record.get("invocations") if isinstance(record, dict) else None
    if isinstance(record, dict) and isinstance(record.get("minutes"), (int, float)):
        entries = [record]
    entries = entries if isinstance(entries, list) else []
    numeric = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    read = [e for e in entries if isinstance(e, dict) and numeric(e.get("minutes"))
            and all(e.get(k) is None or numeric(e.get(k)) for k in ("ran", "runs"))]
    if os.path.exists(path) and (record is None or not entries or len(read) < len(entries)):
        print(f"note: {path}: an entry that cannot be read is left out of the lab wall clock",
              flush=True)
    return read


def wall_clock_text(cfg):
    """'lab wall clock M min on DATE for ...': every invocation's minutes added up."""
    entries = wall_clock_entries(os.path.join(cfg.out, "wall_clock.json"))
    if not entries:
        return "lab wall clock not recorded"
    dates = sorted({str(e.get("date", "?")) for e in entries})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    text = f"lab wall clock {sum(e['minutes'] for e in entries):.1f} min on {when}"
    ran, total = sum(e.get("ran") or 0 for e in entries), entries[-1].get("runs")
    if total is not None and ran >= total:  # (a run that was done again counts twice)
        text += f" for all {total} runs"
    elif total is not None:
        text += f" for the {ran} of {total} runs not already on disk"
    if len(entries) > 1:
        parts = " + ".join(f"{e['minutes']:.1f}" for e in entries)
        text += f" in {len(entries)} invocations ({parts} min)"
    timed = {c for e in entries if isinstance(e.get("claims"), list) for c in e["claims"]}
    if timed and timed < set(cfg.claims):  # the other claims' runs were on disk
        text += f" (a lab of {', '.join(c for c in CLAIMS if c in timed)} only)"
    return text


def intro_section(cfg, rebuilt):
    """Title, what ran where and for how long, the world and its settings."""
    world = load(os.path.join(cfg.world, "world.json")) or {}
    machine = (f"{platform.machine()} / {os.cpu_count()} CPU cores / "
               f"torch {__import__('torch').__version__}")
    duration = wall_clock_text(cfg)
    if rebuilt:
        duration += "; this report rebuilt from the runs on disk"
    questions = cfg.eval_limit or "all"
    rlhf_note = ""
    if "rlhf" in cfg.claims and len(rlhf_seeds(cfg)) < len(cfg.seeds):
        rlhf_note = f"; RLHF on seeds {', '.join(map(str, rlhf_seeds(cfg)))}"
    return [TITLE, "",
            f"Generated by `python lab.py` ({', '.join(cfg.claims)}; "
            f"seeds {', '.join(map(str, cfg.seeds))}{rlhf_note}) on {machine}, "
            f"{time.strftime('%Y-%m-%d')}; "
            + duration + ". Every number is measured on the Shapes world's held-out test split "
            f"({questions} questions per benchmark and POPE split, oracle judge); "
            "± is the standard deviation over seeds. Each run starts from the SFT checkpoint "
            f"`{cfg.sft}` (--sft).", "",
            "## The world and the baseline", "",
            f"World `{cfg.world}` (seed {world.get('seed')}, format {world.get('version')}): bias "
            f"and difficulty settings `{json.dumps(world.get('params', {}))}`; measured "
            f"co-occurrence stats `{json.dumps(world.get('stats', {}))}`.", "",
            "How the SFT baseline was calibrated (world seeds 0-2, the flaws-off controls, the "
            "issue's targets met and not met) is in README.md, section \"The Shapes world\".", ""]


def pope_overlap_section(cfg):
    """How far POPE's three splits ask the same questions (few shapes: more than on COCO)."""
    pope = {}
    for split in ("random", "popular", "adversarial"):
        p = os.path.join(cfg.world, f"pope_{split}.jsonl")
        questions = read_records(p) if os.path.exists(p) else []
        for i, q in enumerate(questions):
            for key in ("image", "text"):
                if not isinstance(q.get(key), str):
                    raise DataError(p, record=i + 1, field=key, message="expected a string")
        pope[split] = [(q["image"], q["text"]) for q in questions]
    if not pope["popular"] or len(pope["popular"]) != len(pope["adversarial"]):
        return []

    def same(a, b):
        return sum(x == y for x, y in zip(pope[a], pope[b])) / len(pope[a])
    return [f"POPE's three splits share their questions to a large degree here (with "
            f"{len(pope['random'])} questions each: popular = adversarial for "
            f"{same('popular', 'adversarial'):.0%} of them, random = popular for "
            f"{same('random', 'popular'):.0%}): with 6 shapes and 1-4 per image, few absent shapes "
            "are left to choose from, so the splits differ less than on COCO's 80 categories.", ""]


def lrv_section(cfg, runs, base):
    """LRV-Instruction: the negative share of the instruction set against POPE. -> (md, verdicts)"""
    rows = metric_rows(runs, trained_runs(runs, "lrv/"))
    g = group(rows, lambda r: f"neg share {setting(r).split('neg')[1]}")
    g.update(group(base, lambda r: "SFT (no LRV tuning)"))
    order = ["SFT (no LRV tuning)"] + [f"neg share {r}" for r in LRV_RATIOS]
    ms = ["POPE F1 random", "POPE F1 popular", "POPE F1 adversarial", "POPE accuracy",
          "POPE yes-ratio", "POPE |yes-ratio - 0.5|", "CHAIR_i"]
    md = ["## LRV-Instruction: negative instructions", "", md_table(g, ms, order), "",
          plot_link(cfg, "LRV", "lrv.png"), ""]
    bar_plot(plot_path(cfg, "lrv.png"), "LRV: POPE by negative-instruction share", g, ms, order)
    none, balanced = "neg share 0.0", "neg share 0.5"
    verdicts = [
        verdict(g, none, balanced, "POPE F1 adversarial", False,
                "LRV (balanced negatives raise POPE F1 on the adversarial split)"),
        verdict(g, none, balanced, "POPE |yes-ratio - 0.5|", True,
                "LRV (balanced negatives move the yes-ratio toward 0.5)"),
        verdict(g, none, balanced, "POPE accuracy", False,
                "LRV (balanced negatives raise POPE accuracy, averaged over the splits)")]
    return md, verdicts


# the facts control: the held-out pairs with another image's captions (reward.py)
OTHER_FACTS = "held-out, another image's captions"
PARTNER_GAP = "partner pairs minus all"  # accuracy on partner pairs - on all held-out pairs


def reward_model_groups(cfg):
    """{'RM with facts' / 'RM without facts': {metric: [held-out accuracy per seed]}}."""
    rm = {}
    for facts in ("facts", "nofacts"):
        label = f"RM {'with' if facts == 'facts' else 'without'} facts"
        for s in rlhf_seeds(cfg):
            path = os.path.join(cfg.out, f"rlhf/rm-{facts}-s{s}", "report.json")
            r = load(path)
            if not isinstance(r, dict):  # (not done: lab.is_done)
                continue
            for key, metric in (("val_accuracy", "held-out pair accuracy"),
                                ("val_accuracy_partner", "on pairs naming a co-occurring partner"),
                                ("val_accuracy_other_facts", OTHER_FACTS)):
                if number(path, r, key) is not None:
                    add_value(rm, label, metric, s, r[key])
            # partner pairs against all: facts help there most when this gap grows with them
            if r.get("val_accuracy") is not None and r.get("val_accuracy_partner") is not None:
                add_value(rm, label, PARTNER_GAP, s, r["val_accuracy_partner"] - r["val_accuracy"])
    return rm


# what the PPO table follows over steps (ppo.py's metrics.jsonl): key -> (column, scale, format)
PPO_CURVES = {"length": ("length (tokens)", 1, ".1f"),
              "halluc_per_answer": ("hallucinations/100", 100, ".0f"),
              "kl": ("KL from SFT (nats/answer)", 1, ".2f"), "score": ("RM score", 1, ".2f")}


def ppo_curves(cfg, runs=None):
    """{metric: {PPO variant: [per seed: value at each logged step]}} from each run's
    metrics.jsonl (the PPO_CURVES metrics); given runs, those among them alone."""
    curves = {key: {} for key in PPO_CURVES}
    for v in PPO_VARIANTS:
        for s in rlhf_seeds(cfg):
            if runs is not None and f"rlhf/ppo-{v}-s{s}" not in runs:
                continue
            run = os.path.join(cfg.out, f"rlhf/ppo-{v}-s{s}")
            p = os.path.join(run, "metrics.jsonl")
            # (a run not done: its log may end in half a line, and is not the run reported)
            done = os.path.exists(p) and os.path.exists(os.path.join(run, "DONE"))
            rows = read_records(p) if done else []
            rows = [r for r in rows if "length" in r]
            for key, (_, scale, _) in PPO_CURVES.items():
                values = [number(p, r, key) for r in rows if key in r]  # (null: NaN or inf
                curve = [scale * x for x in values if measured(x)]  # logged, as one absent)
                curves[key].setdefault(v, []).append(curve)
    return curves


def rlhf_section(cfg, runs, base):
    """LLaVA-RLHF: reward models with and without facts; PPO variants. -> (md, verdicts)"""
    rm = reward_model_groups(cfg)
    rows = metric_rows(runs, trained_runs(runs, "rlhf/ppo-"))
    g = group(rows, lambda r: "PPO " + setting(r)[len("rlhf/ppo-"):])
    g.update(group(base, lambda r: "SFT"))
    order = ["SFT"] + [f"PPO {v}" for v in PPO_VARIANTS]
    ms = ["CHAIR_i", "CHAIR_s", "POPE F1 adversarial", "POPE yes-ratio", "POPE |yes-ratio - 0.5|",
          "MMHal score", "MMHal halluc. rate", "answer words"]
    curves = ppo_curves(cfg, runs)
    rm_metrics = ["held-out pair accuracy", "on pairs naming a co-occurring partner", PARTNER_GAP,
                  OTHER_FACTS]
    md = ["## LLaVA-RLHF: factually augmented reward model and PPO", "",
          md_table(rm, rm_metrics, ["RM with facts", "RM without facts"]), "",
          f"'{OTHER_FACTS}': the facts RM scored on the same held-out pairs with the captions "
          "of another image; as accurate as with its own means it does not read its facts.", "",
          md_table(g, ms, order, {"answer words": ".1f", "MMHal score": ".2f"}), "",
          "PPO's rollouts, first -> last step, mean over seeds: response length, the oracle's "
          "hallucinations per 100 rollouts, the KL from the SFT policy (what the KL penalty "
          "charges), and the reward model's score (each RM has its own scale):", "",
          "| PPO variant | " + " | ".join(c for c, _, _ in PPO_CURVES.values()) + " |",
          "|---|" + "---|" * len(PPO_CURVES)]
    for v in PPO_VARIANTS:
        cells = []
        for key, (_, _, fmt) in PPO_CURVES.items():
            runs_v = [c for c in curves[key].get(v, []) if c]
            if not runs_v:
                cells.append("-")
                continue
            first = statistics.fmean(c[0] for c in runs_v)
            last = statistics.fmean(c[-1] for c in runs_v)
            cells.append(f"{first:{fmt}} -> {last:{fmt}}")
        if cells[0] != "-":
            md.append(f"| {v} | " + " | ".join(cells) + " |")
    md += ["", plot_link(cfg, "RLHF", "rlhf.png") + " "
           + plot_link(cfg, "PPO length", "rlhf_length.png"), ""]
    bar_plot(plot_path(cfg, "rlhf.png"), "Fact-RLHF: PPO variants", g,
             ["CHAIR_i", "CHAIR_s", "POPE F1 adversarial", "MMHal halluc. rate"], order)
    line_plot(plot_path(cfg, "rlhf_length.png"), "PPO response length", curves["length"],
              "tokens")
    verdicts = [
        verdict(rm, "RM without facts", "RM with facts", "held-out pair accuracy", False,
                "Fact-RLHF (facts raise the reward model's held-out accuracy)"),
        verdict(rm, "RM without facts", "RM with facts", "on pairs naming a co-occurring partner",
                False, "Fact-RLHF (facts help where the rejected answer names the partner)"),
        # (most there: the gain on partner pairs beats the gain on all pairs)
        verdict(rm, "RM without facts", "RM with facts", PARTNER_GAP, False,
                "Fact-RLHF (facts help most where the rejected answer names the partner: partner "
                "pairs gain more than all)"),
        verdict(g, "PPO no-facts", "PPO facts", "CHAIR_i", True,
                "Fact-RLHF (PPO against the fact-augmented RM hallucinates less than against the "
                "plain RM)"),
        verdict(g, "SFT", "PPO facts", "CHAIR_i", True, "RLHF (PPO lowers CHAIR_i from SFT)"),
        verdict(g, "SFT", "PPO facts", "POPE F1 adversarial", False,
                "RLHF (PPO raises POPE F1 on the adversarial split)"),
        verdict(g, "SFT", "PPO facts", "POPE |yes-ratio - 0.5|", True,
                "RLHF (PPO moves the yes-ratio toward 0.5: the issue's 'lowers it' for a "
                "yes-biased SFT, where a fall past 0.5 toward a collapse does not count)"),
        verdict(g, "PPO facts", "PPO no-facts", "answer words", False,
                "reward hacking (PPO against the plain RM grows answers more)"),
        verdict(g, "PPO no-length-penalty", "PPO facts", "answer words", True,
                "length penalty (it keeps answers shorter)"),
        verdict(g, "PPO no-correctness", "PPO facts", "POPE F1 adversarial", False,
                "correctness term (it helps POPE-style yes/no answers)")]
    return md, verdicts


def povid_section(cfg, runs, base):
    """POVID: DPO on injected pairs (stage 1), plus noisy-image answers (stage 2).
    -> (md, verdicts)"""
    label = {"povid/stage1": "DPO (POVID stage 1)", "povid/stage2": "POVID stage 2"}
    g = group(metric_rows(runs, trained_runs(runs, "povid/")), lambda r: label[setting(r)])
    g.update(group(base, lambda r: "SFT"))
    order = ["SFT", "DPO (POVID stage 1)", "POVID stage 2"]
    ms = ["CHAIR_i", "CHAIR_s", "POPE F1 random", "POPE F1 popular", "POPE F1 adversarial",
          "answer words"]
    md = ["## POVID: DPO with AI-made dispreferred answers", "",
          md_table(g, ms, order, {"answer words": ".1f"}), "",
          plot_link(cfg, "POVID", "povid.png"), ""]
    bar_plot(plot_path(cfg, "povid.png"), "POVID", g, ["CHAIR_i", "CHAIR_s", "POPE F1 adversarial"],
             order)
    verdicts = [
        verdict(g, "SFT", "DPO (POVID stage 1)", "CHAIR_i", True,
                "POVID stage 1 (DPO on injected pairs lowers CHAIR_i)"),
        verdict(g, "DPO (POVID stage 1)", "POVID stage 2", "CHAIR_i", True,
                "POVID stage 2 (noisy-image answers lower CHAIR_i further)")]
    return md, verdicts


def vigc_generation_groups(cfg):
    """{'VIG only' / 'VIG + VIC': {metric: [value per seed]}} from each VIGC run's report.json."""
    gen = {}
    metrics = (("hallucinations / 100 answers", "hallucinations_per_100"),
               ("answers with any", "answers_with_hallucination"),
               ("sentences / answer", "sentences_per_answer"))
    for s in cfg.seeds:
        path = os.path.join(cfg.out, f"vigc/vigc-s{s}", "report.json")
        r = load(path)
        if not isinstance(r, dict):  # (not done: lab.is_done)
            continue
        for k, label in (("vig_only", "VIG only"), ("vic", "VIG + VIC")):
            if k in r:
                if not isinstance(r[k], dict):
                    raise DataError(path, field=k, message=f"expected an object, got {r[k]!r:.40}")
                gen.setdefault(label, {})  # (the run is there, if nothing was counted)
                for m, key in metrics:  # (null: no generated answer parsed, nothing counted)
                    if key not in r[k]:
                        raise DataError(path, field=f"{k}.{key}", message="missing")
                    if number(path, r[k], key) is not None:
                        add_value(gen, label, m, s, r[k][key])
        parsed, images = number(path, r, "parsed"), number(path, r, "images")
        if parsed is not None and images is not None:
            add_value(gen, "VIG only", "parsed / generated", s, parsed / max(images, 1))
    return gen


def vigc_section(cfg, runs, base):
    """VIGC: hallucinations of generated answers with and without correction; SFT with the
    generated data. -> (md, verdicts)"""
    gen = vigc_generation_groups(cfg)
    label = {"original": "SFT data only", "plus-vig": "+ VIG-only data", "plus-vigc": "+ VIGC data"}
    rows = metric_rows(runs, trained_runs(runs, "vigc/sft-"))
    g = group(rows, lambda r: label[setting(r)[len("vigc/sft-"):]])
    order = ["SFT data only", "+ VIG-only data", "+ VIGC data"]
    ms = ["POPE F1 random", "POPE F1 adversarial", "CHAIR_i", "CHAIR_s", "answer words"]
    gms = ["hallucinations / 100 answers", "answers with any", "sentences / answer",
           "parsed / generated"]
    md = ["## VIGC: instruction generation and correction", "",
          md_table(gen, gms, ["VIG only", "VIG + VIC"], {"hallucinations / 100 answers": ".1f"}),
          "",
          "Continued SFT from the baseline, same steps, with and without the generated data:", "",
          md_table(g, ms, order, {"answer words": ".1f"}), "",
          plot_link(cfg, "VIGC", "vigc.png"), ""]
    bar_plot(plot_path(cfg, "vigc.png"), "VIGC: hallucinations per 100 generated answers", gen,
             ["hallucinations / 100 answers"], ["VIG only", "VIG + VIC"])
    data_claims = [("+ VIG-only data", "+ VIGC data",
                    "VIGC data (SFT plus VIGC data beats SFT plus VIG-only data on CHAIR_i)"),
                   ("SFT data only", "+ VIGC data", "VIGC data (adding it to SFT lowers CHAIR_i)")]
    empty = generated_nothing(cfg)
    if empty:  # (an empty file in --data adds nothing: those runs are the SFT data's again)
        md += [f"No generated record for seed(s) {', '.join(map(str, empty))} (no VIG output "
               "parsed): their '+' runs trained on the SFT data alone.", ""]
    verdicts = [verdict(gen, "VIG only", "VIG + VIC", "hallucinations / 100 answers", True,
                        "VIGC (iterative correction lowers hallucinations in generated answers)")]
    for a, b, claim in data_claims:
        if len(empty) == len(cfg.seeds):
            verdicts.append(f"- {claim}: not measured (no generated record on any seed).")
        else:
            verdicts.append(verdict(g, a, b, "CHAIR_i", True, claim))
    return md, verdicts


def generated_nothing(cfg):
    """The seeds whose VIGC run wrote an empty vig_only.json or vigc_data.json."""
    return [s for s in cfg.seeds
            if any(load(os.path.join(cfg.out, f"vigc/vigc-s{s}", f)) == []
                   for f in ("vig_only.json", "vigc_data.json"))]


# The anchor papers' models as published, on COCO (POPE) and MMHal-Bench, checked on 2026-12-03
# against the POPE and LLaVA-1.5 papers' tables, and LLaVA-RLHF's through two transcriptions that
# agree: (model, where, POPE F1 random / popular / adversarial, POPE yes-ratio averaged over the
# splits, MMHal score, MMHal hallucination rate); None: not in that table.
ANCHORS = [
    ("LLaVA-7B", "POPE paper (Li et al., EMNLP 2023), Table 3",
     (0.6865, 0.6772, 0.6698), (0.9537 + 0.9737 + 0.9910) / 3, None, None),
    ("LLaVA-7B", "LLaVA-1.5 paper, Table 4", (0.763, 0.722, 0.701), None, None, None),
    ("LLaVA-1.5-13B", "LLaVA-1.5 paper, Table 4", (0.871, 0.862, 0.845), None, None, None),
    ("LLaVA-SFT+ 7B", "LLaVA-RLHF paper, POPE table", (0.855, 0.824, 0.801), 0.471, None, None),
    ("LLaVA-RLHF 7B", "LLaVA-RLHF paper, POPE table", (0.833, 0.818, 0.795), 0.418, None, None),
    ("LLaVA-SFT+ 13B", "LLaVA-RLHF paper, POPE and MMHal-Bench tables", (0.848, 0.826, 0.811),
     0.419, 2.43, 0.55),
    ("LLaVA-RLHF 13B", "LLaVA-RLHF paper, POPE and MMHal-Bench tables", (0.835, 0.818, 0.805),
     0.390, 2.53, 0.57),
]


def anchor_section(base):
    """The SFT baseline beside the anchor papers' published models (base: metric_rows' row)."""
    def cell(x, f):
        return "-" if x is None else f"{x:{f}}"
    head = ("| model | source | POPE F1 random | POPE F1 popular | POPE F1 adversarial | "
            "POPE yes-ratio | MMHal score | MMHal halluc. rate |")
    lines = [head, "|---" * 8 + "|"]
    shapes_f1 = tuple(base.get(f"POPE F1 {s}") for s in ("random", "popular", "adversarial"))
    rows = [("Shapes SFT baseline", "this lab (oracle, held-out test split)", shapes_f1,
             base.get("POPE yes-ratio"), base.get("MMHal score"), base.get("MMHal halluc. rate"))]
    for model, source, f1, yes, score, rate in rows + ANCHORS:
        cells = [cell(x, ".3f") for x in (f1 or (None,) * 3)]
        cells += [cell(yes, ".3f"), cell(score, ".2f"), cell(rate, ".2f")]
        lines.append(f"| {model} | {source} | " + " | ".join(cells) + " |")
    return ["The baseline beside the anchor papers' models as published (COCO images, a judge "
            "model for MMHal-Bench; here the oracle on Shapes): compare the pathology's shape "
            "(yes-ratio above 0.5, the adversarial split the hardest), not its level. LLaVA "
            "says yes to most yes/no questions, which LLaVA-1.5's paper puts down to the lack of "
            "such questions in its data; LLaVA-SFT+ adds VQA-v2, A-OKVQA and Flickr30k to it. No "
            "CHAIR number of these models is quoted: none was checked against its paper.", "",
            *lines, ""]


def report(cfg, runs, commands, rebuilt=False):
    """RESULTS.md: the world and the SFT baseline, one section (tables, plots) per claim, the
    verdicts, and every command as run (commands: lab.report_runs' lines, each marked where its
    run is not reported; runs: the runs reported)."""
    os.makedirs(cfg.plots, exist_ok=True)
    base = metric_rows(runs, ["sft"])
    md = intro_section(cfg, rebuilt) + pope_overlap_section(cfg)
    if base:
        numbers = ", ".join(f"{k} {v:.3f}" for k, v in base["sft"].items())
        md += ["SFT baseline: " + numbers + ".", "", *anchor_section(base["sft"])]
    verdicts = []
    for claim, section in (("lrv", lrv_section), ("rlhf", rlhf_section), ("povid", povid_section),
                           ("vigc", vigc_section)):
        if claim in cfg.claims:
            lines, said = section(cfg, runs, base)
            md += lines
            verdicts += said
    md += ["## Verdicts", "", "A claim *held* when the mean moved the claimed way by more than the "
           "larger seed standard deviation. Where both sides ran the same seeds, 'paired by seed' "
           "counts the seeds on which the claimed side did better, and gives the mean and "
           "standard deviation of the seed-by-seed differences (second minus first); it does "
           "not change the verdict, whose rule was fixed before the first lab ran.", "",
           *verdicts, "", "## Commands", "",
           f"Every run's command (each wrote its log beside its folder in `{cfg.out}`; one "
           "marked 'not reported' did not finish, or was made with another command):", "",
           "```"]
    md += commands + ["```", ""]
    os.makedirs(os.path.dirname(cfg.results) or ".", exist_ok=True)
    common.write_whole(cfg.results, lambda f: f.write("\n".join(md)))  # (cut: read as a report)
    print("\n".join(verdicts))
    print(f"wrote {cfg.results} and plots in {cfg.plots}")
