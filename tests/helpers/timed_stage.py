"""A stand-in stage for tests of pipeline.run_tasks: sleeps, and records when it started and ended.

    python tests/helpers/timed_stage.py LOG NAME SECONDS [FAIL]   appends "NAME start|end <time>" lines to LOG
    (and "NAME gpu SLOT" with the CUDA_VISIBLE_DEVICES it was given)
"""
import os
import sys
import time

log, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(log, "a") as f:
    f.write(f"{name} start {time.time()}\n")
    if os.environ.get("CUDA_VISIBLE_DEVICES"):  # the GPUs the pipeline gave this stage
        f.write(f"{name} gpu {os.environ['CUDA_VISIBLE_DEVICES'].replace(',', '+')}\n")
time.sleep(seconds)
with open(log, "a") as f:
    f.write(f"{name} end {time.time()}\n")
sys.exit(1 if "fail" in sys.argv[4:] else 0)  # study/pipeline.py appends --overwrite
