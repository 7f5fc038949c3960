"""A quiet console: the run's own lines, its progress bars and the result table; everything else goes to the run's
log file only (``logger.verbose=true`` shows it all on the console too).

What libraries print, and where it goes here:
- vLLM and Triton log records, transformers' log records, Python warnings (``FutureWarning`` of
  ``torch.distributed.reduce_op``, NumPy's): the logging module → the job's log file (Hydra's
  ``<run dir>/<job>.log``); the console handler passes opd-lab's own records and errors only;
- lines native code writes straight to the stderr file descriptor (vLLM's NUMA-binding warning, its weight-loading
  bar) while an engine starts: :func:`native_stderr_to_log` appends them to the same log file;
- library progress bars (weights loading and saving): off;
- wandb's own console lines (its banner, run history, the Weave advertisement): silenced (``WANDB_SILENT``); the
  run's directory and the ``wandb sync`` command are printed by the run itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

_state = {"verbose": True, "log_file": None}


class _OwnLinesOnly(logging.Filter):
    """Console filter: opd-lab's records and anything at ERROR or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("opd_lab") or record.levelno >= logging.ERROR


def configure(verbose: bool) -> None:
    """Set the console up for this process (called once per job, after Hydra configured logging)."""
    _state["verbose"] = verbose
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    _state["log_file"] = Path(files[0].baseFilename) if files else None
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # vLLM's records propagate to the root handlers: the log file too
    logging.captureWarnings(True)  # warnings → the 'py.warnings' logger → the log file (and a verbose console)
    if verbose:
        return
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for handler in root.handlers:
        if not isinstance(handler, logging.FileHandler) and not any(isinstance(f, _OwnLinesOnly)
                                                                     for f in handler.filters):
            handler.addFilter(_OwnLinesOnly())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def verbose() -> bool:
    return bool(_state["verbose"])


@contextlib.contextmanager
def native_stderr_to_log():
    """While an engine starts: what native code writes to stderr (fd 2) is appended to the run's log file instead of
    the console (a quiet console with a log file; otherwise nothing changes)."""
    log_file = _state["log_file"]
    if _state["verbose"] or log_file is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_file, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
