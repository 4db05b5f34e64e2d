"""The outlier prefix (``--prefix auto``, after PrefixQuant), and the calibration feeds that follow it.

In SmolLM2 whatever token stands first is an attention sink whose down_proj input peaks ~2,000x
above the median token, so a per-tensor range fitted to it leaves ordinary tokens a handful of
codes. Calibration first scans the float model for such positions and tokens, then picks a
prefix: BOS, plus any token that is an outlier only as a sink (prefixing it must at least halve
its outlier count; tokens that are large at every occurrence stay out). The prefix's KV cache,
computed once by the float model, is saved as ``prefix.npz`` beside the output (metadata
``ttfsc.prefix`` = its token ids) and every ``Generator`` runs sequences after it; calibration
itself runs after it (``calibration_feeds``), so the ranges never see the sink.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ttfsc import modelio
from ttfsc.errors import TtfscError
from ttfsc.quantizer.calibration import Log, bos_id, calibration_sequences, decoder
from ttfsc.runtime.generate import PREFIX_FILE, PREFIX_META, Generator, Prefix, format_ids

OUTLIER_RATIO = 10.0  # a token is an outlier when its peak |activation| exceeds 10x the median peak
MAX_PREFIX_TOKENS = 4  # BOS + up to 3 other outlier tokens (PrefixQuant uses 1-4)
DETECT_SEQUENCES = 4  # calibration sequences the outlier scan looks at


def position_ratios(sess: Any, acts: Sequence[str], gen: Generator, seqs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per sequence and position: the largest, over tensors, of max|x| over channels / its median over positions.

    An attention sink shows up as a ratio of hundreds (SmolLM2: 25,000 vs 160) in the linear
    inputs of later layers, while ordinary tokens stay within a few times the median.
    """
    peaks = []
    for ids in seqs:
        values = sess.run(list(acts), gen.feeds(ids))
        peaks.append(np.stack([np.abs(v).max(-1).reshape(-1) for v in values]))  # [tensor, position]
    median = np.median(np.concatenate(peaks, axis=1), axis=1, keepdims=True)
    return [(p / np.maximum(median, np.finfo(np.float32).tiny)).max(0) for p in peaks]


def outlier_hits(seqs: Sequence[np.ndarray], ratios: Sequence[np.ndarray], bos: int) -> Counter:
    """How often each token is an outlier; position 0 counts as BOS (whatever stands first is a sink)."""
    hits: Counter = Counter()
    for ids, r in zip(seqs, ratios):
        for pos in np.flatnonzero(r > OUTLIER_RATIO):
            hits[bos if pos == 0 else int(ids[pos])] += 1
    return hits


def detect_prefix(sess: Any, acts: Sequence[str], gen: Generator, path: str, seqs: Sequence[np.ndarray], bos: int,
                  log: Log) -> list[int]:
    """Outlier tokens that a prefix removes: BOS, then greedily the most frequent remaining outlier
    token, kept only if prefixing it at least halves its outlier occurrences.

    The check matters: some tokens (SmolLM2's " the" in layer 2) are large at every occurrence,
    not only as a sink, and a prefix cannot help them. Empty when no position is an outlier.
    """
    def scan(ids: tuple[int, ...]) -> Counter:
        g = decoder(sess, path, gen.compute_prefix(ids)) if ids else gen
        stripped = [np.asarray(g.strip_bos(s)) for s in seqs]
        return outlier_hits(stripped, position_ratios(sess, acts, g, stripped), bos)

    hits = scan(())
    if not hits:
        return []
    prefix, rejected = [bos], []
    for _ in range(MAX_PREFIX_TOKENS - 1):
        hits = scan(tuple(prefix))
        cands = sorted((t for t in hits if t not in prefix and t not in rejected), key=lambda t: (-hits[t], t))
        if not cands:
            break
        after = scan(tuple(prefix + [cands[0]]))
        (prefix if 2 * after[cands[0]] <= hits[cands[0]] else rejected).append(cands[0])
        log(f"prefix: token {cands[0]} is an outlier {hits[cands[0]]} times, {after[cands[0]]} once prefixed: "
            + ("kept" if prefix[-1] == cands[0] else "not a sink, left out"))
    return prefix


def choose_prefix(mode: str | list[int], sess: Any, acts: Sequence[str], gen: Generator, path: str,
                  seqs: Sequence[np.ndarray], bos: int, log: Log) -> Prefix | None:
    """The prefix ``mode`` asks for, its KV cache computed by the float model; None for no prefix."""
    if mode == "none":
        return None
    if mode == "auto":
        ids = detect_prefix(sess, acts, gen, path, seqs[:DETECT_SEQUENCES], bos, log)
        if not ids:
            log(f"prefix: no outlier tokens (peak |activation| > {OUTLIER_RATIO:g}x median) found; no prefix")
            return None
    else:
        ids = [bos] if mode == "bos" else list(mode)
    prefix = gen.compute_prefix(ids)
    log(f"prefix: [{format_ids(ids)}], {prefix.length} tokens, float KV cache {prefix.kv_bytes / 1024:.0f} KiB")
    return prefix


def save_prefix(prefix: Prefix, path: Path) -> None:
    """Write prefix.npz with the command's other outputs: a half-written cache beside a model would
    silently corrupt it."""
    with modelio.atomic_outputs(path) as (tmp,):
        prefix.save(tmp)


def declares_prefix(model: Any) -> bool:
    """Whether the model runs after a prefix, whose KV cache is the prefix.npz beside it."""
    return any(e.key == PREFIX_META and e.value for e in model.metadata_props)


def input_files(model: Any, path: str | os.PathLike) -> dict[Path, str]:
    """The files a command reads with the model at ``path`` (modelio.model_files), with its prefix.npz
    when it declares a prefix (beside a model that does not, a prefix.npz is some sibling's)."""
    files = modelio.model_files(model, path)
    prefix = Path(path).with_name(PREFIX_FILE)
    if declares_prefix(model) and prefix.is_file():
        files[prefix] = "the input's prefix.npz"
    return files


def calibration_feeds(sess: Any, path: str, acts: Sequence[str], calib: Any, prefix_mode: str | list[int],
                      samples: int, seqlen: int, log: Log) -> tuple[list[dict[str, np.ndarray]], Prefix | None, str]:
    """Feeds to calibrate on (after the prefix ``prefix_mode`` picks, if any), the prefix, and their origin.

    Shared by range calibration, the smoothing statistics and GPTQ's Hessians, so all see
    activations exactly as the quantized model will: after the prefix's float KV cache, without
    the sink.
    """
    if calib is not None and not isinstance(calib, (str, os.PathLike)):
        feeds = [dict(f) for f in calib]
        if not feeds:
            raise TtfscError("calibration feeds are empty; give at least one input dict.")
        if prefix_mode not in ("auto", "none"):
            raise TtfscError("--prefix needs a decoder calibrated on text; given feeds cannot take a prefix.")
        return feeds, None, f"given feeds: {len(feeds)} batches"
    gen = decoder(sess, path)
    seqs, desc = calibration_sequences(gen, path, calib, samples, seqlen, log)
    prefix = choose_prefix(prefix_mode, sess, acts, gen, path, seqs, bos_id(path), log)
    gen = decoder(sess, path, prefix)
    return [gen.feeds(gen.strip_bos(ids)) for ids in seqs], prefix, desc
