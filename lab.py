"""The hallucination lab: each seed paper's central claim, measured on the Shapes world's held-out
test split (images drawn apart from the training ones, where the co-occurrence bias is broken; on
the default world about one in ten, each of a single shape, repeats a training image's pixels).

    python pipeline.py && python lab.py  # 4 claims x 5 seeds (RLHF 3): 49-113 min on 2 cores
    python lab.py --claims lrv povid --seeds 0 1 2
    python lab.py --report_only true     # rebuild RESULTS.md and the plots from the runs on disk
    python pipeline.py --world_seed 1 && python lab.py --world_seed 1     # recheck on another world

Every experiment starts from the same SFT checkpoint (--sft, the pipeline's ckpt/sft), is repeated
over --seeds (seed of data order, LoRA init, sampling and noise; the RLHF claim over the first
--rlhf_seeds of them), and is scored by eval.py with the exact oracle. A run is a plain stage
command (`python dpo.py ...`) in its own process; --jobs of them run side by side with one thread
each; a run whose output exists is not repeated, so an interrupted lab continues where it stopped
(OUT/lab.json ties OUT to one SFT checkpoint and world: a lab from another refuses it).
What each claim compares:

  lrv    LRV-Instruction: fine-tune on the world's SFT mix plus its LRV instruction set with
         negative share 0 / 0.25 / 0.5 -> POPE
  rlhf   LLaVA-RLHF: reward model with / without facts (held-out pair accuracy); PPO against
         each, and PPO without the length penalty / without the correctness term -> CHAIR, POPE,
         MMHal, length
  povid  POVID: SFT vs DPO on injected pairs (stage 1) vs stage 2 (from stage 1, + noisy-image
         answers)
         -> CHAIR, POPE
  vigc   VIGC: hallucinations per 100 generated answers, VIG only vs VIG + VIC; SFT on original data
         alone vs + VIG-only data vs + VIGC data (same steps) -> POPE, CHAIR
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from urllib.parse import quote

from PIL import Image, ImageDraw

import common
import distributed
import rundir
import shapes
from checkpoint import latest_checkpoint, refuse_scalar_model, resolve_checkpoint
from formats import DataError, json_lines, read_text


CLAIMS = ("lrv", "rlhf", "povid", "vigc")


@dataclass
class Config:
    """Run the ablations over several seeds and write RESULTS.md with tables and plots."""
    sft: str = "ckpt/sft"  # the SFT checkpoint every experiment starts from (pipeline.py writes it)
    world: str = "data/shapes"  # the Shapes world the SFT model was trained on
    world_seed: int = 0  # seed of that world; N > 0 moves every path option's default to NAME-seedN
    out: str = "runs/lab"  # one folder per run (checkpoints, logs, eval scores)
    results: str = "RESULTS.md"  # the report: tables, verdicts, commands, machine
    plots: str = "docs/lab"  # PNG plots, one per claim
    # which claims to run (the report also shows every other claim whose runs are all on disk)
    claims: tuple = CLAIMS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # seeds per configuration (mean and spread over them)
    # the RLHF claim runs on the first N seeds only: per seed its two 1000-step reward models take
    # about as long as the other three claims together (MINUTES)
    rlhf_seeds: int = 3
    jobs: int = 2  # runs side by side, one thread each
    steps: int = 0  # > 0: every run trains only this many steps (smoke test)
    eval_limit: int = 0  # eval questions per benchmark and POPE split (0: the whole test split)
    report_only: bool = False  # only rebuild RESULTS.md and the plots from finished runs
    device: str = "cpu"  # cpu or cuda
    # allowed values (common.parse_config refuses others in one line)
    RANGES = dict(world_seed="[0, inf)", claims=CLAIMS, seeds=common.SEED_RANGE,
                  rlhf_seeds="[1, inf)", jobs="[1, inf)", steps="[0, inf)", eval_limit="[0, inf)",
                  device=("cpu", "cuda"))


# ----------------------------------------------------------------------------- the runs
# Step budgets: long enough for each method to move the model (in all 49-113 min on 2 cores,
# within the 60-minute budget on one host of four: README).
LRV_RATIOS = (0.0, 0.25, 0.5)
PPO_VARIANTS = {"facts": ("facts", []), "no-facts": ("nofacts", []),
                "no-length-penalty": ("facts", ["--length_penalty", "0"]),
                "no-correctness": ("facts", ["--correctness", "0"])}


def rlhf_seeds(cfg):
    return cfg.seeds[:cfg.rlhf_seeds]


def plan(cfg):
    """{run name: (argv, the runs it needs, file that exists when it is done)} for the chosen
    claims."""
    runs, R = {}, lambda *p: os.path.join(cfg.out, *p)
    steps = lambda n: ["--max_steps", str(cfg.steps or n)]
    base = ["--world", cfg.world, "--world_seed", str(cfg.world_seed), "--device", cfg.device]

    # score a checkpoint on the held-out test split -> NAME/eval
    def add_eval(name, ckpt, bench, needs=()):
        argv = ["eval.py", "--ckpt", ckpt, "--out", R(name, "eval"), "--benchmarks", *bench,
                "--limit", str(cfg.eval_limit), *base]
        # (eval.py's folder name: a checkpoint-N is scored as RUN-checkpoint-N)
        ckpt_name = common.checkpoint_name(ckpt)
        runs[name + "/eval"] = (argv, list(needs), R(name, "eval", ckpt_name, "scores.json"))

    def add(name, script, argv, needs=(), done="", bench=None):
        runs[name] = ([script, *argv, *base], list(needs), done or R(name, "DONE"))
        if bench:  # its final checkpoint
            add_eval(name, R(name), bench, [name])

    all_bench = ("pope", "chair", "mmhal")
    add_eval("sft", cfg.sft, all_bench)
    tune = ["--init", cfg.sft, "--warmup", "10", "--report", "false",
            "--eval_every", "0", "--save_every", "100000", "--log_every", "25"]
    for s in cfg.seeds:
        seed = ["--seed", str(s)]
        if "lrv" in cfg.claims:
            for r in LRV_RATIOS:
                n = f"lrv/neg{r}-s{s}"
                # the main job's LRV budget (pipeline.BUDGET): 600 steps at 1e-3
                argv = [*tune, "--lrv", "true", "--neg_ratio", str(r), *steps(600), "--lr", "1e-3",
                        *seed, "--out", R(n)]
                add(n, "sft.py", argv, bench=("pope", "chair"))
        if "rlhf" in cfg.claims and s in rlhf_seeds(cfg):
            for facts in ("facts", "nofacts"):
                n = f"rlhf/rm-{facts}-s{s}"
                has_facts = str(facts == "facts").lower()
                # 1000 steps, not the main job's 150: at 150 a reward model ranks added sentences
                # and little else (docs/main-job-runs.md, format 11's measurements)
                argv = ["--init", cfg.sft, "--facts", has_facts, "--eval_prompt", "short",
                        *steps(1000), "--eval_every", "0", "--save_every", "100000", *seed,
                        "--out", R(n)]
                add(n, "reward.py", argv, done=R(n, "report.json"))
            for v, (rm, extra) in PPO_VARIANTS.items():
                n = f"rlhf/ppo-{v}-s{s}"
                rm_run = f"rlhf/rm-{rm}-s{s}"
                # the main job's PPO budget (pipeline.BUDGET): 30 steps at ppo.py's own lr
                argv = ["--init", cfg.sft, "--reward", R(rm_run), *steps(30),
                        "--rollout_batch", "32", "--minibatch_size", "16",
                        "--save_every", "100000", *extra, *seed, "--out", R(n)]
                add(n, "ppo.py", argv, needs=[rm_run], bench=all_bench)
        if "povid" in cfg.claims:
            for stage in (1, 2):
                n = f"povid/stage{stage}-s{s}"
                # stage 2 goes on from stage 1, its policy and reference (POVID's run_povid.sh
                # starts from POVID_stage_one_merged)
                first = f"povid/stage1-s{s}"
                init, needs = (cfg.sft, []) if stage == 1 else (R(first), [first])
                argv = ["--init", init, "--povid_stage", str(stage), *steps(100),
                        "--eval_every", "0", "--save_every", "100000", *seed, "--out", R(n)]
                add(n, "dpo.py", argv, needs=needs, bench=("pope", "chair"))
        if "vigc" in cfg.claims:
            g = f"vigc/vigc-s{s}"
            argv = ["--init", cfg.sft, *steps(300), "--batch_size", "32", "--lr", "2e-3",
                    "--generate", "120", "--save_every", "100000", *seed, "--out", R(g)]
            add(g, "vigc.py", argv, done=R(g, "report.json"))
            variants = (("original", ""), ("plus-vig", R(g, "vig_only.json")),
                        ("plus-vigc", R(g, "vigc_data.json")))
            for v, extra in variants:
                n = f"vigc/sft-{v}-s{s}"
                # ~8% generated records
                data = os.path.join(cfg.world, "sft.json") + (f",{extra}:4" if extra else "")
                argv = [*tune, "--lr", "5e-4", "--data", data, "--image_folder", cfg.world,
                        *steps(100), *seed, "--out", R(n)]
                add(n, "sft.py", argv, needs=[g] if extra else [], bench=("pope", "chair"))
    return runs


# minutes of one core per run at the lab's step budgets (AMD EPYC, 1 thread; a Xeon takes about
# half): only their ratios matter, to start the longest chains of work first
MINUTES = {"reward.py --facts true": 23, "reward.py": 13, "vigc.py": 6, "sft.py --lrv true": 3.5,
           "dpo.py": 2.7, "sft.py": 2, "ppo.py": 1.7, "eval.py": 0.4}


def minutes(argv):
    """The MINUTES entry of a run's command: its script, with the flag that changes its cost."""
    script, flags = argv[0], " ".join(argv[1:])
    for kind, m in MINUTES.items():
        if kind.startswith(script) and (kind == script or kind[len(script) + 1:] in flags):
            return m
    return 1.0


def chain_minutes(runs):
    """{run: its minutes plus the longest chain of runs that need it}. Started in that order, a
    2-core lab keeps both cores busy to the end; in plan order the last reward model or VIGC
    generation starts late and the runs behind it finish on one core."""
    chain = {}

    def walk(name):
        if name not in chain:
            after = [walk(k) for k, v in runs.items() if name in v[1]]
            chain[name] = minutes(runs[name][0]) + max(after, default=0.0)
        return chain[name]

    for name in runs:
        walk(name)
    return chain


def run_record(cfg, name):
    """Where a finished run's command is kept (in its folder, so a rerun removes it)."""
    return os.path.join(cfg.out, name, "lab_run.json")


def spelled(path):
    """A folder as the lab's commands spell it, one way: 'runs/lab/' is 'runs/lab', '-runs'
    './-runs' (run_lab spells --out, --sft and --world so; portable matches them so)."""
    return common.dash_free(os.path.normpath(path))


def portable(cfg, argv):
    """argv with the --out, --sft and --world folders written {out}, {sft}, {world}: runs moved
    with their lab to other folders keep matching their commands."""
    folders = [("{out}", cfg.out), ("{sft}", cfg.sft), ("{world}", cfg.world)]
    folders = sorted(((k, spelled(f)) for k, f in folders), key=lambda kv: -len(kv[1]))
    out = []
    for i, a in enumerate(argv):
        if a == "--device" or (i and argv[i - 1] == "--device"):  # (where it ran: not the recipe)
            continue
        for key, folder in folders:  # (a whole path or its start, in a list of paths too)
            a = re.sub(rf"(^|,){re.escape(folder)}(?=$|/|,|:)", lambda m: m.group(1) + key, a)
        out.append(re.sub(r"(\{(?:out|sft|world)\})/(?=$|,|:)", r"\1", a))  # ('ckpt/sft/')
    return out


def stale_runs(runs, cfg):
    """Runs on disk made with another command than today's plan gives them (a lab whose recipe
    changed since: their lab_run.json says so), and every run on disk that needs one of them or
    one that is not done (removed, or cut off while it ran again). A run finished before commands
    were recorded has no record: it is kept unless its checkpoint says it went on from another
    --init (POVID's stage 2 started from the SFT until 2026-12-03)."""
    missing = {k for k, v in runs.items() if not is_done(v[2])}
    stale = set()
    for name, (argv, _, done) in runs.items():
        record = None if name in missing else load(run_record(cfg, name))
        if isinstance(record, dict) and record.get("command") != portable(cfg, argv):
            stale.add(name)
        if record is None and name not in missing and from_another_init(cfg, name, argv):
            stale.add(name)
    while True:
        after = {k for k, v in runs.items()
                 if k not in stale | missing and (stale | missing).intersection(v[1])}
        if not after:
            return stale
        stale |= after


def is_done(done):
    """Whether a run's done-file is there, and, for the JSON reports that mark a run done
    (scores.json, report.json), holds a JSON object: a cut or damaged one counted as done forever,
    then ended the report in a traceback. Such a run is not done, and runs again."""
    return os.path.exists(done) and (not done.endswith(".json") or isinstance(load(done), dict))


def from_another_init(cfg, name, argv):
    """Whether the run's last checkpoint records an --init that names another checkpoint than
    argv's (one that no longer exists, as in a moved folder, is not judged)."""
    if "--init" not in argv:
        return False
    latest = latest_checkpoint(os.path.join(cfg.out, name))
    made = load(os.path.join(latest, "config.json")) if latest else None
    recorded = made.get("run_config") if isinstance(made, dict) else None
    init = recorded.get("init") if isinstance(recorded, dict) else None
    if not isinstance(init, str) or not os.path.exists(init):
        return False
    same = lambda path: os.path.realpath(resolve_checkpoint(path))
    return same(init) != same(argv[argv.index("--init") + 1])


def execute(runs, cfg, finished=lambda n: None):
    """Run what is not done yet, or was made with another command (stale_runs), --jobs at a time,
    each after the runs it needs; a failed run is reported (its log named) and the runs that need
    it are skipped. finished(n) is called each time a run ends well, n the number that have."""
    stale = stale_runs(runs, cfg)
    if stale:
        first = ", ".join(sorted(stale)[:3]) + (", ..." if len(stale) > 3 else "")
        print(f"{len(stale)} run(s) made with another command than today's, or after one that "
              f"was, run again ({first})", flush=True)
    todo = {k: v for k, v in runs.items() if not is_done(v[2]) or k in stale}
    for name in stale:  # (now, not as each starts: a lab stopped once a stale run was made again,
        # before the runs made from its old version started, left those done with today's
        # commands recorded: the next lab and its report took them as made from the new one;
        # and before its folder is removed: rmtree took DONE last, so a lab killed meanwhile left
        # a torn run counted done)
        if os.path.isfile(runs[name][2]):
            os.remove(runs[name][2])
    chain = chain_minutes(runs)
    running, failed, t0, n_ok = {}, set(), time.time(), 0
    here = os.path.dirname(os.path.abspath(__file__))
    # (a run dies with the lab: distributed.end_with_the_launcher)
    env = {**os.environ, common.STARTED_BY: str(os.getpid())}
    env.update({"OMP_NUM_THREADS": "1"} if cfg.jobs > 1 else {})
    n_done = len(runs) - len(todo)

    def keep(name):  # a run that ended well: its command, and its DONE where the lab writes one
        record, done = run_record(cfg, name), runs[name][2]
        os.makedirs(os.path.dirname(record), exist_ok=True)
        common.write_json({"command": portable(cfg, runs[name][0])}, record)
        if done.endswith("DONE"):
            open(done, "w").close()

    print(f"{n_done} of {len(runs)} runs already done; {len(todo)} to go ({cfg.jobs} at a time)",
          flush=True)
    try:
        while todo or running:
            # (until none is left: a run skipped here fails the runs that need it in turn; taken
            # once, stage 2's eval counted as ready and scored an old stage 2 from a failed stage 1)
            skipped = True
            while skipped:
                skipped = [k for k, v in todo.items() if any(n in failed for n in v[1])]
                for name in skipped:
                    failed.add(name)
                    del todo[name]
                    print(f"skip  {name}: a run it needs failed", flush=True)
            ready = [k for k, v in todo.items() if not any(n in todo or n in running for n in v[1])]
            ready.sort(key=lambda k: -chain[k])  # the longest chain of work first
            while ready and len(running) < max(cfg.jobs, 1):
                name = ready.pop(0)
                argv, _, _ = todo.pop(name)
                # a run that did not finish starts again from nothing
                folder = os.path.join(cfg.out, name)
                if os.path.isdir(folder):
                    shutil.rmtree(folder)
                log_suffix = "-eval.log" if name.endswith("/eval") else ".log"
                log = os.path.join(cfg.out, name.replace("/eval", "") + log_suffix)
                os.makedirs(os.path.dirname(log), exist_ok=True)
                cmd = [sys.executable, os.path.join(here, argv[0]), *argv[1:]]
                # (started with SIGINT ignored, a `lab.py &` in a script: common's handler drops
                # it, so the runs take the SIGINT that stops them, in their own session; a signal
                # between starting a run and recording it is taken once it is recorded)
                with open(log, "w") as f, distributed.stop_signals_deferred():
                    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                            **distributed.stage_process_kwargs())
                    running[name] = (proc, log, time.time())
                print(f"start {name}: python {shlex.join(argv)}", flush=True)
            time.sleep(0.2)
            for name, (p, log, t) in list(running.items()):
                if p.poll() is None:
                    continue
                del running[name]
                if p.returncode != 0:
                    failed.add(name)
                else:
                    keep(name)
                    n_ok += 1
                    finished(n_ok)
                said = "done " if p.returncode == 0 else "FAIL "
                ended = p.returncode and f" ({distributed.ended_how(p.returncode)}; see {log})"
                print(f"{said} {name} in {time.time() - t:.0f}s{ended or ''}"
                      f" | {(time.time() - t0) / 60:.1f} min so far", flush=True)
    except BaseException as e:  # (Ctrl-C or SIGTERM sent to the lab alone, or an error of its
        # own, such as a log path that is a folder: its runs went on as orphans)
        # (Ctrl-C: a terminal's reached them too: their own exit first, not a second interrupt
        # in their last words; a further signal meanwhile is dropped, not left to cut the stop)
        distributed.stop_processes([proc for proc, _, _ in running.values()],
                                   grace=isinstance(e, KeyboardInterrupt))
        # (one that ended well before its poll, or in the stop's grace wait, is kept: it was
        # run again from nothing, a reward model's 23 minutes among them)
        for name, (p, _, _) in running.items():
            if p.returncode == 0:
                keep(name)
                n_ok += 1  # (and its minutes: the report's wall clock counts the runs it made)
                finished(n_ok)
        raise
    return failed


TITLE = "# Results: the hallucination lab"  # a report's first line: lab.py replaces only these


def refuse_foreign_results(path):
    """--results replaces the file it names once the runs have ended: one there already must be a
    report lab.py wrote (a typo'd --results world.json or README.md was overwritten)."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:  # (an editor's BOM)
            first = f.readline().rstrip("\r\n")
    except FileNotFoundError:
        return
    except OSError as e:
        raise common.ConfigError(f"--results {path}: cannot be read ({e.strerror})")
    if first != TITLE and os.path.getsize(path) > 0:  # (an empty file holds nothing to lose)
        raise common.ConfigError(f"--results {path}: exists and is not a lab report (its first "
                                 f"line is not {TITLE!r}); choose another file, or remove it")


def refuse_foreign_plots(folder):
    """--plots: not a world, a checkpoint or a training run (its plots were written into it)."""
    for held, what in (("world.json", "a Shapes world"), ("config.json", "a checkpoint")):
        if os.path.isfile(os.path.join(folder, held)):
            raise common.ConfigError(f"--plots {folder}: holds {what} ({held}); choose a folder "
                                     "of plots")
    if os.path.isdir(folder) and latest_checkpoint(folder):
        raise common.ConfigError(f"--plots {folder}: holds a training run (checkpoint-N); choose "
                                 "a folder of plots")


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


def save_wall_clock(cfg, started, minutes, ran, n_runs):
    """OUT/wall_clock.json: each invocation of the lab that finished a run, with its minutes up to
    its last finished run (a lab killed mid-run starts those runs again, so time spent on them is
    not the lab's), how many runs it finished, and the claims it was asked for. Called after every
    finished run: an interrupted lab keeps its time, and a resumed one adds to it."""
    path = os.path.join(cfg.out, "wall_clock.json")
    before = [entry for entry in wall_clock_entries(path) if entry.get("start") != started]
    entry = {"start": started, "date": started[:10], "minutes": round(minutes, 1), "ran": ran,
             "runs": n_runs, "claims": list(cfg.claims)}
    os.makedirs(cfg.out, exist_ok=True)
    common.write_json({"invocations": before + [entry]}, path, indent=None)


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
            if not isinstance(r, dict):  # (not done: is_done)
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
        if not isinstance(r, dict):  # (not done: is_done)
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


def refuse_unmeasured(cfg):
    """--report_only: each claim and each seed given has a finished run in --out (the SFT
    baseline's eval, done for every seed, made a report of seeds or claims never run). Left at
    their defaults (every claim, seeds 0-4), they report what is there."""
    runs = plan(cfg)
    done = [name for name, (_, _, path) in runs.items() if is_done(path)]
    for claim in cfg.claims if cfg.claims != Config.claims else ():
        if not any(name.startswith(claim + "/") for name in done):
            raise common.ConfigError(f"--claims {claim}: no finished run of it in --out {cfg.out} "
                                     "to report; run it first, or leave it out of --claims")
    seed_of = lambda name: name.split("/")[1].rpartition("-s")[2]  # ('lrv/neg0.5-s3/eval': 3)
    seeded = [name for name in runs if not name.startswith("sft/")]
    for seed in cfg.seeds if cfg.seeds != Config.seeds else ():  # (RLHF: --rlhf_seeds of them)
        planned = any(seed_of(name) == str(seed) for name in seeded)
        if planned and not any(seed_of(name) == str(seed) for name in done if name in seeded):
            raise common.ConfigError(f"--seeds {seed}: no finished run of this seed in --out "
                                     f"{cfg.out} to report; run it first, or leave it out of "
                                     "--seeds")


def reported_claims(cfg):
    """The claims RESULTS.md covers: the ones asked for, and every other one whose runs for these
    seeds are all on disk (`--claims lrv` keeps the other claims' tables, not only its own)."""
    def on_disk(claim):  # (and made with today's commands: stale_runs)
        one = replace(cfg, claims=(claim,))
        runs = plan(one)
        return all(is_done(done) for _, _, done in runs.values()) and not stale_runs(runs, one)
    return tuple(c for c in CLAIMS if c in cfg.claims or on_disk(c))


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


def report(cfg, runs, rebuilt=False):
    """RESULTS.md: the world and the SFT baseline, one section (tables, plots) per claim, the
    verdicts, and every command as run. A stale run (stale_runs: left on disk by a lab whose run
    before it failed, so it was not made again) is not reported."""
    os.makedirs(cfg.plots, exist_ok=True)
    # (a run not done, failed or skipped, or one left stale: listed as asked, said so)
    stale = stale_runs(runs, cfg)
    # (shell-quoted: a path with a space or a parenthesis made a command that does not run)
    commands = ["python " + shlex.join(argv) + ("" if is_done(done) and name not in stale else
                                                "  # not reported: not done, or made otherwise")
                for name, (argv, _, done) in runs.items()]
    runs = {k: v for k, v in runs.items() if k not in stale}
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


def lab_stamp(cfg):
    """What lab.json records: the sha256 of the SFT checkpoint's files and of the world's
    world.json, and the flags that change every run."""
    ckpt = latest_checkpoint(cfg.sft) or cfg.sft
    files = sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt)
                   if f.endswith((".safetensors", ".bin", "config.json")))
    world = [os.path.join(cfg.world, "world.json")]
    return {"sft": {os.path.basename(p): h for p, h in rundir.file_digests(files).items()},
            "world": list(rundir.file_digests(world).values()),
            "flags": {"steps": cfg.steps, "eval_limit": cfg.eval_limit}}


def check_out_matches(cfg):
    """A run on disk is reused, so --out must hold runs from this --sft on this --world, made with
    this --steps and --eval_limit, only: OUT/lab.json records the sha256 of the SFT checkpoint's
    files and of the world's world.json, and those two flags; a lab from another SFT (a new
    pipeline run), world or budget refuses OUT instead of mixing its runs with theirs (the report
    prints every command with today's flags). An OUT from before lab.json existed is taken as it
    is, and a lab.json from before it recorded the flags is taken as made with today's. Returns
    today's stamp."""
    stamp = lab_stamp(cfg)
    path = os.path.join(cfg.out, "lab.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                was = json.load(f)
        except (OSError, ValueError) as e:
            raise common.ConfigError(f"{path}: cannot read ({type(e).__name__}); it ties --out to "
                                     "one SFT checkpoint and world: move --out aside")
        if not isinstance(was, dict):
            raise common.ConfigError(f"{path}: not a JSON object; it ties --out to one SFT "
                                     "checkpoint and world: move --out aside")
        was.setdefault("flags", stamp["flags"])
        if not isinstance(was["flags"], dict):
            raise common.ConfigError(f"{path}: 'flags' is not a JSON object; it ties --out to "
                                     "one budget: move --out aside")
        if was["flags"] != stamp["flags"]:
            made = " ".join(f"--{k} {v}" for k, v in sorted(was["flags"].items()))
            raise common.ConfigError(f"--out {cfg.out}: holds runs made with {made} (recorded in "
                                     f"{path}): move it aside or pass another --out")
        if was != stamp:
            other_sft = was.get("sft") != stamp["sft"]
            other = f"SFT checkpoint than --sft {cfg.sft}" if other_sft else \
                f"world than --world {cfg.world}"
            raise common.ConfigError(f"--out {cfg.out}: holds runs from another {other} "
                                     f"(recorded in {path}): move it aside or pass another --out")
        return stamp
    os.makedirs(cfg.out, exist_ok=True)
    common.write_json(stamp, path)  # whole or absent: a lab killed here leaves no half stamp
    return stamp


def refuse_unfinished_sft(cfg):
    """An --sft run still written (a killed pipeline's SFT process), or stopped before its last
    step: every run would start from a model its run was not to make (a note in each run's log
    said so)."""
    holder = rundir.lock_holder(cfg.sft)
    if holder:
        raise common.ConfigError(f"--sft {cfg.sft}: a process (pid {holder}) is still writing "
                                 "there; wait for it to end, or stop it")
    progress = rundir.run_progress(cfg.sft)
    if progress and progress[0] < progress[1]:
        raise common.ConfigError(f"--sft {cfg.sft} stopped at step {progress[0]} of "
                                 f"{progress[1]} (unfinished): finish it (sft.py with --out "
                                 "there and --resume true) or train it again")


def refuse_live_writers(cfg, runs, stale):
    """A run folder this lab would start again (removing it first) that a live process still
    writes: a run of a lab killed earlier (its runs go on); both wrote there at once."""
    for name, (_, _, done) in runs.items():
        if is_done(done) and name not in stale:  # (done: left as it is)
            continue
        folder = os.path.join(cfg.out, name)
        holder = rundir.lock_holder(folder)
        if holder:
            raise common.ConfigError(f"{folder}: a process (pid {holder}) is still writing there "
                                     "(a run of a lab stopped earlier?); wait for it to end, or "
                                     "stop it, then run lab.py again")


def refuse_missing_world(cfg):
    """--world must hold a world (the SFT's): with none, every stage wrote a default-size world of
    its own and trained on it, lab.json recorded no world, and --report_only blamed "another
    world"."""
    how = ("pass the world the --sft checkpoint was trained on (--world, --world_seed; "
           "python pipeline.py writes it)")
    if not os.path.exists(cfg.world):
        raise common.ConfigError(f"--world {cfg.world}: not found; {how}")
    if not os.path.isfile(os.path.join(cfg.world, "world.json")):
        raise common.ConfigError(f"--world {cfg.world}: holds no world.json (not a Shapes world); "
                                 f"{how}")


def refuse_out_in_sft(cfg):
    """--out is not the --sft run folder, inside it, or around it: every run failed on the lab's
    own lock (and lab.json, the runs' folders and their removal went among the SFT's files)."""
    out, sft = os.path.realpath(cfg.out), os.path.realpath(cfg.sft)
    if out == sft or out.startswith(sft + os.sep):
        where = "is" if out == sft else "lies inside"
        raise common.ConfigError(f"--out {cfg.out} {where} the --sft folder {cfg.sft}: the runs "
                                 "would be written among its files; choose another --out")
    # (the lab removes a run folder before running it again: an SFT inside one would go; one
    # elsewhere under --out, runs/pipe/sft beside runs/lab's folders, is left alone)
    top = sft[len(out) + 1:].split(os.sep)[0] if sft.startswith(out + os.sep) else None
    if top in {name.split("/")[0] for name in plan(replace(cfg, claims=CLAIMS))}:
        raise common.ConfigError(f"--out {cfg.out} holds the --sft folder {cfg.sft} in its run "
                                 f"folder '{top}', which the lab removes and writes again; keep "
                                 "the SFT checkpoint out of it")


# (common's line names --resume true: the lab takes no such flag)
INTERRUPTED = ("interrupted: the runs that ended are kept; the same command goes on from them "
               "(the runs cut off start again)")


def main(cfg):
    try:
        run_lab(cfg)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None


def run_lab(cfg):
    common.refuse_torchrun("lab.py", "it starts its runs as processes of its own, --jobs at a time")
    # python pipeline.py --world_seed N writes ckpt-seedN/sft
    if cfg.world_seed and cfg.sft == Config.sft:
        cfg.sft = f"ckpt-seed{cfg.world_seed}/sft"
    common.seed_suffix(cfg, Config, ("world", "out", "results", "plots"))
    cfg = common.replace_config(cfg, out=spelled(cfg.out), sft=spelled(cfg.sft),
                                world=spelled(cfg.world))
    if not cfg.report_only:  # (every run would fail, and the report be written of none)
        distributed.check_device(cfg.device)
    unknown = [c for c in cfg.claims if c not in CLAIMS]
    if unknown:
        raise common.ConfigError(f"--claims: unknown '{unknown[0]}' "
                                 "(choose from lrv, rlhf, povid, vigc)")
    sft_config = os.path.join(resolve_checkpoint(cfg.sft), "config.json")
    trains = not cfg.report_only  # (every run would fail, then the report replaces --results)
    if not os.path.isdir(cfg.sft) or (trains and not os.path.isfile(sft_config)):
        seed = f" --world_seed {cfg.world_seed}" if cfg.world_seed else ""
        raise common.ConfigError(f"--sft {cfg.sft}: checkpoint not found (no config.json; run "
                                 f"python pipeline.py{seed} first, or pass --sft DIR)")
    refuse_missing_world(cfg)
    refuse_out_in_sft(cfg)
    if trains:  # (else every run fails, and the report of none replaces --results)
        refuse_scalar_model(resolve_checkpoint(cfg.sft))
        refuse_unfinished_sft(cfg)
        shapes.ensure_world(cfg.world, seed=cfg.world_seed)  # (checked, never rewritten)
        other = rundir.other_world(resolve_checkpoint(cfg.sft), cfg.world)
        if other:  # (every run trained, and was scored, on a world the SFT never saw)
            raise common.ConfigError(f"--sft {cfg.sft} {other[1]}: pass the world it was trained "
                                     "on (--world, --world_seed), or its SFT (--sft)")
    if cfg.report_only:  # (refused for "another command": the --world_seed in each run's)
        try:
            was = shapes.read_world_json(cfg.world).get("seed")
        except (OSError, ValueError, AttributeError):
            was = None  # (the runs' commands are compared below)
        if isinstance(was, int) and was != cfg.world_seed:
            raise common.ConfigError(f"--world {cfg.world} holds the world of seed {was}, not "
                                     f"--world_seed {cfg.world_seed}: pass its seed")
    for flag, path in (("--out", cfg.out), ("--results", cfg.results), ("--plots", cfg.plots)):
        rundir.refuse_in_world(flag, path, cfg.world)
    for flag, path in (("--out", cfg.out), ("--plots", cfg.plots)):
        rundir.check_output_path(flag, path)
    rundir.check_output_path("--results", cfg.results, folder=False)  # (checked before any run:
    # it is written once they have ended)
    refuse_foreign_results(cfg.results)
    refuse_foreign_plots(cfg.plots)
    # --report_only on an --out that holds no finished run (a typo, another --world_seed) would
    # replace --results with a report of nothing
    if cfg.report_only and not any(is_done(done) for _, _, done in
                                   plan(replace(cfg, claims=CLAIMS)).values()):
        raise common.ConfigError(f"--out {cfg.out}: no finished run to report (--report_only "
                                 f"true would replace {cfg.results} with an empty report); check "
                                 "--out and --seeds")
    if cfg.report_only:  # (a typo'd --seeds or --claims: a report of runs that never ran)
        refuse_unmeasured(cfg)
        rundir.refuse_unread(cfg, ["jobs", "device"], "with --report_only true (nothing is run); "
                             "drop it")
    if not cfg.report_only:  # (before lab.json is written: a lab refused here, a second one on
        # this --out, had replaced the stamp of the lab running there with its own SFT's)
        rundir.ensure_writable(cfg.out)
        rundir.lock_out(cfg.out)  # one lab per --out (two trained one run folder at once)
    stamp = check_out_matches(cfg)
    if cfg.report_only:  # (a report of runs today's lab would not make)
        # (of the claims reported: another claim's stale runs leave it out of the report, as in
        # a lab that runs; refused for them, this advice did not run them)
        shown = replace(cfg, claims=reported_claims(cfg))
        stale = sorted(stale_runs(plan(shown), cfg))
        if stale:
            raise common.ConfigError(f"--out {cfg.out}: {len(stale)} run(s) were made with "
                                     "another command than today's lab gives them, or from a run "
                                     f"no longer done ({stale[0]}: {run_record(cfg, stale[0])}); "
                                     "run this command without --report_only to run them again")
    runs, t0 = plan(cfg), time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    failed, ran = set(), 0
    if not cfg.report_only:
        stale = stale_runs(runs, cfg)
        refuse_live_writers(cfg, runs, stale)
        ran = sum(not is_done(v[2]) or k in stale for k, v in runs.items())
        clock = lambda n: save_wall_clock(cfg, started, (time.time() - t0) / 60, n, len(runs))
        failed = execute(runs, cfg, clock)
        try:
            now = lab_stamp(cfg)
        except OSError:  # (the SFT folder moved aside: --overwrite true)
            now = None
        if now != stamp:  # (lab.json keeps the old one: the next lab refuses --out)
            which = " and ".join(f"--{k} {getattr(cfg, k)}" for k in ("sft", "world")
                                 if (now or {}).get(k, "moved") != stamp[k])
            raise common.ConfigError(f"{which} changed while the lab ran (a pipeline run again, "
                                     f"an SFT resumed): the runs in --out {cfg.out} start from "
                                     f"either; {cfg.results} left as it was: move --out aside "
                                     "and run again")
    shown = replace(cfg, claims=reported_claims(cfg))
    if failed and len(failed) >= ran:  # (a report then holds nothing new, maybe less than before)
        print(f"no run ended well: {cfg.results} left as it was", flush=True)
    else:
        report(shown, plan(shown), rebuilt=ran == 0)
    if failed:
        names = ", ".join(sorted(failed))
        print(f"error: {len(failed)} run(s) failed or were skipped: {names}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    cfg = common.parse_config(Config)
    distributed.interrupt_on_sigterm()
    with common.user_errors(interrupted=INTERRUPTED):  # (said where its output's reader ended)
        main(cfg)
