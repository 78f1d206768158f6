"""Compress a site's votes into counts of unique vote patterns.

Pixels are conditionally independent given their true class, so the EM likelihood depends on the pixels only
through the counts of (voter tuple, vote pattern, gold value). EM on those counts is exactly EM on the pixels
at a tiny fraction of the memory; per-site posteriors are then a lookup pattern -> posterior.

Counts table (``PATTERN_COLUMNS``): ``voters`` = the site's sorted labeller ids joined by ``SEP``; ``votes``
= one digit per voter, in the same order, with the class code (0 background, 1..C class, C+1 unclassed);
``zone`` = pixel stratum (0 interior, 1 within ``edge_zone_px`` of some voter's boundary; see em.py);
``gold`` = reference class code or -1 (no reference); ``count`` = number of footprint pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

SEP = "\x1f"
PATTERN_COLUMNS = ["voters", "votes", "zone", "gold", "count"]
_KEY_LIMIT = 2**62


@dataclass
class SitePatterns:
    """Unique patterns of one site: ``votes`` (u, n_voters) uint8, ``zone`` (u,), ``gold`` (u,), ``count``
    (u,), and ``inverse`` mapping each footprint pixel to its pattern row (None when not requested)."""

    votes: np.ndarray
    zone: np.ndarray
    gold: np.ndarray
    count: np.ndarray
    inverse: np.ndarray | None


def site_patterns(
    codes: np.ndarray,
    gold: np.ndarray | None,
    n_obs: int,
    zone: np.ndarray | None = None,
    n_zones: int = 2,
    with_inverse: bool = True,
) -> SitePatterns:
    """Unique (vote pattern, zone, gold) rows of ``codes`` (n_voters, n_pixels) with codes < ``n_obs``.

    Uses a mixed-radix integer key (bincount when the key space is small, else unique); falls back to
    row-wise unique for very many voters. The counts pass skips the per-pixel ``inverse`` (memory).
    """
    n, npx = codes.shape
    g = np.full(npx, -1, np.int64) if gold is None else gold.astype(np.int64)
    z = np.zeros(npx, np.int64) if zone is None else zone.astype(np.int64)
    n_gold_vals = n_obs + 1  # gold + 1 in 0..n_obs
    tail = n_zones * n_gold_vals
    if n_obs**n * tail < _KEY_LIMIT:
        radix = n_obs ** np.arange(n, dtype=np.int64)
        key = np.zeros(npx, np.int64)
        for j in range(n - 1, -1, -1):  # Horner: sum_j codes[j] * n_obs**j
            key *= n_obs
            key += codes[j]
        key *= n_zones
        key += z
        key *= n_gold_vals
        key += g + 1
        space = n_obs**n * tail
        if space <= 4 * npx + 4096:
            counts = np.bincount(key, minlength=space)
            present = np.flatnonzero(counts)
            ukey, ucount, inverse = present.astype(np.int64), counts[present], None
            if with_inverse:
                lookup = np.empty(space, np.int64)
                lookup[present] = np.arange(len(present))
                inverse = lookup[key]
        elif with_inverse:
            ukey, inverse, ucount = np.unique(key, return_inverse=True, return_counts=True)
        else:
            (ukey, ucount), inverse = np.unique(key, return_counts=True), None
        ugold = ukey % n_gold_vals - 1
        uzone = (ukey // n_gold_vals) % n_zones
        rest = ukey // tail
        votes = ((rest[:, None] // radix[None, :]) % n_obs).astype(np.uint8)
    else:
        stacked = np.concatenate([codes.T.astype(np.int64), z[:, None], g[:, None]], axis=1)
        urows, inverse, ucount = np.unique(stacked, axis=0, return_inverse=True, return_counts=True)
        votes, uzone, ugold = urows[:, :n].astype(np.uint8), urows[:, n], urows[:, n + 1]
    inverse = inverse.reshape(-1) if with_inverse else None
    return SitePatterns(votes, uzone.astype(np.int8), ugold.astype(np.int8), ucount.astype(np.int64), inverse)


def edge_zone(masks: np.ndarray, width_px: int) -> np.ndarray:
    """Pixels within ``width_px`` (4-connected steps) of any voter's field boundary, both sides.

    ``masks`` is (n_voters, height, width) bool. Boundary errors (jittered edges) and omission/commission
    errors have very different rates, so the EM gives each labeller one confusion per zone; the zone is
    computed from the votes only, so it exists off gold too. The tile edge is not a boundary.
    """
    n, h, w = masks.shape
    out = np.zeros((h, w), bool)
    if width_px <= 0 or n == 0:
        return out
    # A pixel is on a boundary when a 4-neighbour differs in some voter's mask (both sides are marked).
    dx = (masks[:, :, 1:] != masks[:, :, :-1]).any(axis=0)
    dy = (masks[:, 1:, :] != masks[:, :-1, :]).any(axis=0)
    out[:, 1:] |= dx
    out[:, :-1] |= dx
    out[1:, :] |= dy
    out[:-1, :] |= dy
    for _ in range(width_px - 1):
        grown = out.copy()
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        out = grown
    return out


def votes_to_strings(votes: np.ndarray) -> list[str]:
    if votes.shape[1] == 0:
        return [""] * votes.shape[0]
    buf = (votes.astype(np.uint8) + 48).tobytes()
    w = votes.shape[1]
    return [buf[i * w : (i + 1) * w].decode("ascii") for i in range(votes.shape[0])]


def strings_to_votes(strings: Sequence[str], n: int) -> np.ndarray:
    if n == 0:
        return np.zeros((len(strings), 0), np.uint8)
    buf = np.frombuffer("".join(strings).encode("ascii"), dtype=np.uint8)
    return (buf.reshape(len(strings), n) - 48).astype(np.uint8)


def patterns_frame(voters: Sequence[str], pats: SitePatterns) -> pd.DataFrame:
    """Counts rows of one site."""
    return counts_frame([(voters, pats)])


def counts_frame(items: Sequence[tuple[Sequence[str], SitePatterns]]) -> pd.DataFrame:
    """Summed counts rows of many sites, built with one DataFrame (pandas overhead is per frame)."""
    if not items:
        return empty_counts()
    voters = np.concatenate([np.full(len(p.count), SEP.join(v), dtype=object) for v, p in items])
    votes = [x for _, p in items for x in votes_to_strings(p.votes)]
    df = pd.DataFrame(
        {
            "voters": voters,
            "votes": np.asarray(votes, dtype=object),
            "zone": np.concatenate([p.zone for _, p in items]).astype(np.int64),
            "gold": np.concatenate([p.gold for _, p in items]).astype(np.int64),
            "count": np.concatenate([p.count for _, p in items]).astype(np.int64),
        },
        columns=PATTERN_COLUMNS,
    )
    return sum_counts([df])


SITE_COUNT_COLUMNS = ["site_id", *PATTERN_COLUMNS]


def site_counts_frame(items: Sequence[tuple[str, Sequence[str], SitePatterns]]) -> pd.DataFrame:
    """Counts rows per site (``site_id`` first), sorted by (site_id, votes, zone, gold): the persisted
    form, so a later version can re-sum unchanged sites' counts without recomputing them."""
    if not items:
        return empty_site_counts()
    df = pd.DataFrame(
        {
            "site_id": np.concatenate([np.full(len(p.count), str(s), dtype=object) for s, _, p in items]),
            "voters": np.concatenate([np.full(len(p.count), SEP.join(v), dtype=object) for _, v, p in items]),
            "votes": np.asarray([x for _, _, p in items for x in votes_to_strings(p.votes)], dtype=object),
            "zone": np.concatenate([p.zone for _, _, p in items]).astype(np.int64),
            "gold": np.concatenate([p.gold for _, _, p in items]).astype(np.int64),
            "count": np.concatenate([p.count for _, _, p in items]).astype(np.int64),
        },
        columns=SITE_COUNT_COLUMNS,
    )
    # site_patterns rows are unique per (votes, zone, gold) within a site: sorting fixes the order.
    out = df.sort_values(["site_id", "votes", "zone", "gold"], kind="stable")
    return out.reset_index(drop=True)


def empty_site_counts() -> pd.DataFrame:
    out = empty_counts()
    out.insert(0, "site_id", pd.Series(dtype=object))
    return out


def sum_counts(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate and sum counts tables (associative: batches can be reduced in any order)."""
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return empty_counts()
    df = pd.concat(frames, ignore_index=True)
    out = df.groupby(["voters", "votes", "zone", "gold"], sort=True, as_index=False)["count"].sum()
    return out[PATTERN_COLUMNS]


def empty_counts() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "voters": pd.Series(dtype=object),
            "votes": pd.Series(dtype=object),
            "zone": pd.Series(dtype="int64"),
            "gold": pd.Series(dtype="int64"),
            "count": pd.Series(dtype="int64"),
        }
    )
