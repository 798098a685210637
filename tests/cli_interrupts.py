"""Run the ``rllib`` command and freeze it at a chosen point, so a test can SIGKILL it exactly there.

    python -m tests.cli_interrupts iteration:3 MARKER -- train file x.yaml ...   # frozen inside iteration 3
    python -m tests.cli_interrupts checkpoint:2 MARKER -- train file x.yaml ...  # frozen inside checkpoint 2

``iteration:N``: after ``training_step`` of iteration N has updated the weights in memory, before the result
is logged or checkpointed. ``checkpoint:N``: after RLlib has written checkpoint N's files into the staging
directory, before the manifest and the rename that make it a checkpoint. At that point the helper writes
MARKER and sleeps; the test kills the process. Only test code patches anything: the CLI runs unchanged.
"""

import pathlib
import sys
import time


def _freeze(marker: str) -> None:
    pathlib.Path(marker).write_text("frozen")
    while True:
        time.sleep(60)


def _freeze_in_iteration(iteration: int, marker: str) -> None:
    from gigpo_rllib.algorithm import GiGPO

    original = GiGPO.training_step

    def training_step(self):
        out = original(self)
        if self.iteration + 1 == iteration:  # Algorithm.iteration counts finished iterations
            _freeze(marker)
        return out

    GiGPO.training_step = training_step


def _freeze_in_checkpoint(iteration: int, marker: str) -> None:
    from gigpo_rllib import checkpoints

    original = checkpoints.write_manifest

    def write_manifest(checkpoint, *, iteration: int):
        if iteration == frozen_at:
            _freeze(marker)
        original(checkpoint, iteration=iteration)

    frozen_at = iteration
    checkpoints.write_manifest = write_manifest


def main() -> int:
    point, marker, separator, *cli_args = sys.argv[1:]
    assert separator == "--", "usage: python -m tests.cli_interrupts WHERE:N MARKER -- CLI ARGS"
    where, number = point.split(":")
    {"iteration": _freeze_in_iteration, "checkpoint": _freeze_in_checkpoint}[where](int(number), marker)
    from gigpo_rllib.cli import main as cli_main

    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
