"""What the detectors say: series keys, explained anomalies and episode events.

Every record turns into plain JSON-able data (``to_dict``/``from_dict``) for the alerts topic,
the anomalies table and detector state. Values are floats: anomaly detection explains
usage, it never bills it, so nothing here feeds an invoice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "EARLY",
    "EVENT_KINDS",
    "SEVERITIES",
    "Anomaly",
    "EpisodeEvent",
    "SeriesKey",
]

# Ordered: an episode's UPDATE fires when its severity climbs this list.
SEVERITIES = ("minor", "major", "critical")
EARLY = "early"  # EpisodeEvent.kind of an early warning (see EpisodeEvent)
EVENT_KINDS = ("open", "update", "resolve", EARLY)


class SeriesKey(NamedTuple):
    """One series: a customer's meter, optionally one dimension group. A NamedTuple so a
    plain ``(customer, meter, group)`` tuple finds the same engine entry."""

    customer: str
    meter: str
    group: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, series: Any) -> SeriesKey:
        """Accept ``SeriesKey``, ``(customer, meter)`` or ``(customer, meter, group)``;
        ``group`` may be pairs or a dict."""
        if isinstance(series, SeriesKey):
            return series
        if isinstance(series, tuple | list) and len(series) in (2, 3):
            group: Any = series[2] if len(series) == 3 else ()
            if isinstance(group, dict):
                group = sorted(group.items())
            return cls(str(series[0]), str(series[1]),
                       tuple((str(k), str(v)) for k, v in group))
        raise TypeError("series must be (customer, meter) or (customer, meter, group), "
                        f"got {series!r}")

    @property
    def id(self) -> str:
        """Canonical text, unique per series: ``customer|meter|k=v&k2=v2`` with ``%``,
        ``|``, ``&`` and ``=`` percent-escaped so no two series share an id."""
        group = "&".join(f"{_esc(k)}={_esc(v)}" for k, v in self.group)
        return f"{_esc(self.customer)}|{_esc(self.meter)}|{group}"

    def to_plain(self) -> list[Any]:
        return [self.customer, self.meter, [list(p) for p in self.group]]

    @classmethod
    def from_plain(cls, plain: Any) -> SeriesKey:
        return cls(str(plain[0]), str(plain[1]), tuple((str(k), str(v)) for k, v in plain[2]))


def _esc(text: str) -> str:
    return (text.replace("%", "%25").replace("|", "%7C").replace("&", "%26")
            .replace("=", "%3D"))


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One abnormal window, explained: what was expected, the band that was normal, what
    was seen and by how much it missed."""

    series: SeriesKey
    window_start_ms: int
    detector: str
    direction: str  # "up" | "down"
    observed: float
    expected: float
    lower: float  # the band of normal values for this window: [lower, upper]
    upper: float
    score: float  # signed robust z: log-ratio of observed to expected over the series' scale
    severity: str  # one of SEVERITIES
    since_ms: int  # start of the episode this window belongs to
    elapsed_fraction: float = 1.0  # < 1 when raised from a window still in progress

    @property
    def partial(self) -> bool:
        return self.elapsed_fraction < 1.0

    def explain(self) -> str:
        where = f"{self.series.id} @ {self.window_start_ms}"
        so_far = f" ({self.elapsed_fraction:.0%} of the window)" if self.partial else ""
        return (f"{where}: {self.direction} {self.severity} - observed {self.observed:g}"
                f"{so_far}, expected {self.expected:g} (normal {self.lower:g}.."
                f"{self.upper:g}), score {self.score:+.1f}, {self.detector}, "
                f"episode since {self.since_ms}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "series": self.series.to_plain(), "window_start_ms": self.window_start_ms,
            "detector": self.detector, "direction": self.direction,
            "observed": self.observed, "expected": self.expected, "lower": self.lower,
            "upper": self.upper, "score": self.score, "severity": self.severity,
            "since_ms": self.since_ms, "elapsed_fraction": self.elapsed_fraction,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Anomaly:
        d = dict(d)
        d["series"] = SeriesKey.from_plain(d["series"])
        return cls(**d)


@dataclass(frozen=True, slots=True)
class EpisodeEvent:
    """A change in an anomalous episode. ``kind`` is "open" (once, when it starts),
    "update" (it got materially worse) or "resolve" (once, when it is over).

    ``key`` is the idempotency key, ``<series id>|<since_ms>|<seq>``: replaying the same
    input produces the same keys, so a sink that upserts on it never shows an alert twice.

    The anomaly stage also emits ``kind="early"`` (``seq`` -1): a window that is not final
    yet already holds more than the whole window should. It is outside the episode's
    sequence (the episode opens, or not, when the window is final) and keyed
    ``<series id>|<window_start_ms>|early``: at most one per series and window.
    """

    kind: str
    series: SeriesKey
    since_ms: int
    seq: int  # 0 for "open", then 1, 2, ... for each update and the resolve
    window_start_ms: int  # the window whose observation caused this event
    anomaly: Anomaly  # open/update: the window that caused it; resolve: the episode's peak
    windows: int  # abnormal windows in the episode so far
    until_ms: int | None = None  # resolve: end of the last abnormal window

    @property
    def key(self) -> str:
        if self.kind == EARLY:
            return f"{self.series.id}|{self.since_ms}|early"
        return f"{self.series.id}|{self.since_ms}|{self.seq}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "kind": self.kind, "series": self.series.to_plain(),
            "since_ms": self.since_ms, "seq": self.seq,
            "window_start_ms": self.window_start_ms, "anomaly": self.anomaly.to_dict(),
            "windows": self.windows, "until_ms": self.until_ms,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpisodeEvent:
        d = {k: v for k, v in d.items() if k != "key"}
        d["series"] = SeriesKey.from_plain(d["series"])
        d["anomaly"] = Anomaly.from_dict(d["anomaly"])
        return cls(**d)
