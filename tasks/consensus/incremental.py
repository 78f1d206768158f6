"""Incremental consensus: per-site keys, and the global values carried from the previous version.

Two keys per labelled site (``tasks/store/reuse.py`` has the mechanism):

* the *input* key (``reuse_keys/consensus_inputs.parquet``): the site's labels and assignments
  (``site_label_keys``), its grid, footprint and role, the reference labellers, the parameters and the code.
  Pass 1 (the site's ``assignment_quality`` rows and vote-pattern counts) is a pure function of it.
* the *consensus* key (``reuse_keys/consensus.parquet``, what downstream stages depend on): the input key
  plus the global values the site's consensus actually used - its voters' EM skills and class confusions
  and the priors (method "em"), or its voters' merge weights (method "bayes").

The global values are refitted every run. On a reprocess (``Reuse.refit = False``) ``carry_model`` keeps a
labeller's previous values when the refit moved none of them by more than
``ConsensusParams.carry_tolerance`` (priors / merge defaults as one group), so one relabelled site does not
rewrite every site, while a labeller whose quality really moved (new gold) changes - and with it the key
of every site they mapped. The values used are written to ``consensus_model.json`` (exact floats) for the
next version to carry from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import shapely

from tasks.consensus.em import EMModel
from tasks.consensus.merge import BayesWeights, bayes_weights, merge_weights
from tasks.consensus.params import ConsensusParams
from tasks.store.grid import SiteGrid
from tasks.store.reuse import carry_close, code_key, content_key

MODEL_FORMAT = 1
CODE_PACKAGES = ("tasks.consensus", "tasks.store")
INPUTS_STAGE = "consensus_inputs"  # reuse_keys/<this>.parquet: the pass-1 (input) keys
STAGE = "consensus"  # reuse_keys/consensus.parquet: the per-site consensus keys downstream reads


def params_dump(params: ConsensusParams) -> dict:
    """The parameters a result depends on (``carry_tolerance`` only picks which values are used, and
    those are keyed themselves)."""
    return params.model_dump(mode="json", exclude={"carry_tolerance"})


def fit_key(params: ConsensusParams) -> str:
    """What the global values were fitted under; values fitted under other parameters are never carried."""
    return content_key(params_dump(params), code_key(*CODE_PACKAGES))


# ------------------------------------------------------------------------------------------- input keys
def site_input_keys(
    sites: pd.DataFrame,
    label_keys: Mapping[str, str],
    reference_labellers: Iterable[str],
    params: ConsensusParams,
    site_ids: Iterable[str] | None = None,
) -> dict[str, str]:
    """Input key of every site in ``site_ids`` (default: every site of ``sites`` with a label key, i.e.
    with assignments). ``label_keys``: ``site_label_keys`` of the sites' labels and assignments."""
    crs = getattr(sites, "crs", None)
    src_crs = "EPSG:4326" if crs is None else crs.to_string()  # its name, not one thread's spelling of it
    common = content_key(
        src_crs, sorted(str(r) for r in reference_labellers), params_dump(params), code_key(*CODE_PACKAGES)
    )
    wanted = None if site_ids is None else {str(s) for s in site_ids}
    has_geom = "geometry" in sites.columns
    out: dict[str, str] = {}
    for row in sites.to_dict("records"):
        sid = str(row["site_id"])
        if sid not in label_keys or (wanted is not None and sid not in wanted):
            continue
        grid = SiteGrid.from_row(row)
        geom = row.get("geometry") if has_geom else None
        wkb = None if geom is None else shapely.to_wkb(geom, output_dimension=2)
        site = [grid.crs, [float(x) for x in grid.transform], int(grid.width), int(grid.height)]
        out[sid] = content_key(common, label_keys[sid], site, wkb, str(row.get("role")))
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------- the model used
@dataclass
class ConsensusModel:
    """The global values every site's consensus reads: the pooled EM (method "em") or the merge weights
    (method "bayes"). ``fit_key`` names the parameters and code they were fitted under."""

    method: str
    fit_key: str
    em: EMModel | None = None
    bayes: BayesWeights | None = None

    @property
    def n_labellers(self) -> int:
        if self.em is not None:
            return len(self.em.labeller_ids)
        return len(self.bayes.table) if self.bayes is not None else 0

    def to_json(self) -> str:
        doc = {
            "format": MODEL_FORMAT,
            "method": self.method,
            "fit_key": self.fit_key,
            "em": self.em.to_dict() if self.em is not None else None,
            "bayes": None
            if self.bayes is None
            else {
                "table": {k: list(v) for k, v in sorted(self.bayes.table.items())},
                "defaults": list(self.bayes.defaults),
            },
        }
        return json.dumps(doc, sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ConsensusModel | None:
        """None for another format (a model this code cannot carry)."""
        doc = json.loads(text)
        if doc.get("format") != MODEL_FORMAT:
            return None
        bayes = doc.get("bayes")
        return cls(
            method=doc["method"],
            fit_key=doc["fit_key"],
            em=EMModel.from_dict(doc["em"]) if doc.get("em") is not None else None,
            bayes=None
            if bayes is None
            else BayesWeights(
                {str(k): tuple(float(x) for x in v) for k, v in bayes["table"].items()},
                tuple(float(x) for x in bayes["defaults"]),
            ),
        )


def fitted_model(em: EMModel | None, lq: pd.DataFrame | None, params: ConsensusParams) -> ConsensusModel:
    """The freshly fitted global values of this run."""
    if params.method == "em":
        return ConsensusModel("em", fit_key(params), em=em)
    return ConsensusModel("bayes", fit_key(params), bayes=bayes_weights(lq, params))


def _em_groups(m: EMModel) -> dict[str, np.ndarray]:
    g = {}
    for j, lab in enumerate(m.labeller_ids):
        parts = [m.sens_zone[j], m.spec_zone[j]]
        if m.class_conf is not None:
            parts.append(m.class_conf[j].ravel())
        g[f"labeller:{lab}"] = np.concatenate(parts).astype(np.float64)
    pri = [m.prior_zone] + ([m.class_prior] if m.class_prior is not None else [])
    g["priors"] = np.concatenate(pri).astype(np.float64)
    return g


def _em_compatible(new: EMModel, old: EMModel) -> bool:
    return (
        new.n_zones == old.n_zones
        and tuple(new.class_names) == tuple(old.class_names)
        and (new.class_conf is None) == (old.class_conf is None)
    )


def _carry_em(new: EMModel, old: EMModel, tol: float) -> tuple[EMModel, set[str]]:
    used, changed = carry_close(_em_groups(new), _em_groups(old), tol)
    Z = new.n_zones
    sens, spec = new.sens_zone.copy(), new.spec_zone.copy()
    conf = None if new.class_conf is None else new.class_conf.copy()
    for j, lab in enumerate(new.labeller_ids):
        v = np.asarray(used[f"labeller:{lab}"], np.float64)
        sens[j], spec[j] = v[:Z], v[Z : 2 * Z]
        if conf is not None:
            conf[j] = v[2 * Z :].reshape(conf.shape[1:])
    pri = np.asarray(used["priors"], np.float64)
    prior_zone = pri[:Z].copy()
    class_prior = None if new.class_prior is None else pri[Z:].copy()
    model = replace(
        new, sens_zone=sens, spec_zone=spec, class_conf=conf, prior_zone=prior_zone, class_prior=class_prior
    )
    return model, changed


def _bayes_groups(w: BayesWeights) -> dict[str, np.ndarray]:
    g = {f"labeller:{k}": np.asarray(v, np.float64) for k, v in w.table.items()}
    g["defaults"] = np.asarray(w.defaults, np.float64)
    return g


def _carry_bayes(new: BayesWeights, old: BayesWeights, tol: float) -> tuple[BayesWeights, set[str]]:
    used, changed = carry_close(_bayes_groups(new), _bayes_groups(old), tol)
    table = {k: tuple(float(x) for x in used[f"labeller:{k}"]) for k in new.table}
    return BayesWeights(table, tuple(float(x) for x in used["defaults"])), changed


def carry_model(
    new: ConsensusModel, old: ConsensusModel | None, tol: float
) -> tuple[ConsensusModel, set[str]]:
    """The values to use: ``old``'s per group (a labeller; the priors or merge defaults) unless ``new``
    moved by more than ``tol``. Returns (model, groups that took the new value); nothing is carried from a
    model fitted under other parameters, code or method."""
    if new.method == "em" and new.em is not None:
        groups = set(_em_groups(new.em))
        if old is None or old.fit_key != new.fit_key or old.em is None or not _em_compatible(new.em, old.em):
            return new, groups
        em, changed = _carry_em(new.em, old.em, tol)
        return replace(new, em=em), changed
    if new.method == "bayes" and new.bayes is not None:
        groups = set(_bayes_groups(new.bayes))
        if old is None or old.fit_key != new.fit_key or old.bayes is None:
            return new, groups
        w, changed = _carry_bayes(new.bayes, old.bayes, tol)
        return replace(new, bayes=w), changed
    return new, set()


def site_values(model: ConsensusModel, voters: Sequence[str], params: ConsensusParams) -> list:
    """Exactly the global values a site with ``voters`` reads (what its consensus key hashes)."""
    voters = list(voters)
    if model.method == "em":
        em = model.em
        if em is None:
            return ["em", voters, None]
        s, p = em._skills(voters)
        conf = None
        if em.class_conf is not None and voters:
            idx = {v: i for i, v in enumerate(em.labeller_ids)}
            mean_conf = em.class_conf.mean(axis=0)
            conf = np.stack([em.class_conf[idx[v]] if v in idx else mean_conf for v in voters])
        return ["em", voters, s, p, conf, em.prior_zone, em.class_prior]
    q, fs, nfs = merge_weights(voters, model.bayes, params)
    return ["bayes", voters, q, fs, nfs]


def consensus_keys(
    input_keys: dict[str, str],
    voters: dict[str, tuple[str, ...]],
    model: ConsensusModel,
    params: ConsensusParams,
) -> dict[str, str]:
    """Per-site consensus key: input key + the global values used for the site's voters + params + code."""
    common = content_key(params_dump(params), code_key(*CODE_PACKAGES))
    return {
        s: content_key(k, site_values(model, voters.get(s, ()), params), common)
        for s, k in sorted(input_keys.items())
    }
