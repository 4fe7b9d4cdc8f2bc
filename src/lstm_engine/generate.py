"""Sampling tokens from a language model's logits: temperature, top-k, top-p (nucleus), greedy at 0."""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterator

import numpy as np

from .layers import Dense, Dropout


def check_sampling(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
                   seed: Any) -> tuple[int, float, int | None, float | None, np.random.Generator]:
    """Validated sampling arguments, and the random generator the seed gives."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    if isinstance(seed, np.random.Generator):
        rng = seed
    elif seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        rng = np.random.default_rng(seed)
    else:
        raise ValueError(f"seed: expected None, an integer >= 0 or a numpy Generator, got {seed!r}")
    return (int(max_new_tokens), float(temperature), None if top_k is None else int(top_k),
            None if top_p is None else float(top_p), rng)


def sample(scores: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
           rng: np.random.Generator) -> np.ndarray:
    """One token id per row of scores (B, V): logits or log-probabilities."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any() or np.isneginf(scores.max(axis=1)).any():
        raise ValueError("generate: the model's scores for the next token are NaN or all -inf")
    if temperature == 0:
        return scores.argmax(axis=1)
    B, V = scores.shape
    z = scores / temperature
    certain = np.isposinf(z)
    if certain.any():
        # +inf marks the only possible tokens of its row.
        rows = certain.any(axis=1)
        z[rows] = np.where(certain[rows], 0.0, -np.inf)
    if top_k is not None and top_k < V:
        # Everything below the k-th largest score is dropped (ties at the k-th are kept).
        kth = np.partition(z, V - top_k, axis=1)[:, V - top_k: V - top_k + 1]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p
        # Keep a token while the mass of the likelier ones is still short of top_p: the smallest
        # set reaching top_p, and never fewer than one token.
        keep_sorted = before < top_p
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        p = np.where(keep, p, 0)
        p /= p.sum(axis=1, keepdims=True)
    u = rng.random((B, 1))
    ids = (np.cumsum(p, axis=1) < u).sum(axis=1)
    # Rounding can leave the cumulative sum just below u: fall back to the last kept token.
    last = V - 1 - np.argmax(p[:, ::-1] > 0, axis=1)
    return np.minimum(ids, last)


def check_language_model(model: Any, output_size: int | None) -> bool:
    """Raise ValueError unless the model maps token ids to scores over those ids; True if the scores are probabilities."""
    if not model.is_chain:
        raise ValueError("generate: the model must be a chain of layers from token ids to scores "
                         "(Embedding -> recurrent layers -> Dense); feed a graph model with session.step")
    if not model.takes_ids:
        raise ValueError("generate: the model must start with an Embedding (token ids in) and end in logits")
    vocab = model.layers[0].num_embeddings
    if output_size is None or output_size > vocab:
        raise ValueError(f"generate: the model outputs {output_size} scores per step but its Embedding "
                         f"takes ids below {vocab}; sampled ids must be valid inputs")
    # A softmax head gives probabilities, which are sampled through their logarithm.
    head = [layer for layer in model.layers if not isinstance(layer, Dropout)][-1]
    return isinstance(head, Dense) and head.activation == "softmax"


def sample_next(scores: np.ndarray, log_probs: bool, temperature: float, top_k: int | None,
                top_p: float | None, rng: np.random.Generator) -> np.ndarray:
    """One token id per row of a language model's output (B, V): logits, or probabilities if log_probs."""
    if log_probs:
        with np.errstate(divide="ignore"):
            scores = np.log(scores)
    return sample(scores, temperature, top_k, top_p, rng)


def generate_tokens(session: Any, prompt_ids: Any, max_new_tokens: Any, temperature: Any, top_k: Any,
                    top_p: Any, seed: Any) -> Iterator:
    """Validate everything now, then return the lazy iterator of sampled ids (see Session.generate)."""
    model = session.model
    log_probs = check_language_model(model, session.output_size)
    n, temp, k, p, rng = check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    B = session.batch_size
    ids = np.asarray(prompt_ids)
    if ids.size == 0:
        raise ValueError("prompt_ids: expected at least one token to start from")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"prompt_ids: token ids must be integers, got dtype {ids.dtype}")
    if ids.ndim == 1 and B == 1:
        ids = ids[None]
        single = True
    elif ids.ndim == 2 and ids.shape[0] == B:
        single = False
    else:
        want = "(steps,) or (1, steps)" if B == 1 else f"({B}, steps)"
        raise ValueError(f"prompt_ids: expected shape {want} for a session of batch size {B}, got {ids.shape}")
    model.layers[0].check_ids(ids, "prompt_ids")
    return _tokens(session, ids, n, temp, k, p, rng, log_probs, single)


def _tokens(session: Any, ids: np.ndarray, n: int, temperature: float, top_k: int | None,
            top_p: float | None, rng: np.random.Generator, log_probs: bool, single: bool) -> Iterator:
    if n == 0:
        return
    scores = session.feed(ids)[:, -1]
    out = np.empty_like(scores)
    for i in range(n):
        tok = sample_next(scores, log_probs, temperature, top_k, top_p, rng)
        # Feed the token before handing it out, so that the state always includes what was yielded.
        scores = session.step(tok, out=out)
        yield int(tok[0]) if single else tok
