"""torchrun, ending in one line: ``python -m phsa_train.torchrun [torchrun arguments]`` (``launch/pretrain.sh``).

The real ``torch.distributed.run``; only its two endings that are no bug of anyone's read as one line instead
of a traceback plus torchrun's failure block:
  * a stop signal (SIGTERM from Slurm's scancel / preemption, Ctrl-C): torchrun has forwarded it, the ranks
    saved a checkpoint and stopped (:mod:`phsa_train.training.preemption`); exit 128 + the signal number;
  * a rank that exited with status 2 has already said what was wrong in one line (bad input, a non-finite
    loss, a full disk), and torchrun stopped the others with a signal; exit 2. Any other failure keeps
    torchrun's report: the rank's traceback is the clue.
"""
from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser
from torch.distributed.run import main as torchrun_main

ONE_LINE_EXIT = 2  # phsa_train.train: the rank printed the reason itself


def supported_arguments(argv: list[str]) -> list[str]:
    """argv without the ``--shutdown-timeout`` option when this torch's torchrun lacks it (added after 2.11, the
    GPU image's torch): the launcher passes it so that ranks get time to checkpoint on SIGTERM; older torchruns
    use their fixed grace period instead of refusing to start."""
    known = {s for a in get_args_parser()._actions for s in a.option_strings}
    out, skip = [], False
    for i, a in enumerate(argv):
        if a == "-m":  # the training module and its arguments follow: not torchrun's
            return out + argv[i:]
        if skip:
            skip = False
            continue
        if a == "--shutdown-timeout" and a not in known:
            skip = True
            continue
        if a.startswith("--shutdown-timeout=") and "--shutdown-timeout" not in known:
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(supported_arguments(sys.argv[1:] if argv is None else argv))
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"[torchrun] stopped by {name}; the ranks checkpointed first (see above)", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        if ONE_LINE_EXIT in codes and all(c == ONE_LINE_EXIT or c < 0 for c in codes):  # < 0: torchrun stopped it
            return ONE_LINE_EXIT
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
