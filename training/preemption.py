"""Preemption (risk T-04, "automatic retry on spot interruption"): a SIGTERM during a
stage's training saves its checkpoint, the process exits with :data:`EXIT_PREEMPTED`, and
the rerun of the same command resumes the stage from that checkpoint.

Lightning does the signal part in one process. While a ``Trainer`` fits or tests, its
signal connector turns SIGTERM into ``trainer.received_sigterm`` and its loops raise
``SIGTERMException`` at the next batch boundary. Under DDP its handler also runs a
``broadcast`` from inside the signal handler (Lightning 2.5+), which pairs with whatever
collective the other rank is in at that moment -- a gradient all-reduce mid-step -- and
hangs both processes (seen in CI: a 2-process CPU fit never exited after SIGTERM). So in a
multi-process fit the callback below takes SIGTERM over:

* :func:`preemption_checkpoint`, a callback. With more than one process its own SIGTERM
  handler only notes the signal; at each training batch's end (and at the end of
  validation and of each test batch) every rank all-reduces that note (max), so all of
  them set ``received_sigterm`` at the same step and Lightning stops them together,
  whichever rank was signalled. On the ``SIGTERMException`` during ``fit`` every rank
  takes part in ``trainer.save_checkpoint`` and rank zero moves the file into place as
  ``checkpoints/last.ckpt`` in one rename -- the file the stage store resumes from;
* :func:`resume_checkpoint`: the newest of ``last.ckpt`` and the ``hpc_ckpt_<n>.ckpt``
  files Lightning's SLURM requeue (``SIGUSR1``) writes into the stage folder;
* :class:`Preempted`, the ``SystemExit`` (status 75) the store raises instead, after
  marking the MLflow run ``KILLED`` with a ``preempted_<n>`` tag: a preemption is no
  failure, so no T-05 alert and no retry in the same process.

SIGTERM outside a fit or a test (data generation, risk assessment, model export) is not
caught: the process ends by the signal (status 143 in the shell) and the rerun resumes
from the stage folder as after any crash.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from core.files import fsync_dir, tmp_name, writer_alive

log = logging.getLogger(__name__)

#: Exit status of a process stopped by SIGTERM once its stage was checkpointed:
#: ``EX_TEMPFAIL`` of sysexits.h ("temporary failure; the user is invited to retry").
#: 0 is done, 1 an error, 143 (128 + SIGTERM) a kill outside training.
EXIT_PREEMPTED = 75
LAST = "last.ckpt"
#: Lightning's SLURM requeue checkpoints, in the trainer's ``default_root_dir``.
HPC_GLOB = "hpc_ckpt_*.ckpt"


class Preempted(SystemExit):
    """A stage stopped by SIGTERM, its checkpoint saved: exit with :data:`EXIT_PREEMPTED`.

    A ``SystemExit``, as Lightning's ``SIGTERMException`` is: ``except Exception`` handlers
    (failure marking, retries) let it through, and the interpreter exits with its code.
    """

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_preemption(error: BaseException) -> bool:
    """Whether ``error`` is Lightning's SIGTERM stop (or one already converted)."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    return isinstance(error, SIGTERMException | Preempted)


def preemption_checkpoint(dirpath: Path) -> Any:
    """A :class:`PreemptionCheckpoint` callback saving into ``dirpath`` (Lightning is
    imported here, not with this module)."""
    return _callback_class()(Path(dirpath))


@functools.cache
def _callback_class() -> type:
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.trainer.states import TrainerFn

    class PreemptionCheckpoint(Callback):
        """Saves ``<dirpath>/last.ckpt`` when Lightning stops a fit on SIGTERM.

        The full training state (weights, optimizer, loops, callbacks) at the batch where
        Lightning stopped, written to a temporary sibling and renamed: a reader sees the
        old ``last.ckpt`` or the new one, never a part. Every rank calls
        ``save_checkpoint`` (a collective under DDP); only rank zero writes and renames.

        Attributes:
            saved: the checkpoint written, or None.
            position: ``(epoch, global_step)`` it holds.
        """

        def __init__(self, dirpath: Path) -> None:
            super().__init__()
            self.dirpath = dirpath
            self.saved: Path | None = None
            self.position: tuple[int, int] | None = None
            self.signalled = False

        # -- SIGTERM under DDP: note in the handler, agree at batch boundaries
        def _take_over_sigterm(self, trainer: Any) -> None:
            """Replace Lightning's SIGTERM handler (it runs a collective) with one that
            only notes the signal; Lightning's teardown puts the pre-fit handler back."""
            if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._note)

        def _note(self, signum: int, frame: Any) -> None:
            self.signalled = True  # nothing else: a handler runs between any two bytecodes

        def _agree(self, trainer: Any) -> None:
            """All ranks learn whether any was signalled (one all-reduce, called at the same
            point on every rank) and tell Lightning, whose loops then stop together."""
            if trainer.world_size <= 1:
                return
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(self.signalled)], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not trainer.received_sigterm:
                trainer._signal_connector.received_sigterm = True  # what the loops read
                if trainer.is_global_zero:
                    log.info(
                        "SIGTERM: all %d processes stop at step %d",
                        trainer.world_size,
                        trainer.global_step,
                    )

        def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
            self._take_over_sigterm(trainer)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._take_over_sigterm(trainer)

        def on_test_start(self, trainer: Any, pl_module: Any) -> None:
            self._take_over_sigterm(trainer)

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self._agree(trainer)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                self._agree(trainer)

        def on_test_batch_end(self, trainer: Any, *args: Any) -> None:
            self._agree(trainer)

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if not is_preemption(exception) or trainer.state.fn != TrainerFn.FITTING:
                return  # a crash is the store's to report; a test resumes from the fit's end
            target, tmp = self.dirpath / LAST, self.dirpath / tmp_name(LAST)
            if trainer.is_global_zero:
                self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(tmp))
            self.position = (int(trainer.current_epoch), int(trainer.global_step))
            if trainer.is_global_zero:
                os.replace(tmp, target)
                fsync_dir(self.dirpath)
            self.saved = target

    return PreemptionCheckpoint


def remove_partial(dirpath: Path) -> list[Path]:
    """Delete temporary checkpoints (``.last.ckpt.tmp-<pid>-<hex>``) whose writer is gone:
    what a process killed while saving leaves; returns them."""
    removed = []
    for path in Path(dirpath).glob(f".{LAST}.tmp-*"):
        if not writer_alive(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a stage resumes from: the newest (by modification time; ``last.ckpt``
    on a tie) of ``checkpoints/last.ckpt`` and Lightning's ``hpc_ckpt_<n>.ckpt``; None
    when there is neither."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / LAST
    found = [last] if last.is_file() else []
    found += sorted(run_dir.glob(HPC_GLOB))
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p == last))


def checkpoint_position(path: Path) -> tuple[int, int] | None:
    """``(epoch, global_step)`` of a Lightning checkpoint (memory-mapped, weights only);
    None when the file cannot tell."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["epoch"]), int(ckpt["global_step"])
    except Exception:  # noqa: BLE001 - only for a log line; Lightning reports a bad file
        return None


def describe(path: Path | None, position: tuple[int, int] | None, root: Path) -> str:
    """``checkpoints/last.ckpt (epoch 1, step 14)``, relative to ``root`` where it can be."""
    if path is None:
        return "no checkpoint"
    try:
        name = str(Path(path).relative_to(root))
    except ValueError:
        name = str(path)
    if position is None:
        return name
    return f"{name} (epoch {position[0]}, step {position[1]})"


def mark_preempted(client: Any, run_id: str, note: str, tag: str = "preempted") -> None:
    """Tag MLflow run ``run_id`` with ``note`` under ``tag`` (``tag_<n>`` for the next free
    ``n`` when ``tag`` ends with ``_``) and end it ``KILLED``: stopped from outside, to be
    resumed, not failed. Never raises (the exit matters more)."""
    try:
        if tag.endswith("_"):
            tags = client.get_run(run_id).data.tags
            tag = f"{tag}{sum(k.startswith(tag) for k in tags)}"
        client.set_tag(run_id, tag, note[:500])
        client.set_terminated(run_id, "KILLED")
    except Exception as error:  # noqa: BLE001
        log.error("could not mark run %s preempted: %s", run_id, error)


def end_parent(parent: Any, error: BaseException) -> None:
    """End a pipeline's parent run (:class:`training.stages.parent.PipelineRun`) after
    ``error``: ``KILLED`` with a ``preempted`` tag for a SIGTERM stop (the rerun resumes
    it), else ``parent.fail``."""
    if is_preemption(error):
        mark_preempted(parent.client, parent.run_id, str(error))
    else:
        parent.fail(error)
