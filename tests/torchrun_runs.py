"""Several training runs in one torchrun launch, one after another in the same processes (each
process imports torch and transformers once). The process group lives across the runs: a run
ends without destroying it (gloo hangs in the first barrier of a group initialised a third time
in one process, which no real run does).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/torchrun_runs.py PLAN.json

PLAN.json is a list of [script, argv...] entries; a run that fails ends the launch with its error,
and a run that takes longer than $RUN_TIMEOUT seconds (a hang) prints every thread's stack and
ends it.
"""

import faulthandler
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bookkeeping  # noqa: E402
import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
import train_stage3_lora  # noqa: E402

ENTRY = {"train_stage1.py": train_stage1, "train_stage2.py": train_stage2, "train_stage3_lora.py": train_stage3_lora}

if __name__ == "__main__":
    bookkeeping.cleanup_dist = lambda: None
    with open(sys.argv[1], encoding="utf-8") as fh:
        plan = json.load(fh)
    for script, *argv in plan:
        faulthandler.dump_traceback_later(int(os.environ.get("RUN_TIMEOUT", "600")), exit=True)
        ENTRY[script].main(argv)
        faulthandler.cancel_dump_traceback_later()
