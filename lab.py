"""The hallucination lab: each seed paper's central claim, measured on the Shapes world's held-out
test split (images drawn apart from the training ones, where the co-occurrence bias is broken; on
the default world about one in ten, each of a single shape, repeats a training image's pixels).

    python pipeline.py && python lab.py  # 4 claims x 5 seeds (RLHF 3): 48-113 min on 2 cores
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
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import common
import distributed
import lab_report
import rundir
import shapes
from checkpoint import latest_checkpoint, refuse_scalar_model, resolve_checkpoint
from lab_report import (CLAIMS, LRV_RATIOS, PPO_VARIANTS, TITLE, load, rlhf_seeds,
                        wall_clock_entries)


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
# Step budgets: long enough for each method to move the model (in all 48-113 min on 2 cores,
# within the 60-minute budget on the two fast hosts of four: README).
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


def report_runs(cfg, runs, rebuilt=False):
    """RESULTS.md (lab_report.report) of the planned runs, and every command as run. A stale run
    (stale_runs: left on disk by a lab whose run before it failed, so it was not made again) is
    not reported."""
    # (a run not done, failed or skipped, or one left stale: listed as asked, said so)
    stale = stale_runs(runs, cfg)
    # (shell-quoted: a path with a space or a parenthesis made a command that does not run)
    commands = ["python " + shlex.join(argv) + ("" if is_done(done) and name not in stale else
                                                "  # not reported: not done, or made otherwise")
                for name, (argv, _, done) in runs.items()]
    lab_report.report(cfg, {k: v for k, v in runs.items() if k not in stale}, commands, rebuilt)


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
        report_runs(shown, plan(shown), rebuilt=ran == 0)
    if failed:
        names = ", ".join(sorted(failed))
        print(f"error: {len(failed)} run(s) failed or were skipped: {names}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    cfg = common.parse_config(Config)
    distributed.interrupt_on_sigterm()
    with common.user_errors(interrupted=INTERRUPTED):  # (said where its output's reader ended)
        main(cfg)
