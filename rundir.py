"""Run directories: one writer per --out (lock, refusals, run.json with the inputs' digests),
checkpoints written whole (OUT/checkpoint-NNNNNN/, sharded under FSDP) and --resume, which goes on
only from the inputs the run started on."""
import copy
import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import stat
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import (FORMAT_NAME, FORMAT_VERSION, base_fingerprint, base_weights_dir,
                        checkpoint_step, complete_checkpoints, init_fingerprint, latest_checkpoint,
                        no_dir, recorded_template, resolve_checkpoint, save_checkpoint_files,
                        tensors_fingerprint)
import common
from common import ConfigError
import distributed
from formats import digests_read, not_found
from model import CheckpointError


# ----------------------------------------------------------------------------------------
# checkpoints: OUT/checkpoint-NNNNNN/ written to a temp dir and renamed (a crash never leaves
# a half checkpoint); --init OUT and --resume read the newest complete one
# ----------------------------------------------------------------------------------------

SHARDS = "shards"  # the torch.distributed.checkpoint folder inside an FSDP checkpoint-N/

RESUME_FREE_FIELDS = {"resume", "overwrite", "out", "log_every", "save_every", "eval_every",
                      "max_steps",
                      # do not change the math (skip_nonfinite: the way out of a stopped run;
                      # grad_checkpoint: the same gradients, recomputed: bitwise in the tests)
                      "skip_nonfinite", "save_full", "grad_checkpoint",
                      # the same global batch in other micro-batches (resumed on fewer GPUs, the
                      # memory a process has): allowed, with a note (not bitwise)
                      "grad_accum",
                      # the rollouts' decoding path: the same tokens up to float rounding (and a
                      # run started before the flag was added resumes)
                      "compile_decode"}
# why a field that looks like a memory setting is not free at --resume (said with the refusal)
RESUME_WHY = {"micro_batch": " (ppo.py's rollout samples in chunks of it: another value draws "
                             "other samples from the same stream)",
              "world": " (pass the --world the run had, or put the world back there)"}
# fields a stage gained after runs were started without them: such a run's config reads as having
# this value, what the stage did before (vigc's repetition_penalty: its default, as vigc resumes
# with every generation flag at its default; '{world}' in a value: the run's own --world, as
# world_paths resolves it; a function: of the run's config). Left out, as no one value is what the
# stage did before: sft's reading stage (read_steps, read_data, instruct_lr, instruct_warmup: none
# read with --init, where each must be its default; a fresh run read none, which --read_steps 0 or
# --read_data '' says) and so every field sft gained before it (pack, align_data, ...): such a run
# is refused in one line ("lacks this script's field")
ADDED_FIELDS = {"prompt_space": False, "vision_tower": "", "repetition_penalty": 1.5,
                "policy_lora": "", "warmup_from_zero": False, "caption_shuffle": "pair",
                "loss_divisor": "tokens",
                # 2026-12-01: no stage sharded before --fsdp
                "fsdp": False,
                # ppo.py 2026-12-01: LLaVA-RLHF's variants as flags, ours kept as the defaults
                "stop_at_question": False, "rm_input": "text", "correct_rule": "word",
                # reward.py 2026-12-01 and 12-03: the blank-image control, the import
                "blank_images": False, "import_llava_rlhf": "",
                # vigc.py 2026-12-01: --vic_mode reference beside ours; the world's tokenizer as a
                # flag; --instructions (a --data run used the built-in phrasings, '' now; a run on
                # the world before it read a world of format 7, which no stage reads now)
                "vic_mode": "ours", "tokenizer": "{world}/tokenizer", "instructions": "",
                # dpo.py 2026-12-01: POVID stage 2 noised the resized image before; stage 1 reads
                # none, and refuses all but the default
                "noise_on": lambda was: "resized" if was.get("povid_stage") == 2 else "original"}


def check_output_path(flag, path, folder=True):
    """Before any work: `flag` PATH can be written at the end of a long run: a folder (or, with
    folder=False, a file) that is not the other kind, under an existing ancestor that is a folder
    this process may write (the folders between are made when it writes)."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        kind = "is not a folder" if folder else "is a folder, not a file"
        raise ConfigError(f"{flag} {path}: exists and {kind}")
    parent = os.path.abspath(path if folder else os.path.dirname(path) or ".")
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} cannot be written")


_made_out = []  # folders make_dirs made (deepest last): release_locks removes them if empty


def make_dirs(path):
    """os.makedirs(path, exist_ok=True), noting the folders it made: a run refused later (a
    checkpoint that fails to load) leaves none of them behind, empty."""
    # (walked as given: makedirs of 'a/new/../run' makes 'a/new' too; each is noted by its
    # normalized name, and 'a/new/..' (which is 'a', there before) is not)
    # (a link to a folder not made yet: the folder it names is made, as shapes.py makes a world
    # there; makedirs of the link itself said "File exists")
    if os.path.islink(path) and not os.path.exists(path):
        path = os.path.realpath(path)
    made, parent = [], os.path.join(os.getcwd(), path)
    while not os.path.exists(parent):
        if os.path.basename(parent) not in ("..", "."):
            made.insert(0, os.path.normpath(parent))
        parent = os.path.dirname(parent)
    _made_out.extend(made)  # (before: one failing half way left those made before it)
    os.makedirs(path, exist_ok=True)


def ensure_writable(out_dir):
    """Fail early, with one line, when the output directory cannot be written."""
    probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
    try:
        make_dirs(out_dir)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        if os.path.exists(probe):  # (made, then its write failed: a full disk's)
            os.remove(probe)
        # (a file, or a link that loops, read "cannot be written (File exists)")
        why = ("a file, not a folder" if os.path.exists(out_dir) and not os.path.isdir(out_dir)
               else not_found(out_dir) if os.path.islink(out_dir) and not os.path.exists(out_dir)
               else "")  # (a link to a folder that is there: its write failed, as any other's)
        parent = os.path.dirname(os.path.normpath(out_dir))
        while not why and parent not in ("", os.sep):  # (a link on the way that names nothing)
            if os.path.islink(parent) and not os.path.exists(parent):
                why = f"{parent} is {not_found(parent)}"
            parent = os.path.dirname(parent)
        if why:
            raise ConfigError(f"{out_dir}: output directory: {why}")
        raise ConfigError(f"{out_dir}: output directory cannot be written ({e.strerror})")


# ----------------------------------------------------------------------------------------
# one writer per run directory, and no run replaced by accident: claim_out() before anything is
# read or written (lock, refusals), start_writing() once the inputs are checked (move aside,
# run.json)
# ----------------------------------------------------------------------------------------

LOCK = ".lock"  # in --out: flock'ed by the process writing there, holds its pid
RUN_FILE = "run.json"  # in --out: sha256 of the data files the run started on (--resume compares)
_locks = {}  # real path of a locked --out -> the open lock file


def lock_out(out_dir):
    """Hold an exclusive flock on OUT/.lock for as long as this process lives (or release_locks());
    a second writer fails in one line naming the holder's pid. Taking it again in one process is a
    no-op."""
    import fcntl
    key = os.path.realpath(out_dir)
    if key in _locks:
        return
    path = os.path.join(out_dir, LOCK)
    made = not os.path.exists(path)
    if not made and os.stat(path).st_nlink > 1:  # (a run copied with hard links shares its
        # .lock: the copy was refused while the original ran, and wrote its pid into it)
        _split_lock(out_dir, path)
    f = open(path, "a+")
    f.made = made  # (release_locks removes it again where it is all this run left)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"{out_dir}: another process (pid {holder}) is writing there; wait for "
                          "it to end or choose another --out")
    try:  # a refused run removes the .lock it made (release_locks): the one locked must be there
        same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except OSError:
        same = False
    if not same:
        f.close()
        raise ConfigError(f"{out_dir}: another process was starting there at the same moment; "
                          "start again")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _locks[key] = f


def _split_lock(out_dir, path):
    """OUT/.lock made a file of its own, under a flock of the folder itself (which no copy shares:
    a folder cannot be hard-linked): two runs starting in one copy each split it, and each locked
    its own file."""
    import fcntl
    folder = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        common.unshare(path)  # (split already by the other: left as it is)
    finally:
        os.close(folder)  # (and its flock with it)


def release_locks():
    """Drop the locks. A run refused after claiming --out (bad data, a world it cannot use) left
    the folder holding only the .lock it made, or a new empty folder: both are removed again (the
    lock file while still held; the empty folders it made inside first)."""
    _remove_empty(_made_out)
    for key, f in _locks.items():
        try:
            if f.made and os.listdir(key) == [LOCK]:
                os.remove(os.path.join(key, LOCK))
        except OSError:  # (gone, or not ours to clean: leave it)
            pass
        f.close()  # (closing the file drops the flock)
    _locks.clear()
    _remove_empty(_made_out)
    _made_out.clear()


def _remove_empty(folders):
    for path in reversed(folders):  # (deepest first)
        try:
            os.rmdir(path)  # (only while empty)
        except OSError:
            pass


def lock_holder(out_dir):
    """The pid in OUT/.lock while a live process holds its flock (a stage a killed pipeline or lab
    left running goes on writing there), else None."""
    import fcntl
    path = os.path.join(out_dir, LOCK)
    if os.path.realpath(out_dir) in _locks or not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "unknown"
    return None


def run_progress(run_dir):
    """(step, planned max_steps) of a run folder's newest checkpoint, from its config.json; None
    where either is not recorded."""
    ck = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    try:
        with open(os.path.join(ck, "config.json")) as f:
            config = json.load(f)
        step, planned = config["step"], config["run_config"]["max_steps"]
    except (TypeError, OSError, ValueError, KeyError):
        return None
    return (step, planned) if isinstance(step, int) and isinstance(planned, int) else None


def holds_run(out_dir):
    """What in OUT shows that a run wrote there (checkpoints, their temp dirs, metrics)."""
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    prefixes = ("checkpoint-", ".tmp-checkpoint-")
    return [n for n in names if n.startswith(prefixes) or n == "metrics.jsonl"]


# the images data.check_images decoded for this run and records (images_fingerprint; not those
# of an input free at --resume: check_images(record=False))
_images_read = set()


def note_images_read(paths):
    _images_read.update(paths)


def images_fingerprint():
    """{"count", "names_sizes"} of the images this run's data files name (those check_images
    decoded and recorded), or None for none: each one's file name and size, as a sorted multiset,
    so a folder moved or copied elsewhere is the same images and one replaced by other pixels
    (another size) is not; one gone (or not a file) counts as size -1. Cheap (one stat each, the
    files just decoded: 118k COCO images, under 0.5 s; their bytes were read once to decode them,
    and reading them again to hash them would double that); an image edited to the very same size
    is not seen."""
    if not _images_read:
        return None
    h = hashlib.sha256()
    for name in sorted(f"{os.path.basename(p)}:{_file_size(p)}" for p in _images_read):
        h.update(f"{name};".encode())
    return {"count": len(_images_read), "names_sizes": h.hexdigest()[:32]}


def _file_size(path):
    """path's size, or -1 where it is no file: one stat (isfile + getsize took two, each a round
    trip on NFS, for every image on rank 0)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def file_digests(paths, as_read=False):
    """{path: sha256 hex} of the data files that exist (a missing one is the reader's error to
    report). as_read: of the bytes this run's readers read, where they read the file (it may have
    changed since: while a run decodes its images, minutes for COCO)."""
    out = {}
    for p in paths:
        if p and os.path.isfile(p):
            path = os.path.abspath(p)
            out[path] = digests_read.get(path) if as_read else None
            if out[path] is None:  # (no reader read it this run)
                with open(p, "rb") as f:
                    out[path] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def claim_out(cfg, d, inits=()):
    """Before anything is read or written (main process): --out writable and locked; a run already
    there is continued only with --resume true (which needs a checkpoint) and replaced only with
    --overwrite true. Under torchrun every rank waits for rank 0's answer: the others went on
    while rank 0 was refused (a locked --out's half-written checkpoints were cleaned away by
    another rank's --resume)."""
    # (a run before it in this process, a test's: not this run's images and files)
    _images_read.clear()
    digests_read.clear()
    if d.world == 1:
        return _claim_out(cfg, inits)
    rank0_lock = main_first(d, lambda: _claim_out(cfg, inits), lambda: lock_seen(cfg.out))
    check_out_shared(cfg, d, rank0_lock)


def main_first(d, work, seen=lambda: None):
    """work() on the main process alone, a refusal of it told to every rank (rank 0 says why; each
    other node's terminal too), and the main process's seen() after it returned on every rank.
    Rank 0 refused alone, the others went on: into the first step's collective, where the other
    nodes learnt of it as gloo's "Connection closed by peer"."""
    refused = None
    if d.main:
        try:
            work()
        except Exception as e:  # (told to the other ranks before it is raised here)
            refused = e
    told = [None if refused is None else str(refused), seen() if d.main else None]
    dist.broadcast_object_list(told, src=0)
    if refused is not None:
        raise refused
    if told[0] is not None:
        distributed.refuse_once_per_node(d, f"rank 0: {told[0]}")
    return told[1]


def lock_seen(out_dir):
    """OUT/.lock as this process sees it (its text and modification time), or None. (Opened, not
    stat'ed: NFS checks its cached attributes on open.)"""
    try:
        with open(os.path.join(out_dir, LOCK), "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime_ns
    except OSError:
        return None


def check_out_shared(cfg, d, rank0_lock):
    """Whether every process sees the --out rank 0 claimed (its .lock as rank 0 wrote it): on nodes
    without a shared file system each has a folder of its own. --fsdp is refused there (each rank
    wrote its shards into its own node's folder: rank 0's checkpoint lacked the others' and ended
    with exit 0); a replicated run is written by rank 0 alone, said on the nodes that see none of
    it (load_resume refuses a --resume on nodes without the checkpoint)."""
    sees = [None] * d.world
    dist.all_gather_object(sees, lock_seen(cfg.out) == rank0_lock)
    if all(sees):
        return
    apart = sees.index(False)
    if getattr(cfg, "fsdp", False):
        distributed.refuse_once_per_node(
            d, f"--out {cfg.out}: rank {apart} does not see the folder rank 0 writes (the nodes "
            "share no file system there): --fsdp writes each process's shards into it; give every "
            "node one shared --out")
    if d.local_rank == 0 and not sees[d.rank] and not cfg.resume:  # (resume_together: the
        # checkpoint every rank finds, which a copy of the run on each node gives them)
        print(f"note: --out {cfg.out} on this node is not the folder rank 0 writes (no shared file "
              "system): the run is written on rank 0's node alone; copy it to every node's --out "
              "before a --resume", flush=True)


def _claim_out(cfg, inits):
    out, resume, overwrite = cfg.out, cfg.resume, getattr(cfg, "overwrite", False)
    try:  # (a byte that is not UTF-8: the tokenizer's files failed to be written, a traceback)
        out.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"--out {out!r}: not valid UTF-8 (checkpoint files record paths in "
                          "UTF-8 JSON): choose another name") from None
    for init in inits:  # before the out folder or a world is written (both cost time to undo)
        if init and not os.path.isdir(init):
            raise ConfigError(no_dir(init))
        # a run folder still being written: its newest checkpoint is replaced (and removed) as
        # it goes, under this run's load or later under the adapters saved against it
        holder = lock_holder(init) if init else None
        if holder and not os.path.isfile(os.path.join(init, "config.json")):
            raise ConfigError(f"{init}: a process (pid {holder}) is still writing this run "
                              "folder; wait for its run to end, or pass one of its checkpoint-N "
                              "folders copied aside")
    refuse_in_world("--out", out, getattr(cfg, "world", ""), "the run")  # (and --overwrite
    # would move the world away)
    out_real = os.path.realpath(out)
    if resume and overwrite:
        raise ConfigError("--resume true and --overwrite true: choose one (continue the run, or "
                          "replace it)")
    ensure_writable(out)
    lock_out(out)
    found = holds_run(out)
    resumable = latest_checkpoint(out) is not None
    if found and not resume and not overwrite:
        what = ", ".join(found[:3])
        if not resumable:  # (cut off before its first checkpoint: --resume has nothing)
            raise ConfigError(f"{out}: holds a run stopped before its first checkpoint ({what}); "
                              "pass --overwrite true to move it aside and start again, or "
                              "another --out")
        raise ConfigError(f"{out}: holds a run ({what}); pass --resume true to continue it, "
                          "--overwrite true to move it aside and start again, or another --out")
    if resume and not resumable:
        fresh = "drop --resume and pass --overwrite true to move it aside and start again" \
            if found else "run without --resume to start fresh"
        raise ConfigError(f"{out}: --resume true, but there is no checkpoint to resume from "
                          f"({fresh})")
    for f in dataclasses.fields(cfg) if overwrite else ():  # --overwrite would move the inputs
        # of this run away (the checkpoint it starts from, its world or data files)
        value = getattr(cfg, f.name)
        if f.name == "out" or not isinstance(value, str):
            continue
        for path in paths_in_flag(value):
            real = os.path.realpath(path)
            if real == out_real or real.startswith(out_real + os.sep):
                named = "" if path == value else f" ({path})"
                raise ConfigError(f"--{f.name} {value}{named} lies inside --out {out}, which "
                                  "--overwrite true moves aside; copy it elsewhere or choose "
                                  "another --out")


def refuse_unread(cfg, flags, why, runs=(False,)):
    """One line for a flag among `flags` given on the command line, or changed from its default,
    where it is not read (`why` completes '--flag VALUE: not read ...'): it would be ignored
    without a word (a value typed at its default too: its user meant it, unless it is among
    `runs`, what happens anyway: false for off, by default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    given = getattr(cfg, "_given", frozenset())  # (parse_config's; none for a Config built in code)
    for flag in flags:
        value = getattr(cfg, flag)
        # ('' typed asks for none: nothing is left unread; a value in `runs` is what happens)
        typed = flag in given and value not in ("", ()) and \
            not any(value is r or (type(value) is type(r) and value == r) for r in runs)
        if value != defaults[flag] or typed:
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            shown = str(value).lower() if isinstance(value, bool) else shown  # (as it is typed)
            shown = "(a key, not shown)" if flag.endswith("_key") else shown  # (a secret)
            raise ConfigError(f"--{flag} {shown}: not read {why}")


def refuse_unread_shared(cfg, warmups=None):
    """The stages' shared flags that another flag leaves unread: bf16 off the GPU, --save_full
    without --fsdp, LoRA's shape with --lora_r 0 (a full fine-tune), --warmup_from_zero without
    warmup steps (`warmups`: the warmup lengths the run reads, default --warmup's)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if cfg.device != "cuda" and cfg.dtype != "fp32":  # (fp32, typed or not, is what runs)
        refuse_unread(cfg, ["dtype"], f"with --device {cfg.device} (bf16 runs on GPU only); "
                      "drop it")
    if "save_full" in names and not cfg.fsdp:
        refuse_unread(cfg, ["save_full"], "without --fsdp (every checkpoint holds the whole "
                      "model); drop it", runs=())  # (false, 'the last alone', is not what runs)
    if "lora_r" in names and cfg.lora_r == 0:
        lora = [f for f in ("lora_alpha", "lora_dropout", "lora_targets") if f in names]
        refuse_unread(cfg, lora, "with --lora_r 0 (a full fine-tune); drop it")
    if "warmup_from_zero" in names and not any([cfg.warmup] if warmups is None else warmups):
        refuse_unread(cfg, ["warmup_from_zero"], "with --warmup 0 (no warmup step for it to "
                      "change); drop it")


def paths_in_flag(value):
    """The existing paths a flag value names: itself, or the files of a list (`A,B`) whose items
    may carry a weight or a role (`FILE:2`, `FILE:conv`) or a name (`mmhal=FILE`)."""
    pieces = [value] + value.split(",")
    pieces += [p.rsplit(":", 1)[0] for p in pieces] + [p.split("=", 1)[-1] for p in pieces]
    return sorted({p for p in pieces if p and os.path.exists(p)})


def pid_alive(pid):
    """Whether a process of this id runs on this machine (someone else's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (someone else's process)
        return True
    return True


def start_writing(cfg, d, data_files=(), model=None, reward_model=None, free_files=()):
    """Once the inputs are checked, just before the first write (main process). --resume: the data
    files must be those the run started on (sha256 in OUT/run.json), and the CLIP folder `model`
    read its vision weights from (--vision_tower, or the one its checkpoint names) must hold the
    weights it held then (tensors_fingerprint), and the images the data names must be those it named
    then (images_fingerprint). --overwrite true: a run already in --out is moved aside in one
    rename (kept, never deleted). A fresh run records its data files' digests, its images'
    fingerprint and that CLIP's (ppo.py: its `reward_model`'s CLIP too, where that is another
    model). free_files: files a run recorded with its data before 2026-12-06 that may change at
    --resume now (vigc's --images list): left out of the comparison."""
    # (each node's local rank 0 reads its node's files: the other ranks there see the same)
    digests = file_digests(data_files, as_read=True) if d.local_rank == 0 else None
    if d.world == 1:
        return _start_writing(cfg, digests, model, reward_model, free_files)
    same_data_on_every_node(digests, d)
    main_first(d, lambda: _start_writing(cfg, digests, model, reward_model, free_files))


def _start_writing(cfg, digests, model, reward_model=None, free_files=()):
    out = cfg.out
    run_file = os.path.join(out, RUN_FILE)
    # the CLIP folder each model read its vision weights from (None: the checkpoint's own)
    clips = {"clip_tensors": getattr(model, "clip_dir", None),
             "reward_clip_tensors": getattr(reward_model, "clip_dir", None)
             if reward_model is not model else None}
    clip_prints = {k: tensors_fingerprint(clip) for k, clip in clips.items() if clip}
    images = images_fingerprint()
    if cfg.resume and os.path.exists(run_file):
        try:
            with open(run_file) as f:
                run = json.load(f)
            was = run["data"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{run_file}: cannot read ({type(e).__name__}); it records the run's "
                              "data files")
        for key, clip in clips.items():
            # (a folder replaced since: the rest of the run read another CLIP without a word;
            # runs from before it was recorded: not checked; before 2026-12-06 the files'
            # base_fingerprint, which a CLIP converted to other files fails. Another
            # --vision_tower is refused before, with the config)
            if clip and key in run:
                same = run[key] == clip_prints[key]
            elif clip and key == "clip_tensors" and "clip_fingerprint" in run:
                same = run["clip_fingerprint"] == base_fingerprint(clip)
            else:
                continue
            if not same:
                flag = f"--reward {cfg.reward}: its CLIP " if key == "reward_clip_tensors" else \
                    "--vision_tower " if getattr(cfg, "vision_tower", "") else ""
                raise ConfigError(f"{flag}{clip}: other CLIP weights than this run started "
                                  f"with (replaced since: the fingerprint in {run_file} "
                                  "differs); put those back, or start a new run")
        if not isinstance(was, dict) or not all(isinstance(v, str) for v in was.values()):
            raise ConfigError(f"{run_file}: field 'data': expected an object {{file: sha256}} (it "
                              "records the run's data files)")
        free = {os.path.abspath(p) for p in free_files}
        was = {path: digest for path, digest in was.items() if path not in free}
        # (each file's contents in its place: both are in the run's order of its data files)
        moved = was != digests and list(was.values()) == list(digests.values())
        if moved:  # (the same files' contents, the folder moved or mounted elsewhere)
            print(f"note: --resume: the run's data files are read from other paths now (the same "
                  f"contents, sha256): {', '.join(sorted(set(digests) - set(was)))}")
        for path in sorted(set(was) | set(digests)) if not moved else ():
            if was.get(path) != digests.get(path):
                if path not in digests:
                    how = "is not part of it now"
                elif path not in was:
                    how = "was not part of it"
                else:
                    how = "changed since the run started (sha256 differs)"
                raise ConfigError(f"{path}: --resume on other data: this file {how}; resume with "
                                  "the data the run started on, or start a new run")
        images_was = run.get("images")  # (a run recorded before 2026-12-06: not checked)
        if images_was is not None and images_was != images:
            now = images["count"] if images else 0
            then = images_was.get("count") if isinstance(images_was, dict) else "?"
            raise ConfigError(f"--resume on other images: the {now} images the data files name "
                              f"are not the {then} the run started on (their names or sizes "
                              f"differ from {run_file}'s 'images'); put those back, or start a "
                              "new run")
    if getattr(cfg, "overwrite", False) and holds_run(out):
        real = os.path.normpath(out)
        if os.path.islink(real):  # (the folder: a link (to /scratch) stays one, to a new folder)
            real = os.path.realpath(real)
        aside = f"{real}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            os.rename(real, aside)  # the one atomic step: the old run is whole under its new name
        except OSError as e:  # (a name near 255 bytes: the line said "File name too long" of OUT)
            raise ConfigError(f"--overwrite: cannot move the run in {out} aside to {aside} "
                              f"({e.strerror}); it is as it was: move it yourself, or choose "
                              "another --out") from None
        old_lock = _locks.pop(os.path.realpath(out))
        os.makedirs(real)
        lock_out(out)
        old_lock.close()
        print(f"--overwrite: the previous run in {out} is now {aside} (delete it when it is no "
              "longer needed)")
    if not cfg.resume:  # (and the checkpoint --init stood for: --resume keeps to it, and its
        # weights' fingerprint: check_base_unchanged)
        init = getattr(cfg, "init", "")
        record = {"init": os.path.abspath(resolve_checkpoint(init))} if init else {}
        record.update(clip_prints)
        try:
            record.update({"init_fingerprint": init_fingerprint(init)} if init else {})
        except (CheckpointError, OSError):  # (a layout without weight files of its own: none)
            pass
        record.update({"images": images} if images else {})
        common.write_json({"data": digests, **record}, run_file, indent=2)


def same_data_on_every_node(digests, d):
    """Every node's data files hold rank 0's contents (sha256, in the order of the flags that name
    them). On nodes without a shared file system each reads its own copy: a copy that differed
    trained its ranks' share of every batch on other records, without a word (run.json recorded
    rank 0's)."""
    every = [None] * d.world
    dist.all_gather_object(every, digests)
    ours = list(every[0].items())
    for rank, theirs in enumerate(every):
        if theirs is None:
            continue
        theirs = list(theirs.values())
        for i, (path, digest) in enumerate(ours):
            if i >= len(theirs) or theirs[i] != digest:
                path = list(digests or {path: 0})[i]  # (as this node names it: its local rank 0's)
                distributed.refuse_once_per_node(
                    d, f"{path}: other contents on rank {rank}'s node than on rank 0's (sha256 "
                    "differs): every node must read the same data files (copy them alike, or share "
                    "one file system)")


def rng_state(generators=None):
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # (this process's device alone: a resume may see fewer)
        state["cuda"] = torch.cuda.get_rng_state()
    state["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    return state


def set_rng_state(state, generators=None):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # (saved before 2026-12-05: every visible device's;
            # set_rng_state_all raised an IndexError on a machine that sees fewer)
            i = torch.cuda.current_device()
            cuda = cuda[i] if i < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    for k, g in (generators or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


def save_checkpoint(model, out_dir, step, run_config, optimizer=None, tokenizer=None, base=None,
                    generators=None, extra_state=None, keep=2, d=None, full=None):
    """Write OUT/checkpoint-{step}: model files (+ tokenizer) and trainer_state.pt (optimizer, step,
    RNG, run config). Written into a temp dir and renamed; older checkpoints beyond `keep` removed.
    Replicated: only the main process writes; all processes wait for it. Under FSDP see
    _save_sharded. A model whose base weights changed since they were loaded (a PEFT adapter's
    vision or projector LoRA merged in) is written whole: `base` no longer holds its weights."""
    if getattr(model, "base_edited", False):
        base = None
    if d is not None and d.fsdp:
        return _save_sharded(model, out_dir, step, run_config, optimizer, tokenizer, base,
                             generators, extra_state, keep, d, full)
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    ranks_rng = None  # every rank's random streams (each draws its own LoRA dropout masks)
    if d is not None and d.world > 1:
        ranks_rng = [None] * d.world if d.main else None
        dist.gather_object(rng_state(generators), ranks_rng, dst=0)
    tmp, failed = os.path.join(out_dir, f".tmp-checkpoint-{step:06d}-{os.getpid()}"), None
    if d is None or d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        cfg = _config_dict(run_config)
        try:
            # base is stored relative to the checkpoint, so a moved ckpt/ tree keeps working
            save_checkpoint_files(model, tmp, base=base,
                                  extra_config={"step": step, "run_config": cfg})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            state = {"format_version": FORMAT_VERSION, "step": step, "run_config": cfg,
                     "optimizer": optimizer.state_dict() if optimizer is not None else None,
                     "rng": rng_state(generators), "rng_ranks": ranks_rng,
                     "world": d.world if d is not None else 1, "extra": extra_state or {}}
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        except Exception as e:  # (a full disk: torch's and safetensors' own errors, a traceback)
            failed = e
    agree_written(failed, tmp, out_dir, final, d)
    _commit(tmp, final, out_dir, keep, d)
    return final


def write_failure(error, out_dir, what):
    """A user's error for a checkpoint that could not be written for want of space (or a failing
    disk, or a file-size limit): OSError's ENOSPC, EDQUOT, EIO or EFBIG, or the same in torch's and
    safetensors' own errors, which carry no errno; or for want of permission (EACCES, EPERM,
    EROFS). Anything else is raised as it was."""
    text = str(error)
    if (isinstance(error, OSError) and error.errno == errno.ENAMETOOLONG) or \
            "os error 36" in text:  # (safetensors' own error: an --out near PATH_MAX)
        return CheckpointError(f"{out_dir}: cannot write {what} (File name too long: a path "
                               "inside it is past the system's limit); nothing of it was kept: "
                               "choose a shorter --out")
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CheckpointError(f"{out_dir}: cannot write {what} ({error.strerror}: "
                               f"{error.filename or out_dir}); nothing of it was kept, what was "
                               "written before is: make the folder writable and run again "
                               f"({common.RESUME_IF_SAVED})")
    full = isinstance(error, OSError) and \
        error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)
    signs = ("No space left", "os error 28", "os error 27", "File too large", "Disk quota",
             "iostream error", "unexpected pos", "file write failed")
    if not full and not any(sign in text for sign in signs):
        raise error
    try:
        free = f"{shutil.disk_usage(out_dir).free / 2 ** 20:.0f} MB free there"
    except OSError:
        free = "its free space unknown"
    first = text.strip().splitlines()[0][:120] if text.strip() else type(error).__name__
    return CheckpointError(f"{out_dir}: cannot write {what} ({first}; {free}); nothing of it "
                           "was kept, what was written before is: free some space (or mend the "
                           f"disk) and run again ({common.RESUME_IF_SAVED})")


def _config_dict(run_config):
    """The run config as a checkpoint records it; a run on a Shapes world also records a digest of
    its world.json (seed, format, parameters, statistics: the same bytes when written again with
    them), so a world rewritten since with other parameters is noticed (note_world)."""
    is_dataclass = dataclasses.is_dataclass(run_config)
    cfg = dataclasses.asdict(run_config) if is_dataclass else dict(run_config)
    digest = world_digest(cfg["world"]) if isinstance(cfg.get("world"), str) else None
    if digest:
        cfg["world_digest"] = digest
    return cfg


def world_digest(world):
    """A digest of the world's world.json, or None where there is none."""
    try:
        with open(os.path.join(world, "world.json"), "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:16]
    except OSError:
        return None


def rewritten_world(ckpt_dir, world):
    """The recorded world path when the checkpoint was trained on `world` and that folder has been
    written again since with other parameters (its world.json differs from the one recorded), else
    None (another world, not recorded, or the same)."""
    rc = recorded_run_config(ckpt_dir)
    if not isinstance(rc.get("world"), str):
        return None
    same_folder = os.path.realpath(rc["world"]) == os.path.realpath(world)
    now = world_digest(world)
    stale = same_folder and rc.get("world_digest") not in (None, now) and now is not None
    return rc["world"] if stale else None


def other_world(ckpt, world):
    """(kind, why) where the checkpoint `ckpt` was not trained on the Shapes world in `world` as it
    is now, else None: 'rewritten' (that folder written again since with other parameters) or
    'elsewhere' (another world folder with other contents; a copy of the same world is the same
    world, and a world not written yet here is the same folder to be written again)."""
    if rewritten_world(ckpt, world):
        return "rewritten", (f"was trained on {world} before it was written again with other "
                             "parameters (its world.json differs from the one recorded)")
    rc = recorded_run_config(ckpt)
    now = world_digest(world)
    elsewhere = isinstance(rc.get("world"), str) and \
        os.path.realpath(rc["world"]) != os.path.realpath(world)
    if rc.get("world_digest") not in (None, now) and (now is not None or elsewhere):
        return "elsewhere", (f"was trained on the world in {rc.get('world')}, not on --world "
                             f"{world} (their world.json differ)")
    return None


def refuse_in_world(flag, path, world, what="it"):
    """An output inside the --world folder: written among the world's files (which shapes.py then
    refuses to write again)."""
    if not (world and path):
        return
    real, world_real = os.path.realpath(path), os.path.realpath(world)
    if real == world_real:
        raise ConfigError(f"{flag} {path} is the --world folder: {what} would be written among "
                          f"the world's files; choose another {flag}")
    if real.startswith(world_real + os.sep):
        raise ConfigError(f"{flag} {path} lies inside the --world folder {world}: {what} would be "
                          f"written among the world's files; choose another {flag}")


def note_world(flag, path, world):
    """A note where --init/--ckpt was trained on this --world folder before it was written again
    with other parameters: its answers are then judged against, or trained on, another world; and
    where it names a run folder whose run stopped before its last step (its newest checkpoint is
    taken: not the model the run was to make). world None: the second note alone (a run that reads
    no Shapes world)."""
    if path and world and rewritten_world(resolve_checkpoint(path), world):
        print(f"note: {flag} {path} was trained on {world} before it was written again with "
              "other parameters (its world.json differs from the one recorded): this run reads "
              "the world as it is now", flush=True)
    progress = None
    if path and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        progress = run_progress(path)  # (a run folder, not a checkpoint picked by hand)
    holder = lock_holder(path) if progress else None
    if progress and holder:  # (eval of a run as it trains: its newest checkpoint now)
        print(f"note: {flag} {path}: its run is still being written (pid {holder}, at step "
              f"{progress[0]} of {progress[1]}); its newest checkpoint now is read (and may be "
              "removed by its run meanwhile)", flush=True)
    elif progress and progress[0] < progress[1]:
        # (a run resumed there later removes that checkpoint, which adapters saved against it
        # name as their base)
        print(f"note: {flag} {path}: its run stopped at step {progress[0]} of {progress[1]} "
              "(unfinished); its newest checkpoint is read (resuming that run later may remove "
              "it: copy it aside to keep what is made from it)", flush=True)


def _commit(tmp, final, out_dir, keep, d):
    """fsync the temp dir and rename it to its final name (the one atomic step) on the writing
    process, every process stopping with one line where that fails (rank 0 stopping alone left the
    others waiting at the next barrier); then drop old checkpoints."""
    failed = None
    if d is None or d.main:
        try:
            _fsync_dir(tmp)
            _swap_in(tmp, final)
        except OSError as e:
            failed = e
    agree_written(failed, tmp, out_dir, final, d)
    if d is None or d.main:
        _drop_old_checkpoints(out_dir, keep)
    if d is not None and d.world > 1:
        dist.barrier()


def agree_written(failed, tmp, out_dir, final, d):
    """Raise write_failure's line where this process (or, several processes: any) failed, the
    temp folder removed (a temp file: by the caller, as dpo's reference cache)."""
    if d is not None and d.world > 1:
        _stop_together(failed, tmp, out_dir, final, d)
    elif failed is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(failed, out_dir, os.path.basename(final)) from None


def _drop_old_checkpoints(out_dir, keep):
    """Keep the newest `keep` complete checkpoints and every one that ended a run. One that cannot
    be removed is a note: the new checkpoint is written, the run goes on."""
    old = complete_checkpoints(out_dir)  # (keep counts complete ones)
    for n in old[:-keep] if keep > 0 else []:
        if _ended_a_run(os.path.join(out_dir, n)):
            continue
        try:
            _discard(os.path.join(out_dir, n))
        except OSError as e:
            print(f"note: {out_dir}: could not remove the older {n} ({e.strerror or e}); "
                  "it stays", flush=True)


def _ended_a_run(path):
    """Whether a checkpoint was the last of a finished run (its step is its run's max_steps): a run
    resumed for more steps keeps it, as other runs name it as their base (a reward model, a DPO
    or --export adapter run from this SFT) and would no longer load."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        return cfg["step"] == cfg["run_config"]["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _trash(path):
    """Where a checkpoint directory goes before it is deleted (a name load_resume clears)."""
    name = f".tmp-checkpoint-discard-{os.path.basename(path)}-{os.getpid()}"
    return os.path.join(os.path.dirname(path), name)


def _discard(path):
    """Delete a checkpoint directory after renaming it to a temp name (one atomic step): a kill
    during the deletion never leaves a checkpoint-N that looks complete (has config.json) but is
    not."""
    os.rename(path, _trash(path))
    shutil.rmtree(_trash(path), ignore_errors=True)


def _swap_in(tmp, final):
    """Rename tmp to final; a final already there (the same step saved again, e.g. the last save)
    is put back where the rename fails (deleted first, a failing rename lost both)."""
    if not os.path.exists(final):
        os.rename(tmp, final)
        return
    os.rename(final, _trash(final))
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(_trash(final), final)
        raise
    shutil.rmtree(_trash(final), ignore_errors=True)


def _fsync_dir(path):
    for folder, _, names in os.walk(path):  # (FSDP checkpoints hold a shards/ folder)
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                os.fsync(f.fileno())


def load_resume(out_dir, run_config, free=()):
    """The newest checkpoint in OUT and its trainer state, after checking that the run config is the
    same (except fields that do not change the math, and the script's `free` ones: vigc's
    generation settings). None if there is none. The random streams
    are left as --seed set them (building the model draws from them, as at the start):
    `restore` sets the checkpoint's once the model is built. Under torchrun every process must
    resume from the same checkpoint (resume_together)."""
    found, refused = (None, None), None
    try:
        found = _load_resume(out_dir, run_config, free)
    except common.USER_ERRORS as e:
        refused = e
    resume_together(out_dir, found[0], refused)
    return found


def resume_together(out_dir, path, refused):
    """Every rank goes on from the same checkpoint, or every rank stops, one line a node. Nodes with
    an --out of their own (no shared file system) found none, or an older copy: they started again
    from step 0 beside rank 0's resumed run and hung in a collective once their steps parted; a
    refusal on one node left the others in a collective (a gloo traceback)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if refused is not None:
            raise refused
        return
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    every = [None] * dist.get_world_size()
    name = os.path.basename(path) if path else None
    dist.all_gather_object(every, (rank - local, None if refused is None else str(refused), name))
    stopped = [(r, node, text) for r, (node, text, _) in enumerate(every) if text is not None]
    here = [r for r, node, _ in stopped if node == rank - local]
    if here and here[0] == rank:  # (the first rank of its node that could not: its own line)
        raise refused
    if stopped:
        if not here and local == 0:
            common.fail(f"rank {stopped[0][0]}: {stopped[0][2]}")
        raise SystemExit(2)
    apart = next((r for r, (_, _, n) in enumerate(every) if n != every[0][2]), None)
    if apart is not None:
        def what(n):
            return f"resumes from {n}" if n else "finds no checkpoint there"
        message = (f"{out_dir}: --resume: rank 0 {what(every[0][2])}, rank {apart} "
                   f"{what(every[apart][2])}: every node must see the run's --out (one shared "
                   "file system, or a copy of the run on each node)")
        if local == 0:
            common.fail(message)
        raise SystemExit(2)


def _load_resume(out_dir, run_config, free):
    for n in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        has_config = os.path.exists(os.path.join(out_dir, n, "config.json"))
        # (a cut write of ours holds files alone: checkpoint-best/ of a user's, or checkpoint-N/
        # holding a folder, a run written there by another stage, were deleted with all they
        # held; an FSDP one cut with its shares/ is kept, never loaded without its config.json)
        incomplete = (checkpoint_step(n) is not None and not has_config
                      and os.path.isdir(os.path.join(out_dir, n))
                      and not any(e.is_dir() for e in os.scandir(os.path.join(out_dir, n))))
        # a checkpoint whose writing (or deletion) was cut off
        if n.startswith(".tmp-checkpoint-") or incomplete:
            shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)
    path = latest_checkpoint(out_dir)
    if path is None:
        return None, None
    file = os.path.join(path, "trainer_state.pt")
    # mapped where the optimizer lives on a GPU: a full fine-tune's AdamW moments were read whole
    # onto the host on their way there, 28 GB at 7B in bf16. Read whole on the CPU: the moments
    # would be the mapping itself (copy-on-write), keeping the file's disk space held after
    # checkpoint rotation deleted it, for the rest of the run
    mapped = getattr(run_config, "device", "cpu") != "cpu"
    # (torch.save writes a zip archive, and mapped an empty or cut file was "mmap can only be
    # used with files saved with torch.save(..., _use_new_zipfile_serialization=True)")
    if os.path.isfile(file) and not zipfile.is_zipfile(file):
        raise CheckpointError(f"{file}: truncated or corrupt (not the zip archive torch.save "
                              "writes): move the checkpoint away and --resume takes the one "
                              "before it")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False, mmap=mapped)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read trainer state ({type(e).__name__}: {e})")
    if mapped and isinstance(state, dict):  # (all but the moments copied out: a random stream
        # kept by the run held the whole file mapped; restore() lets the moments go)
        state = {k: v if k == "optimizer" else copy.deepcopy(v) for k, v in state.items()}
    needed = {"format_version", "step", "run_config", "rng"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{file}: not a factalign trainer state (expected format_version, "
                              "step, run_config, rng)")
    if state["format_version"] != FORMAT_VERSION:
        relation = "is newer than" if _newer(state["format_version"]) else "differs from"
        raise CheckpointError(f"{file}: format_version {state['format_version']!r} {relation} "
                              f"the {FORMAT_VERSION} this code reads; resume with the factalign "
                              "version that wrote it")
    now = dataclasses.asdict(run_config)
    was = dict(state["run_config"])
    for k, v in ADDED_FIELDS.items():
        if k in now and k not in was:
            v = v(was) if callable(v) else v
            was[k] = v.replace(common.WORLD, str(was.get("world", ""))) if isinstance(v, str) else v
    # fields this script has that the run's config lacks: another stage wrote it (a field that
    # differs would name one of them, which says nothing about what went wrong)
    free = RESUME_FREE_FIELDS | set(free)
    absent = [k for k in now if k not in free and k not in was]
    if absent:
        fields = ", ".join(map(repr, absent[:3])) + (", ..." if len(absent) > 3 else "")
        raise ConfigError(f"{path}: --resume: this run's config lacks this script's field"
                          f"{'s' if len(absent) > 1 else ''} {fields}: another stage or an older "
                          "factalign wrote it; resume with the stage and version that wrote it, "
                          "or pass another --out")
    diff = [k for k in now if k not in free and _norm(now[k], k) != _norm(was.get(k), k)]
    # (a --world moved or renamed: its '{world}/...' paths differ too, and sft's and vigc's
    # --tokenizer came first, naming a flag that was not given)
    diff.sort(key=lambda k: k != "world")
    if diff:
        k = diff[0]
        why = RESUME_WHY.get(k, "")
        raise ConfigError(f"{path}: --resume with a different config: field '{k}' was "
                          f"{was.get(k)!r}, now {now[k]!r}{why}")
    if rewritten_world(path, now.get("world", "")):  # (the rest of the run would read another)
        raise ConfigError(f"{path}: --resume: {now['world']} was written again with other "
                          "parameters since this run started (its world.json differs from the "
                          "one recorded); start again with --overwrite true, or pass the world "
                          "it was trained on")
    max_steps, planned = now.get("max_steps"), was.get("max_steps")
    if isinstance(planned, int) and isinstance(max_steps, int) and max_steps != planned and \
            int(os.environ.get("RANK", "0")) == 0:  # (the cosine schedule is over max_steps)
        print(f"note: --resume with --max_steps {max_steps}, the run planned {planned}: the "
              f"learning-rate schedule stretches from step {state['step']} on, so the run "
              "matches neither a run of one plan nor of the other", flush=True)
    accum, was_accum = now.get("grad_accum"), was.get("grad_accum")
    if None not in (accum, was_accum) and accum != was_accum and \
            int(os.environ.get("RANK", "0")) == 0:
        print(f"note: --resume with --grad_accum {accum}, the run had {was_accum}: the same global "
              "batches in other micro-batches, summed in another order: not bitwise the run that "
              "was not stopped", flush=True)
    if isinstance(max_steps, int) and state["step"] > max_steps:  # (it would train nothing)
        raise ConfigError(f"{path}: --resume: the run is at step {state['step']}, past --max_steps "
                          f"{max_steps}; give --max_steps {state['step']} or more")
    return path, state


def _newer(version):
    return isinstance(version, int) and version > FORMAT_VERSION


# the fields that name files or folders (a run's other strings are choices)
PATH_FIELDS = {"world", "init", "data", "val_data", "align_data", "read_data", "tokenizer",
               "image_folder", "captions", "reward", "vision_tower", "policy_lora",
               "import_llava_rlhf", "instructions", "images"}


def _norm(v, field=None):
    """A config value as compared on --resume: a path spelled otherwise (`w/`, `./w`, `w//x`, the
    absolute path) is the same path; not through links (one may point elsewhere since)."""
    if field in PATH_FIELDS and isinstance(v, str) and v:
        return os.path.normpath(os.path.abspath(v))
    return list(v) if isinstance(v, (tuple, list)) else v


# ----------------------------------------------------------------------------------------
# what a run was started from (--init's run.json, the base its adapters sit on), and FSDP
# checkpoints: each rank writes its shards (torch.distributed.checkpoint) into the temp dir that is
# renamed as a whole; the final one also holds the whole model
# ----------------------------------------------------------------------------------------

def recorded_init(run):
    """The --init a training run recorded in its run.json (None: not recorded)."""
    path = os.path.join(run, RUN_FILE)
    try:
        with open(path) as f:
            init = json.load(f).get("init")
    except (OSError, ValueError, AttributeError):
        return None
    if init is not None and not isinstance(init, str):  # (a hand edit: a TypeError where read)
        raise ConfigError(f"{path}: field 'init': expected the path of the checkpoint the run "
                          "started from")
    return init


def trained_base(resume_path, init, loads_adapters=False):
    """The checkpoint --init stands for in this run: on --resume, the base the run's adapters were
    trained on (the resumed checkpoint's 'base'; a full model: the --init run.json recorded), not
    --init's newest checkpoint-N: a run folder given as --init may have grown one since, and the
    adapters (a full DPO run: its reference) would move onto other weights. loads_adapters: the
    stage loads the resumed checkpoint itself (its adapters through their own 'base'); else the
    resumed run is built from the base returned, which must hold the weights the run started
    from (check_base_unchanged)."""
    base = _trained_base(resume_path, init, loads_adapters)
    if resume_path and not loads_adapters:
        check_base_unchanged(resume_path, base, init)
    return base


def _trained_base(resume_path, init, loads_adapters):
    now = resolve_checkpoint(init)
    if not resume_path:
        return now
    was = recorded_base(resume_path)
    # (an adapter checkpoint loaded as such whose base is gone: its load says so, and the run
    # does not resume on --init, as the note said before it)
    loads_adapters = loads_adapters and was is not None
    if was is None:  # a full model: the --init its run started from (run.json; older runs: none)
        was = recorded_init(os.path.dirname(resume_path))
    if not was:
        return now
    main = int(os.environ.get("RANK", "0")) == 0  # (said once under torchrun)
    if not os.path.exists(was):  # (a moved project: run.json's absolute path; not --init's change)
        if main and not loads_adapters:
            print(f"note: {was}, the base this run recorded, is not there (moved?): resuming on "
                  f"--init {init} ({now})", flush=True)
        return now
    if os.path.realpath(was) != os.path.realpath(now) and main:
        print(f"note: --init {init} now holds {now}; resuming on {was}, what this run was "
              "trained from", flush=True)
    return was


def check_base_unchanged(resume_path, base, init):
    """--resume building the model from `base` (the checkpoint --init stood for) rather than from
    the checkpoint resumed (FSDP shards hold the trained weights alone; ppo restores its adapters
    onto it): refused where `base` holds other weights than the run recorded (the checkpoint's
    'base_fingerprint', and run.json's 'init_fingerprint', which covers the adapters of a LoRA
    --init as well; neither in older runs: not checked). An --init retrained or replaced at its
    path went on as the run's frozen weights."""
    recorded = ((os.path.join(resume_path, "config.json"), "base_fingerprint",
                 lambda: base_fingerprint(base_weights_dir(base))),
                (os.path.join(os.path.dirname(resume_path), RUN_FILE), "init_fingerprint",
                 lambda: init_fingerprint(base)))
    for path, key, now in recorded:
        try:
            with open(path) as f:
                saved = json.load(f).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if saved is not None and saved != now():
            raise ConfigError(f"--init {init}: {base} holds other weights than this run started "
                              "from (retrained or replaced at its path since: its fingerprint "
                              "differs from the one the run recorded); put those back, or start a "
                              "new run")


def fold_init_adapters(model):
    """A run started from a checkpoint with adapters trains the policy it holds: its active
    adapter merged into the base (e.g. POVID stage 2 from a LoRA stage-1 run), every adapter
    dropped; the run adds its own from its flags. (A new adapter beside it left it off: the bare
    base was trained; one of the run's name was taken over with its old shape.) True when one
    was merged."""
    merged = model.active_adapter is not None
    if merged:
        model.merge_adapter(model.active_adapter)
    for name in list(model.adapters):
        model.delete_adapter(name)
    return merged


def recorded_run_config(ckpt_dir):
    """The run config a checkpoint of ours records, or {} (not ours, or no config: loading says
    what is wrong)."""
    try:
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            rc = json.load(f).get("run_config")
    except (OSError, ValueError, AttributeError):
        return {}
    return rc if isinstance(rc, dict) else {}


def note_template(flag, path, template):
    """A note where a checkpoint of ours was trained with another --template than this run
    prompts it with (its answers, rewards and log-probabilities are then of another prompt
    format; sometimes meant, as LLaVA-RLHF evaluating with llava_v1)."""
    trained = recorded_template(resolve_checkpoint(path)) if path else None  # ('': a fresh model)
    if trained is not None and trained != template:
        print(f"note: {flag} {path} was trained with --template {trained}; this run prompts it "
              f"with --template {template} (pass --template {trained} to prompt it as trained)",
              flush=True)


def recorded_base(ckpt_dir):
    """The frozen base a checkpoint's adapters sit on, as its config.json names it (relative to
    the checkpoint); None for a full model."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        recorded = json.load(f).get("base")
    return os.path.normpath(os.path.join(ckpt_dir, recorded)) if recorded else None


def sharded_resume(resume_path, d):
    """Whether --resume loads FSDP shards: then the model is built from --init (or fresh) as at the
    start, sharded, and restore() loads the shards into it. (A final LoRA-merged model has no
    shards: loaded whole.)"""
    return bool(resume_path) and d.fsdp and os.path.isdir(os.path.join(resume_path, SHARDS))


def restore(model, opt, path, state, d, what="the other ranks' random streams",
            generators=None):
    """Continue where the checkpoint being resumed left off: the optimizer state, this rank's
    random streams and the stage's own `generators` (set here, after the model was built from
    --seed's streams as at the start); under FSDP also the model's and optimizer's shards.
    `what`: what starts again on another number of processes (note_other_world)."""
    if not sharded_resume(path, d):
        # (popped: the moments read from a mapped trainer_state.pt, kept in `state`, held the
        # file mapped for the whole run, its disk space held after rotation deleted it)
        moments = state.pop("optimizer", None)
        if moments is not None:
            opt.load_state_dict(moments)
            if d.device.type != "cpu":  # (what the optimizer keeps on the host, AdamW's step,
                # was still the mapped file's, and held all of it mapped: copied out)
                for s in opt.state.values():
                    s.update({k: v.clone() for k, v in s.items()
                              if torch.is_tensor(v) and v.device.type == "cpu"})
        # each rank its own (rank 0's alone changed the other ranks' LoRA dropout masks), rank
        # 0's on another number of processes
        ranks = state.get("rng_ranks")
        note_other_world(state.get("world", len(ranks) if ranks else None), d, what)
        set_rng_state(ranks[d.rank] if ranks and len(ranks) == d.world else state["rng"],
                      generators)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)
    # frozen weights come from --init, as at the start
    trained = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(distributed.resharded(model), opt, options=trained)
    both = {"model": model_sd, "optim": optim_sd}
    # this rank's files first, every rank stopping where one cannot read its own (one went on
    # alone into the collective load: a gloo traceback, or a hang)
    rng, failed = os.path.join(path, f"rng-rank{d.rank}.pt"), None
    try:
        check_shard_files(path)
        # (absent when resumed on more ranks: rank 0's)
        if not os.path.exists(rng) and state.get("fsdp_world") == d.world:  # (lost: not bitwise)
            raise CheckpointError(f"{rng}: missing (the checkpoint was written by {d.world} "
                                  "processes, each with its random streams)")
        streams = _read_rng(rng) if os.path.exists(rng) else state["rng"]
    except CheckpointError as e:
        failed = e
    except OSError as e:  # (a file this rank may not read: the others would wait in the load)
        failed = CheckpointError(f"{e.filename or path}: cannot be read ({e.strerror or e})")
    _stop_reading_together(failed, path, d)
    try:
        dcp.load(both, checkpoint_id=os.path.join(path, SHARDS))
    # e.g. another model size
    except (RuntimeError, ValueError, KeyError, CheckpointException) as e:
        if isinstance(e, CheckpointException) and e.failures:  # (its own text: the ranks only)
            e = (e.failures.get(d.rank) or next(iter(e.failures.values())))[0]
        raise CheckpointError(f"{path}/{SHARDS}: cannot load the FSDP shards into this model "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    # (strict=False: the frozen weights are not in the shards, by the option above; every trained
    # one is, or dcp.load raised)
    set_state_dict(model, opt, model_state_dict=both["model"], optim_state_dict=both["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    note_other_world(state.get("fsdp_world"), d, what)
    set_rng_state(streams, generators)


def _read_rng(path):
    """A rank's random streams as its checkpoint holds them; a file that cannot be read is a
    CheckpointError (a torch.load traceback on one rank)."""
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # (a truncated or foreign file: pickle's, zip's, torch's errors)
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}); the checkpoint is "
                              "damaged: move it away and --resume takes the one before it")


def _stop_reading_together(failed, path, d):
    """A barrier that raises on every rank where one could not read its part of the checkpoint
    (that rank: its own line; the others: a line saying another process could not)."""
    flag = torch.tensor([0.0 if failed is None else 1.0], device=d.device)
    if d.world > 1:
        dist.all_reduce(flag)
    if failed is not None:
        raise failed
    if flag.item():
        raise CheckpointError(f"{path}: another process could not read its part of this "
                              "checkpoint (its line says why)")


def rank_states(obj, d):
    """Every rank's `obj`, in rank order, for the checkpoint rank 0 writes (collective)."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def own_state(saved, d):
    """This rank's entry of what rank_states saved; None where nothing was saved or another number
    of processes wrote it (note_other_world says so)."""
    return saved[d.rank] if isinstance(saved, list) and len(saved) == d.world else None


def note_other_world(written_by, d, streams="the other ranks' random streams"):
    """--resume on another number of processes than wrote the checkpoint is allowed (a node lost),
    and said: the global batches are the same, but their sums run in another order and
    `streams` start again, so the run is no longer bitwise the one not stopped."""
    if d.main and written_by is not None and written_by != d.world:
        print(f"note: --resume on {d.world} process(es), the checkpoint was written by "
              f"{written_by}: the same global batches, summed in another order, and {streams} "
              "start again: not bitwise the run that was not stopped", flush=True)


def check_shard_files(ckpt):
    """Every file the shards' index (.metadata) reads from is there and holds the bytes it names
    (a checkpoint cut off while written or copied said only "CheckpointException ranks: [0]")."""
    from torch.distributed.checkpoint import FileSystemReader
    shards = os.path.join(ckpt, SHARDS)
    damaged = f"the checkpoint is damaged: move {ckpt} away and --resume takes the one before it"
    try:
        index = FileSystemReader(shards).read_metadata().storage_data
    except Exception as e:  # (any unpickling error of a damaged index)
        raise CheckpointError(f"{shards}/.metadata: cannot be read ({type(e).__name__}); "
                              f"{damaged}")
    ends = {}
    for info in index.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = os.path.join(shards, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing (the shards' index reads from it); {damaged}")
        if os.path.getsize(file) < end:
            raise CheckpointError(f"{file}: truncated ({os.path.getsize(file)} bytes; the shards' "
                                  f"index reads up to byte {end}); {damaged}")


def _save_sharded(model, out_dir, step, run_config, optimizer, tokenizer, base, generators,
                  extra_state, keep, d, full):
    """FSDP checkpoint-N/: shards/ (each rank's part of the model and AdamW state,
    torch.distributed.checkpoint), rng-rank{r}.pt, config.json, trainer_state.pt, tokenizer; with
    `full` (default: the run's last step, or every save with --save_full) also the whole model as
    model/adapters.safetensors. All written into one temp dir that rank 0 renames once every rank is
    done: a kill at any moment leaves no half checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)

    cfg = _config_dict(run_config)
    if full is None:
        full = step == cfg.get("max_steps") or bool(cfg.get("save_full"))
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    tmp = os.path.join(out_dir, f".tmp-checkpoint-{step:06d}-fsdp")  # one name all ranks know
    failed = None
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.makedirs(tmp)
        except OSError as e:
            failed = e
    _stop_together(failed, tmp, out_dir, final, d)
    distributed.resharded(model)
    # frozen weights: --init has them (LoRA: the whole base)
    trained = StateDictOptions(ignore_frozen_params=True)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=trained)
    else:
        model_sd, optim_sd = get_model_state_dict(model, options=trained), {}
    failed = None
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, SHARDS))
        torch.save(rng_state(generators), os.path.join(tmp, f"rng-rank{d.rank}.pt"))
    # (a full disk: every rank stops, none waits for the others; dcp's CheckpointException is
    # a BaseException)
    except (Exception, CheckpointException) as e:
        failed = e
        if isinstance(e, CheckpointException) and e.failures:  # (its text names the ranks only)
            failed = (e.failures.get(d.rank) or next(iter(e.failures.values())))[0]
    _stop_together(failed, tmp, out_dir, final, d)  # every rank's files are in tmp
    plain = distributed.gather_full_model(model, d) if full else None
    failed = None
    if d.main:
        try:
            _write_sharded_rest(tmp, final, step, cfg, model, plain, tokenizer, base, generators,
                                extra_state, d)
        except Exception as e:
            failed = e
    _stop_together(failed, tmp, out_dir, final, d)
    _commit(tmp, final, out_dir, keep, d)
    return final


def _stop_together(failed, tmp, out_dir, final, d):
    """A barrier that raises on every rank when one could not write its part of the checkpoint
    (that rank: write_failure's line; the others: a line saying a process could not), the temp
    folder removed: a rank that stopped alone left the others waiting at the next barrier."""
    flag = torch.tensor([0.0 if failed is None else 1.0], device=d.device)
    dist.all_reduce(flag)
    if not flag.item():
        return
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    what = os.path.basename(final)
    if failed is not None:
        raise write_failure(failed, out_dir, what) from None
    raise CheckpointError(f"{out_dir}: cannot write {what}: another process could not write its "
                          "part (its line says why); nothing of it was kept")


def _write_sharded_rest(tmp, final, step, cfg, model, plain, tokenizer, base, generators,
                        extra_state, d):
    """Rank 0's part of an FSDP checkpoint: config.json (with the whole model when `plain`),
    the tokenizer, trainer_state.pt."""
    extra = {"step": step, "run_config": cfg, "fsdp_shards": SHARDS}
    if plain is not None:  # the whole model, as a replicated run writes it
        save_checkpoint_files(plain, tmp, base=base, extra_config=extra)
    else:  # what latest_checkpoint and --resume read; the weights are in shards/ only
        base_rel = None
        if base:
            base_rel = os.path.relpath(os.path.realpath(base), os.path.realpath(final))
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "model": dataclasses.asdict(model.config), "adapters": model.adapters,
                "heads": sorted(model.heads), "active_adapter": model.active_adapter,
                "base": base_rel, **extra}
        clip = getattr(model, "clip_dir", None)
        if base and clip:  # as save_checkpoint_files records it
            meta["vision_tower"] = os.path.relpath(clip, os.path.abspath(final))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    trainer_state = {"format_version": FORMAT_VERSION, "step": step, "run_config": cfg,
                     "optimizer": None, "rng": rng_state(generators),
                     "extra": extra_state or {}, "fsdp_world": d.world}
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
