"""`python tests/kill_inside_write.py N metalearn-args...`: run metalearn, and SIGKILL it in the
middle of its N-th checkpoint write (the temporary file complete, not yet renamed into place).

The kill comes from inside the process, so the test lands it at that exact moment every time.
"""

import os
import signal
import sys

from metalearn.cli import main

target, writes = int(sys.argv[1]), 0
rename = os.replace


def replace_or_die(src, dst, *args, **kwargs):
    global writes
    if str(dst).endswith(".npz"):
        writes += 1
        if writes == target:
            os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)


os.replace = replace_or_die
sys.argv = ["metalearn", *sys.argv[2:]]
main()
