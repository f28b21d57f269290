r"""The main job: every stage on the built-in Shapes world, then one comparison table.

    python pipeline.py                # SFT -> LRV, RM -> PPO, DPO/POVID, VIGC -> eval (2 CPU cores)
    python pipeline.py --world_seed 1 # other world: data/shapes-seed1, ckpt-seed1, runs/eval-seed1
    python pipeline.py --steps 2 --model tiny --world /tmp/w --out /tmp/ck \
        --eval_out /tmp/ev  # the suite's smoke test (all its outputs under /tmp)

Each stage is the plain script (`python sft.py`, `python reward.py`, ...) with its defaults plus the
step budget below, run as its own process exactly as a user would; each reads the previous stage's
output. After SFT, the two independent lanes (LRV -> reward model -> PPO, and DPO -> VIGC) run side
by side, one thread each: on a 2-core CPU two single-threaded processes get ~1.7x the work done of
one with two.
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import common
import distributed
import rundir
from checkpoint import base_fingerprint, base_weights_dir, is_peft_dir, latest_checkpoint


STAGES = ("sft", "lrv", "rm", "ppo", "dpo", "vigc", "eval")


@dataclass
class Config:
    """Run the whole Shapes pipeline and print the comparison table."""
    out: str = "ckpt"  # root of the stage outputs: OUT/sft, lrv, rm, ppo, dpo, vigc
    world: str = "data/shapes"  # the Shapes world (written on first use)
    world_seed: int = 0  # world seed; N > 0 moves --world, --out, --eval_out defaults to NAME-seedN
    stages: tuple = STAGES  # sft; lrv->rm->ppo beside dpo->vigc; eval
    steps: int = 0  # > 0: every stage trains only this many steps (smoke test)
    model: str = "shapes"  # model preset for SFT from scratch (tiny for the smoke test)
    eval_out: str = "runs/eval"  # where eval.py writes answers, scores and compare.md
    eval_limit: int = 0  # questions per benchmark (0: eval.py's Shapes defaults)
    device: str = "cpu"  # cpu or cuda
    jobs: int = 2  # lanes run side by side after SFT (1: strictly one stage at a time)
    overwrite: bool = False  # stages whose --out holds a run move it aside (kept) and run again
    # allowed values (common.parse_config refuses others in one line)
    RANGES = dict(world_seed="[0, inf)", stages=STAGES, steps="[0, inf)",
                  model=("tiny", "shapes", "bench", "llava-7b", "llava-13b"), eval_limit="[0, inf)",
                  device=("cpu", "cuda"), jobs="[1, inf)")


# The 12-minute budget on 2 CPU cores: what the pipeline passes beyond each stage's defaults. The
# reward model reads the same facts through the short evaluation turn (half the tokens of
# LLaVA-RLHF's verbatim one, which stays reward.py's default for real runs). PPO keeps its own lr
# (5e-4): at 2e-3 the policy drifted ~8 nats of KL per answer in 30 steps and said "no" to nearly
# every yes/no question (yes-ratio 0.06 and 0.09 from two SFT runs; docs/main-job-runs.md). LRV
# runs 600 steps at 1e-3 (about a minute): at 150 steps and 5e-4 it moved the yes-ratio without
# teaching the model to look (POPE recall 0.995 -> 0.777 at the same accuracy on seed 0). The
# reward model stays at 150 steps, the budget's trade-off: 1000 reach 0.79 held-out, not 0.66, but
# take ~8 minutes (lab.py trains 1000).
BUDGET = {
    "lrv": ["--lrv", "true", "--max_steps", "600", "--lr", "1e-3", "--warmup", "10",
            "--report", "false", "--eval_every", "0", "--save_every", "600"],
    "rm": ["--eval_prompt", "short", "--max_steps", "150", "--eval_every", "50",
           "--save_every", "50"],
    "ppo": ["--max_steps", "30", "--rollout_batch", "32", "--minibatch_size", "16",
            "--save_every", "10"],
    "dpo": ["--max_steps", "150", "--eval_every", "75", "--save_every", "75"],
    "vigc": ["--max_steps", "300", "--batch_size", "32", "--lr", "2e-3", "--generate", "100"],
}


def compared_models(cfg):
    """What eval compares: every model under --out, those these --stages train beside those there
    already (--stages lrv,eval compared LRV alone, without its SFT baseline; going on after an
    interrupt with --stages naming the rest left the models already trained out of the table).
    Where sft is trained, the others there are not compared: they sit on the SFT it replaces."""
    models = {s: os.path.join(cfg.out, s) for s in ("sft", "lrv", "ppo", "dpo")}
    kept = "sft" not in cfg.stages
    return [m for s, m in models.items() if s in cfg.stages or (kept and os.path.isdir(m))]


def on_weights_of(run, sft_ck):
    """Whether the newest checkpoint of `run` holds adapters trained on the weights in `sft_ck`
    (its base_fingerprint: by content, where file times mislead: a plain `cp -r` resets them, and
    a copy keeping them can hide a replaced SFT); None where it records none (a full model, as
    LRV's: the times decide)."""
    try:
        with open(os.path.join(latest_checkpoint(run), "config.json")) as f:
            saved = json.load(f).get("base_fingerprint")
    except (OSError, ValueError, AttributeError):  # (unreadable: refuse_unusable_inputs' to say)
        return None
    if not isinstance(saved, str):
        return None
    return saved == base_fingerprint(base_weights_dir(sft_ck))


def refuse_stale_models(cfg, models):
    """A model under --out older than the SFT checkpoint it would be compared with was trained
    from an SFT run since replaced or extended (e.g. --stages sft --overwrite true, then --stages
    eval): the table would set models of two SFT runs side by side. A model of adapters is
    judged by the fingerprint of the base weights it recorded (on_weights_of); a full one by the
    SFT checkpoint its run.json names and by file times."""
    def written(run):  # (its newest checkpoint's config.json: written last)
        ck = latest_checkpoint(run)
        return os.path.getmtime(os.path.join(ck, "config.json")) if ck else None
    sft = os.path.join(cfg.out, "sft")
    sft_time = written(sft)
    retrained = {os.path.join(cfg.out, s) for s in cfg.stages}  # (trained again before eval)
    sft_now = latest_checkpoint(sft) if os.path.isdir(sft) else None
    for m in models:
        m_time = written(m) if m != sft and m not in retrained else None
        # the SFT checkpoint its run started from (run.json), where recorded: another SFT run's
        # checkpoint can be older than the model (one pipeline replaced the SFT while another's
        # later stages still trained on the first). By name (checkpoint-N): a ckpt/ tree moved
        # elsewhere keeps working; a replacing run of as many steps is left to the time check
        init = rundir.recorded_init(m) if m_time is not None and sft_now else None
        other = init is not None and os.path.basename(os.path.normpath(init)) != \
            os.path.basename(sft_now)
        stale = other or (sft_time is not None and m_time is not None and m_time < sft_time)
        same = on_weights_of(m, sft_now) if m_time is not None and sft_now else None
        if same is not None:  # (adapters with their base's fingerprint: the weights decide)
            stale = not same
        if stale:
            later = [s for s in STAGES if s not in ("sft", "eval")]
            raise common.ConfigError(f"--stages {','.join(cfg.stages)}: {m} was trained before "
                                     f"{sft}'s newest checkpoint or from another one, from an SFT "
                                     "run since replaced or extended: run --stages "
                                     f"{','.join(later)},eval again (or its own stage with "
                                     "--overwrite true, or move it aside)")


def has_checkpoint(run):
    """Whether a run folder holds a checkpoint a later stage can read (or is one: ours, or a
    PEFT adapter folder)."""
    return os.path.isfile(os.path.join(run, "config.json")) or is_peft_dir(run) \
        or bool(latest_checkpoint(run))


def refuse_unusable_inputs(cfg, runs):
    """Runs under --out that later stages read or eval compares, trained by an earlier pipeline:
    one still being written by a stage process that pipeline left behind (killed), or one that
    stopped before its last step (its newest checkpoint is not the model its run was to make),
    or one that stopped before its first checkpoint (nothing to read)."""
    for run in runs:
        holder = rundir.lock_holder(run)
        if holder:
            raise common.ConfigError(f"--stages {','.join(cfg.stages)}: {run}: a process (pid "
                                     f"{holder}) is still writing there (a stage of a pipeline "
                                     "stopped earlier?); wait for it to end, or stop it")
        if not has_checkpoint(run):  # (the later stage failed on it: no config.json)
            stage = os.path.basename(run)
            raise common.ConfigError(f"--stages {','.join(cfg.stages)}: {run} holds no checkpoint "
                                     "(its run stopped before its first): train it again "
                                     f"(--stages {stage},... --overwrite true)")
        progress = rundir.run_progress(run)
        if progress and progress[0] < progress[1]:
            stage = os.path.basename(run)
            raise common.ConfigError(f"--stages {','.join(cfg.stages)}: {run} stopped at step "
                                     f"{progress[0]} of {progress[1]} (unfinished): train it "
                                     f"again (--stages {stage},... --overwrite true) or finish it "
                                     f"first ({finish_command(cfg, stage)})")


def finish_command(cfg, stage):
    """The command that finishes a stage's run stopped part-way, as this pipeline runs it (a bare
    --resume was refused field by field, and --max_steps, free at --resume, took the script's
    default: a smoke run's SFT went on to 3500 steps)."""
    return f"python {shlex.join(stage_commands(cfg)[stage])} --resume true"


def refuse_rewritten_world(cfg):
    """Stages after an SFT run already in --out, on a --world written again since with other
    parameters: every later stage would read another world than the SFT model learnt."""
    sft = os.path.join(cfg.out, "sft")
    ck = latest_checkpoint(sft) if os.path.isdir(sft) else None
    other = rundir.other_world(ck, cfg.world) if ck else None
    if other:
        hint = {"rewritten": "run every stage again (--overwrite true), or pass the world it was "
                             "trained on",
                "elsewhere": "pass the world it was trained on, or run sft too"}[other[0]]
        raise common.ConfigError(f"--stages {','.join(cfg.stages)}: {sft} {other[1]}: {hint}")


def refuse_missing_reward(cfg):
    """ppo without rm in --stages reads the reward model under --out: one missing failed only once
    ppo started (after minutes of SFT), and one on the SFT trained again since (here, or by an
    earlier --stages sft) failed with 'base ... holds other weights'."""
    rm, stages = os.path.join(cfg.out, "rm"), ",".join(cfg.stages)
    if not os.path.isdir(rm):
        raise common.ConfigError(f"--stages {stages}: ppo reads the reward model {rm}, which is "
                                 "not there: add rm to --stages")
    if "sft" in cfg.stages:
        raise common.ConfigError(f"--stages {stages}: ppo reads the reward model {rm}, trained on "
                                 "the SFT model these stages replace: add rm to --stages")
    refuse_stale_models(cfg, [rm])


def stage_commands(cfg):
    o = lambda name: os.path.join(cfg.out, name)
    common_flags = ["--world", cfg.world, "--world_seed", str(cfg.world_seed),
                    "--device", cfg.device]
    if cfg.steps:  # smoke test: the step count and small extras instead of BUDGET
        short = lambda extra=(): ["--max_steps", str(cfg.steps), *extra]
        budget = lambda name: []
    else:
        short = lambda extra=(): []
        budget = lambda name: BUDGET.get(name, [])
    compared = compared_models(cfg)
    eval_limit = ["--limit", str(cfg.eval_limit)] if cfg.eval_limit else []
    return {
        "sft": ["sft.py", "--out", o("sft"), "--model", cfg.model, *common_flags,
                *short(["--report", "false", "--batch_size", "8"])],
        "lrv": ["sft.py", "--init", o("sft"), "--out", o("lrv"), *common_flags, *budget("lrv"),
                *short(["--lrv", "true", "--report", "false", "--batch_size", "8"])],
        "rm": ["reward.py", "--init", o("sft"), "--out", o("rm"), *common_flags, *budget("rm"),
               *short(["--batch_size", "4", "--eval_prompt", "short"])],
        "ppo": ["ppo.py", "--init", o("sft"), "--reward", o("rm"), "--out", o("ppo"),
                *common_flags, *budget("ppo"),
                *short(["--rollout_batch", "4", "--minibatch_size", "4", "--max_new_tokens", "8"])],
        "dpo": ["dpo.py", "--init", o("sft"), "--out", o("dpo"), *common_flags, *budget("dpo"),
                *short(["--batch_size", "4"])],
        "vigc": ["vigc.py", "--init", o("sft"), "--out", o("vigc"), *common_flags, *budget("vigc"),
                 *short(["--batch_size", "4", "--generate", "4", "--max_new_tokens", "16"])],
        "eval": ["eval.py", "--compare", *compared, "--out", cfg.eval_out, *common_flags,
                 *eval_limit],
    }


# steps in order; a tuple of lanes runs side by side
LANES = (("sft",), (("lrv", "rm", "ppo"), ("dpo", "vigc")), ("eval",))


_running = set()  # the stage processes running now
_stopping = threading.Event()  # set on Ctrl-C: no lane starts another stage
_lane_failed = threading.Event()  # set when a stage fails: no lane starts another stage


def stop_stages():
    """Ctrl-C: the running stages get it too (they were sent it alone when the pipeline was)."""
    _stopping.set()
    distributed.stop_processes(list(_running))  # (a second signal meanwhile is dropped)


def run_lane(names, commands, here, env, times):
    """Run stages one after another; return (stage, exit code) of the first failure, or None."""
    for name in names:
        if _stopping.is_set():
            return name, 130
        if _lane_failed.is_set():  # (another lane's stage failed: its line is the job's last word)
            return None
        cmd = [sys.executable, os.path.join(here, commands[name][0]), *commands[name][1:]]
        print(f"\n=== {name}: python {' '.join(commands[name])}", flush=True)
        t0 = time.time()
        # in the caller's folder: its relative paths hold
        # (its Ctrl-C line is the pipeline's to say; it dies with the pipeline: a pipeline killed
        # outright left it training on, distributed.end_with_the_launcher)
        stage_env = {**(env or os.environ), common.INTERRUPT_SAID_BY: "1",
                     common.STARTED_BY: str(os.getpid())}
        # (a SIGTERM or Ctrl-C between starting it and recording it is taken once it is recorded:
        # raised between the two, the stop did not know the stage, as in lab.execute)
        with distributed.stop_signals_deferred():
            proc = subprocess.Popen(cmd, env=stage_env, **distributed.stage_process_kwargs())
            _running.add(proc)
        if _stopping.is_set():  # (started while stop_stages went through the others)
            proc.send_signal(signal.SIGINT)
        code = proc.wait()  # (interrupted: it stays in _running, for stop_stages to stop)
        _running.discard(proc)
        times[name] = time.time() - t0
        if code != 0:
            _lane_failed.set()
            return name, code
    return None


# (common's line names a stage's --resume true, which the pipeline does not take)
INTERRUPTED = ("interrupted: the stages that ran to the end are kept; go on with --stages naming "
               "the rest, or start again with --overwrite true")


def main(cfg):
    try:
        run_pipeline(cfg)
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM): the running stages are stopped, no later one
        # starts, wherever it lands (before any stage: common's line named --resume true)
        stop_stages()
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None


def run_pipeline(cfg):
    common.refuse_torchrun("pipeline.py", "it starts each stage as a process of its own")
    if "sft" not in cfg.stages:  # (the preset of the SFT from scratch)
        rundir.refuse_unread(cfg, ["model"], "without sft in --stages; drop it")
    if "eval" not in cfg.stages:
        rundir.refuse_unread(cfg, ("eval_out", "eval_limit"), "without eval in --stages; drop it")
    if set(cfg.stages) == {"eval"}:  # (eval scores what is there: it trains nothing, moves nothing)
        rundir.refuse_unread(cfg, ("steps", "overwrite"), "with --stages eval alone (it trains "
                             "nothing; its stored answers are reused unless the models changed); "
                             "drop it")
    common.seed_suffix(cfg, Config, ("world", "out", "eval_out"))
    for name in ("world", "out", "eval_out"):  # (each passed on to the stages)
        setattr(cfg, name, common.dash_free(getattr(cfg, name)))
    distributed.check_device(cfg.device)
    commands = stage_commands(cfg)
    if cfg.overwrite:  # (without it a training stage refuses an --out that holds a run)
        overwrite = ["--overwrite", "true"]
        commands = {k: v + (overwrite if k != "eval" else []) for k, v in commands.items()}
    unknown = [s for s in cfg.stages if s not in commands]
    if unknown:
        choices = ", ".join(commands)
        raise common.ConfigError(f"--stages: unknown stage '{unknown[0]}' (choose from {choices})")
    if "eval" in cfg.stages and not compared_models(cfg):  # (eval would read its own default)
        raise common.ConfigError(f"--stages {','.join(cfg.stages)}: eval compares the models of "
                                 f"sft, lrv, ppo or dpo, and none is given or in --out {cfg.out}")
    if "ppo" in cfg.stages and "rm" not in cfg.stages:  # (before the stages before ppo train)
        refuse_missing_reward(cfg)
    if "sft" not in cfg.stages:
        refuse_rewritten_world(cfg)
    if "eval" in cfg.stages and "sft" not in cfg.stages:
        refuse_stale_models(cfg, compared_models(cfg))
    # what these stages read that an earlier pipeline trained: finished, and no longer written
    read = {"sft"} if set(cfg.stages) - {"sft"} else set()
    read |= {"rm"} if "ppo" in cfg.stages else set()
    read |= {os.path.basename(m) for m in compared_models(cfg)} if "eval" in cfg.stages else set()
    earlier = [os.path.join(cfg.out, r) for r in sorted(read) if r not in cfg.stages]
    refuse_unusable_inputs(cfg, [run for run in earlier if os.path.isdir(run)])
    for stage in cfg.stages if not cfg.overwrite else ():  # (the stage's own hint names flags
        # the pipeline does not take)
        out = os.path.join(cfg.out, stage)
        if stage != "eval" and rundir.holds_run(out):
            use = f"or leave {stage} out of --stages to use it" \
                if has_checkpoint(out) else \
                "(it stopped before its first checkpoint: nothing there to use)"
            progress = rundir.run_progress(out)
            if progress and progress[0] < progress[1]:  # (a pipeline stopped in it: "use it" led
                # to the refusal of an unfinished run)
                use = (f"or finish it (it stopped at step {progress[0]} of {progress[1]}: "
                       f"{finish_command(cfg, stage)}), then leave {stage} out of --stages")
            raise common.ConfigError(f"--stages {','.join(cfg.stages)}: {out} holds a run: pass "
                                     "--overwrite true to train it again (the old run is moved "
                                     f"aside, kept), {use}")
    # an output the last stage writes, checked before the first trains
    outputs = [("--out", cfg.out), ("--world", cfg.world)]
    outputs += [("--eval_out", cfg.eval_out)] if "eval" in cfg.stages else []
    for flag, path in outputs:
        rundir.check_output_path(flag, path)
    # (the sft stage refused it, after the pipeline's lock was left among the world's files)
    rundir.refuse_in_world("--out", cfg.out, cfg.world, "the stages' runs")
    if "eval" in cfg.stages:  # (eval's lock met the pipeline's own, after every stage trained)
        rundir.refuse_in_world("--eval_out", cfg.eval_out, cfg.world, "eval's answers")
        real = os.path.realpath(cfg.eval_out)
        runs = [os.path.realpath(os.path.join(cfg.out, s)) for s in STAGES if s != "eval"]
        # (in a checkpoint of a run: eval wrote its answers among the weights)
        if real == os.path.realpath(cfg.out) or any(real == r or real.startswith(r + os.sep)
                                                   for r in runs):
            raise common.ConfigError(f"--eval_out {cfg.eval_out} is --out or lies in a stage's "
                                     "run folder in it: eval would write among the runs; choose "
                                     "another --eval_out")
    # (compared_models: beside an SFT trained now, the models there already are not compared)
    compared = compared_models(cfg)
    left_out = [m for m in (os.path.join(cfg.out, s) for s in ("lrv", "ppo", "dpo"))
                if os.path.isdir(m) and m not in compared]
    if "eval" in cfg.stages and left_out:
        print(f"note: eval leaves out {', '.join(left_out)}: trained on another SFT than the one "
              "these stages train", flush=True)
    rundir.ensure_writable(cfg.out)
    rundir.lock_out(cfg.out)  # one pipeline per --out (a second replaced the SFT under the first)
    here = os.path.dirname(os.path.abspath(__file__))
    times, t_start = {}, time.time()
    run_stages(cfg, commands, here, times)
    print("\nstage times: " + " | ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
          + f" | wall clock {(time.time() - t_start) / 60:.1f} min")


def run_stages(cfg, commands, here, times):
    _lane_failed.clear()  # (this job's stages alone)
    for step in LANES:
        step_lanes = step if isinstance(step[0], tuple) else (step,)
        lanes = [[s for s in lane if s in cfg.stages] for lane in step_lanes]
        lanes = [lane for lane in lanes if lane]
        # side by side, one thread each, their output interleaved
        if cfg.jobs > 1 and len(lanes) > 1:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            run_one = lambda lane: run_lane(lane, commands, here, env, times)
            with ThreadPoolExecutor(len(lanes)) as pool:
                futures = [pool.submit(run_one, lane) for lane in lanes]
                try:
                    failed = [f for f in (x.result() for x in futures) if f]
                except KeyboardInterrupt:  # (the pool waits for its lanes: stop them first)
                    stop_stages()
                    raise
        else:
            failed = []
            for lane in lanes:
                failed = [f for f in [run_lane(lane, commands, here, None, times)] if f]
                if failed:
                    break
        if failed:
            name, code = failed[0]
            # exit code 2: the stage printed its one line naming the bad input (and the '=== name'
            # header above it says which stage); a second line would only repeat it
            if code != 2:  # (killed by a signal: -9 read as 'exit code -9', the job's 247)
                how = f"was {distributed.ended_how(code)}" if code < 0 else \
                    f"failed with {distributed.ended_how(code)}"
                print(f"error: stage '{name}' {how}; later stages not run", file=sys.stderr)
                code = 128 - code if code < 0 else code  # (a shell's code for a signal's death)
            elif len(lanes) > 1 and cfg.jobs > 1:  # (its line is above the other lane's output)
                print(f"error: stage '{name}' failed (its line above); later stages not run",
                      file=sys.stderr)
            raise SystemExit(code)


if __name__ == "__main__":
    cfg = common.parse_config(Config)
    distributed.interrupt_on_sigterm()
    with common.user_errors(interrupted=INTERRUPTED):  # (said where its output's reader ended)
        main(cfg)
