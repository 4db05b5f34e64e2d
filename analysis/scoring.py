"""What evaluate.py (perplexity) and tasks.py (zero-shot tasks) both score with.

Below both, so that neither imports the other for it: the log-probability of a target token,
the progress bar, and the checked reader of jsonl data files (task files, C4-style corpora).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ttfsc.errors import TtfscError
from ttfsc.runtime.tokenizer import read_text_file

LOGSOFTMAX_ROWS = 256  # rows per float64 log-softmax chunk: bounds memory for 49k-word vocabularies


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[row, target] per row, in float64, a few rows at a time."""
    out = np.empty(len(targets), dtype=np.float64)
    for s in range(0, len(targets), LOGSOFTMAX_ROWS):
        rows = logits[s:s + LOGSOFTMAX_ROWS].astype(np.float64)
        top = rows.max(-1, keepdims=True)
        logz = np.log(np.exp(rows - top).sum(-1)) + top[:, 0]
        out[s:s + len(rows)] = rows[np.arange(len(rows)), targets[s:s + LOGSOFTMAX_ROWS]] - logz
    return out


def progress_bar(it: Any, enabled: bool, desc: str) -> Any:
    """A tqdm bar on stderr when asked and stderr is a terminal; the bare iterable otherwise."""
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, file=sys.stderr, disable=None, leave=False)


def read_jsonl(path: Path, fields: dict[str, type], example: str) -> Iterable[tuple[int, dict]]:
    """(line number, row) of a jsonl file whose rows must hold ``fields`` of the given types.

    A bad line is one clear error naming the file, the line and an ``example`` of a good one; a file
    that is not UTF-8 text is one clear error too (read_text_file), before any row is used.
    """
    for lineno, line in enumerate(read_text_file(path, "data file").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise TtfscError(f"{path}:{lineno}: not valid JSON ({exc}); each line must be one object "
                             f"such as {example}.") from None
        for key, kind in fields.items():
            if not isinstance(row, dict) or not isinstance(row.get(key), kind):
                raise TtfscError(f"{path}:{lineno}: field {key!r} is missing or not a {kind.__name__}; "
                                 f"each line must look like {example}.")
        yield lineno, row
