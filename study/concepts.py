"""What experts mean: mutual information between an expert's routing and the demo captions' concepts.

The demo scenes are compositional (shape, colour, size, relation), so every probe token can carry
concept labels: a text token the concept of its word (``of`` takes the relation of the word before
it), an image patch the colour, shape and size of every object covering at least ``min_cover`` of
its pixels. Object masks are re-rendered from each sample's ``key.json`` (the objects' attributes
and centres) with the demo renderer, so the data format needs nothing new. Relations are text-only.

For expert e and concept c, with r_e = "token routed to e (any of its top-k slots)" and m the
modality, all binary / plug-in estimates in bits:

* I(r_e; c), and the within-modality I(r_e; c | m) = Σ_m p(m) I(r_e; c | m): a pure text expert
  has I(r_e; red) > 0 only because "red" words are text; I(r_e; red | m) removes that.
* normalised u = I / min(H(a), H(b)) ∈ [0, 1] (1: one variable determines the other as far as
  the rarer allows); the conditional one uses the conditional entropies.

An expert *specialises to a concept* when u(r_e; c | m) ≥ ``SPECIALIST_U`` and exceeds its
modality score u(r_e; m).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

__all__ = ["CONCEPTS", "SPECIALIST_U", "binary_entropy_bits", "binary_mi_bits", "conditional_mi_bits",
           "expert_concept_mi", "specialists", "word_concepts", "patch_concepts", "probe_concepts", "concept_analysis"]

SPECIALIST_U = 0.2


def _concept_list() -> list[str]:
    from ..runtime.data.demo import COLOURS, RELATIONS, SHAPES, SIZES

    return ([f"colour:{c}" for c in COLOURS] + [f"shape:{s}" for s in SHAPES] + [f"size:{s}" for s in SIZES]
            + [f"relation:{r}" for r in RELATIONS])


CONCEPTS = _concept_list()


def _h(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def binary_entropy_bits(a_N) -> float:
    a = np.asarray(a_N, dtype=bool)
    if a.size == 0:
        return 0.0
    q = a.mean()
    return _h(np.array([q, 1 - q]))


def binary_mi_bits(a_N, b_N) -> float:
    """I(a; b) of two binary variables from their joint frequencies (plug-in), in bits."""
    a = np.asarray(a_N, dtype=bool)
    b = np.asarray(b_N, dtype=bool)
    if a.size == 0:
        return 0.0
    joint = np.bincount(a.astype(np.int64) * 2 + b, minlength=4).reshape(2, 2) / a.size
    return max(_h(joint.sum(1)) + _h(joint.sum(0)) - _h(joint.ravel()), 0.0)


def conditional_mi_bits(a_N, b_N, z_N) -> float:
    """I(a; b | z) = Σ_z p(z) I(a; b | z=z)."""
    z = np.asarray(z_N)
    a, b = np.asarray(a_N, dtype=bool), np.asarray(b_N, dtype=bool)
    return float(sum((z == v).mean() * binary_mi_bits(a[z == v], b[z == v]) for v in np.unique(z)))


def _conditional_entropy(a: np.ndarray, z: np.ndarray) -> float:
    return float(sum((z == v).mean() * binary_entropy_bits(a[z == v]) for v in np.unique(z)))


def _norm(i: float, ha: float, hb: float) -> float:
    d = min(ha, hb)
    return float(min(i / d, 1.0)) if d > 1e-12 else 0.0


def expert_concept_mi(routed_NE, concepts_NC, modality_N) -> dict:
    """Per expert and concept: MI, within-modality MI and their normalised forms; per expert the
    MI with the modality. Lists are [E][C] / [E]."""
    r = np.asarray(routed_NE, dtype=bool)
    c = np.asarray(concepts_NC, dtype=bool)
    m = np.asarray(modality_N)
    E, C = r.shape[1], c.shape[1]
    out = {k: [[0.0] * C for _ in range(E)] for k in ("mi", "cmi", "u", "cu")}
    out["mi_modality"], out["u_modality"] = [0.0] * E, [0.0] * E
    hm = _h(np.bincount(m.astype(np.int64)) / max(m.size, 1))
    hc = [binary_entropy_bits(c[:, j]) for j in range(C)]
    hc_m = [_conditional_entropy(c[:, j], m) for j in range(C)]
    for e in range(E):
        he, he_m = binary_entropy_bits(r[:, e]), _conditional_entropy(r[:, e], m)
        joint = np.bincount(r[:, e].astype(np.int64) * (m.max(initial=0) + 1) + m, minlength=2 * (m.max(initial=0) + 1))
        mi_m = max(he + hm - _h(joint / max(m.size, 1)), 0.0)
        out["mi_modality"][e], out["u_modality"][e] = mi_m, _norm(mi_m, he, hm)
        for j in range(C):
            i, ci = binary_mi_bits(r[:, e], c[:, j]), conditional_mi_bits(r[:, e], c[:, j], m)
            out["mi"][e][j], out["cmi"][e][j] = i, ci
            out["u"][e][j], out["cu"][e][j] = _norm(i, he, hc[j]), _norm(ci, he_m, hc_m[j])
    return out


def specialists(mi: dict, names: list[str], threshold: float = SPECIALIST_U) -> list[tuple[int, str, float, float]]:
    """(expert, concept, u(r_e; c | m), u(r_e; m)) of every expert that specialises to a concept."""
    out = []
    for e, row in enumerate(mi["cu"]):
        j = int(np.argmax(row))
        if row[j] >= threshold and row[j] > mi["u_modality"][e]:
            out.append((e, names[j], float(row[j]), float(mi["u_modality"][e])))
    return out


def word_concepts(pieces: list[str]) -> list[str | None]:
    """The concept of each word piece of one caption (``of`` inherits the relation before it)."""
    from ..runtime.data.demo import COLOURS, SHAPES, SIZES

    words = [p.replace("\u2581", "").strip().lower() for p in pieces]
    out: list[str | None] = []
    for i, w in enumerate(words):
        if w in COLOURS:
            out.append(f"colour:{w}")
        elif w in SHAPES:
            out.append(f"shape:{w}")
        elif w in SIZES:
            out.append(f"size:{w}")
        elif w in ("above", "below"):
            out.append(f"relation:{w}")
        elif w in ("left", "right"):
            out.append(f"relation:{w} of")
        elif w == "of" and i > 0 and words[i - 1] in ("left", "right"):
            out.append(f"relation:{words[i - 1]} of")
        else:
            out.append(None)
    return out


def patch_concepts(meta: dict, image_size: int, patch_size: int, min_cover: float = 0.25) -> list[set[str]]:
    """The concepts of each patch (raster order) of a demo scene described by its ``key.json``."""
    from ..runtime.data.demo import COLOURS, Scene, SceneObject, render_scene

    g = image_size // patch_size
    out: list[set[str]] = [set() for _ in range(g * g)]
    for o in meta.get("objects", []):
        obj = SceneObject(o["shape"], o["colour"], o["size"], o["cx"], o["cy"])
        pix = np.asarray(render_scene(Scene((obj,), None, 0), image_size), dtype=np.float64)
        ch = int(np.argmax(COLOURS[obj.colour]))
        cover = pix[..., ch] / COLOURS[obj.colour][ch]  # box-filtered: the pixel's covered fraction
        per_patch = cover.reshape(g, patch_size, g, patch_size).mean((1, 3)).ravel()
        for p in np.flatnonzero(per_patch >= min_cover):
            out[p] |= {f"colour:{obj.colour}", f"shape:{obj.shape}", f"size:{obj.size}"}
    return out


def _shard_metadata(eval_shards: list[str]) -> dict[str, dict]:
    from ..runtime.data.shards import expand_shards

    meta = {}
    for url in expand_shards(eval_shards):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta[member.name[: -len(".json")]] = json.load(io.TextIOWrapper(tar.extractfile(member), "utf-8"))
    return meta


def probe_concepts(batches: list, eval_shards: list[str], tokenizer: str | Path, image_size: int,
                   patch_size: int) -> np.ndarray | None:
    """[N, C] bool concept labels of the probe tokens (probe order: per sample its patches, then its
    real text tokens), or None when the samples carry no scene metadata (not a demo set)."""
    from ..runtime.data import Tokenizer

    meta = _shard_metadata(eval_shards)
    tok = Tokenizer(tokenizer)
    col = {c: j for j, c in enumerate(CONCEPTS)}
    rows: list[np.ndarray] = []
    for b in batches:
        for i, key in enumerate(b.keys):
            if key not in meta or "objects" not in meta[key]:
                return None
            for labels in patch_concepts(meta[key], image_size, patch_size):
                rows.append(_row(labels, col))
            ids = b.text[i][b.text_mask[i]].tolist()
            pieces = [tok.decode([t]) for t in ids]
            for concept in word_concepts(pieces):
                rows.append(_row({concept} if concept else set(), col))
    return np.stack(rows) if rows else np.zeros((0, len(CONCEPTS)), dtype=bool)


def _row(labels: set[str], col: dict[str, int]) -> np.ndarray:
    r = np.zeros(len(col), dtype=bool)
    for c in labels:
        r[col[c]] = True
    return r


def concept_analysis(routed_LNE: list, concepts_NC, modality_N, layers: list[int]) -> dict:
    """JSON-ready per-run output: per MoE layer the [E][C] normalised MI u and within-modality cu,
    each expert's modality score, and the experts that specialise to a concept (expert, concept, cu,
    u_modality, [p(m)·I(r_e; c | m) per modality]: in which modality it does). Concepts that no
    probe token carries are left out (their MI is 0 by construction)."""
    c = np.asarray(concepts_NC, dtype=bool)
    for routed in routed_LNE:
        if len(routed) != len(c) or len(c) != len(modality_N):
            raise ValueError(f"concept labels ({len(c)} tokens) and routing ({len(routed)}) / modality ({len(modality_N)}) "
                             "must describe the same probe tokens")
    present = [j for j in range(c.shape[1]) if c[:, j].any()]
    names = [CONCEPTS[j] for j in present]
    m = np.asarray(modality_N)
    out = {"concepts": names, "counts": [int(c[:, j].sum()) for j in present], "layers": []}
    for layer, routed in zip(layers, routed_LNE):
        r = np.asarray(routed, dtype=bool)
        mi = expert_concept_mi(r, c[:, present], m)
        found = []
        for e, name, cu, um in specialists(mi, names):
            j = CONCEPTS.index(name)
            # where the within-modality MI sits: p(m) · I(r_e; c | m = each modality), bits
            parts = [float((m == v).mean() * binary_mi_bits(r[m == v, e], c[m == v, j])) for v in range(int(m.max(initial=0)) + 1)]
            found.append([e, name, cu, um, parts])
        out["layers"].append({"layer": layer, "u": mi["u"], "cu": mi["cu"], "u_modality": mi["u_modality"], "specialists": found})
    return out
