"""Points on a quality-compute curve, from runs labelled `METHOD:POINT[-sSEED]` (benchmarks/fidelity.py's
labels): a method's line, its seeds averaged, and a value read off it at a given compute."""
import re
import statistics
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple


def method_of(label: str) -> str:
    """A run's method, its label's prefix: "static_kl:0.93-s1" -> "static_kl"."""
    return label.split(":")[0]


def point_of(label: str) -> str:
    """A run's point on its method's curve, its label without a trailing seed: "static_kl:0.93-s1" ->
    "static_kl:0.93". Seeds of one point are averaged on the curve, so one lucky seed moves no line."""
    return re.sub(r"-s\d+$", "", label)


class CurvePoint(NamedTuple):
    x: float
    y: float  # mean over the point's seeds
    low: float  # the least and the most of its seeds
    high: float
    seeds: int


def mean_points(groups: Iterable[Sequence[dict]], x_key: str, y_key: str) -> List[CurvePoint]:
    """One point per group of rows (the seeds of one point), in x order."""
    return sorted(CurvePoint(statistics.fmean(r[x_key] for r in rows), statistics.fmean(r[y_key] for r in rows),
                             min(r[y_key] for r in rows), max(r[y_key] for r in rows), len(rows))
                  for rows in groups)


def curve_points(runs: Dict[str, dict], method: str, x_key: str, y_key: str) -> List[CurvePoint]:
    """`method`'s points, the seeds of each averaged, in x order."""
    points: Dict[str, List[dict]] = {}
    for label, row in runs.items():
        if method_of(label) == method:
            points.setdefault(point_of(label), []).append(row)
    return mean_points(points.values(), x_key, y_key)


def interpolate(points: Sequence[Tuple[float, ...]], x: float) -> Optional[float]:
    """y at x on points (x, y, ...) in x order, linear between the two neighbours; None outside them."""
    for (x0, y0, *_), (x1, y1, *_) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def shipping_pick(candidates: Dict[str, dict], min_first_words: float = 0.5) -> Optional[str]:
    """The shipping rule: of the runs whose greedy answers match the base's first ten words on at
    least `min_first_words` of the prompts, the one with the lowest generation FLOPs (the lower KL
    between equals). None when no run qualifies."""
    qualified = [(row["flops_generation"], row["kl"], label) for label, row in candidates.items()
                 if row["gen_first_words"] >= min_first_words]
    return min(qualified)[2] if qualified else None
