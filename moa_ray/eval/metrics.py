"""AlpacaEval and MT-Bench metrics, computed the way the official evaluators compute them.

AlpacaEval encodes a preference as a number in [1, 2]: 1 = the reference (output_1)
wins, 2 = the model (output_2) wins, 1.5 (or the legacy 0) = a draw, anything in
between = the judge's probability. From it (``alpaca_eval.metrics``):

* ``win_rate`` = mean(preference - 1) x 100, ``standard_error`` = its standard error of
  the mean (ddof 1) x 100;
* ``discrete_win_rate`` = (wins + draws / 2) / n x 100 with each preference rounded;
* ``avg_length`` = mean characters of the model's outputs (truncated, as the leaderboard prints);
* ``lc_win_rate``: AlpacaEval 2's length-controlled win rate. A logistic regression
  predicts the preference from tanh(length difference / its std), a model term and,
  when the instruction difficulties are given, a difficulty term; the LC win rate is
  the mean prediction with the length difference set to zero. The fit is an
  L1-penalised logistic regression on the soft labels, its C chosen from
  logspace(-4, 4, 10) by 5-fold grouped cross-validation of the log loss, like
  ``LogisticRegressionCV(penalty="l1", solver="liblinear", fit_intercept=False)`` in
  ``alpaca_eval.metrics.glm_winrate``. AlpacaEval's leaderboard model
  (``length_controlled_v1``) also needs two files it downloads from the Hugging Face
  Hub (per-instruction difficulty and the annotations of two length-gamed baselines,
  which regularise the length slope); pass them with :class:`GLMData` to get that
  model, otherwise the ``length_controlled_minimal`` model is fitted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from pydantic import BaseModel, Field
from scipy import stats
from scipy.special import expit, log_expit

from moa_ray.errors import MoARayError
from moa_ray.eval.datasets import shipped_jsonl
from moa_ray.eval.schema import PairwiseRow
from moa_ray.eval.store import join, resolve, resolve_latest

CS = np.logspace(-4, 4, 10)
N_SPLITS = 5
GAMED_REGULARIZATION = 0.2


class MetricsError(MoARayError):
    """Annotations cannot be read or hold no usable preference."""


class WinRate(BaseModel):
    """AlpacaEval metrics of one generator against the reference."""

    generator: str
    win_rate: float
    standard_error: float
    discrete_win_rate: float
    lc_win_rate: float | None = None
    lc_standard_error: float | None = None
    lc_model: str | None = Field(default=None, description="length_controlled_v1 (official) or length_controlled_minimal")
    avg_length: int
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int

    def public(self) -> dict[str, Any]:
        """The fields ``moa-ray eval metrics --json`` prints."""
        keys = ("win_rate", "standard_error", "discrete_win_rate", "lc_win_rate", "avg_length", "n_total")
        return {k: getattr(self, k) for k in keys}


# --------------------------------------------------------------------------- raw win rate


def _clean_preferences(values: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Preferences as floats (0 -> 1.5) and the mask of valid ones (in [1, 2], not missing)."""
    prefs = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    prefs[prefs == 0.0] = 1.5
    valid = ~np.isnan(prefs) & (prefs >= 1.0) & (prefs <= 2.0)
    return prefs, valid


def head_to_head(preferences: Sequence[float | None]) -> dict[str, float | int]:
    """win_rate, standard_error, discrete_win_rate and counts, exactly as alpaca_eval's ``get_winrate``."""
    prefs, valid = _clean_preferences(preferences)
    p = prefs[valid]
    if p.size == 0:
        raise MetricsError("no valid preference (values must be in [1, 2])")
    x = p - 1.0
    discrete = np.where(p == 1.5, 0.5, np.round(p) - 1.0)
    n_draws = int((p == 1.5).sum())
    return {
        "win_rate": float(x.mean() * 100),
        "standard_error": float(stats.sem(x) * 100) if x.size > 1 else float("nan"),
        "discrete_win_rate": float(discrete.mean() * 100),
        "n_wins": int((discrete == 1.0).sum()),
        "n_wins_base": int((discrete == 0.0).sum()),
        "n_draws": n_draws,
        "n_total": int(p.size),
    }


# --------------------------------------------------------------------------- length control


class GLMData(BaseModel):
    """AlpacaEval's precomputed GLM inputs (``instruction_difficulty.csv``, ``df_gamed.csv`` of the
    ``tatsu-lab/alpaca_eval`` dataset on the Hugging Face Hub), indexed by AlpacaEval instruction position."""

    instruction_difficulty: dict[int, float]
    gamed: list[dict[str, float]] = Field(
        default_factory=list,
        description="Rows of df_gamed.csv: index, preference (in [0, 1]), std_delta_len, instruction_difficulty, not_gamed_baseline.",
    )

    @classmethod
    def from_dir(cls, directory: str | Path) -> GLMData:
        d = Path(directory)
        diff_path = d / "instruction_difficulty.csv"
        if not diff_path.is_file():
            raise MetricsError(f"{diff_path} not found (download it from the tatsu-lab/alpaca_eval dataset on the HF Hub)")
        with diff_path.open(newline="") as f:
            rows = list(csv.reader(f))
        try:
            difficulty = {int(r[0]): float(r[-1]) for r in rows[1:] if r}
        except (ValueError, IndexError) as err:
            raise MetricsError(f"{diff_path}: expected 'index,instruction_difficulty' rows ({err})") from None
        gamed: list[dict[str, float]] = []
        gamed_path = d / "df_gamed.csv"
        if gamed_path.is_file():
            needed = ("index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline")
            with gamed_path.open(newline="") as f:
                reader = csv.DictReader(f)
                missing = [c for c in needed if c not in (reader.fieldnames or [])]
                if missing:
                    raise MetricsError(f"{gamed_path}: missing columns {missing}")
                for r in reader:
                    if r["preference"] in ("", "nan"):
                        continue
                    gamed.append(
                        {
                            "preference": float(r["preference"]),
                            "std_delta_len": float(r["std_delta_len"]),
                            "instruction_difficulty": float(r["instruction_difficulty"]),
                            "not_gamed_baseline": float(r["not_gamed_baseline"] in ("True", "true", "1", "1.0")),
                        }
                    )
        return cls(instruction_difficulty=difficulty, gamed=gamed)


def _fit_l1_logistic(X: np.ndarray, y: np.ndarray, w: np.ndarray, C: float, tol: float = 1e-12) -> np.ndarray:
    """argmin ||b||_1 + C * sum_i w_i * CE(y_i, sigmoid(X_i b)) for soft labels y in [0, 1], no intercept.

    liblinear's objective with the duplicated-rows trick AlpacaEval uses for soft labels,
    solved by proximal Newton (GLMNET's scheme: coordinate descent on the quadratic model,
    then a backtracking line search); with a handful of features it converges to machine
    precision in a few iterations.
    """
    d = X.shape[1]
    lam = 1.0 / (C * w.sum())  # objective divided by C * sum(w): same minimiser, of order 1
    wn = w / w.sum()

    def smooth(b: np.ndarray) -> float:
        m = X @ b
        return float(-(wn * (y * log_expit(m) + (1 - y) * log_expit(-m))).sum())

    def total(b: np.ndarray) -> float:
        return float(smooth(b) + lam * float(np.abs(b).sum()))

    b = np.zeros(d)
    f = total(b)
    for _ in range(100):
        q = expit(X @ b)
        g = X.T @ (wn * (q - y))
        H = (X * (wn * q * (1 - q))[:, None]).T @ X + 1e-12 * np.eye(d)
        delta = np.zeros(d)
        for _ in range(200):  # coordinate descent on g.delta + delta.H.delta/2 + lam * |b + delta|_1
            previous = delta.copy()
            for j in range(d):
                r = g[j] + H[j] @ delta - H[j, j] * delta[j]
                z = H[j, j] * b[j] - r
                delta[j] = np.sign(z) * max(abs(z) - lam, 0.0) / H[j, j] - b[j]
            if np.max(np.abs(delta - previous)) < 1e-15:
                break
        decrease = g @ delta + lam * (np.abs(b + delta).sum() - np.abs(b).sum())
        step = 1.0
        while step > 1e-10:
            candidate = b + step * delta
            f_new = total(candidate)
            if f_new <= f + 1e-4 * step * decrease:
                break
            step /= 2
        else:
            break
        b, f_prev, f = candidate, f, f_new
        if f_prev - f < tol * max(1.0, abs(f)) and np.max(np.abs(step * delta)) < 1e-10:
            break
    return b


def _log_loss(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    p = np.clip(expit(X @ b), 1e-15, 1 - 1e-15)
    return float(-np.mean(w * (y * np.log(p) + (1 - y) * np.log(1 - p))))


def _fit_cv(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pick C by grouped K-fold log loss (each row is its own group), then refit on everything."""
    n = len(y)
    folds = np.arange(n) % N_SPLITS
    best_c, best_loss = CS[-1], math.inf
    for C in CS:
        losses = []
        for k in range(min(N_SPLITS, n)):
            train, test = folds != k, folds == k
            b = _fit_l1_logistic(X[train], y[train], w[train], C)
            losses.append(_log_loss(X[test], y[test], w[test], b))
        loss = float(np.mean(losses))
        if loss < best_loss - 1e-12:
            best_c, best_loss = C, loss
    return _fit_l1_logistic(X, y, w, best_c)


def length_controlled_win_rate(
    preferences: Sequence[float | None],
    model_lengths: Sequence[int],
    reference_lengths: Sequence[int],
    instruction_index: Sequence[int] | None = None,
    glm_data: GLMData | None = None,
) -> tuple[float, float, str]:
    """LC win rate, its standard error (both x 100) and the GLM used; see the module docstring."""
    prefs, valid = _clean_preferences(preferences)
    if valid.sum() < N_SPLITS:
        raise MetricsError(f"the length-controlled win rate needs at least {N_SPLITS} preferences")
    delta = np.asarray(reference_lengths, dtype=float) - np.asarray(model_lengths, dtype=float)
    sd = delta.std(ddof=1)
    std_delta = delta / sd if sd > 0 else np.zeros_like(delta)
    y = prefs - 1.0
    ones = np.ones_like(y)
    if glm_data is None:
        X = np.column_stack([np.tanh(std_delta), ones])
        X_test = np.column_stack([np.zeros_like(y), ones])
        Xv, yv, wv = X[valid], y[valid], ones[valid]
        name = "length_controlled_minimal"
    else:
        if instruction_index is None:
            raise MetricsError("instruction difficulties need the AlpacaEval index of every annotation")
        missing = [i for i in instruction_index if i not in glm_data.instruction_difficulty]
        if missing:
            raise MetricsError(f"no instruction difficulty for AlpacaEval indices {missing[:5]}")
        diff = np.array([glm_data.instruction_difficulty[i] for i in instruction_index], dtype=float)
        X = np.column_stack([np.tanh(std_delta), diff, ones])
        X_test = np.column_stack([np.zeros_like(y), diff, ones])
        Xv, yv, wv = X[valid], y[valid], ones[valid]
        name = "length_controlled_noreg"
        if glm_data.gamed:
            g = glm_data.gamed
            Xg = np.array([[math.tanh(r["std_delta_len"]), r["instruction_difficulty"], r["not_gamed_baseline"]] for r in g])
            yg = np.array([r["preference"] for r in g])
            wg = np.where(Xg[:, 2] > 0, 1.0, GAMED_REGULARIZATION / 2)  # two gamed baselines share the weight
            Xv, yv, wv = np.vstack([Xg, Xv]), np.concatenate([yg, yv]), np.concatenate([wg, wv])
            name = "length_controlled_v1"
    b = _fit_cv(Xv, yv, wv)
    predicted = expit(X_test[valid] @ b)
    se = float(stats.sem(predicted) * 100) if predicted.size > 1 and np.ptp(predicted) > 0 else 0.0
    return float(predicted.mean() * 100), se, name


# --------------------------------------------------------------------------- annotations


def _read_parquet(uri: str) -> list[dict[str, Any]]:
    """Every row of a Parquet file or directory, local or on a pyarrow filesystem (a judge output: its pairwise/)."""
    fs, root = resolve(uri)
    try:
        found = [d for d in ANNOTATION_DIRS if fs.get_file_info(join(root, d)).type == pafs.FileType.Directory]
        if len(found) > 1:
            raise MetricsError(f"{uri} holds {' and '.join(found)} annotations: name one of the subdirectories")
        if found:
            root = join(root, found[0])
        rows: list[dict[str, Any]] = pads.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()
        return rows
    except (OSError, ValueError) as err:
        raise MetricsError(f"cannot read {uri}: {err}") from None


#: The judge output's tables in AlpacaEval's columns: pair-v2 preferences, AlpacaEval's official annotator.
ANNOTATION_DIRS = ("pairwise", "alpaca_eval_official")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .json / .jsonl(.gz) / .parquet file, or of a directory of part files (a path or a URI)."""
    if "://" in str(path):  # s3://, gs://, file://: never through Path, which folds the "//"
        return _read_parquet(str(path))
    p = Path(path)
    found = [d for d in ANNOTATION_DIRS if (p / d).is_dir()]  # the output directory of `moa-ray eval judge`
    if len(found) > 1:
        raise MetricsError(f"{path} holds {' and '.join(found)} annotations: name one of the subdirectories")
    if found:
        p = path = p / found[0]
    if p.is_dir() or str(path).endswith((".parquet", ".pq")):
        return _read_parquet(str(path))
    if not p.is_file():
        raise MetricsError(f"annotations not found: {path}")
    raw = p.read_bytes()
    name = p.name.lower()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
        name = name[:-3]
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8").read()
    try:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MetricsError(f"{path} is not JSON / JSON lines: {err}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise MetricsError(f"{path}: expected a list of annotation objects")
    return data


def _resolve_own_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """moa-ray judge tables may hold failed or superseded attempts; keep one finished row per key."""
    if not records or "status" not in records[0] or "prompt_id" not in records[0]:
        return records
    return [r for r in resolve_latest(records, PairwiseRow.KEY).values() if r["status"] == "ok"]


def alpaca_index() -> dict[str, int]:
    """AlpacaEval instruction -> its position in the dataset (the index AlpacaEval's GLM files use)."""
    return {r["instruction"]: i for i, r in enumerate(shipped_jsonl("alpaca_eval", "alpaca_eval.jsonl"))}


def chars(record: Mapping[str, Any], column: str) -> int:
    """The length of an output in characters: ``<column>_length`` where a reader measured it (and left the text on
    disk), else the text's."""
    measured = record.get(f"{column}_length")
    return int(measured) if measured is not None else len(record.get(column) or "")


def win_rates(records: list[dict[str, Any]], *, glm_data: GLMData | None = None, lc: bool = True) -> dict[str, WinRate]:
    """AlpacaEval metrics per generator (``generator_2``) of annotations in AlpacaEval's format."""
    records = _resolve_own_rows(records)
    if not records:
        raise MetricsError("no annotations")
    missing = [c for c in ("output_1", "output_2", "preference") if c not in records[0] and f"{c}_length" not in records[0]]
    if missing:
        raise MetricsError(
            f"annotations lack the columns {missing} (AlpacaEval format: instruction, output_1, output_2, preference, generator_2)"
        )
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[str(r.get("generator_2") or "model")].append(r)
    index = alpaca_index() if glm_data is not None else None
    out = {}
    for generator, rows in groups.items():

        def positions(rows: list[dict[str, Any]] = rows, index: Mapping[str, int] | None = index) -> list[int] | None:
            if index is None:
                return None
            try:
                return [index[r["instruction"]] for r in rows]
            except KeyError as err:
                raise MetricsError(f"instruction not in AlpacaEval, no difficulty for it: {str(err)[:80]}") from None

        out[generator] = generator_win_rate(
            generator,
            [r["preference"] for r in rows],
            [chars(r, "output_2") for r in rows],
            [chars(r, "output_1") for r in rows],
            positions,
            glm_data,
            lc=lc,
        )
    return out


def generator_win_rate(
    generator: str,
    preferences: Sequence[float | None],
    lengths: Sequence[int],
    reference_lengths: Sequence[int],
    positions: Callable[[], Sequence[int] | None],
    glm_data: GLMData | None,
    *,
    lc: bool = True,
) -> WinRate:
    """One generator's AlpacaEval metrics from its annotations' preferences and output lengths, in their order (the
    LC fit's folds follow it); ``positions``: the instructions' places in AlpacaEval for ``glm_data``, looked up only
    when the LC fit runs (at least :data:`N_SPLITS` annotations)."""
    h2h = head_to_head(preferences)
    result = WinRate.model_validate({"generator": generator, "avg_length": int(np.mean(lengths)), **h2h})
    if lc and h2h["n_total"] >= N_SPLITS:
        lcw, lcse, model = length_controlled_win_rate(preferences, lengths, reference_lengths, positions(), glm_data)
        result = result.model_copy(update={"lc_win_rate": lcw, "lc_standard_error": lcse, "lc_model": model})
    return result


# --------------------------------------------------------------------------- MT-Bench


class MTBenchScore(BaseModel):
    """Mean single-answer grades of one pipeline."""

    pipeline: str
    score: float = Field(description="Mean over every graded turn (MT-Bench's headline number).")
    turn_1: float | None = None
    turn_2: float | None = None
    by_category: dict[str, float] = Field(default_factory=dict)
    n_graded: int
