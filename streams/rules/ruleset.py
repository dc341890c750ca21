"""The rule set: a human-edited YAML file, validated by pydantic, whose version is stamped on every entry."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PointsAmount = Annotated[int, Field(ge=0, le=10_000_000)]
Rate = Annotated[Decimal, Field(ge=0, le=10_000, allow_inf_nan=False)]
Amount = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]


class Rounding(StrEnum):
    """How a fractional number of points becomes an integer; applied once per ledger entry."""

    floor = "floor"
    nearest = "nearest"  # half up: 2.5 -> 3
    ceil = "ceil"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EarningBasis(_Strict):
    """Which money of an order earns points. The part paid with points or store credit never earns."""

    after_discounts: bool = True
    include_tax: bool = False
    include_shipping: bool = False
    include_fees: bool = False


class CategoryRule(_Strict):
    """Per-category earning: `rate` replaces the base rate, `multiplier` scales whichever rate applies."""

    rate: Rate | None = None
    multiplier: Rate = Decimal(1)
    excluded: bool = False

    @model_validator(mode="after")
    def _one_effect(self) -> CategoryRule:
        if self.excluded and (self.rate is not None or self.multiplier != 1):
            raise ValueError("a category is either excluded or has a rate or multiplier, not both")
        return self


class ProductRule(_Strict):
    """Per-product earning: `fixed_points` per unit replaces any rate; `excluded` earns nothing."""

    fixed_points: PointsAmount | None = None
    excluded: bool = False

    @model_validator(mode="after")
    def _one_effect(self) -> ProductRule:
        if self.excluded and self.fixed_points is not None:
            raise ValueError("a product is either excluded or has fixed_points, not both")
        return self


class SpendThreshold(_Strict):
    minimum_total: Amount
    bonus: PointsAmount


class PurchaseRules(_Strict):
    points_per_unit: Rate = Decimal(1)
    basis: EarningBasis = EarningBasis()
    minimum_order_total: Amount = Decimal(0)
    maximum_points_per_order: PointsAmount | None = None
    categories: dict[str, CategoryRule] = {}
    products: dict[str, ProductRule] = {}
    first_order_bonus: PointsAmount = 0
    spend_thresholds: list[SpendThreshold] = []
    pending_days: Annotated[int, Field(ge=0, le=365)] = 0

    @field_validator("spend_thresholds")
    @classmethod
    def _distinct_thresholds(cls, thresholds: list[SpendThreshold]) -> list[SpendThreshold]:
        totals = [threshold.minimum_total for threshold in thresholds]
        if len(set(totals)) != len(totals):
            raise ValueError("two spend thresholds have the same minimum_total")
        ordered = sorted(thresholds, key=lambda threshold: threshold.minimum_total)
        for lower, higher in zip(ordered, ordered[1:], strict=False):
            if higher.bonus < lower.bonus:
                raise ValueError(
                    f"the bonus of the {higher.minimum_total} threshold ({higher.bonus}) is below the bonus of the "
                    f"{lower.minimum_total} threshold ({lower.bonus}): only the highest threshold reached is awarded, "
                    "so spending more would earn less"
                )
        return ordered


class FixedPoints(_Strict):
    """Fixed awards for engagement; 0 disables one."""

    registration: PointsAmount = 0
    review: PointsAmount = 0  # the first approved review per product per customer
    blog_comment: PointsAmount = 0  # the first comment per post per customer
    social_share: PointsAmount = 0
    feedback: PointsAmount = 0


class ReferralRules(_Strict):
    referrer_points: PointsAmount = 0
    referee_points: PointsAmount = 0
    # A referral whose qualifying order is fully refunded or cancelled within this many days of the order is
    # reversed for both customers. Unset: the purchase return window (purchase.pending_days); 0: never.
    return_window_days: Annotated[int, Field(ge=0, le=365)] | None = None


PromotionSource = Literal["purchase", "review", "referral", "registration", "blog_comment", "social_share", "feedback"]


class Promotion(_Strict):
    """A date-window promotion, decided by event time: `starts_at` <= occurred_at < `ends_at`."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    multiplier: Rate = Decimal(1)
    bonus: PointsAmount = 0  # once per qualifying event
    sources: list[PromotionSource] = ["purchase"]

    @model_validator(mode="after")
    def _window(self) -> Promotion:
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self

    def active_at(self, moment: datetime) -> bool:
        return self.starts_at <= moment < self.ends_at


CapPeriod = Literal["day", "week", "month"]


class Cap(_Strict):
    """At most `points_max` points per customer from `source` per calendar period in the store timezone."""

    source: PromotionSource
    period: CapPeriod
    points_max: PointsAmount


class Eligibility(_Strict):
    """Customers in an excluded segment (staff, wholesale, ...) earn nothing; they can still redeem."""

    excluded_segments: list[str] = []


class RedemptionRules(_Strict):
    point_value: Annotated[Decimal, Field(gt=0, allow_inf_nan=False)] = Decimal("0.01")
    minimum_points: PointsAmount = 1
    maximum_points: PointsAmount | None = None

    @model_validator(mode="after")
    def _range(self) -> RedemptionRules:
        if self.maximum_points is not None and self.maximum_points < self.minimum_points:
            raise ValueError(
                f"maximum_points {self.maximum_points} is below minimum_points {self.minimum_points}: "
                "every redemption would be refused"
            )
        return self


class ExpiryRules(_Strict):
    """Point expiry, decided by event time (including `clock.tick` events), never by the wall clock.

    `inactivity`: the whole available balance expires after `days` without earning or redeeming.
    `lot`: each award expires `days` after it was made; spending uses the oldest points first.
    """

    mode: Literal["none", "inactivity", "lot"] = "none"
    days: Annotated[int, Field(ge=1, le=3650)] = 365


class TierLevel(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
    minimum: Amount  # lifetime points, or spend in the window, needed to reach the tier
    multiplier: Rate = Decimal(1)  # applied to rate-based purchase points (not to product fixed_points)


class TierRules(_Strict):
    """Tiers by lifetime earned points (never the current balance) or by spend in a rolling window."""

    basis: Literal["lifetime_points", "rolling_spend"] = "lifetime_points"
    window_days: Annotated[int, Field(ge=1, le=3650)] = 365
    levels: list[TierLevel] = []

    @field_validator("levels")
    @classmethod
    def _ordered(cls, levels: list[TierLevel]) -> list[TierLevel]:
        if len({level.name for level in levels}) != len(levels):
            raise ValueError("tier names must be unique")
        ordered = sorted(levels, key=lambda level: level.minimum)  # the file may list them in any order
        for lower, higher in zip(ordered, ordered[1:], strict=False):
            if higher.minimum == lower.minimum:
                raise ValueError(
                    f"tiers {lower.name} and {higher.name} have the same minimum {higher.minimum}: "
                    "which one a customer reaches would be undecided"
                )
        return ordered

    def tier_for(self, metric: Decimal) -> TierLevel | None:
        reached = [level for level in self.levels if metric >= level.minimum]
        return reached[-1] if reached else None


class RuleSet(_Strict):
    """A complete, versioned rule set. See docs/rules.md for every rule kind and their precedence."""

    model_config = ConfigDict(frozen=True, extra="forbid", ignored_types=(cached_property,))

    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:+-]{1,64}$")]
    timezone: str = "UTC"
    rounding: Rounding = Rounding.floor
    purchase: PurchaseRules = PurchaseRules()
    fixed: FixedPoints = FixedPoints()
    referral: ReferralRules = ReferralRules()
    promotions: list[Promotion] = []
    caps: list[Cap] = []
    eligibility: Eligibility = Eligibility()
    redemption: RedemptionRules = RedemptionRules()
    expiry: ExpiryRules = ExpiryRules()
    tiers: TierRules = TierRules()

    @property
    def referral_return_window_days(self) -> int:
        """Days after a referee's qualifying order within which its refund reverses the referral (0: never)."""
        window = self.referral.return_window_days
        return self.purchase.pending_days if window is None else window

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {name!r} (use an IANA name such as Europe/Paris)") from None
        return name

    @field_validator("promotions")
    @classmethod
    def _unique_promotions(cls, promotions: list[Promotion]) -> list[Promotion]:
        ids = [promotion.id for promotion in promotions]
        if len(set(ids)) != len(ids):
            raise ValueError("promotion ids must be unique")
        return promotions

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @cached_property
    def caps_by_source(self) -> dict[str, list[Cap]]:
        """The caps per source, in the file's order (most sources have none, and every award asks)."""
        caps: dict[str, list[Cap]] = {}
        for cap in self.caps:
            caps.setdefault(cap.source, []).append(cap)
        return caps


class RuleSetInvalid(ValueError):
    """A rule set file that cannot be used; `problems` lists (path of the bad key, reason)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        listed = "; ".join(f"{path}: {reason}" if path else reason for path, reason in problems)
        super().__init__(f"invalid rule set {source}: {listed}")


def default_ruleset_path() -> Path:
    return Path(str(resources.files("streams.rules") / "rulesets" / "default.yaml"))


def parse_ruleset(text: str, source: str = "<text>") -> RuleSet:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise RuleSetInvalid(source, [("", f"not valid YAML: {problem}{where}")]) from None
    if not isinstance(document, dict):
        raise RuleSetInvalid(source, [("", "the file must hold a mapping of settings")])
    try:
        return RuleSet.model_validate(document)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            path = ".".join(str(part) for part in item["loc"]) or "(top level)"
            reason = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
            problems.append((path, reason))
        raise RuleSetInvalid(source, problems) from None


def load_ruleset(path: Path | str | None = None) -> RuleSet:
    """Load and validate a rule set file; None loads the packaged default."""
    file = Path(path) if path is not None else default_ruleset_path()
    return parse_ruleset(read_ruleset_text(file), str(file))


def read_ruleset_text(file: Path | str) -> str:
    """A rule set file's text; a file that cannot be read (missing, a directory, not UTF-8) is a `RuleSetInvalid`."""
    try:
        return Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RuleSetInvalid(str(file), [("", "cannot read the file: not UTF-8 text")]) from None
    except OSError as error:
        raise RuleSetInvalid(str(file), [("", f"cannot read the file: {error.strerror}")]) from None
