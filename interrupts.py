"""Ctrl-C and SIGTERM outside common.user_errors, where Python printed a KeyboardInterrupt traceback
(Ctrl-C) or died without a word (SIGTERM, exit code 143). Imported first by each script, before
torch (stdlib alone: it is in place within a few milliseconds of the start):

- while a script starts (its imports, torch's take most of a second, and the reading of its
  flags) a Ctrl-C or SIGTERM ends it at once with one line and exit code 130, as it does later;
  nothing is written yet. common.user_errors, or interrupt_on_sigterm in pipeline.py and lab.py,
  then puts Python's own handlers back and sets its own (`hand_over`).
- once the script's work is done (`work_done`, as user_errors ends) both are ignored: a SIGTERM
  landing in the interpreter's teardown killed a run whose outputs were whole (143, no line), and
  pipeline.py called that stage killed.

While a script runs, its own handlers take the first SIGINT or SIGTERM as Ctrl-C and drop any
after it (`interrupt_once`, `interrupting`): common.user_errors, the hand-over of a refused rank,
pipeline.py's and lab.py's stop.

Only in a program started as one of the scripts (`python sft.py`, torchrun's ranks): a program
that imports a stage as a library (a test, a notebook), or runs one in its own process (IPython's
`%run sft.py`, runpy), keeps Python's own handlers: its command line does not name the script."""
import atexit
import os
import signal
import sys
import threading
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("sft", "reward", "ppo", "dpo", "vigc", "eval", "shapes", "pipeline", "lab", "bench")

# set by pipeline.py for its stages: its own line says how to go on after Ctrl-C (a stage's named
# --resume true, which the pipeline does not take)
INTERRUPT_SAID_BY = "FACTALIGN_INTERRUPT_SAID_BY"

STARTING = "interrupted while starting: nothing was written"


def _script_on_the_command_line(argv):
    """The script `python [options] SCRIPT ...` runs (argv: sys.orig_argv), ours that `-m NAME`
    runs (`torchrun -m sft`), or None (`-c`, another module, no script: an interactive
    interpreter, IPython)."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "--":
            return next(args, None)
        if arg == "--check-hash-based-pycs":  # (the one long option taking a value)
            next(args, None)
        elif arg.startswith("-") and not arg.startswith("--") and arg != "-":
            for i, letter in enumerate(arg[1:], 1):
                if letter == "m":  # (its value: the rest of this argument, else the next one)
                    module = arg[i + 1:] or next(args, "")
                    return os.path.join(HERE, f"{module}.py") if module in SCRIPTS else None
                if letter == "c":
                    return None
                if letter in "WX":  # (its value: the rest of this argument, else the next one)
                    if i == len(arg) - 1:
                        next(args, None)
                    break
        elif not arg.startswith("-"):
            return arg
    return None


def _started_as_a_script():
    """Whether this program is `python SCRIPT.py` for one of the scripts beside this file. Its
    command line must name it too: a host running a script in its own process (IPython's `%run
    sft.py`, runpy.run_path(..., run_name="__main__")) has it as __main__ for a while, and would
    otherwise keep our handlers: Ctrl-C ignored in the notebook, or ending it with os._exit."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    name, ext = os.path.splitext(os.path.basename(main_file))
    # (sys.orig_argv is Python 3.10's: before it, Python's own handlers, as before this file)
    script = _script_on_the_command_line(getattr(sys, "orig_argv", []))
    return ext == ".py" and name in SCRIPTS and script is not None and \
        os.path.dirname(os.path.realpath(main_file)) == os.path.realpath(HERE) and \
        os.path.realpath(script) == os.path.realpath(main_file)


def _interrupted_while_starting(signum, frame):
    # (a stage of pipeline.py: the pipeline says it; under torchrun: local rank 0, one line a node)
    if not os.environ.get(INTERRUPT_SAID_BY) and os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            os.write(2, f"{STARTING}\n".encode())
        except OSError:  # (started with stderr closed, `2>&-`: the exit code says it)
            pass
    os._exit(130)  # (an exception raised here would unwind through half-imported modules)


OURS = _started_as_a_script() and threading.current_thread() is threading.main_thread()
_before = {}  # signal -> Python's handler, while ours is set
if OURS:
    for _signum in (signal.SIGINT, signal.SIGTERM):
        # (ignored at start, `script &` from a shell script: stays ignored; pipeline.py reads that)
        if signal.getsignal(_signum) in (signal.default_int_handler, signal.SIG_DFL):
            _before[_signum] = signal.signal(_signum, _interrupted_while_starting)
    atexit.register(lambda: work_done())  # (an exit before user_errors: --help, a refused flag)


def hand_over():
    """Python's own SIGINT and SIGTERM handlers back, for the caller to take them (main thread)."""
    if threading.current_thread() is threading.main_thread():
        while _before:
            signum, handler = _before.popitem()
            if signal.getsignal(signum) is _interrupted_while_starting:
                signal.signal(signum, handler)


def work_done():
    """The script's work is done and said: SIGINT and SIGTERM are ignored while it exits. Returns
    whether they are (not in a program that merely imports a stage)."""
    if not OURS or threading.current_thread() is not threading.main_thread():
        return False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    return True


def drop_signal(signum, frame):
    """A further Ctrl-C or SIGTERM while stopping: dropped. (A Python handler, not SIG_IGN: a
    stage started in that moment would inherit SIG_IGN and ignore the SIGINT that stops it.)"""


def interrupt_once(signals, dropped=(signal.SIGINT, signal.SIGTERM)):
    """The first of `signals` to come raises KeyboardInterrupt, having set each of `dropped` to
    drop_signal: a second signal raised again inside the stop the first began, and cut it short
    (or ended it in a traceback). Returns the handlers `signals` had. (Main thread alone.)"""
    def interrupt(signum, frame):
        for each in dropped:
            signal.signal(each, drop_signal)
        raise KeyboardInterrupt
    return {signum: signal.signal(signum, interrupt) for signum in signals}


@contextmanager
def interrupting(signals):
    """interrupt_once(signals) while the block runs, a second one of them dropped. After it, also
    when it raises, each has its handler back, unless the block set another (work_done's SIG_IGN
    as a script ends: kept). Off the main thread, where no handler can be set: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = interrupt_once(signals, dropped=signals)
    ours = {signal.getsignal(signum) for signum in before} | {drop_signal}
    try:
        yield
    finally:
        for signum, handler in before.items():
            if signal.getsignal(signum) in ours:
                signal.signal(signum, handler)
