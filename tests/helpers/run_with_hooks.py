"""Run a stage with test-only failure hooks (tests/test_reliability.py), as its own process so that it can die:

    python tests/helpers/run_with_hooks.py [--die-after-saves N] [--slow-save SECONDS] [--signal-after-steps N SIG]
                                           STAGE.py [stage flags ...]
    torchrun --standalone --nproc_per_node=2 tests/helpers/run_with_hooks.py --die-after-saves 1 reward.py ...

--die-after-saves N  SIGKILL the process right after its N-th completed `distributed.save_model` (a preempted job;
                     under torchrun every process counts its own saves and dies at the same one)
--slow-save S        in every save, once the temporary folder is complete and flushed, print a line starting with
                     "test hook:" and wait S seconds before `distributed.move_into_place` renames it, so a test can
                     SIGKILL the process in the middle of a save
--signal-after-steps N SIG  send signal SIG (TERM, INT) to this process right after it logged its N-th training step
                     (a metrics line with "loss", "L_adapted" or "iteration"), as a preemption would; under torchrun
                     only rank 0 signals itself, so the other ranks learn of it from rank 0 alone

The hooks wrap those two functions of distributed.py before the stage is imported, then the stage's own `main` runs
under `common.run_main`, exactly as `python STAGE.py` would run it. Production code knows nothing of them.
"""
import importlib
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

from plumbing import common  # noqa: E402
from plumbing import distributed  # noqa: E402


def main(argv: list[str]) -> None:
    die_after_saves, slow_save, signal_after = 0, 0.0, (0, "")
    while argv and argv[0] in ("--die-after-saves", "--slow-save", "--signal-after-steps"):
        flag, value, argv = argv[0], argv[1], argv[2:]
        if flag == "--die-after-saves":
            die_after_saves = int(value)
        elif flag == "--slow-save":
            slow_save = float(value)
        else:
            signal_after, argv = (int(value), argv[0]), argv[1:]
    script, flags = argv[0], argv[1:]

    if signal_after[0] and os.environ.get("RANK", "0") == "0":
        log, steps_logged = common.MetricsLog.log, [0]

        def log_then_signal(self, **metrics) -> None:
            log(self, **metrics)
            if {"loss", "L_adapted", "iteration"} & set(metrics):
                steps_logged[0] += 1
                if steps_logged[0] == signal_after[0]:
                    os.kill(os.getpid(), getattr(signal, "SIG" + signal_after[1]))

        common.MetricsLog.log = log_then_signal

    if slow_save:
        move_into_place = distributed.move_into_place

        def slow_move_into_place(tmp: str, folder: str) -> None:
            print(f"test hook: {tmp} written, renaming in {slow_save:g} s", flush=True)
            time.sleep(slow_save)
            move_into_place(tmp, folder)

        distributed.move_into_place = slow_move_into_place

    if die_after_saves:
        save_model, saves_done = distributed.save_model, [0]

        def save_model_then_die(*args, **kwargs) -> None:
            save_model(*args, **kwargs)
            saves_done[0] += 1
            if saves_done[0] == die_after_saves:
                os.kill(os.getpid(), signal.SIGKILL)

        distributed.save_model = save_model_then_die

    stage = importlib.import_module(os.path.basename(script).removesuffix(".py"))
    common.run_main(lambda: stage.main(flags))


if __name__ == "__main__":
    main(sys.argv[1:])
