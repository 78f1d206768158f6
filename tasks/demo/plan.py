"""The labelling campaign: site roles, land cover, who labels what and when.

Decided up front (before any pixel is drawn) so that the drifter's quality can follow its own timeline and
so tiny regions still contain every role and every labeller where the tests need them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from tasks.demo.labellers import CROWD, EXPERT
from tasks.demo.layout import SiteBox, scene_sites

ROLES = ("gold", "multi", "single", "unlabelled")
NO_FIELD_COVERS = ("grassland", "shrubland", "settlement", "water")
MIN_ROLE_SITES = {"gold": 3, "multi": 4, "single": 3, "unlabelled": 3}
ROLE_SHARE = {"gold": 0.15, "multi": 0.35, "single": 0.25}
CAMPAIGN_START = datetime(2026, 3, 1, tzinfo=UTC)
CAMPAIGN_DAYS = 60
TAG_PLAN = 1  # rng stream tags: keep every random decision on its own reproducible stream


@dataclass(frozen=True)
class SitePlan:
    box: SiteBox
    role: str
    land_cover: str

    @property
    def site_id(self) -> str:
        return self.box.site_id


@dataclass(frozen=True)
class Assignment:
    site_id: str
    labeller_id: str
    completed_at: str | None  # ISO-8601 UTC ("...Z"); None = pending
    time_rank: float  # 0..1 position in this labeller's own completed timeline (0 for pending)

    @property
    def completed(self) -> bool:
        return self.completed_at is not None


@dataclass(frozen=True)
class Plan:
    sites: list[SitePlan]
    assignments: list[Assignment]

    def completed_for(self, site_id: str) -> list[Assignment]:
        return [a for a in self.assignments if a.site_id == site_id and a.completed]


def role_counts(n_sites: int) -> dict[str, int]:
    """Target shares, with floors so every role exists even in an 18-site region."""
    if n_sites < sum(MIN_ROLE_SITES.values()):
        raise ValueError(f"need at least {sum(MIN_ROLE_SITES.values())} sites, got {n_sites}")
    counts = {r: max(MIN_ROLE_SITES[r], round(ROLE_SHARE[r] * n_sites)) for r in ROLE_SHARE}
    counts["unlabelled"] = n_sites - sum(counts.values())
    while counts["unlabelled"] < MIN_ROLE_SITES["unlabelled"]:
        donor = max(ROLE_SHARE, key=lambda r: counts[r] - MIN_ROLE_SITES[r])
        counts[donor] -= 1
        counts["unlabelled"] += 1
    return counts


def _crew_sizes(rng: np.random.Generator, n_sites: int, min_total: int) -> list[int]:
    """3-5 labellers per site, bumped until the total covers ``min_total`` slots."""
    sizes = [int(k) for k in rng.integers(3, 6, size=n_sites)]
    while sum(sizes) < min_total and min(sizes) < 5:
        sizes[sizes.index(min(sizes))] += 1
    return sizes


def _take_cyclic(order: list[str], sizes: list[int]) -> list[list[str]]:
    """Deal labellers from a fixed cycle: consecutive picks are distinct and counts stay balanced."""
    out, pos = [], 0
    for k in sizes:
        out.append([order[(pos + j) % len(order)] for j in range(k)])
        pos += k
    return out


def _land_covers(rng: np.random.Generator, n: int) -> list[str]:
    """About 30% field-free covers in each role group (at least one when n >= 3), rest cropland."""
    n_free = 0 if n < 3 else max(1, round(0.3 * n))
    if n >= 3:
        n_free = min(n_free, n - 2)  # keep at least two cropland sites per group
    start = int(rng.integers(len(NO_FIELD_COVERS)))
    free = [NO_FIELD_COVERS[(start + i) % len(NO_FIELD_COVERS)] for i in range(n_free)]
    covers = free + ["cropland"] * (n - n_free)
    return [covers[i] for i in rng.permutation(n)]


def _timestamps(rng: np.random.Generator, n: int) -> list[str]:
    """Sorted working-hour timestamps spread over the campaign (minute resolution)."""
    days = rng.integers(0, CAMPAIGN_DAYS, size=n)
    minutes = rng.integers(7 * 60, 19 * 60, size=n)
    stamps = sorted(
        CAMPAIGN_START + timedelta(days=int(d), minutes=int(m)) for d, m in zip(days, minutes, strict=True)
    )
    return [s.strftime("%Y-%m-%dT%H:%M:00Z") for s in stamps]


def make_plan(seed: int, n_scenes: int, sites_per_side: int) -> Plan:
    rng = np.random.default_rng([seed, TAG_PLAN])
    boxes = [b for s in range(n_scenes) for b in scene_sites(s, sites_per_side)]
    counts = role_counts(len(boxes))
    perm = rng.permutation(len(boxes))
    role_of: dict[int, str] = {}
    pos = 0
    for role in ROLES:
        for i in perm[pos : pos + counts[role]]:
            role_of[int(i)] = role
        pos += counts[role]

    by_role = {r: sorted(i for i, rr in role_of.items() if rr == r) for r in ROLES}
    cover_of: dict[int, str] = {}
    for role in ROLES:
        for i, cover in zip(by_role[role], _land_covers(rng, len(by_role[role])), strict=True):
            cover_of[i] = cover
    sites = [SitePlan(b, role_of[b.index], cover_of[b.index]) for b in boxes]

    crowd = list(CROWD)
    crews: dict[int, list[str]] = {}
    gold_order = [crowd[i] for i in rng.permutation(len(crowd))]
    gold_sizes = _crew_sizes(rng, len(by_role["gold"]), 2 * len(crowd))
    for i, crew in zip(by_role["gold"], _take_cyclic(gold_order, gold_sizes), strict=True):
        crews[i] = [EXPERT, *crew]
    multi_order = [crowd[i] for i in rng.permutation(len(crowd))]
    multi_sizes = _crew_sizes(rng, len(by_role["multi"]), len(crowd))
    for i, crew in zip(by_role["multi"], _take_cyclic(multi_order, multi_sizes), strict=True):
        crews[i] = crew
    single_order = [crowd[i] for i in rng.permutation(len(crowd))]
    for i, crew in zip(
        by_role["single"], _take_cyclic(single_order, [1] * len(by_role["single"])), strict=True
    ):
        crews[i] = crew

    # Pending work: on ~40% of unlabelled sites and ~10% of multi sites (an extra labeller not yet done).
    pending: list[tuple[int, str]] = []
    unl = by_role["unlabelled"]
    for i in rng.choice(unl, size=max(2, math.ceil(0.4 * len(unl))), replace=False):
        pending.append((int(i), crowd[int(rng.integers(len(crowd)))]))
    multi = by_role["multi"]
    for i in rng.choice(multi, size=max(1, round(0.1 * len(multi))), replace=False):
        spare = [c for c in crowd if c not in crews[int(i)]]
        if spare:
            pending.append((int(i), spare[int(rng.integers(len(spare)))]))

    # Each labeller's completed sites get timestamps in random order over ~60 days.
    per_labeller: dict[str, list[int]] = {}
    for i in sorted(crews):
        for lab in crews[i]:
            per_labeller.setdefault(lab, []).append(i)
    assignments: list[Assignment] = []
    for lab in [EXPERT, *crowd]:
        idx = per_labeller.get(lab, [])
        order = rng.permutation(len(idx))
        stamps = _timestamps(rng, len(idx))
        denom = max(1, len(idx) - 1)
        for rank, k in enumerate(order):
            assignments.append(Assignment(boxes[idx[k]].site_id, lab, stamps[rank], rank / denom))
    for i, lab in pending:
        assignments.append(Assignment(boxes[i].site_id, lab, None, 0.0))
    assignments.sort(key=lambda a: (a.site_id, a.labeller_id))
    return Plan(sites=sites, assignments=assignments)
