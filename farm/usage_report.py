"""Usage over a date range for the admin's charts: tokens and requests per day, stacked by model, optionally for one
user or one key (read from `Usage`, written by `farm.usage`). Chart geometry is computed here, so the template
draws plain inline SVG (no JavaScript, no CDN)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta

from django.db.models import Sum

from farm.models import Usage

PALETTE = ("#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#a16207", "#db2777", "#4b5563")
CHART_HEIGHT = 160
BAR_WIDTH = 16
BAR_GAP = 4


@dataclass(frozen=True)
class Segment:
    model: str
    value: int
    colour: str
    x: int
    y: float
    height: float


@dataclass(frozen=True)
class DayBar:
    day: date
    x: int
    total: int
    segments: list[Segment]


@dataclass(frozen=True)
class Chart:
    title: str
    bars: list[DayBar]
    peak: int
    width: int
    height: int = CHART_HEIGHT


@dataclass(frozen=True)
class ModelTotal:
    model: str
    colour: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class UsageReport:
    start: date
    end: date
    models: list[ModelTotal]
    tokens: Chart
    requests: Chart
    by_key: list[dict] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(m.total_tokens for m in self.models)

    @property
    def total_requests(self) -> int:
        return sum(m.requests for m in self.models)


def _chart(title: str, days: list[date], per_day: dict[date, dict[str, int]], colours: dict[str, str]) -> Chart:
    peak = max((sum(values.values()) for values in per_day.values()), default=0)
    scale = (CHART_HEIGHT - 10) / peak if peak else 0.0
    bars = []
    for position, day in enumerate(days):
        x = position * (BAR_WIDTH + BAR_GAP)
        y = float(CHART_HEIGHT)
        segments = []
        for model, value in sorted(per_day.get(day, {}).items()):
            if value <= 0:
                continue
            height = value * scale
            y -= height
            segments.append(
                Segment(model=model, value=value, colour=colours[model], x=x, y=round(y, 2), height=round(height, 2))
            )
        bars.append(DayBar(day=day, x=x, total=sum(per_day.get(day, {}).values()), segments=segments))
    return Chart(title=title, bars=bars, peak=peak, width=max(1, len(days)) * (BAR_WIDTH + BAR_GAP))


def usage_report(*, start: date, end: date, username: str | None = None, key_prefix: str | None = None) -> UsageReport:
    """Usage from `start` to `end` (inclusive), for everyone or one user (username) or one key (its prefix)."""
    rows = Usage.objects.filter(day__gte=start, day__lte=end)
    if username:
        rows = rows.filter(owner__username=username)
    if key_prefix:
        rows = rows.filter(api_key__prefix__startswith=key_prefix)
    daily = rows.values("day", "model").annotate(
        requests=Sum("requests"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")
    )
    days = [start + timedelta(days=offset) for offset in range((end - start).days + 1)]
    totals: dict[str, list[int]] = {}
    tokens: dict[date, dict[str, int]] = {}
    requests: dict[date, dict[str, int]] = {}
    for row in daily:
        model = row["model"]
        total = totals.setdefault(model, [0, 0, 0])
        total[0] += row["requests"]
        total[1] += row["prompt"]
        total[2] += row["completion"]
        tokens.setdefault(row["day"], {})[model] = row["prompt"] + row["completion"]
        requests.setdefault(row["day"], {})[model] = row["requests"]
    ordered = sorted(totals, key=lambda m: -(totals[m][1] + totals[m][2]))
    colours = {model: PALETTE[i % len(PALETTE)] for i, model in enumerate(ordered)}
    by_key = list(
        rows.values("api_key__prefix", "api_key__name", "owner__username")
        .annotate(requests=Sum("requests"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
        .order_by("-completion", "-prompt")[:50]
    )
    return UsageReport(
        start=start,
        end=end,
        models=[
            ModelTotal(
                model=m,
                colour=colours[m],
                requests=totals[m][0],
                prompt_tokens=totals[m][1],
                completion_tokens=totals[m][2],
            )
            for m in ordered
        ],
        tokens=_chart("Tokens per day", days, tokens, colours),
        requests=_chart("Requests per day", days, requests, colours),
        by_key=by_key,
    )
