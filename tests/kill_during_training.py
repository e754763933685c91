"""Run ``visionlora ARGS...`` and kill the process with SIGKILL at the Nth training loss (one per batch,
or per job and packed step of ``train-many``).

Usage: python kill_during_training.py N train --data ...   (used by the resume test)
"""

import os
import signal
import sys

from visionlora.cli import main
from visionlora.tasks.classification.task import ClassificationSteps

kill_at = int(sys.argv[1])
calls = 0
original_loss = ClassificationSteps.loss_of_outputs


def loss_then_maybe_die(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_loss(self, *args, **kwargs)


ClassificationSteps.loss_of_outputs = loss_then_maybe_die
sys.exit(main(sys.argv[2:]))
