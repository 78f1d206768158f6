"""Pooled Dawid-Skene / STAPLE EM on vote-pattern counts.

Binary model (the must): truth field/background, each labeller j has sensitivity s_j = P(vote field | field)
and specificity p_j = P(vote background | background), one pair per pixel zone z (0 interior, 1 edge band:
within ``edge_zone_px`` of some voter's boundary, see patterns.edge_zone), and one field prior per zone.
Zones matter because boundary jitter and omission/commission errors have very different rates: with a
single pair per labeller, three sloppy boundaries outvote one precise one at every edge pixel. Zones come
from the votes only, so they exist on every site; ``edge_zone_px = 0`` gives plain Dawid-Skene. Fitted once
over the counts of all sites (see patterns.py), gold pixels clamped to the reference, initialised from the
gold skills of ``labeller_quality``. The M-step uses ``params.smoothing`` pseudo-pixels per confusion cell
and per prior (MAP).

Inversion guard: a labeller with s + p < 1 would be read "inverted" (their field votes taken as
background). Unless their own gold pixels show s + p < 1, each M-step projects (s, p) back to
s + p >= 1 + ``guard_margin`` by an equal shift, which is what keeps EM out of the mirror solution.

Class model (cheap extra): over field pixels (rows weighted by the field posterior), truth in 1..C and per
labeller confusion P(observed code | true class) with observed codes 0..C+1 (background, classes,
unclassed); gold class pixels clamped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
from scipy.special import expit, logsumexp

from tasks.consensus.params import ConsensusParams
from tasks.consensus.patterns import SEP, strings_to_votes, sum_counts

_EPS = 1e-6


@dataclass
class _Entries:
    """Sparse (row, labeller, observed code) triples of the pattern rows."""

    row: np.ndarray
    lab: np.ndarray
    obs: np.ndarray
    weight: np.ndarray  # pixel count per row
    zone: np.ndarray  # per row
    gold: np.ndarray  # per row, -1 none
    labellers: tuple[str, ...]


def build_entries(counts: pd.DataFrame) -> _Entries:
    counts = sum_counts([counts])
    labellers = sorted({v for s in counts["voters"].unique() for v in (s.split(SEP) if s else [])})
    index = {v: i for i, v in enumerate(labellers)}
    rows, labs, obs = [], [], []
    for voters, grp in counts.groupby("voters", sort=True):
        ids = voters.split(SEP) if voters else []
        if not ids:
            continue
        votes = strings_to_votes(grp["votes"].tolist(), len(ids))
        rows.append(np.repeat(grp.index.to_numpy(), len(ids)))
        labs.append(np.tile(np.array([index[v] for v in ids], np.int64), len(grp)))
        obs.append(votes.reshape(-1))

    def cat(xs, dt):
        return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

    return _Entries(
        row=cat(rows, np.int64),
        lab=cat(labs, np.int64),
        obs=cat(obs, np.uint8),
        weight=counts["count"].to_numpy(np.float64),
        zone=counts["zone"].to_numpy(np.int64),
        gold=counts["gold"].to_numpy(np.int64),
        labellers=tuple(labellers),
    )


def apply_inversion_guard(sens, spec, allowed, margin: float):
    """Project (s, p) of non-allowed labellers onto s + p >= 1 + margin by an equal shift (box-clipped)."""
    sens, spec = np.clip(sens, _EPS, 1 - _EPS), np.clip(spec, _EPS, 1 - _EPS)
    bad = (sens + spec < 1 + margin) & ~np.asarray(allowed, bool)
    if bad.any():
        d = (1 + margin - sens[bad] - spec[bad]) / 2
        s2 = np.clip(sens[bad] + d, _EPS, 1 - _EPS)
        p2 = np.clip(np.maximum(spec[bad] + d, 1 + margin - s2), _EPS, 1 - _EPS)
        sens, spec = sens.copy(), spec.copy()
        sens[bad] = np.maximum(s2, 1 + margin - p2)
        spec[bad] = p2
    return sens, spec


def initial_skills(labellers: Sequence[str], lq: pd.DataFrame | None, params: ConsensusParams):
    """Gold skills (area-pooled) where known, population mean otherwise, fallbacks with no gold at all."""
    known: dict[str, tuple[float, float]] = {}
    if lq is not None and len(lq) and "field_skill_pooled" in lq.columns:
        for lab, fs, nfs, n in lq[
            ["labeller_id", "field_skill_pooled", "nofield_skill_pooled", "n_gold"]
        ].itertuples(index=False):
            if n > 0 and np.isfinite(fs) and np.isfinite(nfs):
                known[str(lab)] = (float(fs), float(nfs))
    if known:
        arr = np.array(list(known.values()))
        d_s, d_p = float(arr[:, 0].mean()), float(arr[:, 1].mean())
    else:
        d_s, d_p = params.fallback_field_skill, params.fallback_nofield_skill
    sens = np.array([known.get(v, (d_s, d_p))[0] for v in labellers], float)
    spec = np.array([known.get(v, (d_s, d_p))[1] for v in labellers], float)
    return np.clip(sens, 0.02, 0.98), np.clip(spec, 0.02, 0.98)


def _binary_counts(e: _Entries, vlab: np.ndarray, post: np.ndarray, n: int):
    """Expected (tp, fn, fp, tn) per virtual labeller (labeller x zone) given row posteriors."""
    wp, wn = e.weight * post, e.weight * (1 - post)
    f = e.obs > 0
    a, b = wp[e.row], wn[e.row]
    tp = np.bincount(vlab[f], a[f], n)
    fn = np.bincount(vlab[~f], a[~f], n)
    fp = np.bincount(vlab[f], b[f], n)
    tn = np.bincount(vlab[~f], b[~f], n)
    return tp, fn, fp, tn


def field_logit(prior_row, sens, spec, vlab: np.ndarray, field_vote: np.ndarray, row: np.ndarray, R: int):
    """log P(field | votes) - log P(background | votes) per row from sparse votes."""
    llr = np.where(
        field_vote, np.log(sens[vlab]) - np.log1p(-spec[vlab]), np.log1p(-sens[vlab]) - np.log(spec[vlab])
    )
    return np.log(prior_row) - np.log1p(-prior_row) + np.bincount(row, llr, R)


@dataclass
class EMModel:
    """Fitted pooled EM: small and picklable; posteriors for any site are computed from it.

    ``sens`` / ``spec`` are each labeller's overall (zone-pooled) skills, reported as the latent skills, and
    ``iou`` the expected IoU of their masks against the soft consensus (uses every site, not just gold);
    ``sens_zone`` / ``spec_zone`` (J, Z) and ``prior_zone`` (Z,) are what posteriors use.
    """

    labeller_ids: tuple[str, ...]
    sens: np.ndarray
    spec: np.ndarray
    iou: np.ndarray
    sens_zone: np.ndarray
    spec_zone: np.ndarray
    prior_zone: np.ndarray
    prior_field: float
    inversion_allowed: np.ndarray
    n_pixels: np.ndarray
    n_gold_pixels: np.ndarray
    n_iter: int
    converged: bool
    log_likelihood: float
    class_names: tuple[str, ...] = ()
    class_prior: np.ndarray | None = None
    class_conf: np.ndarray | None = None  # (J, C, C+2): P(observed code | true class)

    @property
    def n_zones(self) -> int:
        return int(self.prior_zone.shape[0])

    def latent_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "labeller_id": list(self.labeller_ids),
                "latent_sensitivity": self.sens,
                "latent_specificity": self.spec,
                "latent_iou": self.iou,
                "inversion_allowed": self.inversion_allowed,
                "n_pixels": self.n_pixels,
                "n_gold_pixels": self.n_gold_pixels,
            }
        )

    def to_dict(self) -> dict:
        """JSON-ready fields; floats survive a JSON round trip exactly (``repr`` is shortest-exact)."""
        out: dict = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, np.generic):
                v = v.item()
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> EMModel:
        """Inverse of :meth:`to_dict` (same dtypes as a fitted model)."""
        kw = dict(d)
        for name in ("labeller_ids", "class_names"):
            kw[name] = tuple(str(x) for x in kw.get(name, ()))
        for name, dt in _ARRAY_FIELDS.items():
            if kw.get(name) is not None:
                kw[name] = np.asarray(kw[name], dtype=dt)
        J, Z = len(kw["labeller_ids"]), len(kw["prior_zone"])
        kw["sens_zone"] = kw["sens_zone"].reshape(J, Z)
        kw["spec_zone"] = kw["spec_zone"].reshape(J, Z)
        if kw.get("class_conf") is not None:
            C = len(kw["class_prior"])
            kw["class_conf"] = kw["class_conf"].reshape(J, C, C + 2)
        return cls(**kw)

    def _skills(self, voters: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n_voters, Z) skills; labellers unseen in the fit get the per-zone mean of fitted labellers."""
        idx = {v: i for i, v in enumerate(self.labeller_ids)}
        if len(self.labeller_ids):
            d_s, d_p = self.sens_zone.mean(axis=0), self.spec_zone.mean(axis=0)
        else:
            d_s, d_p = np.full(self.n_zones, 0.75), np.full(self.n_zones, 0.9)
        s = np.array([self.sens_zone[idx[v]] if v in idx else d_s for v in voters], float)
        p = np.array([self.spec_zone[idx[v]] if v in idx else d_p for v in voters], float)
        return s.reshape(len(voters), self.n_zones), p.reshape(len(voters), self.n_zones)

    def field_posterior(
        self, voters: Sequence[str], votes: np.ndarray, zone: np.ndarray | None = None
    ) -> np.ndarray:
        """P(field) per pattern row; ``votes`` (u, n_voters) class codes in ``voters`` order."""
        z = np.zeros(votes.shape[0], np.int64) if zone is None else np.minimum(zone, self.n_zones - 1)
        s, p = self._skills(voters)
        s, p = s[:, z].T, p[:, z].T  # (u, n_voters)
        f = votes > 0
        llr = np.where(f, np.log(s) - np.log1p(-p), np.log1p(-s) - np.log(p)).sum(axis=1)
        pr = self.prior_zone[z]
        return expit(np.log(pr) - np.log1p(-pr) + llr)

    def class_posterior(self, voters: Sequence[str], votes: np.ndarray) -> np.ndarray | None:
        """P(class k | field, votes) per pattern row, shape (u, C); None without a class model."""
        if self.class_conf is None:
            return None
        idx = {v: i for i, v in enumerate(self.labeller_ids)}
        mean_conf = self.class_conf.mean(axis=0)
        logp = np.tile(np.log(self.class_prior), (votes.shape[0], 1))
        for j, v in enumerate(voters):
            conf = self.class_conf[idx[v]] if v in idx else mean_conf
            logp += np.log(conf[:, votes[:, j]]).T
        return np.exp(logp - logsumexp(logp, axis=1, keepdims=True))


_ARRAY_FIELDS = {
    "sens": np.float64,
    "spec": np.float64,
    "iou": np.float64,
    "sens_zone": np.float64,
    "spec_zone": np.float64,
    "prior_zone": np.float64,
    "inversion_allowed": bool,
    "n_pixels": np.int64,
    "n_gold_pixels": np.int64,
    "class_prior": np.float64,
    "class_conf": np.float64,
}


def fit_em(counts: pd.DataFrame, lq: pd.DataFrame | None, params: ConsensusParams) -> EMModel:
    """Fit the pooled binary model (and the class model when classed votes exist)."""
    e = build_entries(counts)
    J, R, s = len(e.labellers), len(e.weight), params.smoothing
    Z = max(int(e.zone.max(initial=0)) + 1, 2 if params.edge_zone_px > 0 else 1)
    vlab = e.lab * Z + e.zone[e.row]  # virtual labeller = (labeller, zone of the pixel)
    sens0, spec0 = initial_skills(e.labellers, lq, params)
    sens, spec = np.repeat(sens0, Z), np.repeat(spec0, Z)
    gold_bin = np.where(e.gold < 0, -1, (e.gold > 0).astype(np.int64))
    clamp = gold_bin >= 0
    field_vote = e.obs > 0
    # Gold-only skills (pooled over zones) decide whether an inversion is real.
    w_gold = np.where(clamp, e.weight, 0.0)
    g_e = _Entries(e.row, e.lab, e.obs, w_gold, e.zone, e.gold, e.labellers)
    tp, fn, fp, tn = _binary_counts(g_e, e.lab, np.where(clamp, gold_bin, 0).astype(float), J)
    has_gold = (tp + fn > 0) & (tn + fp > 0)
    allowed = has_gold & ((tp + s) / (tp + fn + 2 * s) + (tn + s) / (tn + fp + 2 * s) < 1)
    allowed_v = np.repeat(allowed, Z)
    sens, spec = apply_inversion_guard(sens, spec, allowed_v, params.guard_margin)
    zw = np.bincount(e.zone, e.weight, Z)
    g_field = np.bincount(e.zone, w_gold * gold_bin.clip(0), Z)
    g_tot = np.bincount(e.zone, w_gold, Z)
    prior = np.where(g_tot > 0, (g_field + s) / (g_tot + 2 * s), 0.5).clip(_EPS, 1 - _EPS)
    converged, n_iter = False, 0
    while n_iter < params.em_max_iter:
        n_iter += 1
        post = expit(field_logit(prior[e.zone], sens, spec, vlab, field_vote, e.row, R))
        post[clamp] = gold_bin[clamp]
        tp, fn, fp, tn = _binary_counts(e, vlab, post, J * Z)
        new_sens, new_spec = apply_inversion_guard(
            (tp + s) / (tp + fn + 2 * s), (tn + s) / (tn + fp + 2 * s), allowed_v, params.guard_margin
        )
        new_prior = ((np.bincount(e.zone, e.weight * post, Z) + s) / (zw + 2 * s)).clip(_EPS, 1 - _EPS)
        delta = max(
            np.abs(new_sens - sens).max(initial=0),
            np.abs(new_spec - spec).max(initial=0),
            np.abs(new_prior - prior).max(initial=0),
        )
        sens, spec, prior = new_sens, new_spec, new_prior
        if delta < params.em_tol:
            converged = True
            break
    post = expit(field_logit(prior[e.zone], sens, spec, vlab, field_vote, e.row, R))
    post[clamp] = gold_bin[clamp]
    tp, fn, fp, tn = _binary_counts(e, e.lab, post, J)  # zone-pooled latent skills for reporting
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), 1.0)
    model = EMModel(
        labeller_ids=e.labellers,
        sens=(tp + s) / (tp + fn + 2 * s),
        spec=(tn + s) / (tn + fp + 2 * s),
        iou=iou,
        sens_zone=sens.reshape(J, Z),
        spec_zone=spec.reshape(J, Z),
        prior_zone=prior,
        prior_field=float((e.weight @ post) / max(e.weight.sum(), 1.0)),
        inversion_allowed=allowed,
        n_pixels=np.bincount(e.lab, e.weight[e.row], J).astype(np.int64),
        n_gold_pixels=np.bincount(e.lab, w_gold[e.row], J).astype(np.int64),
        n_iter=n_iter,
        converged=converged,
        log_likelihood=_log_likelihood(e, vlab, prior[e.zone], sens, spec, field_vote, gold_bin, R),
        class_names=tuple(params.class_names),
    )
    _fit_classes(model, e, post, params)
    return model


def _log_likelihood(e: _Entries, vlab, prior_row, sens, spec, field_vote, gold_bin, R) -> float:
    l1 = np.log(prior_row) + np.bincount(
        e.row, np.where(field_vote, np.log(sens[vlab]), np.log1p(-sens[vlab])), R
    )
    l0 = np.log1p(-prior_row) + np.bincount(
        e.row, np.where(field_vote, np.log1p(-spec[vlab]), np.log(spec[vlab])), R
    )
    per_row = np.where(gold_bin == 1, l1, np.where(gold_bin == 0, l0, np.logaddexp(l1, l0)))
    return float(e.weight @ per_row)


def _fit_classes(model: EMModel, e: _Entries, post_field: np.ndarray, params: ConsensusParams) -> None:
    C, O, J, R, s = params.n_classes, params.n_classes + 2, len(e.labellers), len(e.weight), params.smoothing
    classed = (e.obs >= 1) & (e.obs <= C)
    if C < 1 or not classed.any():
        return
    w = e.weight * post_field
    clamp = (e.gold >= 1) & (e.gold <= C)
    init = np.ones((C, O))
    init[np.arange(C), np.arange(1, C + 1)] = 4.0
    conf = np.tile(init / init.sum(axis=1, keepdims=True), (J, 1, 1))
    prior = np.full(C, 1.0 / C)
    flat = e.lab * O + e.obs.astype(np.int64)
    for _ in range(params.em_max_iter):
        logp = np.log(prior)[None, :] + np.stack(
            [np.bincount(e.row, np.log(conf[e.lab, k, e.obs]), R) for k in range(C)], axis=1
        )
        post = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        post[clamp] = np.eye(C)[e.gold[clamp] - 1]
        new = np.stack(
            [np.bincount(flat, (w * post[:, k])[e.row], J * O).reshape(J, O) for k in range(C)], axis=1
        )
        new = (new + s) / (new + s).sum(axis=2, keepdims=True)
        new_prior = (w @ post + s) / (w.sum() + C * s)
        delta = max(np.abs(new - conf).max(), np.abs(new_prior - prior).max())
        conf, prior = new, new_prior
        if delta < params.em_tol:
            break
    model.class_conf, model.class_prior = conf, prior
