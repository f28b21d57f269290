"""What every training script shares: errors users cause (one line, exit code 2), dataclass
config -> command line, seeding and batch order, AdamW + cosine schedule and the update, logging,
whole-file writes, and the models, tokenizers and computations several stages share. torchrun and
FSDP2 live in distributed.py, run directories and checkpoints in rundir.py; both import this
module, which takes the few names it needs from them inside the functions that call them."""
import argparse
import dataclasses
import errno
import functools
import json
import math
import os
import random
import re
import select
import signal
import sys
import threading
import time
import typing
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
# imported before any process group exists: its functions take group.WORLD as a default argument,
# evaluated at import. Imported later (AdamW does, through torch._dynamo), they hold the group past
# destroy_process_group, and gloo's threads then race the interpreter's exit (SIGABRT).
import torch.distributed.nn.functional  # noqa: F401

from checkpoint import (clip_alone, detect_layout, is_peft_dir, latest_checkpoint, load_checkpoint,
                        peft_base_dir, refuse_scalar_model, resolve_checkpoint)
import interrupts
from formats import DataError
from interrupts import INTERRUPT_SAID_BY
from model import PRESETS, CheckpointError, LLaVA, ModelConfig

# a stage's --seed: numpy's global seed (np.random.seed) takes 32 bits
SEED_RANGE = "[0, 4294967295]"

# ----------------------------------------------------------------------------------------
# errors users cause: one line, exit code 2, no traceback
# ----------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A flag value or combination that cannot work."""


class NonFiniteError(Exception):
    """A non-finite loss or gradient."""


USER_ERRORS = (ConfigError, CheckpointError, NonFiniteError, DataError)


# ESC and what follows: CSI (colours, the cursor), OSC (titles, links; ended by BEL or ESC \),
# and the two- and three-byte codes (ESC M, ESC ( B of `tput sgr0`)
TERMINAL_CODE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[ -/]*[0-~])")


def torchrun_rank():
    """This process's rank under torchrun (0 in a plain run)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def fail(message):
    """The one line of a user's error, and exit code 2. Under torchrun every rank that meets the
    error says it (one rank's own file may be the cause), the other ranks' lines named as theirs,
    each written whole (two ranks' lines ran together)."""
    rank = torchrun_rank()
    # (a library's own text may carry terminal colours, as torch.load's refusal of a pickled
    # module does, links, or several lines)
    message = " ".join(TERMINAL_CODE.sub("", str(message)).splitlines())
    message = re.sub(r"[\x00-\x08\x0e-\x1f\x7f]", "", message)  # (a bell, a stray escape)
    if sys.stderr:  # (None: started with stderr closed, `2>&-`; the exit code still says it)
        sys.stderr.write(f"error{f' (rank {rank})' if rank else ''}: {message}\n")
        sys.stderr.flush()
    tell_the_waiting_ranks(message)
    raise SystemExit(2)


def tell_the_waiting_ranks(message):
    """A rank refused before it joined the process group (a flag or input given on one node only):
    the other nodes' ranks waited for it in setup_dist, 30 minutes (gloo's timeout), after its
    node had ended. It joins to hand them its line (same_flags_everywhere), for up to a minute
    (a rank that never comes: a traceback before setup_dist). Where every rank is on this node,
    torchrun stops them itself once this one exits: nothing to hand over. The join waits inside
    C++, where no signal handler runs: a Ctrl-C or torchrun's SIGTERM waited for it, up to that
    minute; it is taken at once now (distributed.taking_signals)."""
    import distributed  # (it imports this module)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed.made_process_group or world == 1 or "TORCHELASTIC_RUN_ID" not in os.environ or \
            _runs_alone or int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:
        return
    import datetime

    def hand_over():  # ("gloo": the object collectives of the others' "cpu:gloo,cuda:nccl" too)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        dist.all_gather_object([None] * dist.get_world_size(), (rank - local, message))
    # both signals raise KeyboardInterrupt here, as in user_errors (before it, interrupts.py's
    # handler said "interrupted while starting" and exited 130), a second one dropped, not a
    # traceback; one ignored at start stays so (None: a handler set outside Python, which could
    # not be put back)
    stops = [signum for signum in (signal.SIGINT, signal.SIGTERM)
             if signal.getsignal(signum) not in (signal.SIG_IGN, None)]
    with interrupts.interrupting(stops):
        try:
            # a stop here ends the rank with the refusal's exit code 2 and its line alone: the
            # refusal is what the user's command met (said already), the stop only cut short the
            # handing over; 130 and an "interrupted" line under it would read as a run stopped
            # midway, and a caller reading the code (pipeline.py, a shell script) would lose the
            # cause
            distributed.taking_signals(hand_over, stopped=None, code=2)
        except SystemExit as e:
            distributed.end_process(e.code)  # (the join's thread in C++: no teardown, it aborted)
            raise
        except BaseException:  # (the others gone, or never there)
            pass


_runs_alone = False  # refuse_torchrun: no rank of this script makes a process group


def refuse_torchrun(script, why):
    """A script that runs in one process, started by torchrun: rank 0 says so once, the others
    leave quietly (they were refused by rank 0's lock on --out, naming its pid)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    global _runs_alone
    _runs_alone = True  # (no rank waits for another: nothing to tell them)
    if int(os.environ.get("RANK", "0")) != 0:
        raise SystemExit(2)
    raise ConfigError(f"{script} runs in one process ({why}): run it with python, not torchrun")


# set by pipeline.py and lab.py for their stages and runs: their own pid (end_with_the_launcher)
STARTED_BY = "FACTALIGN_STARTED_BY"


RESUME_IF_SAVED = "a training run that saved a checkpoint goes on from it with --resume true"
INTERRUPTED = f"interrupted: what was written is kept ({RESUME_IF_SAVED})"


def escape_what_stdout_cannot_write():
    """A strict stdout (a UTF-8 or Latin-1 locale's) escapes what its encoding cannot write, as
    Python's stderr does: a name holding a byte that is not UTF-8 (a surrogate escape), or a CJK
    one under Latin-1, made a progress line raise UnicodeEncodeError mid-run. (The C locale's
    'surrogateescape' writes such a name's own bytes back: kept.)"""
    if hasattr(sys.stdout, "reconfigure") and sys.stdout.errors == "strict":  # (not a StringIO)
        sys.stdout.reconfigure(errors="backslashreplace")


@contextmanager
def user_errors(*extra, interrupted=INTERRUPTED):
    """Turn the errors a user can cause (bad data, bad checkpoint, bad flags, unwritable paths)
    into one line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
    Ctrl-C, or SIGTERM: the line `interrupted` (what a run of this script leaves, how to go on),
    exit 130. (Before it, and after it in a script, interrupts.py's handlers.)"""
    escape_what_stdout_cannot_write()
    interrupts.hand_over()
    # SIGTERM (a scheduler's time limit, `kill`, torchrun passing on its own to its ranks) taken
    # as Ctrl-C, where it would kill the process: a stage ended without its line, in the middle
    # of whatever it did (nothing torn: checkpoints are renamed whole); a second one is dropped
    # (it cut the stop short). Left as it is where ignored, or handled (pipeline.py's, lab.py's)
    sigterm = [signal.SIGTERM] if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else []
    with interrupts.interrupting(sigterm), _said_in_one_line(extra, interrupted):
        yield


@contextmanager
def _said_in_one_line(extra, interrupted):
    """user_errors' work inside its SIGTERM handler: each error and stop said in one line, with its
    exit code; the locks released, and in a script SIGINT and SIGTERM ignored, as it ends."""
    unraisable = sys.unraisablehook
    sys.unraisablehook = functools.partial(_take_a_lost_interrupt, unraisable)
    try:
        yield
        if sys.stdout:  # (None: started with stdout closed)
            sys.stdout.flush()  # (a pipe's reader gone: said here, not in the interpreter's exit)
    except UnicodeDecodeError as e:  # (readers name the file; this is the last resort)
        fail(f"bytes that are not UTF-8 at offset {e.start}: {e.reason}")
    except USER_ERRORS + tuple(extra) as e:
        fail(str(e))
    except MemoryError:  # (a size too large for this machine: one line, not a traceback)
        fail("out of memory: lower --batch_size, --micro_batch, --lora_r or the model size")
    except RuntimeError as e:  # torch's allocator failing (CPU: "can't allocate", CUDA: OOM)
        text = str(e)
        if peer_ended(text):
            said_on_each_node(PEER_ENDED)
            raise SystemExit(1) from None
        if "can't allocate memory" not in text and "out of memory" not in text.lower():
            raise
        first = text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__
        fail(f"out of memory ({first}): lower --batch_size, --micro_batch, --lora_r or the model "
             "size")
    except PermissionError as e:
        fail(f"{e.filename}: permission denied")
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        fail(f"{e.filename}: {e.strerror}")
    except BrokenPipeError as e:
        if e.filename is not None or not reader_gone(sys.stdout):
            raise
        stdout_reader_gone(interrupted)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        # (a full disk while logging, answering or drawing: named by `naming` where it can be)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(f"{where}{e.strerror} while writing: free some space and run again (checkpoints "
                 f"and worlds are written whole or not at all; {RESUME_IF_SAVED})")
        if e.errno in (errno.EROFS, errno.EFBIG):
            fail(f"{where}{e.strerror} while writing")
        if e.errno == errno.EIO:
            fail(f"{where}{e.strerror} while reading or writing: check the disk")
        if where and e.strerror:  # (no strerror: no system call's error, a bug's: its traceback)
            fail(f"{where}{e.strerror}")
        raise
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback per process
        # under torchrun each launcher passes the SIGINT to its ranks: its local rank 0 says it
        # for them (each rank wrote the same line; one line a node, where each has a terminal)
        if not os.environ.get(INTERRUPT_SAID_BY):
            said_on_each_node(interrupted)
        raise SystemExit(130) from None
    finally:
        sys.unraisablehook = unraisable
        if hasattr(signal, "setitimer") and \
                signal.getsignal(signal.SIGALRM) is raise_the_lost_interrupt:  # (not yet raised)
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
        import rundir  # (it imports this module)
        rundir.release_locks()
        interrupts.work_done()  # (before interrupting puts SIGTERM back: it keeps this SIG_IGN)


def _take_a_lost_interrupt(unraisable, args):
    """sys.unraisablehook inside user_errors. A signal's handler runs wherever the main thread is:
    inside a finalizer (a __del__ the garbage collector called: regex's Group.__del__ as a stage
    tokenized), its KeyboardInterrupt is "Exception ignored" and lost. A stage sent Ctrl-C by
    lab.py or pipeline.py trained on to its last step while they waited for it; lab.py and
    pipeline.py themselves, every further signal dropped by then, ran on. It is raised again 10 ms
    later, once the finalizer has returned (raised in this hook, it was lost again; landing in
    another finalizer: once more). Not where the program that runs the stage in its own process
    (a test harness, a notebook) has a SIGALRM handler of its own: that one is left as it is."""
    if not issubclass(args.exc_type, KeyboardInterrupt) or not hasattr(signal, "setitimer") or \
            threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, raise_the_lost_interrupt):
        return unraisable(args)
    signal.signal(signal.SIGALRM, raise_the_lost_interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.01)


def raise_the_lost_interrupt(signum, frame):
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    raise KeyboardInterrupt


STDOUT_READER_GONE = "the program reading the output has ended (a pipe to `head`?)"


def reader_gone(stream):
    """Whether `stream` is a pipe whose reading end is closed (poll says POLLERR on its writing
    end): `script.py | head` once head has its lines."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, ValueError, OSError):  # (no file behind it, closed, no poll)
        return False


def stdout_reader_gone(interrupted):
    """A print to a pipe whose reader has ended (`| head`): Python's BrokenPipeError traceback,
    exit code 1, and one more at exit as it flushed stdout. One line on stderr now (where it is
    not that pipe too), the script's `interrupted` line, and exit code 141, as a program killed by
    SIGPIPE reads in a shell. A stage of pipeline.py says the cause alone: how to go on is the
    pipeline's to say (a stage's `--resume true`, which the pipeline does not take)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the flush at exit: quiet)
    if not reader_gone(sys.stderr):
        said_on_each_node(STDOUT_READER_GONE if os.environ.get(INTERRUPT_SAID_BY)
                          else f"{STDOUT_READER_GONE}: {interrupted}")
    raise SystemExit(141) from None


def said_on_each_node(line):
    """`line` on stderr from local rank 0 alone: one line a node, where each has a terminal."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and sys.stderr:  # (None: `2>&-`)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


PEER_ENDED = ("stopped: another process of this run has ended (interrupted, refused or killed: "
              f"its lines, on its node's terminal, say why); what was written is kept "
              f"({RESUME_IF_SAVED})")


def peer_ended(text):
    """Whether a collective's error says that another rank's process is gone (gloo's words where
    its connection closes: Ctrl-C, an error or kill -9 on another node). Each rank of the nodes
    left printed a gloo traceback."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "gloo" in text and any(
        words in text for words in ("Connection closed by peer", "Connection reset by peer"))
    # ("gloo": its transport's file names its errors; another library's reset keeps its traceback)


# ----------------------------------------------------------------------------------------
# dataclass config -> command line
# ----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        fail(f"{self.prog}: {message} (see --help)")


def _parse_bool(s):
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def _converter(tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]: 'none' -> None
        inner = _converter(next(a for a in args if a is not type(None)))
        return lambda s: None if s.strip().lower() in ("none", "") else inner(s)
    if origin in (tuple, list) or tp in (tuple, list):  # comma-separated: --lora_targets q,v
        inner = _converter(args[0]) if args else str
        return lambda s: tuple(inner(x) for x in s.split(",") if x.strip() != "")
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        def conv(s, tp=tp):
            try:
                return tp(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got '{s}'")
        return conv
    raise TypeError(f"unsupported config field type {tp}")


def checkpoint_name(path):
    """The folder eval.py scores a checkpoint into: its name (ckpt/sft -> sft), a checkpoint-N
    with its run's (ckpt/sft/checkpoint-000100 -> sft-checkpoint-000100)."""
    p = os.path.normpath(os.path.abspath(path))
    n = os.path.basename(p)
    return f"{os.path.basename(os.path.dirname(p))}-{n}" if n.startswith("checkpoint-") else n


def is_utf8(name):
    """Whether a name read from the file system holds no byte that is not UTF-8 (a surrogate
    escape)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dash_free(path):
    """A relative path that starts with '-' as './-...': passed on to a stage ('--out -runs/sft'),
    argparse read it as a flag and the stage refused '--out: expected one argument'."""
    return os.path.join(".", path) if path.startswith("-") else path


def seed_suffix(cfg, config_class, fields):
    """A world seed N > 0 moves each of `fields` still at its default to 'NAME-seedN' (data/shapes
    -> data/shapes-seed1), so that worlds of two seeds and the runs on them never share a folder."""
    if not cfg.world_seed:
        return cfg
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    for name in fields:
        if getattr(cfg, name) == defaults[name]:
            root, ext = os.path.splitext(getattr(cfg, name))
            setattr(cfg, name, f"{root}-seed{cfg.world_seed}{ext}")
    return cfg


# the flags of any script that name files or folders (a list's items, `FILE:weight`, `name=FILE`)
PATH_FLAGS = {"out", "init", "vision_tower", "tokenizer", "data", "image_folder", "val_data",
              "align_data", "read_data", "world", "captions", "reward", "instructions", "images",
              "ckpt", "compare", "pope_files", "pope_labels", "chair_instances", "chair_synonyms",
              "chair_captions", "mmhal_file", "gavie_file", "gavie_annotations", "llava_bench_file",
              "llava_bench_answers", "llava_bench_context", "llava_bench_rule", "judge_prompt",
              "judge_model", "llava_answers", "sft", "results", "plots", "eval_out",
              "import_llava_rlhf", "policy_lora"}
# '~' or '~user' that starts a path (or an item of a list, or the FILE of `name=FILE`)
HOME_PREFIX = re.compile(r"(^|,)(\w+=)?(~[^/,]*)(?=/|,|$)")
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs, NFS)


def expand_home(value):
    """'~/x' -> '/home/me/x' in a path flag, as the shell does for `--out ~/x` but not for
    `--out=~/x` (nor `--data a.json,~/b.json`): that wrote a folder named '~' in the working
    folder. A '~name' that names no user is kept as it is (os.path.expanduser)."""
    return HOME_PREFIX.sub(lambda m: m[1] + (m[2] or "") + os.path.expanduser(m[3]), value)


def refuse_long_names(flag, value):
    """A file name longer than a file system takes: one line naming the flag (the error came from
    deep in a write, naming a temp file, or as "not found" for a file that cannot exist). Linux's
    limit, in bytes (macOS and Windows count characters: left to their own error there); a list
    item's `name=` and `:weight` or `:role` are not part of its file's name."""
    if not sys.platform.startswith("linux"):
        return
    for name in (name for item in value.split(",") for name in _file_of(item).split(os.sep)):
        size = len(name.encode("utf-8", "surrogateescape"))
        if size > NAME_MAX:
            raise ConfigError(f"--{flag} {value}: a name of {size} bytes ('{name[:24]}...'); a "
                              f"file system takes at most {NAME_MAX} bytes a name")


def _file_of(item):
    """The file a list item names: without its `name=` or `:weight`/`:role` where the rest is a
    file there (as the list readers take it); else the item whole."""
    for rest in (re.sub(r"^\w+=", "", item), re.sub(r":[^/:]*$", "", item)):
        if rest != item and os.path.exists(rest):
            return rest
    return item


def parse_config(cls, argv=None, prog=None):
    """`--field value` for every field of the dataclass `cls`; types are checked, unknown or
    repeated flags are an error, and every value is checked against `cls.RANGES` (check_ranges).
    Help text comes from the comment after each field."""
    prog = prog or os.path.basename(sys.argv[0])
    argv = _join_negative_values(sys.argv[1:] if argv is None else argv)
    _refuse_repeats(cls, argv, prog)
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = _Parser(prog=prog, description=(cls.__doc__ or "").strip(),
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        if tp in (tuple, list) or typing.get_origin(tp) in (tuple, list):  # --x a b c or --x a,b,c
            parser.add_argument(f"--{f.name}", type=_converter(tp), nargs="*", default=default,
                                help=comments.get(f.name, " "), metavar=f.name.upper())
        elif tp is bool:  # --resume alone is --resume true (it was "expected one argument")
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True,
                                default=default, help=comments.get(f.name, " "),
                                metavar=f.name.upper())
        else:
            parser.add_argument(f"--{f.name}", type=_converter(tp), default=default,
                                help=comments.get(f.name, " "), metavar=f.name.upper())
    args = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):  # nargs lists of comma-split tuples -> one flat tuple
        v = args[f.name]
        if isinstance(v, list):
            args[f.name] = tuple(x for part in v for x in part)
            _check_list_flag(f, args[f.name], prog)
    try:
        for name in PATH_FLAGS & set(args):
            v = args[name]
            args[name] = tuple(map(expand_home, v)) if isinstance(v, tuple) else expand_home(v)
            for value in args[name] if isinstance(v, tuple) else [args[name]]:
                refuse_long_names(name, value)
        cfg = cls(**args)
        # the flags typed (refuse_unread: `--instruct_lr 1e-3` beside --init is not read though
        # 1e-3 is its default; the user asked for that rate and got --lr's without a word)
        cfg._given = frozenset(given_flags(cls, argv))
        check_ranges(cfg)
    except ConfigError as e:
        fail(f"{prog}: {e}")
    return cfg


def _join_negative_values(argv):
    """'--flag -1e-1' -> '--flag=-1e-1': argparse before Python 3.13 reads a negative number in
    scientific notation (or -inf) as an option name and says the flag has no value."""
    out, i = [], 0
    while i < len(argv):
        token, value = argv[i], argv[i + 1] if i + 1 < len(argv) else ""
        if token.startswith("--") and "=" not in token and value.startswith("-"):
            try:
                float(value)
            except ValueError:
                pass
            else:
                out.append(f"{token}={value}")
                i += 2
                continue
        out.append(token)
        i += 1
    return out


def _check_list_flag(field, values, prog):
    """A list flag given with no values (`--seeds` alone, `--seeds ,`) where the default has some
    would run nothing and still rewrite the outputs (lab.py's RESULTS.md); where it has none, it
    is the default (`--pope_files $EMPTY` scored the Shapes world); an item given twice is a
    typo, not a weight."""
    no_default = field.default is dataclasses.MISSING
    default = field.default_factory() if no_default else field.default
    if not values:
        hint = f"default: {' '.join(map(str, default))}" if default else "or leave it out"
        fail(f"{prog}: --{field.name}: give at least one value ({hint})")
    repeated = [x for i, x in enumerate(values) if x in values[:i]]
    if repeated:
        fail(f"{prog}: --{field.name}: {repeated[0]} is given twice (give each value once)")


def given_flags(cls, argv=None):
    """The names of `cls`'s fields given on the command line, in order (a flag given at its
    default value is given: only the command line tells it from one left out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    argv = sys.argv[1:] if argv is None else argv
    tokens = (t[2:].split("=", 1)[0] for t in argv if t.startswith("--"))
    return [name for name in tokens if name in names]


def _refuse_repeats(cls, argv, prog):
    """A flag given twice is a mistake (argparse would keep the last one without a word)."""
    seen = set()
    for name in given_flags(cls, argv):
        if name in seen:
            fail(f"{prog}: --{name} is given twice (give each flag once)")
        seen.add(name)


def _interval(rule):
    """'[0, 1]', '(0, inf)', '[1, inf)' -> (lo, hi, lo_closed, hi_closed)."""
    lo, hi = (x.strip() for x in rule[1:-1].split(","))
    return float(lo), float(hi), rule[0] == "[", rule[-1] == "]"


def check_value(flag, value, rule):
    """One value against its rule; returns what is wrong (None: fine). Rules: an interval in maths
    notation ('[1, inf)', '(0, 1]'; inf only when the bracket is closed) or a tuple of allowed
    choices (for a tuple field: of each item). A float must be finite unless its interval holds inf;
    None passes (Optional)."""
    if value is None or rule is None:
        return None
    if isinstance(rule, tuple):
        items = value if isinstance(value, tuple) else (value,)
        bad = [x for x in items if x not in rule]
        if not bad:
            return None
        if len(rule) > 1:
            names = ", ".join(map(str, rule[:-1])) + f" or {rule[-1]}"
        else:
            names = str(rule[0])
        if isinstance(value, tuple):
            return f"--{flag}: {bad[0]!r} is not one of {', '.join(map(str, rule))}"
        return f"--{flag} {value}: choose {names}"
    lo, hi, lo_closed, hi_closed = _interval(rule)
    for x in value if isinstance(value, tuple) else (value,):
        if isinstance(x, float) and math.isnan(x):
            return f"--{flag} {x}: must be a number in {rule}"
        closed_end = hi_closed and x == hi or lo_closed and x == lo  # e.g. inf in "[0, inf]"
        if isinstance(x, float) and math.isinf(x) and not closed_end:
            return f"--{flag} {x}: must be a finite number in {rule}"
        if x < lo or x > hi or (x == lo and not lo_closed) or (x == hi and not hi_closed):
            return f"--{flag} {x}: must be in {rule}"
        # an open-ended size past what a tensor holds (a typo'd 1e20) failed deep in torch with a
        # traceback; a seed may be any size
        if isinstance(x, int) and not isinstance(x, bool) and x > INT_MAX \
                and not (flag.endswith("seed") or rule == SEED_RANGE):
            return f"--{flag} {x}: must be in {rule} and at most {INT_MAX}"
        if isinstance(x, float) and not math.isinf(x) and abs(x) > FLOAT32_MAX:
            return f"--{flag} {x}: must be in {rule} and at most {FLOAT32_MAX:.1e} (float32)"
    return None


INT_MAX = 2 ** 31 - 1  # the largest open-ended integer flag taken
FLOAT32_MAX = 3.4028234663852886e38  # a float flag reaches tensors as float32


# flags that name where a script reads its world or checkpoint, or writes: never empty (a path
# flag read only in some runs, as --init or --tokenizer, is checked where read: require_paths)
NONEMPTY_PATH_FLAGS = ("out", "world", "results", "plots", "eval_out", "ckpt", "sft",
                       "reward")


def check_ranges(cfg):
    """Every field against the rule its Config declares in RANGES (floats without a rule: finite);
    a NONEMPTY_PATH_FLAGS field must not be empty."""
    rules = getattr(cfg, "RANGES", {})
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in NONEMPTY_PATH_FLAGS and isinstance(value, str) and not value.strip():
            raise ConfigError(f"--{f.name} {value!r}: give a path (an empty one would mean the "
                              "current folder)")
        rule = rules.get(f.name, "(-inf, inf)" if isinstance(value, float) else None)
        problem = check_value(f.name, value, rule)
        if problem:
            raise ConfigError(problem)


# (read once per class: inspect.getsource parses the class's whole module, 13 ms a Config; a test
# suite that runs the scripts in its own process parses flags thousands of times)
@functools.cache
def _field_comments(cls):
    """Field comments from the class source, for --help: the one after a field (`name: type =
    default  # comment`, with the comment lines indented below it that go on with it), else the
    comment lines right above the field, at its indentation."""
    import inspect
    out = {}
    for klass in reversed(cls.__mro__[:-1]):  # a subclass's comment replaces its base's
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above, last, last_indent = [], None, 0
        for line in src.splitlines():
            s, indent = line.strip(), len(line) - len(line.lstrip())
            field = re.match(r"(\w+)\s*:[^=]*=", s)
            if s.startswith("#") and last and indent > last_indent:  # goes on with `last`
                out[last] += " " + s.lstrip("# ")
            elif s.startswith("#"):
                above.append(s.lstrip("# "))
                last = None
            elif field and "#" in s:
                out[field.group(1)] = s.split("#", 1)[1].strip()
                above, last, last_indent = [], field.group(1), indent
            else:
                if field and above:
                    out[field.group(1)] = " ".join(above)
                above, last = [], None
    return out


def replace_config(cfg, **changes):
    """dataclasses.replace that keeps the flags parse_config saw typed (refuse_unread reads them;
    a replaced Config had none, and a flag typed at its default was let through again)."""
    out = dataclasses.replace(cfg, **changes)
    if hasattr(cfg, "_given"):
        out._given = cfg._given
    return out


def data_specs(value, weighted=False):
    """--data FILE[:x],FILE[:x] -> [(path, x or '')]. An item that is an existing file is a path as
    a whole (so a path may hold ':'); otherwise what follows its last ':' is x. Items are read
    left to right, each the longest run of ','-joined pieces that names an existing file (with or
    without its ':x'), so a path may hold ',' in a list too; an item naming no file is one piece
    (its reader says "not found"). weighted: x is a weight (sft.py), which the refusal of a file
    named twice points at (in vigc.py x is a type: FILE:2 would mislead)."""
    pieces = value.split(",")
    out, i = [], 0
    while i < len(pieces):
        if not pieces[i].strip():  # ('' would read as the file '', "file not found" naming nothing)
            raise ConfigError(f"--data {value!r}: an empty file name (give FILE[:x],FILE[:x])")
        for j in range(len(pieces), i, -1):
            item = ",".join(pieces[i:j])
            path, _, x = item.rpartition(":")
            if os.path.isfile(item):
                out.append((item, ""))
                break
            if path and "," not in x and os.path.isfile(path):
                out.append((path, x))
                break
        else:  # no run of pieces names a file: this piece alone, as given
            j = i + 1
            item = pieces[i]
            path, _, x = item.rpartition(":")
            out.append((item, "") if os.path.exists(item) or ":" not in item else (path, x))
        i = j
    for k, (path, _) in enumerate(out):  # (read twice, its records counted twice, unsaid)
        was = next((p for p, _ in out[:k] if p == path or samefile(p, path)), None)
        if was is not None:
            same = "is named twice" if was == path else f"is {was}, named before it"
            hint = " (sft.py reads one twice as FILE:2)" if weighted else ""
            raise ConfigError(f"--data {value!r}: {path} {same}: its records would be read twice; "
                              f"name each file once{hint}")
    return out


# ----------------------------------------------------------------------------------------
# the paths a run reads, seeding, the order of the batches
# ----------------------------------------------------------------------------------------

WORLD = "{world}"  # in a path flag: the folder --world names: the Shapes world


def require_paths(cfg, flags):
    """The path flags a run reads: none empty."""
    for f in flags:
        if not getattr(cfg, f).strip():
            raise ConfigError(f"--{f} '': give a path (this run reads it)")


def world_paths(cfg, reads=("data",), companions=()):
    """cfg with '{world}' in its path flags replaced by --world, and those of the flags it reads
    that named it (the stage writes the world first when one does). The `companions` of --data (its
    validation file, captions, ...) keep a world default only while --data is in the world: a
    user's --data brings its own, so there they drop to '' (none). A flag it reads must not be
    empty ('' named no file: the failure came later, as a nameless ": file not found"), and
    --val_data is not a --data file (refuse_val_in_data)."""
    require_paths(cfg, reads)
    data_in_world = WORLD in cfg.data
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    values = {k: v for k, v in values.items() if isinstance(v, str)}
    dropped = [f for f in companions if WORLD in values[f] and not data_in_world]
    for f in dropped:
        values[f] = ""
    if dropped:
        note_world_file_spelled_out(cfg, dropped)
    named = [f for f in reads + companions if WORLD in values[f]]
    paths = {f: v.replace(WORLD, cfg.world) for f, v in values.items()}
    out = replace_config(cfg, **paths)
    refuse_val_in_data(out)
    return out, named


def note_world_file_spelled_out(cfg, dropped):
    """--data naming a world file by its path (data/shapes/sft.json), not as '{world}/sft.json':
    read as a file of the user's own, without the world's `dropped` companions (its validation
    file, captions, ...). Said: the run changed without a word (the lab's VIGC control means it)."""
    default = next(f.default for f in dataclasses.fields(cfg) if f.name == "data")
    if WORLD not in default:
        return
    world_file = default.replace(WORLD, cfg.world)
    try:
        paths = [path for path, _ in data_specs(cfg.data)]
    except ConfigError:  # (said where the stage reads it)
        return
    if torchrun_rank() == 0 and any(samefile(path, world_file) for path in paths):
        flags = ", ".join(f"--{f}" for f in dropped)
        print(f"note: --data names the world's {os.path.basename(world_file)} by its path: read "
              f"as a file of your own, without the world's {flags}; give it as {default} to keep "
              "them", flush=True)


def samefile(a, b):
    """Whether two paths name one existing file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_val_in_data(cfg):
    """--val_data naming a --data file, under any spelling: its held-out scores would be of
    training records."""
    val = getattr(cfg, "val_data", "")
    if not val:
        return
    files = {cfg.data}  # (reward.py, dpo.py: one file; sft.py: FILE[:weight],...)
    try:
        files |= {path for path, _ in data_specs(cfg.data)}
    except ConfigError:  # (said where the stage reads it)
        pass
    # (a hard link of a --data file is that file too: samefile)
    if any(os.path.realpath(f) == os.path.realpath(val) or samefile(f, val) for f in files):
        raise ConfigError(f"--val_data {val}: one of the --data files (its held-out scores would "
                          "be of training records); give another file, or '' for none")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """The order of n items in an epoch (read, never written: cached, as every step of the epoch
    and sft's plan of a rank's items ask for it)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(step, n, batch_size, seed, rank=0, world=1):
    """Indices of the global batch number `step` over a dataset of n items, split across ranks.
    A fresh permutation per epoch, seeded by (seed, epoch): the data order depends only on the
    step, so --resume needs no sampler state and any world size sees the same global batches."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    perm = epoch_order(n, seed, epoch)
    idx = perm[(i * batch_size) % n:][:batch_size]
    if len(idx) < batch_size and n:  # n < batch_size: wrap around, as often as it needs
        laps = -(-(batch_size - len(idx)) // n)
        idx = torch.cat([idx, perm.repeat(laps)[:batch_size - len(idx)]])
    if batch_size % world:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {world} processes")
    per = batch_size // world
    return idx[rank * per:(rank + 1) * per].tolist()


# ----------------------------------------------------------------------------------------
# optimizer and schedule
# ----------------------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999), vision_lr_ratio=1.0):
    """AdamW over trainable parameters; matrices decay, biases/norms/1-D parameters do not. The
    vision tower and projector may run at vision_lr_ratio x lr (set_lr keeps the ratio)."""
    import distributed  # (it imports this module)
    # (FSDP: the shards)
    named = distributed.resharded(model).named_parameters()
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ConfigError("nothing to train: no parameter requires grad")
    groups = []
    for is_vision in (False, True):
        part = [(n, p) for n, p in named
                if n.startswith(("vision_tower.", "projector.")) == is_vision]
        scale = vision_lr_ratio if is_vision else 1.0
        for decay in (True, False):
            ps = [p for _, p in part if (p.dim() >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0,
                               "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def cosine_lr(step, max_steps, lr, warmup=0, min_ratio=0.0, from_zero=False):
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio * lr at max_steps. Step s
    (from 0) of the warmup runs at lr (s + 1) / warmup, or (from_zero) at lr s / warmup, as
    transformers' schedulers: their first update has rate 0."""
    if step < warmup:
        return lr * (step + (0 if from_zero else 1)) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_and_check(params, max_norm, step, out_dir, skip_nonfinite=False, loss=None,
                   first=False):
    """Clip the gradient norm. A non-finite loss or gradient stops the run naming the step (numbered
    as the log lines and checkpoints number them: the update after checkpoint-N is step N + 1) and
    the last good checkpoint, or (skip_nonfinite) returns None so the caller skips the update.
    first: no update has run yet (said: then no learning rate made it)."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: the norm over every rank's shards
        norm = norm.full_tensor()
    bad_loss = loss is not None and not math.isfinite(float(loss))
    if bad_loss or not torch.isfinite(norm):
        if skip_nonfinite:
            for p in params:
                p.grad = None
            return None
        last = latest_checkpoint(out_dir)
        # (with none, --resume has nothing to go on from: start again)
        again = "resume with --resume true" if last else "start again with --overwrite true"
        cause = "; no update has run: the weights loaded, the data or a loss setting at an " \
            "extreme (as --beta or --kl_coef) made it" if first else ""
        raise NonFiniteError(f"step {step + 1}: non-finite {'loss' if bad_loss else 'gradient'}"
                             f"{cause}; stopped. Last good checkpoint: {last or 'none yet'} "
                             f"({again}, and --skip_nonfinite true to skip such steps)")
    return float(norm)


# --skip_nonfinite: this many skipped updates in a row stop the run (every step skipped trained
# nothing, and the run exited 0)
MAX_SKIPPED_IN_A_ROW = 10


def optimizer_step(opt, params, d, step, cfg, loss=None, reduce=True, last=True):
    """One update, the same in every stage: sum the gradients over ranks, clip, check that loss and
    gradient are finite, step, zero. `loss` is this rank's share (summed over ranks when reduce) and
    comes back global, with the gradient norm; the norm is None when --skip_nonfinite skipped the
    step. last: whether this is the step's last update (PPO takes several)."""
    import distributed  # (it imports this module)
    distributed.sync_grads(params, d)
    if loss is not None and reduce:
        loss = distributed.all_reduce_sum(loss, d)
    skip_nonfinite = getattr(cfg, "skip_nonfinite", False)
    # (PPO takes several updates per step: the run's first update, not its first step)
    first = step == 0 and getattr(opt, "applied", 0) == 0
    norm = clip_and_check(params, cfg.grad_clip, step, cfg.out, skip_nonfinite, loss, first)
    opt.skipped_in_a_row = 0 if norm is not None else getattr(opt, "skipped_in_a_row", 0) + 1
    opt.applied = getattr(opt, "applied", 0) + (norm is not None)  # (updates in this process)
    opt.first_step = getattr(opt, "first_step", step)  # (> 0: resumed, updates came before)
    # a run from step 0 to its last with no update applied at all: it would end with exit 0 and
    # a final checkpoint equal to its start
    nothing = norm is None and opt.applied == 0 and opt.first_step == 0 and \
        step + 1 == cfg.max_steps and last
    if norm is not None:
        opt.step()
    elif opt.skipped_in_a_row == MAX_SKIPPED_IN_A_ROW or nothing:  # (the same on every rank)
        last = latest_checkpoint(cfg.out) or "none yet"
        what = (f"{MAX_SKIPPED_IN_A_ROW} updates in a row" if not nothing else
                "every update of this run")
        raise NonFiniteError(f"step {step + 1}: {what} non-finite and skipped (--skip_nonfinite "
                             "skips a bad batch; this is the settings or the weights); stopped. "
                             f"Last good checkpoint: {last}")
    elif d.main:
        print(f"warning: step {step + 1}: non-finite loss or gradient; update skipped "
              "(--skip_nonfinite)", flush=True)
    opt.zero_grad(set_to_none=True)
    return loss, norm


# ----------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------

class Logger:
    """One nanoGPT-style line per log step on stdout and the same numbers in OUT/metrics.jsonl."""

    def __init__(self, out_dir, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.t0 = time.time()
        # a run killed mid-line: drop the cut line before appending; killed between checkpoints:
        # drop the rows of the steps after the newest one (resumed, they are run and logged again)
        if enabled and os.path.exists(self.path):
            unshare(self.path)
            with open(self.path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
            newest = latest_checkpoint(out_dir)
            self.keep_rows_up_to(int(os.path.basename(newest)[11:]) if newest else 0)

    def keep_rows_up_to(self, step):
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        kept = [line for line in lines if _row_step(line) <= step]
        if len(kept) < len(lines):  # (whole: a full disk left a torn metrics.jsonl.tmp)
            write_whole(self.path, lambda f: f.writelines(kept))

    def log(self, step, **metrics):
        if not self.enabled:
            return
        numbers = (torch.Tensor, np.floating)
        metrics = {k: (float(v) if isinstance(v, numbers) else v) for k, v in metrics.items()}
        elapsed = time.time() - self.t0
        parts = [f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]
        print(" | ".join(parts + [f"{elapsed:.1f}s"]), flush=True)
        with naming(self.path), open(self.path, "a") as f:  # (NaN and inf are not JSON: null)
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in metrics.items()}
            row = {"step": step, "time": round(elapsed, 3), **finite}
            f.write(json.dumps(row) + "\n")


def unshare(path):
    """path made a file of its own where it is one of several hard links: a run folder copied with
    them (`cp -al`, `rsync --link-dest` snapshots) shares its files with the original, and the
    copy's resume appended its rows to the original's metrics.jsonl too (and eval's answers and
    judge replies, appended likewise; the .lock: lock_out). Every other file of a run is written
    whole under a new name, which breaks the link itself."""
    if os.stat(path).st_nlink > 1:
        with open(path, "rb") as f:
            data = f.read()
        write_whole(path, lambda f: f.write(data), binary=True)


def _row_step(line):
    """A metrics.jsonl row's step (0 for a line that is not a row: kept as it is)."""
    try:
        step = json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return 0
    return step if isinstance(step, (int, float)) else 0


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def progress(iterable, total=None, desc="", enabled=True, every=1.0):
    """A minimal progress bar on stderr (no dependency): count, rate and ETA, redrawn each second.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    t0 = last = time.time()
    i = 0
    for i, x in enumerate(iterable, 1):
        yield x
        now = time.time()
        if enabled and (now - last >= every or i == total):
            last = now
            rate = i / max(now - t0, 1e-9)
            eta = f" eta {int((total - i) / rate)}s" if total else ""
            line = f"\r{desc} {i}/{total or '?'} {rate:.1f}/s{eta}   "
            print(line, end="", file=sys.stderr, flush=True)
    if enabled and i:
        print(file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# files written whole
# ----------------------------------------------------------------------------------------

@contextmanager
def naming(path):
    """An OSError raised inside that names no file names `path`: a write failing for want of space
    names none, and the user's line would not say which file could not be written."""
    try:
        yield
    except OSError as e:
        # (one without an errno is no system call's: a library's message, a bug's traceback)
        if e.filename is None and e.errno is not None:
            e.filename = path
        raise


def write_json(obj, path, indent=1):
    """path holds the whole of obj or what it held before (write_whole)."""
    write_whole(path, lambda f: json.dump(obj, f, indent=indent))


def write_whole(path, write, encoding="utf-8", binary=False):
    """write(f) into path.tmpPID, then renamed onto path: path holds all of it or what it held
    before (a disk full, or an error, while writing leaves no half file, nor a temp file). The
    temp file is this process's own: two processes writing one path (two labs' RESULTS.md) each
    rename a whole file; with one shared name each truncated the other's, and one renamed a mix.
    UTF-8 whatever the locale: under an ASCII one (LC_ALL=C without UTF-8 mode) the lab's report
    and its '±' failed at the end of the lab, and every reader here reads UTF-8. binary: f takes
    bytes (a figure, a torch.save)."""
    tmp = f"{path}.tmp{os.getpid()}"
    if os.path.isdir(path):  # (the rename's error named the temp file)
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    try:
        with naming(path):
            with open(tmp, "wb") if binary else open(tmp, "w", encoding=encoding) as f:
                write(f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename == tmp:  # (the temp file is gone: its path)
            e.filename = path
        raise


# ----------------------------------------------------------------------------------------
# models, tokenizers and the computations several stages share
# ----------------------------------------------------------------------------------------

def has_tokenizer(path):
    return any(os.path.exists(os.path.join(path, f))
               for f in ("tokenizer_config.json", "tokenizer.json"))


def tokenizer_source(given, cfg, load_from):
    """(tokenizer_dir, tokenizer_flag) for load_model_and_tokenizer in sft.py and vigc.py (given:
    the config before '{world}' was filled in). A fresh model reads --tokenizer. From --init the
    checkpoint's own tokenizer is read; a --tokenizer given stands in for one it lacks (a LLaMA
    dir), and is refused beside one it has; the default (the world's) never stands in: another
    vocabulary (given: a value other than the default's text). A resumed run's checkpoint holds
    the tokenizer it trained with."""
    if not cfg.init:
        return cfg.tokenizer, ""
    if load_from != cfg.init:
        return "", ""
    default = type(cfg).__dataclass_fields__["tokenizer"].default
    return (cfg.tokenizer if given.tokenizer != default else ""), "--tokenizer"


def base_dtype(cfg):
    """The dtype a stage keeps its frozen base in, and so loads a checkpoint in (one tensor at a
    time: a 13B fp16 release is not held in fp32 on the way): bf16 for --dtype bf16 on a GPU
    without FSDP (which keeps fp32 master weights and computes in bf16), else fp32."""
    bf16 = cfg.dtype == "bf16" and cfg.device == "cuda" and not getattr(cfg, "fsdp", False)
    return torch.bfloat16 if bf16 else torch.float32


def load_model_and_tokenizer(init="", preset="shapes", vision_tower="", tokenizer_dir="",
                             device="cpu", dtype=None, policy=True, geometry=None,
                             tokenizer_flag="", fresh_projector_ok=False):
    """A model from a checkpoint (`init`: ours, llava-hf, original LLaVA, or a LLaMA dir plus
    `vision_tower`), or a fresh `preset` sized to the tokenizer in `tokenizer_dir` (geometry: its
    image_size and patch_size replaced, see world_geometry), in `dtype` (None: fp32, whatever
    the checkpoint stores; the stages pass base_dtype; 'auto': a checkpoint's as stored). The
    tokenizer comes from the
    checkpoint directory (or tokenizer_dir when the checkpoint has none). policy: a reward model
    is refused (policy=False: a reward model is what is wanted). tokenizer_flag: the user's flag
    that gave tokenizer_dir beside `init` (refused where the checkpoint's own tokenizer is read).
    fresh_projector_ok: a LLaMA (or a LLaVA without projector weights) plus CLIP is a start (SFT's
    alone; elsewhere refused)."""
    from data import load_tokenizer
    if init:
        path = resolve_checkpoint(init)
        if not is_peft_dir(path):  # a config.json that cannot work is named before the tokenizer
            if detect_layout(path) == "clip":  # (which reads it too, and would take the blame)
                raise CheckpointError(clip_alone(path))
        if policy:
            refuse_scalar_model(path)
        # a PEFT adapter is often saved without a tokenizer: its base's is the model's own
        base = resolve_checkpoint(peft_base_dir(path)) \
            if is_peft_dir(path) and not has_tokenizer(path) else None
        own = path if has_tokenizer(path) else base if base and has_tokenizer(base) else ""
        if own and tokenizer_flag and tokenizer_dir:
            raise ConfigError(f"{tokenizer_flag} {tokenizer_dir}: not read ({own} holds the "
                              "checkpoint's own tokenizer); drop it")
        tok_dir = own or tokenizer_dir
        if not tok_dir:  # (before loading: a 7B model loaded for minutes to be refused)
            hint = f" (pass {tokenizer_flag} DIR: the world's default does not stand in)" \
                if tokenizer_flag else ""
            where = f" nor in its base {base}" if base else ""
            raise ConfigError(f"{path}: no tokenizer files in the checkpoint directory{where}"
                              f"{hint}")
        # the model first: transformers' tokenizer classes read config.json too, and a value
        # there they refuse would be blamed on the tokenizer, without the field's value
        # fp32 unless asked (LLaVA's releases are fp16: kept as stored, --dtype fp32 trained in
        # fp16 on the CPU and its loss was NaN at step 2)
        # (each weight to `device` as it is read: loaded on the host and moved after, a GPU run
        # held the whole model on the host first, 28 GB for a 7B fp16 release read as fp32)
        model = load_checkpoint(path, vision_tower=vision_tower or None,
                                dtype=dtype or torch.float32, device=device,
                                fresh_projector_ok=fresh_projector_ok)
        tokenizer = load_tokenizer(tok_dir)
        # a token id beyond the embedding would fail mid-run
        if len(tokenizer) > model.config.vocab_size:
            raise CheckpointError(f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens, more "
                                  f"than the {model.config.vocab_size} embedding rows of the model "
                                  f"in {path}")
        # an image id the tokenizer gives to text (not its '<image>') would make that text fill
        # image slots: "N image tokens in input_ids, but ..." at the first batch
        image_id = model.config.image_token_id
        text_token = tokenizer.convert_ids_to_tokens(image_id) \
            if 0 <= image_id < len(tokenizer) else None
        if text_token not in (None, "<image>"):
            raise CheckpointError(f"{path}: the model's image_token_id {image_id} is the token "
                                  f"{text_token!r} of the tokenizer in {tok_dir}, not '<image>' "
                                  "(config.json and tokenizer do not belong together)")
    else:
        tokenizer = load_tokenizer(tokenizer_dir)
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        vocab = -(-len(tokenizer) // 64) * 64  # rounded up: friendlier matmul shapes
        # (on the meta device: no weight drawn, an FSDP rank other than 0 takes rank 0's)
        meta = torch.device(device).type == "meta"
        with torch.device("meta") if meta else nullcontext():
            model = LLaVA.from_preset(preset, **(geometry or {}), vocab_size=vocab,
                                      image_token_id=image_id if image_id is not None else -200,
                                      pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
        if dtype is not None:
            model = model.to(dtype)
    return model.to(device), tokenizer


MAX_CELL_PATCH = 63  # px: a fresh model's patch is a world's grid cell; larger is refused


def world_geometry(params, preset, world):
    """A fresh --model on a Shapes world (params: shapes.load_params): its vision geometry is the
    world's, image_size the image side and patch_size the cell side, so each patch is one grid
    cell as the presets' 48 px / 16 px are on the default 3 x 3 grid (the preset's alone resized
    a 1023 px world to 48 px, shapes below a pixel, and a 2 x 2 grid's cells straddled patches).
    Returns (overrides for from_preset, a note when they differ from the preset's, else None);
    a cell too large to be one patch is refused."""
    size, grid = params["image_size"], params["grid"]
    patch = size // grid  # (shapes.py: the image is grid x cell)
    if patch > MAX_CELL_PATCH:
        raise ConfigError(f"--world {world}: the world's --image_size {size} --grid {grid} makes "
                          f"{patch} px cells, and a fresh --model takes one patch per cell (at "
                          f"most {MAX_CELL_PATCH} px): write a world with --image_size at most "
                          f"{MAX_CELL_PATCH * grid}, or start from --init")
    was = {**dataclasses.asdict(ModelConfig()), **PRESETS[preset]}
    note = None
    if (was["image_size"], was["patch_size"]) != (size, patch):
        note = (f"note: a fresh --model {preset} takes the world's geometry: {size} px images, "
                f"{patch} px patches (one per cell of its {grid}x{grid} grid), not the preset's "
                f"{was['image_size']} / {was['patch_size']}")
    return dict(image_size=size, patch_size=patch), note


def refuse_merged_resume(resume_path, model, adapter, then=""):
    """--resume on a finished LoRA run: its last checkpoint holds the adapter merged into the base
    and no optimizer state, so a run resumed there trained a fresh random adapter on top (unlike
    the uninterrupted run); one line saying how to go on instead (then: the flags that do what the
    run had left, e.g. vigc's generation alone)."""
    if resume_path and adapter not in model.adapters:
        raise ConfigError(f"{resume_path}: --resume true: this run finished and merged its "
                          f"'{adapter}' adapter into the base here (no optimizer state kept), so "
                          f"it cannot go on as the same run; start a new run with --init "
                          f"{resume_path}{then}")


def prompt_item(tokenizer, model, turns, image_unit=None, template="vicuna_v1", max_len=2048):
    """Tokenized generation prompt (turns end with a human turn) with its normalised image; None
    where it is longer than max_len (cut, it lost its end and 'ASSISTANT:': the model went on
    writing the question)."""
    from data import normalize, tokenize_conversation
    c = model.config
    item = tokenize_conversation(tokenizer, turns, c.image_token_id, c.num_image_tokens, 1 << 30,
                                 template)
    if len(item["input_ids"]) > max_len:
        return None
    if image_unit is not None:
        item["pixel_values"] = normalize(image_unit)
    return item


@torch.no_grad()
def oracle_errors(result):
    """Every false claim in an oracle.oracle result, in one list: the hallucinated objects,
    attributes and relations and the claimed absences of present things (the terms of its
    num_hallucinations)."""
    kinds = ("hallucinated_objects", "hallucinated_attributes", "hallucinated_relations",
             "false_negatives")
    return [claim for kind in kinds for claim in result[kind]]


def check_new_tokens(model, cfg, *flags):
    """Each --flag (a count of new tokens) within the model's positions: generate preallocates its
    cache for prompt + new tokens, and 1e9 failed there with an allocation traceback."""
    limit = model.config.max_position
    for flag in flags:
        n = getattr(cfg, flag)
        if n > limit:
            raise ConfigError(f"--{flag} {n}: more new tokens than the model's {limit} positions "
                              "(max_position_embeddings in its config)")


def answer_eos(model, tokenizer):
    """The ids that end an answer: the tokenizer's eos, or with a config that lists several (Llama
    3's lists <|eot_id|> beside it) all of them, sorted: any ends an answer (eval, VIGC, the reports
    and PPO's rollouts stop at the same ones)."""
    eos = tokenizer.eos_token_id
    if isinstance(model.config.eos_token_id, list):
        return sorted({eos, *model.config.eos_token_id})
    return eos


def generate_answers(model, tokenizer, items, batch_size=32, max_new_tokens=64, temperature=0.0,
                     top_p=1.0, generator=None, desc="generate", show=True, num_beams=1,
                     return_finished=False, repetition_penalty=1.0, compile=False):
    """Decode answers for prompt items (from prompt_item) in left-padded batches with the KV cache
    (num_beams > 1: beam search; repetition_penalty, compile: model.generate's). generator: one,
    or a list of one per item. Returns the decoded answer texts (cut at EOS: the tokenizer's, or
    any the model's config lists), and with return_finished whether each one ended with EOS."""
    from data import collate
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    eos = answer_eos(model, tokenizer)
    out = []
    finished = []
    batches = range(0, len(items), batch_size)
    for start in progress(batches, total=len(batches), desc=desc, enabled=show):
        chunk = items[start:start + batch_size]
        b = collate(chunk, tokenizer.pad_token_id, side="left")
        pix = b["pixel_values"].to(dev) if b["pixel_values"] is not None else None
        ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        g = model.generate(pix, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id,
                           generator=generator[start:start + len(chunk)]
                           if isinstance(generator, list) else generator,
                           num_beams=num_beams, repetition_penalty=repetition_penalty,
                           compile=compile)
        for i in range(len(chunk)):
            n = int(g.lengths[i])
            toks = g.tokens[i, :n].tolist()
            out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
            finished.append(bool(g.finished[i]))
    model.train(was_training)
    return (out, finished) if return_finished else out


def to_device(batch, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def score_sequences(model, head, input_ids, attention_mask, image_features):
    """Scalar score per right-padded sequence: head(hidden state at the last real token). Every pad
    comes after the real tokens, so the causal mask alone keeps a real token from seeing one and
    positions count from 0 as they do unpadded: no padding mask goes in (SDPA's fused causal path,
    not a (B, 1, T, T) mask), the same scores."""
    lengths = attention_mask.sum(1, keepdim=True)
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), cols < lengths):
        raise ValueError("score_sequences: the batch must be right-padded")
    h = model(None, input_ids, None, return_hidden=True, image_features=image_features,
              keep=lengths - 1)  # the last layer runs for the scored position alone
    return model.heads[head](h[:, 0])
