"""torchrun: the process group (replicated data parallelism, or FSDP2 sharding with --fsdp), how a
run's processes end together (Ctrl-C, SIGTERM, a rank's failure), gradient sums over ranks, and
FSDP2's sharding of a model."""
import atexit
import dataclasses
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist

import common
from common import ConfigError
import interrupts
from model import LLaVA


# ----------------------------------------------------------------------------------------
# torchrun: the process group, the device, how the processes end together, gradient sums
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False  # parameters, gradients and optimizer state sharded over the ranks (FSDP2)

    @property
    def main(self):
        return self.rank == 0


made_process_group = False  # set by setup_dist; end_process reads it


def check_device(device):
    """--device cuda where there is none: one line before any work (eval's model load, each of a
    lab's runs failing after it, was where it showed). Under torchrun, more processes on a node
    than it has GPUs: each extra one died in torch.cuda.set_device's traceback."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if device == "cuda" and local >= gpus:
        raise ConfigError(f"--device cuda: this process is local rank {local}, and its node has "
                          f"{gpus} CUDA device(s): start at most {gpus} processes per node "
                          f"(torchrun --nproc_per_node {gpus})")


def setup_dist(device="cpu", fsdp=False, flags=None):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs as a world of one (under --fsdp
    a one-rank process group, so the sharded code path is the same at any world size). `flags`:
    the stage's parsed config, which every process must have been given alike
    (same_flags_everywhere)."""
    global made_process_group
    check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # (CPU tensors too: the stages all-reduce small counts on the CPU, which an NCCL-only group
    # refuses, "No backend type associated with device type cpu"; tests run gloo alone)
    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    end_with_the_launcher()  # (torchrun --nproc_per_node 1 too)
    if world == 1:
        if fsdp:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            made_process_group = True
        return Dist(device=torch.device(device), fsdp=fsdp)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    join_process_group(backend)
    made_process_group = True
    d = Dist(rank, world, local, dev, fsdp)
    if flags is not None:
        same_flags_everywhere(flags, d)
    return d


JOIN_TIMEOUT = "FACTALIGN_JOIN_TIMEOUT"  # seconds the ranks wait for each other to start (300)


def join_process_group(backend):
    """init_process_group, waiting for the other ranks at most JOIN_TIMEOUT seconds (their launchers
    met before they started: only imports and flag checks lie between them), then for each of the
    run's collectives gloo's 30 minutes as before. A rank of another node that ended before it
    joined (a traceback: a bug, a package missing there) held these ranks for those 30 minutes
    without a word. (Where torch lacks _set_pg_timeout or _get_default_store the join keeps the
    30 minutes.)"""
    import datetime
    from torch.distributed import constants, distributed_c10d
    text = os.environ.get(JOIN_TIMEOUT, "300")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        common.fail(f"{JOIN_TIMEOUT}={text!r}: give the seconds to wait for the other ranks, "
                    "in (0, inf)")
    # (private: the short join only where both exist to put the 30 minutes back after it)
    set_timeout = getattr(distributed_c10d, "_set_pg_timeout", None)
    default_store = getattr(distributed_c10d, "_get_default_store", None)
    short = set_timeout is not None and default_store is not None
    timeout = datetime.timedelta(seconds=seconds) if short else constants.default_pg_timeout
    try:
        taking_signals(lambda: dist.init_process_group(backend, timeout=timeout))
    except dist.DistStoreError as e:
        # (torchrun's store: "... timeout"; a rank 0 started by hand hosts the store itself, and
        # its wait for the others says "Timed out after N seconds waiting for clients")
        if "timeout" not in str(e) and "timed out" not in str(e).lower():
            raise
        common.said_on_each_node(
            f"stopped: the run's other processes did not all start within {text} s "
            f"({JOIN_TIMEOUT}): one that ended before it joined (a traceback or an error on its "
            "node's terminal), a node not started, or one that cannot reach --master_addr; "
            "nothing was written")
        raise SystemExit(1) from None
    if short:
        set_timeout(constants.default_pg_timeout)
        # the join's timeout was the store's too: later store waits (NCCL's communicators waiting
        # for rank 0's id, FSDP's mesh groups) would be cut at JOIN_TIMEOUT
        default_store().set_timeout(constants.default_pg_timeout)


joining = None  # taking_signals' thread: alive, end_process skips the interpreter's teardown


def taking_signals(join, stopped=interrupts.STARTING, code=130):
    """join() in a thread of its own while this one waits in Python. The join waits inside C++ (the
    store), where no signal handler runs: a rank of this node that failed before joining left the
    others there, deaf to torchrun's SIGTERM, until it killed them 30 s later ("forcefully exiting
    via 9"), and a Ctrl-C waited for the join's end (up to JOIN_TIMEOUT). Here the wait is broken
    every 0.1 s, so the stop is taken at once (a thread still in the join is let go: a daemon),
    said as a stop while starting: nothing is written before the join. (`stopped`, `code`: the
    line said, None for none, and the exit code: common.tell_the_waiting_ranks' own.)"""
    done, raised = threading.Event(), []
    gpu = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def run():
        try:
            if gpu is not None:  # (the current GPU is a thread's own: the rank's, set_device)
                torch.cuda.set_device(gpu)
            join()
        except BaseException as e:
            raised.append(e)
        finally:
            done.set()
    global joining
    joining = threading.Thread(target=run, name="join", daemon=True)
    try:
        joining.start()  # (a signal may land in it too, as it waits for the thread to start)
        # (an Event, not joining.join(0.1): a join interrupted by the signal can leave the thread
        # marked as ended in Python 3.11, and end_process would then let the teardown run)
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:  # (as common.user_errors says one, with its own words)
        if stopped and not os.environ.get(interrupts.INTERRUPT_SAID_BY):
            common.said_on_each_node(stopped)
        raise SystemExit(code) from None
    if raised:
        raise raised[0]


def same_flags_everywhere(cfg, d):
    """Every process runs with the flags rank 0 has. torchrun on several nodes starts each node's
    processes from that node's own command line: one node given another --max_steps (or batch size,
    seed, ...) trained on its own plan, and the run hung in a collective once the plans parted."""
    mine = dataclasses.asdict(cfg)
    every = [None] * d.world
    dist.all_gather_object(every, (d.rank - d.local_rank, mine))
    # (a rank refused before it came sent its line: tell_the_waiting_ranks; on its node it is said)
    refused = [(rank, node, said) for rank, (node, said) in enumerate(every)
               if isinstance(said, str)]
    if refused:
        if d.local_rank == 0 and d.rank - d.local_rank not in [node for _, node, _ in refused]:
            common.fail(f"rank {refused[0][0]}: {refused[0][2]}")
        raise SystemExit(2)
    every = [flags for _, flags in every]
    for rank, theirs in enumerate(every):
        differ = [k for k in mine if theirs.get(k) != every[0].get(k)]
        if differ:
            k = differ[0]
            refuse_once_per_node(d, f"--{k}: {every[0][k]!r} on rank 0, {theirs[k]!r} on rank "
                                 f"{rank} (another node's command line?): give every node the same "
                                 "flags")


def refuse_once_per_node(d, message):
    """A refusal every process reached alike: one line on each node's terminal (its local rank 0
    says it; under torchrun each node has its own), exit code 2 on every process."""
    if d.local_rank == 0:
        common.fail(message)
    raise SystemExit(2)


def end_with_the_launcher():
    """Under torchrun on Linux this rank is killed when its launcher dies. torchrun stops its ranks
    itself on SIGINT or SIGTERM, but a launcher killed outright (kill -9, the OOM killer) left
    them training on as orphans, writing checkpoints into --out and holding its lock (1800 steps,
    130 s, until their stdout was closed). The same for a stage or run that pipeline.py or lab.py
    started (STARTED_BY, their pid): one of them killed outright left its stages training on for
    up to tens of minutes (a reward model), which the next pipeline or lab refused, then ran
    again. (Taken out of the environment: this process's own children were not started by it.)"""
    started_by = os.environ.pop(common.STARTED_BY, "")
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if not (torchrun or started_by.isdecimal()) or not sys.platform.startswith("linux"):
        return
    import ctypes
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    launcher = LAUNCHER_PID if torchrun else int(started_by)
    if os.getppid() != launcher:  # (it died before the call: this rank is an orphan already)
        who = "torchrun's launcher" if torchrun else "the pipeline or lab that started it"
        sys.stderr.write(f"error: {who} (pid {launcher}) has ended: nothing run\n")
        sys.stderr.flush()
        os._exit(1)


# this process's parent as it started (torchrun's launcher: end_with_the_launcher)
LAUNCHER_PID = os.getppid()


def check_world(script, fsdp, grad_accum=1, **batch_sizes):
    """Before any process group: the global batch sizes must split evenly over the torchrun
    processes (every rank runs the same number of forward passes, which FSDP's collectives need),
    and into --grad_accum micro-batches of at least one sequence each."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and script == "ppo.py":
        raise ConfigError("ppo.py --fsdp: not supported; PPO trains LoRA adapters on one frozen "
                          "base that its four roles share, replicated on every process (see "
                          "README, 'Sharded training')")
    for flag, size in batch_sizes.items():
        if size % world:
            raise ConfigError(f"--{flag} {size} does not split over the {world} processes "
                              f"(torchrun --nproc_per_node {world}): use a multiple of {world}")
        if grad_accum > size // world:  # (an empty micro-batch)
            raise ConfigError(f"--grad_accum {grad_accum}: more micro-batches than the "
                              f"{size // world} sequences per process of --{flag} {size} "
                              f"(allowed: 1 to {size // world})")


def cleanup_dist():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank done with its collectives before gloo's threads are torn down
        dist.destroy_process_group()


def wait_a_moment(procs, seconds=2.0):
    """Wait up to `seconds` in all for processes to end on their own (stopping them comes next)."""
    deadline = time.time() + seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass


def hold_stop_signals():
    """From now on SIGINT and SIGTERM are dropped (main thread alone can set handlers; signals run
    there). Returns the handlers they had. A second signal raised KeyboardInterrupt inside the
    stop itself: no stage got SIGINT, they trained on, and common's --resume line was printed."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, interrupts.drop_signal)
            for s in (signal.SIGINT, signal.SIGTERM)}


@contextmanager
def stop_signals_deferred():
    """A SIGINT or SIGTERM arriving inside the block is taken when it ends (as it would have been
    taken there). Around starting a child and recording it: a Ctrl-C raised between the two left
    the child unknown to the stop, running on as an orphan. Python handlers, not a signal mask:
    the child must not inherit the signals blocked."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    stops = [signal.SIGINT, signal.SIGTERM]
    # (a Ctrl-C a finalizer swallowed, raised again by common.user_errors' SIGALRM: held too)
    if hasattr(signal, "SIGALRM") and \
            signal.getsignal(signal.SIGALRM) is common.raise_the_lost_interrupt:
        stops.append(signal.SIGALRM)
    held = {s: signal.signal(s, lambda signum, frame: got.append(signum))
            for s in stops
            if signal.getsignal(s) != signal.SIG_IGN}  # (ignored: the child inherits that)
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if got:
            signal.raise_signal(got[0])  # (to the handler put back: the interrupt, a drop, ...)


def ended_how(code):
    """A child's exit status in words: 'exit code N', or 'killed by signal SIGKILL' where Python's
    returncode is -N (a signal's number, which read as 'exit -9' looked like the stage's own
    code)."""
    if code >= 0:
        return f"exit code {code}"
    return f"killed by signal {({s.value: s.name for s in signal.Signals}).get(-code, -code)}"


STOP_PATIENCE = 60  # seconds a stopped child may take before the stop says what it waits for


def stop_processes(procs, grace=True):
    """Stop child processes (pipeline's stages, lab's runs) and wait for them: each gets SIGINT
    (their Ctrl-C: a checkpoint-safe exit), after up to 2 s to end on their own where grace (a
    terminal's Ctrl-C reached them too: a second interrupt could cut their last words). Further
    signals meanwhile are dropped, so that the stop always runs to its end."""
    held = hold_stop_signals()
    try:
        if grace:
            wait_a_moment(procs)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        wait_a_moment(procs, STOP_PATIENCE)
        stuck = [proc for proc in procs if proc.poll() is None]
        if stuck:  # (waited for without a word: a stuck one looked like a hung stop)
            pids = " ".join(str(proc.pid) for proc in stuck)
            print(f"still waiting for {len(stuck)} process{'es' * (len(stuck) > 1)} to stop (it "
                  f"may be saving a checkpoint); `kill -9 {pids}` ends "
                  f"{'them' if len(stuck) > 1 else 'it'} now (checkpoints saved stay whole)",
                  file=sys.stderr, flush=True)
        for proc in stuck:
            proc.wait()
    finally:
        for signum, handler in held.items():
            if handler is not None:  # (None: set outside Python, not restorable from here)
                signal.signal(signum, handler)


def interrupt_on_sigterm():
    """SIGTERM (a batch scheduler's time limit, `kill`) taken as Ctrl-C: pipeline.py and lab.py stop
    their running stages and say how to go on (they ended at once, their stages running on as
    orphans that the next pipeline or lab refused until they ended). The first SIGTERM or SIGINT
    raises KeyboardInterrupt; any after it is dropped (one landing in the stop, or on the way to it,
    cut it short). A SIGINT ignored at start (`pipeline.py &` in a script) is dropped instead: with
    SIG_IGN its stages inherited it, ignored the SIGINT that stops them, and trained on. A SIGTERM
    ignored at start (`trap '' TERM`) stays ignored, as user_errors and the stages leave it: the
    user asked for that, and the stages are stopped with SIGINT, which a Ctrl-C still sends."""
    global SIGINT_IGNORED_AT_START
    interrupts.hand_over()
    sigint = signal.getsignal(signal.SIGINT)
    stops = [signal.SIGTERM] if signal.getsignal(signal.SIGTERM) != signal.SIG_IGN else []
    stops += [signal.SIGINT] if sigint is signal.default_int_handler else []
    # for the rest of the run, not a with-block: the stop goes on after user_errors, and a signal
    # in the interpreter's exit is dropped too (_ignore_stop_signals_at_exit)
    interrupts.interrupt_once(stops)
    if sigint == signal.SIG_IGN:
        SIGINT_IGNORED_AT_START = True
        signal.signal(signal.SIGINT, interrupts.drop_signal)
    atexit.register(_ignore_stop_signals_at_exit)


SIGINT_IGNORED_AT_START = False  # (interrupt_on_sigterm: started as `pipeline.py &` in a script)


def stage_process_kwargs():
    """Popen keywords for a pipeline stage or a lab run. Started with SIGINT ignored (`&` in a
    script), the stages go in a session of their own: they no longer inherit SIG_IGN (they take
    the SIGINT that stops them), and a Ctrl-C meant for the script that started us must not reach
    them through its process group either (they ignored it before); ours is sent to each."""
    return {"start_new_session": True} if SIGINT_IGNORED_AT_START else {}


def _ignore_stop_signals_at_exit():
    """A process that has stopped its stages: as it exits, Python puts its signal handlers back to
    the default (SIG_IGN excepted), and one more SIGTERM then killed it (-15) after its stop and
    its line. Its threads are done by now: no stage starts to inherit SIG_IGN."""
    if signal.getsignal(signal.SIGTERM) is interrupts.drop_signal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def end_process(code=0):
    """A script's last call after a run that made a process group (torchrun, or --fsdp): exit at
    once, skipping the interpreter's teardown. Under FSDP torch's DTensor caches keep the device
    mesh, and with it the gloo group and its threads, alive past destroy_process_group; one of
    those threads that needs the GIL while the interpreter shuts down aborts the process (SIGABRT,
    exit code -6, after every file is written). Every file is closed by now; stdout and stderr
    are flushed here. Also while an interrupted join's thread is still in C++ (taking_signals):
    returning from it during the teardown aborted the process as well (7 of 7 runs where the
    interrupt came 1 ms into the join: 134, not 130)."""
    if made_process_group or joining is not None and joining.is_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@contextmanager
def ending_process():
    """A stage script's main block: end_process after a run, and after a user's error (exit 2) or
    an interrupt (130) too. An error under torchrun left the group (never destroyed) to the
    interpreter's teardown, which aborted the rank after its line in 2 of 6 runs ('terminate
    called without an active exception', SIGABRT, -6 instead of 2)."""
    try:
        yield
    except SystemExit as e:  # (sys.exit's codes: None is 0, a message is 1)
        end_process(e.code if isinstance(e.code, int) else int(e.code is not None))
        raise
    end_process()


def all_gather_cat(t, d):
    """Concatenate equally-shaped tensors from all ranks along dim 0."""
    if d.world == 1:
        return t
    out = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


SYNC_BUCKET = 1 << 26  # gradient elements per all-reduce (256 MB in fp32)


def sync_grads(params, d):
    """Sum gradients across ranks (explicit data parallelism: flat all-reduces after backward).
    Our losses are normalised by global counts (tokens or pairs in the global batch), so the
    per-rank gradients add up to the single-process gradient exactly. Why not
    DistributedDataParallel: PPO calls one shared base under four roles (policy, reference, reward,
    value adapters) several times per step and DPO runs the model twice (policy, then adapters off),
    which DDP's one-forward-one-backward bucket hooks do not follow; the trainable set here is LoRA
    (small), so a few flat all-reduces cost little. Under FSDP the gradients come back
    reduce-scattered already (shard_model)."""
    if d.world == 1 or d.fsdp:
        return
    for p in params:  # every rank must all-reduce the same tensors, also after an empty micro-batch
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # flat all-reduces of up to SYNC_BUCKET elements, not one per tensor (nor one of them all: its
    # copy of a 7B full fine-tune's bf16 gradients was 13.5 GB beside them)
    bucket, size = [], 0
    for g in [p.grad for p in params] + [None]:
        if bucket and (g is None or size + g.numel() > SYNC_BUCKET):
            flat = torch.cat([x.reshape(-1) for x in bucket])
            dist.all_reduce(flat)
            _unflatten(flat, bucket)
            bucket, size = [], 0
        if g is not None:
            bucket.append(g)
            size += g.numel()


def _unflatten(flat, grads):
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def bf16_autocast(cfg):
    """The training passes' autocast: bf16 on a GPU with --dtype bf16, else none. Every pass whose
    numbers meet the training pass's runs under it too (DPO's cached reference log-probs, held-out
    losses): outside it CLIP's norms and the residual stream ran at another precision, so the
    policy and its reference differed at step 0."""
    on = cfg.dtype == "bf16" and cfg.device == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def all_reduce_sum(t, d):
    """Sum of a tensor over ranks (identity in a single process)."""
    if d.world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def on_main_first(d, fn):
    """Run fn on the main process first (e.g. writing the Shapes world), then on the others."""
    if d.main:
        out = fn()
    if d.world > 1:
        dist.barrier()
    if not d.main:
        out = fn()
    return out


# ----------------------------------------------------------------------------------------
# FSDP2 (--fsdp true): full-parameter training that does not fit one GPU. Each CLIP layer, each
# decoder layer and the root (embeddings, projector, final norm, lm_head, scalar heads) is one unit;
# its parameters, gradients and AdamW moments live 1/world on each rank, and its whole weights are
# all-gathered just before it runs and freed after it (forward and backward), as DeepSpeed ZeRO-3,
# which LLaVA's own recipe uses. Its checkpoints (each rank's shards) are rundir.py's.
# ----------------------------------------------------------------------------------------

# our callers never modify a model output in place, which is all this warning is about
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def load_device(cfg, d):
    """Where a stage builds its model. Under --fsdp rank 0 reads a checkpoint on the CPU
    (fully_shard moves each unit's weights to the GPU as it shards them, one unit whole at a time;
    loaded on the GPU first, every GPU held the whole fp32 model: 28 GB at 7B, 52 at 13B), and
    every other rank builds the model on the meta device (no memory): shard_model fills their
    shards from rank 0's weights. Rank 0 alone reads because every rank reading held the whole
    fp32 model in host memory before sharding: 8 x 28 GB on a node of 8 ranks at 7B. Else (rank 0's
    fresh model too) on the run's device: its weights drawn where a run without --fsdp draws
    them."""
    if cfg.fsdp and not d.main:
        return torch.device("meta")
    return torch.device("cpu") if cfg.fsdp and cfg.init else d.device


def shard_model(model, d, bf16=False):
    """fully_shard each vision and decoder layer, then the root. Call after adapters, heads and
    set_trainable, before make_optimizer (the optimizer must see the sharded parameters). Built on
    the meta device on the other ranks (load_device), the model is filled from rank 0's weights,
    adapters and heads once sharded. bf16 (GPU): compute in bf16 on all-gathered copies, fp32
    master weights and optimizer state, fp32 reduce-scatter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    # (the first collective after the load: a rank 0 that could not read the checkpoint is gone,
    # and the others say so here, on gloo, rather than wait in NCCL)
    from_rank0 = built_on_meta(model, d)
    whole = model.state_dict() if from_rank0 and d.main else {}  # (rank 0's whole weights)
    mesh = init_device_mesh(d.device.type, (d.world,))
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    units = (list(model.vision_tower.encoder.layers) + list(model.language_model.layers)
             + list(model.heads.values()))
    for unit in units:  # (a scalar head too: score_sequences calls it outside forward())
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    # the root keeps its gathered weights from forward to backward (FSDP's default; so
    # encode_images and logits, called inside forward too, do not free them mid-forward). After a
    # no_grad pass nothing frees them: resharded() puts the shards back before the optimizer or a
    # checkpoint looks at the parameters.
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if from_rank0:
        fill_from_rank0(model, whole, d)
        del whole
    # SUM, not FSDP's default mean: our losses are divided by global counts already
    for unit in units + [model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
    # called outside forward(): they too must all-gather the root
    for name in ("encode_images", "logits"):
        register_fsdp_forward_method(model, name)
    model.encode_every_batch = True  # (a text-only micro-batch on one rank: see LLaVA.embed)
    return model


def built_on_meta(model, d):
    """Whether any rank built `model` on the meta device (collective, on the CPU)."""
    meta = torch.tensor([float(any(p.is_meta for p in model.parameters()))])
    if d.world > 1:
        dist.all_reduce(meta)
    return bool(meta.item())


def fill_from_rank0(model, whole, d):
    """Every rank's shards of the sharded `model` from rank 0's `whole` state dict (empty on the
    other ranks), broadcast one tensor at a time; the meta ranks' random streams become rank 0's,
    which drew the weights they did not (a fresh model): the run's later draws (LoRA dropout) are
    those of a run where every rank drew them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    # to_empty gives every tensor uninitialised memory: one outside the state dict would stay so
    # (the model computes its rotary angles and positions on the fly: it has none)
    kept_out = [m for m in model.modules() if m._non_persistent_buffers_set]
    if kept_out:
        raise RuntimeError(f"{type(kept_out[0]).__name__}: a non-persistent buffer, not filled "
                           "from rank 0: rebuild it after fill_from_rank0")
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=d.device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True,
                                                                broadcast_from_rank0=True))
    streams = torch.get_rng_state()
    dist.broadcast(streams, src=0)
    torch.set_rng_state(streams)
    if d.device.type == "cuda":  # (a fresh model drawn on rank 0's GPU; LoRA dropout runs there)
        streams = torch.cuda.get_rng_state(d.device)  # (a CPU tensor: the gloo group takes it)
        dist.broadcast(streams, src=0)
        torch.cuda.set_rng_state(streams, d.device)


def resharded(model):
    """The model with its root's shards registered again (FSDP; a plain model as it is)."""
    if hasattr(model, "reshard"):
        model.reshard()
    return model


def rank_chunks(n, batch_size, d):
    """This rank's share of range(n) (rank::world) in chunks of batch_size, each with whether it
    counts. Under FSDP every forward pass all-gathers weights, so every rank must run as many as the
    others: a rank with fewer chunks runs its first one again and discards the result (counts
    False)."""
    mine = list(range(n))[d.rank::d.world]
    chunks = [(mine[s:s + batch_size], True) for s in range(0, len(mine), batch_size)]
    if d.fsdp and n:
        most = math.ceil(math.ceil(n / d.world) / batch_size)  # rank 0 holds ceil(n / world) items
        chunks += [(chunks[0][0] if chunks else [0], False)] * (most - len(chunks))
    return chunks


def gather_full_model(model, d, device="cpu"):
    """The whole model, unsharded, on `device` of rank 0 (None on the others); every rank must call
    it. Adapters, heads and the active adapter as in the sharded model. For the LoRA merge,
    generation and the consolidated checkpoint that load_checkpoint, --init and export_llava_hf
    read."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(resharded(model), options=whole)
    if not d.main:
        return None
    # the same modules, no memory: load_state_dict(assign=True) fills them
    with torch.device("meta"):
        plain = LLaVA(model.config)
        for name, a in model.adapters.items():
            plain.add_adapter(name, a["r"], a["alpha"], a["dropout"], a["targets"], a.get("layers"))
        for name in model.heads:
            plain.add_head(name)
    plain.load_state_dict(full, assign=True)
    plain.set_adapter(model.active_adapter)
    plain.clip_dir = getattr(model, "clip_dir", None)  # (save_checkpoint_files records it)
    return plain.to(device)
