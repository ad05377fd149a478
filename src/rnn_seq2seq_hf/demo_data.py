"""The demo's dataset, generated here: dates written in many ways, to be rewritten as ISO dates.

    "the twenty-third of march, nineteen ninety-four"  ->  "1994-03-23"
    "Wednesday, March 23, 1994"                          ->  "1994-03-23"
    "23/03/1994"                                         ->  "1994-03-23"

The model has to align: the year's digits come from the end of the source, the month from a name in the middle, the
day from a spelled-out ordinal or from digits, in an order that depends on the format. Held-out examples use dates
that never occur in the training pairs, in any format.
"""

from __future__ import annotations

import datetime
import random

MONTHS = [
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
]  # fmt: skip
ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINAL_ONES = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth"]
ORDINAL_TEENS = [
    "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth",
    "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth",
]  # fmt: skip
ORDINAL_TENS = {20: "twentieth", 30: "thirtieth"}
FIRST_DATE, LAST_DATE = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)


def spell_number(n: int) -> str:
    """1..99 in words: 23 -> "twenty-three"."""
    if not 1 <= n <= 99:
        raise ValueError(f"spell_number takes 1..99, got {n}")
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")


def spell_ordinal(n: int) -> str:
    """1..31 as an ordinal: 23 -> "twenty-third"."""
    if n < 10:
        return ORDINAL_ONES[n]
    if n < 20:
        return ORDINAL_TEENS[n - 10]
    if n % 10 == 0:
        return ORDINAL_TENS[n]
    return f"{TENS[n // 10]}-{ORDINAL_ONES[n % 10]}"


def spell_year(year: int, rng: random.Random) -> str:
    """1900..2099 as spoken: "nineteen ninety-four", "nineteen oh five", "two thousand and eight", "twenty twenty"."""
    century, rest = divmod(year, 100)
    if century == 19:
        if rest == 0:
            return "nineteen hundred"
        return "nineteen " + (f"oh {ONES[rest]}" if rest < 10 else spell_number(rest))
    if rest == 0:
        return "two thousand"
    if rest < 10 or rng.random() < 0.5:
        return "two thousand and " + spell_number(rest)
    return "twenty " + spell_number(rest)


def write_date(date: datetime.date, rng: random.Random) -> str:
    """One of several human ways of writing `date`."""
    month, day, year = MONTHS[date.month - 1], date.day, date.year
    weekday = date.strftime("%A").lower()
    formats = [
        lambda: f"the {spell_ordinal(day)} of {month}, {spell_year(year, rng)}",
        lambda: f"{month} the {spell_ordinal(day)}, {spell_year(year, rng)}",
        lambda: f"{month.capitalize()} {day}, {year}",
        lambda: f"{day} {month.capitalize()} {year}",
        lambda: f"{day:02d}/{date.month:02d}/{year}",
        lambda: f"{month[:3].capitalize()} {day} {year}",
        lambda: f"{weekday.capitalize()}, {month.capitalize()} {day}, {year}",
        lambda: f"{weekday} the {spell_ordinal(day)} of {month} {year}",
    ]
    return rng.choice(formats)()


def make_date_pairs(
    n_train: int, n_heldout: int, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(source, ISO date) pairs for training and held-out evaluation; held-out dates never occur in training."""
    rng = random.Random(seed)
    span = (LAST_DATE - FIRST_DATE).days + 1
    if n_heldout >= span:
        raise ValueError(f"at most {span - 1} held-out dates exist, asked for {n_heldout}")
    offsets = list(range(span))
    rng.shuffle(offsets)
    heldout_dates = {FIRST_DATE + datetime.timedelta(days=d) for d in offsets[:n_heldout]}
    train_offsets = offsets[n_heldout:]

    def pair(date: datetime.date) -> tuple[str, str]:
        return write_date(date, rng), date.isoformat()

    train = [pair(FIRST_DATE + datetime.timedelta(days=rng.choice(train_offsets))) for _ in range(n_train)]
    heldout = [pair(date) for date in sorted(heldout_dates)]
    rng.shuffle(heldout)
    return train, heldout


__all__ = ["make_date_pairs", "spell_number", "spell_ordinal", "spell_year", "write_date"]
