"""Synthetic AQuA-style problems, written by us: offline data for CPU runs and a pipeline oracle.

Nine templated families (percent/profit, speed-distance-time, work rates, simple/compound interest,
ratios, ages, averages, geometry, unitary method), each at three levels:
  easy   one small arithmetic step with small numbers (problem + rationale + answer ~150-250 chars),
         meant to be learnable by a tiny model with a 256-512 token context;
  medium two or three steps, AQuA-like wording;
  hard   several steps (combined rates, compound interest, age equations, replacement averages...).

Determinism and disjoint splits:
  - example i of a split is generated from random.Random(f"{seed}/{split}/{i}/{attempt}") only, so
    the same (split, index, difficulty, seed) always gives the same item;
  - each problem's mathematical content (family, level and its numbers, not the cosmetic names or
    objects) is hashed to a bucket: 80% train, 10% validation, 10% test. A generated problem whose
    bucket belongs to another split is rejected and the next attempt drawn, so no problem (and no
    number combination of a family) appears in two splits;
  - the correct letter is exactly uniform: each block of 5 consecutive indices uses each letter
    once, in a seeded random order.
Items have the same format as AquaRat (same prompt, rationale + final "Answer: X" target, "letters",
"answer", "options") plus "family" and "difficulty". The rationale's worked steps are followed by a
check of the options in order, up to the right one ("A) 4 no", "B) 12 yes"; see option_checks);
check_options=False leaves it out.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from fractions import Fraction
from typing import Iterator

from tasks.aqua import AQUA_LETTERS, AquaStyleTask, make_aqua_conversation

LEVELS = ("easy", "medium", "hard")
SPLIT_BUCKETS = {"train": range(0, 16), "validation": range(16, 18), "test": range(18, 20)}  # of 20
NAMES = [
    "Tom",
    "Ann",
    "Sam",
    "Mia",
    "Ben",
    "Eva",
    "Leo",
    "Zoe",
    "Max",
    "Ivy",
    "Raj",
    "Kim",
    "Joe",
    "Amy",
    "Dan",
    "Lia",
    "Ravi",
    "Nora",
    "Omar",
    "Jack",
]
ITEMS = ["pen", "book", "cup", "toy", "ball", "box", "hat", "bag", "lamp", "shirt"]


def plural(item: str) -> str:
    return item + ("es" if item.endswith(("s", "x", "sh", "ch")) else "s")


def num(x) -> str:
    """12 -> "12", 12.0 -> "12", 2.5 -> "2.5", Fraction(7, 2) -> "3.5", 10/3 -> "3.33"."""
    if isinstance(x, Fraction):
        x = x.numerator if x.denominator == 1 else float(x)
    if isinstance(x, float):
        if x.is_integer():
            return str(int(x))
        return f"{x:.2f}".rstrip("0").rstrip(".")
    return str(x)


def money(x) -> str:
    return f"${num(x)}"


class Problem:
    """What a family generator returns: text, answer, family-specific wrong answers, formatting."""

    def __init__(self, question, steps, answer, wrong, key, fmt=num):
        self.question, self.steps, self.answer, self.wrong, self.key, self.fmt = (
            question,
            steps,
            answer,
            wrong,
            key,
            fmt,
        )


# ------------------------------------------------------------------------------------------------
# Families. Each takes (rng, level) and returns a Problem. `key` holds every number that matters.


def percent(rng, level):
    if level == "easy":
        p = rng.choice([10, 20, 25, 50, 75, 30, 40, 5])
        n = rng.randrange(1, 21) * (100 // math.gcd(p, 100))  # so that p% of n is a whole number
        a = n * p // 100
        if rng.random() < 0.5:
            return Problem(
                f"What is {p}% of {n}?",
                [f"{p}% of {n} = {n} x {p} / 100 = {a}."],
                a,
                [a + 1, a * 2, n - a, p, a + 10],
                ("pct", p, n),
            )
        return Problem(
            f"What percent of {n} is {a}?",
            [f"{a} / {n} x 100 = {p}%."],
            p,
            [100 - p, p + 10, p // 5 if p % 5 == 0 and p > 5 else p + 5, a, p * 2],
            ("pct2", p, n),
            lambda v: f"{num(v)}%",
        )
    if level == "medium":
        while True:  # redraw until the profit is a whole number of dollars
            c, p = rng.randrange(2, 40) * 10, rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
            if c * p % 100 == 0:
                break
        gain = rng.random() < 0.5
        x = c * p // 100
        s = c + x if gain else c - x
        word = "profit" if gain else "loss"
        return Problem(
            f"A shopkeeper buys a {rng.choice(ITEMS)} for ${c} and sells it at a {p}% {word}. "
            f"What is the selling price?",
            [
                f"The {word} is {p}% of {c} = {x}.",
                f"Selling price = {c} {'+' if gain else '-'} {x} = {s}.",
            ],
            s,
            [x, c - x if gain else c + x, c + p if gain else c - p, s + 10, s - 5],
            ("sp", c, p, gain),
            money,
        )
    # hard: cost price back from a selling price
    gain = rng.random() < 0.5
    while True:
        c, p = rng.randrange(4, 60) * 25, rng.choice([4, 8, 12, 16, 20, 25, 40])
        k = 100 + p if gain else 100 - p
        if c * k % 100 == 0:
            break
    s = c * k // 100
    word = "gains" if gain else "loses"
    return Problem(
        f"By selling an article for ${s}, a trader {word} {p}%. What did the article cost him?",
        [f"Selling price = {k}% of cost price.", f"Cost price = {s} x 100 / {k} = {c}."],
        c,
        [
            s * (100 - p) // 100 if gain else s * (100 + p) // 100,
            s - p if gain else s + p,
            c + p,
            round(s * 100 / (100 - p if gain else 100 + p)),
        ],
        ("cp", c, p, gain),
        money,
    )


def speed(rng, level):
    if level == "easy":
        s, t = rng.randrange(2, 16), rng.randrange(2, 10)
        if rng.random() < 0.5:
            return Problem(
                f"A car goes {s} km/h for {t} hours. How far does it go?",
                [f"Distance = {s} x {t} = {s * t} km."],
                s * t,
                [s + t, s * t + s, s * t - t, s * (t + 1)],
                ("d", s, t),
                lambda v: f"{num(v)} km",
            )
        d = s * t
        return Problem(
            f"A bike covers {d} km at {s} km/h. How many hours does it take?",
            [f"Time = {d} / {s} = {t} hours."],
            t,
            [t + 1, t - 1, d - s, s, t + 2],
            ("t", s, t),
            lambda v: f"{num(v)} h",
        )
    if level == "medium":
        v = rng.choice([5, 10, 15, 20, 25, 30]) * rng.choice(
            [1, 2]
        )  # m/s, a multiple of 5 -> km/h integer
        t = rng.randrange(6, 30)
        length = v * t
        kmh = v * 18 // 5
        return Problem(
            f"A train {length} m long passes a pole in {t} seconds. What is its speed in km/h?",
            [f"Speed = {length} / {t} = {v} m/s.", f"In km/h: {v} x 18 / 5 = {kmh}."],
            kmh,
            [v, kmh + 18, kmh - 9, v * 5 // 18 if v * 5 % 18 == 0 else kmh * 2, kmh + 5],
            ("train", length, t),
            lambda x: f"{num(x)} km/h",
        )
    # hard: two trains crossing each other
    rel = rng.choice([36, 54, 72, 90, 108, 126, 144])  # km/h, multiples of 18
    s1 = rng.randrange(rel // 4, rel * 3 // 4)
    s2 = rel - s1
    ms = rel * 5 // 18
    t = rng.randrange(6, 25)
    total = ms * t
    l1 = rng.randrange(total // 4, total * 3 // 4)
    l2 = total - l1
    return Problem(
        f"Two trains {l1} m and {l2} m long run in opposite directions at {s1} km/h and {s2} km/h. "
        f"How many seconds do they take to cross each other?",
        [
            f"Relative speed = {s1} + {s2} = {rel} km/h = {rel} x 5 / 18 = {ms} m/s.",
            f"Distance = {l1} + {l2} = {total} m.",
            f"Time = {total} / {ms} = {t} s.",
        ],
        t,
        [
            t * 2,
            total // max(1, abs(s1 - s2) * 5 // 18)
            if abs(s1 - s2) * 5 % 18 == 0 and s1 != s2
            else t + 3,
            t + 1,
            t - 2,
            round(total / rel),
        ],
        ("trains", l1, l2, s1, s2),
        lambda x: f"{num(x)} s",
    )


def _pairs_with_integer_together(limit=60):
    out = []
    for a in range(2, limit):
        for b in range(a + 1, limit):
            if (a * b) % (a + b) == 0:
                out.append((a, b))
    return out


_WORK_PAIRS = _pairs_with_integer_together()


def work(rng, level):
    if level == "easy":
        w, d = rng.randrange(2, 13), rng.randrange(2, 16)
        if rng.random() < 0.5:
            return Problem(
                f"1 worker builds a wall in {w * d} days. How many days do {w} workers take?",
                [f"{w} workers are {w} times as fast: {w * d} / {w} = {d} days."],
                d,
                [w * d - w, d + 1, w, d * 2, w * d // 2 if w * d // 2 != d else d + 3],
                ("w1b", w, d),
                lambda v: f"{num(v)} days",
            )
        return Problem(
            f"{w} workers build a wall in {d} days. How many days would 1 worker take?",
            [f"1 worker needs {w} times as long: {w} x {d} = {w * d} days."],
            w * d,
            [w + d, d, w * d + w, w * d - d, d * (w + 1)],
            ("w1", w, d),
            lambda v: f"{num(v)} days",
        )
    a, b = rng.choice(_WORK_PAIRS)
    t = a * b // (a + b)
    n1, n2 = rng.sample(NAMES, 2)
    if level == "medium":
        return Problem(
            f"{n1} can do a job in {a} days and {n2} in {b} days. "
            f"How many days do they take working together?",
            [
                f"In one day they do 1/{a} + 1/{b} = {a + b}/{a * b} of the job.",
                f"Together: {a * b} / {a + b} = {t} days.",
            ],
            t,
            [(a + b) // 2, b - a, a + b, t + 1, t + 2],
            ("w2", a, b),
            lambda v: f"{num(v)} days",
        )
    # hard: a pipe fills in a hours, a leak empties in b hours (b > a); net filling time
    f_, e = a, b
    net = f_ * e // (e - f_) if (f_ * e) % (e - f_) == 0 else None
    if net is None:  # fall back to "together t, A alone a -> B alone b"
        return Problem(
            f"{n1} and {n2} together finish a task in {t} days. {n1} alone takes {a} days. "
            f"How many days does {n2} take alone?",
            [
                f"{n2}'s share per day = 1/{t} - 1/{a} = {a - t}/{a * t}.",
                f"{n2} alone: {a * t} / {a - t} = {b} days.",
            ],
            b,
            [a - t, a + t, b + a, t * 2, b - 2],
            ("w3", a, b),
            lambda v: f"{num(v)} days",
        )
    return Problem(
        f"A pipe fills a tank in {f_} hours, but a leak empties the full tank in {e} hours. "
        f"With the leak, how many hours does the pipe take to fill the tank?",
        [
            f"Net part filled per hour = 1/{f_} - 1/{e} = {e - f_}/{f_ * e}.",
            f"Time = {f_ * e} / {e - f_} = {net} hours.",
        ],
        net,
        [
            e - f_,
            f_ * e // (f_ + e) if (f_ * e) % (f_ + e) == 0 else net + 2,
            net + 1,
            e + f_,
            net * 2,
        ],
        ("w4", f_, e),
        lambda v: f"{num(v)} h",
    )


def interest(rng, level):
    if level == "easy":
        p, r, t = rng.randrange(1, 10) * 100, rng.randrange(1, 11), rng.randrange(1, 6)
        i = p * r * t // 100
        return Problem(
            f"What is the simple interest on ${p} at {r}% a year for {t} "
            f"year{'s' if t > 1 else ''}?",
            [f"Interest = {p} x {r} x {t} / 100 = {i}."],
            i,
            [p * r // 100, i + p, i + 10, i * 2, r * t],
            ("si", p, r, t),
            money,
        )
    if level == "medium":
        p, r, t = rng.randrange(2, 40) * 100, rng.randrange(2, 13), rng.randrange(2, 7)
        i = p * r * t // 100
        a = p + i
        return Problem(
            f"A sum of money amounts to ${a} in {t} years at {r}% simple interest a year. "
            f"What is the sum?",
            [
                f"Amount = sum x (100 + {r} x {t}) / 100 = sum x {100 + r * t} / 100.",
                f"Sum = {a} x 100 / {100 + r * t} = {p}.",
            ],
            p,
            [i, a - p * r // 100, p + 100, a - r * t, p - 100],
            ("sia", p, r, t),
            money,
        )
    # hard: difference between 2-year compound and simple interest
    r = rng.choice([4, 5, 10, 20, 25])
    unit = (100 // r) ** 2
    d = rng.randrange(1, 40) * (10 if unit < 100 else 1)
    p = d * unit
    return Problem(
        f"The difference between compound and simple interest on a sum for 2 years at {r}% a year "
        f"is ${d}. What is the sum?",
        [
            f"For 2 years, CI - SI = sum x ({r}/100)^2.",
            f"Sum = {d} x (100/{r})^2 = {d} x {unit} = {p}.",
        ],
        p,
        [d * 100 // r, p // 2, p + unit * 10, d * unit * 2, p - d],
        ("cisi", p, r),
        money,
    )


def ratio(rng, level):
    if level == "easy":
        b, x = rng.randrange(2, 8), rng.randrange(2, 21)
        return Problem(
            f"The ratio of boys to girls is 1:{b}. There are {x} boys. How many girls are there?",
            [f"Girls = {x} x {b} = {x * b}."],
            x * b,
            [x + b, x * b + x, x * (b + 1), x * b - 1, b],
            ("r1", b, x),
        )
    if level == "medium":
        a, b = rng.sample(range(1, 8), 2)
        k = rng.randrange(2, 20) * (10 if rng.random() < 0.5 else 1)
        n = (a + b) * k
        n1, n2 = rng.sample(NAMES, 2)
        return Problem(
            f"${n} is shared between {n1} and {n2} in the ratio {a}:{b}. How much does {n1} get?",
            [
                f"Total parts = {a} + {b} = {a + b}.",
                f"One part = {n} / {a + b} = {k}.",
                f"{n1} gets {a} x {k} = {a * k}.",
            ],
            a * k,
            [b * k, n // a if n % a == 0 and n // a != a * k else n - 1, k, a * k + k, n - k],
            ("r2", a, b, n),
            money,
        )
    # hard: chain two ratios A:B and B:C into A:C
    a, b1 = rng.sample(range(1, 10), 2)
    b2, c = rng.sample(range(1, 10), 2)
    x, y = Fraction(a * b2, b1 * c).numerator, Fraction(a * b2, b1 * c).denominator
    if x == y:  # A:C = 1:1 makes a poor question; ask a three-way share instead
        return _ratio_hard_fallback(rng)

    def fmt_r(v):
        return f"{v[0]}:{v[1]}"

    wrong = [(y, x), (a * c, b1 * b2), (a + b2, b1 + c), (x + 1, y), (x, y + 1)]
    wrong = [(Fraction(p, q).numerator, Fraction(p, q).denominator) for p, q in wrong]
    # P, Q, R rather than A, B, C: those letters name the options
    return Problem(
        f"If P:Q = {a}:{b1} and Q:R = {b2}:{c}, what is P:R?",
        [f"P:R = ({a} x {b2}):({b1} x {c}) = {a * b2}:{b1 * c} = {x}:{y}."],
        (x, y),
        wrong,
        ("r3", a, b1, b2, c),
        fmt_r,
    )


def _ratio_hard_fallback(rng):
    a, b, c = rng.sample(range(1, 10), 3)
    k = rng.randrange(2, 15)
    n = (a + b + c) * k
    big = max(a, b, c) * k
    return Problem(
        f"${n} is divided in the ratio {a}:{b}:{c}. What is the largest share?",
        [
            f"Total parts = {a} + {b} + {c} = {a + b + c}.",
            f"One part = {n} / {a + b + c} = {k}.",
            f"Largest share = {max(a, b, c)} x {k} = {big}.",
        ],
        big,
        [min(a, b, c) * k, k, big + k, n - big, sorted([a, b, c])[1] * k],
        ("r4", a, b, c, n),
        money,
    )


def ages(rng, level):
    n1, n2 = rng.sample(NAMES, 2)
    if level == "easy":
        x, d = rng.randrange(3, 40), rng.randrange(2, 10)
        if rng.random() < 0.5:
            return Problem(
                f"{n1} is {x} years old. {n2} is {d} years older. How old is {n2}?",
                [f"{x} + {d} = {x + d}."],
                x + d,
                [x - d, x + d + 1, x + 2 * d, x + d - 2, x],
                ("a1", x, d),
            )
        return Problem(
            f"{n1} is {x} years old now. How old will {n1} be in {d} years?",
            [f"{x} + {d} = {x + d}."],
            x + d,
            [x - d, x + d + 1, x + d - 1, x + 2 * d, d * 2],
            ("a2", x, d),
        )
    if level == "medium":
        k, s = rng.randrange(2, 6), rng.randrange(4, 16)
        total = s * (k + 1)
        return Problem(
            f"A father is {k} times as old as his son. Their ages add up to {total}. "
            f"How old is the father?",
            [
                f"Son + {k} x son = {k + 1} x son = {total}, "
                f"so the son is {total} / {k + 1} = {s}.",
                f"Father = {k} x {s} = {k * s}.",
            ],
            k * s,
            [s, total - s + 1, k * s + k, total // k if total % k == 0 else s + k, k * s - 2],
            ("a3", k, s),
        )
    # hard: "now k times, y years ago m times" -> son's present age
    while True:
        s, k, y = rng.randrange(5, 25), rng.randrange(2, 5), rng.randrange(2, 10)
        if s - y >= 2 and (k * s - y) % (s - y) == 0 and (k * s - y) // (s - y) > k:
            m = (k * s - y) // (s - y)
            break
    return Problem(
        f"A man is {k} times as old as his son. {y} years ago he was {m} times as old as his son. "
        f"How old is the son now?",
        [
            f"Let the son be x. Then {k}x - {y} = {m}(x - {y}).",
            f"So {m - k}x = {m * y - y}, x = {(m * y - y)} / {m - k} = {s}.",
        ],
        s,
        [k * s, s - y, s + y, s + 1, m * y],
        ("a4", s, k, y),
        lambda v: f"{num(v)} years",
    )


def averages(rng, level):
    if level == "easy":
        if rng.random() < 0.5:
            a, b = rng.randrange(1, 20), rng.randrange(1, 20)
            if (a + b) % 2:
                b += 1
            return Problem(
                f"What is the average of {a} and {b}?",
                [f"({a} + {b}) / 2 = {(a + b) // 2}."],
                (a + b) // 2,
                [a + b, (a + b) // 2 + 1, abs(a - b) // 2 or 3, max(a, b), min(a, b) + 1],
                ("m2", a, b),
            )
        m = rng.randrange(2, 15)
        a, b = rng.randrange(1, 2 * m), rng.randrange(1, 2 * m)
        c = 3 * m - a - b
        if c <= 0:
            a, b, c = m - 1, m, m + 1
        return Problem(
            f"What is the average of {a}, {b} and {c}?",
            [f"({a} + {b} + {c}) / 3 = {a + b + c} / 3 = {m}."],
            m,
            [a + b + c, m + 1, m - 1, (a + b + c) // 2, m + 3],
            ("m3", a, b, c),
        )
    if level == "medium":
        n, A = rng.randrange(4, 10), rng.randrange(10, 60)
        B = A + rng.choice([-3, -2, -1, 1, 2, 3, 4])
        x = (n + 1) * B - n * A
        if x <= 0:
            B, x = A + 2, (n + 1) * (A + 2) - n * A
        return Problem(
            f"The average of {n} numbers is {A}. When one more number is added, the average "
            f"becomes {B}. What is the new number?",
            [
                f"Sum of {n} numbers = {n} x {A} = {n * A}.",
                f"New sum = {n + 1} x {B} = {(n + 1) * B}.",
                f"New number = {(n + 1) * B} - {n * A} = {x}.",
            ],
            x,
            [B, x + n, abs(B - A) * n, x - B, x + 1],
            ("m4", n, A, B),
        )
    n, w, d = rng.randrange(4, 13), rng.randrange(40, 80), rng.choice([1, 1.5, 2, 2.5, 3, 4])
    new = w + n * d
    return Problem(
        f"The average weight of {n} people rises by {num(d)} kg when one of them, weighing {w} kg, "
        f"is replaced by a new person. What does the new person weigh?",
        [
            f"Total rise = {n} x {num(d)} = {num(n * d)} kg.",
            f"New person = {w} + {num(n * d)} = {num(new)} kg.",
        ],
        new,
        [w - n * d, w + d, new + d, w + (n - 1) * d, new + n],
        ("m5", n, w, d),
        lambda v: f"{num(v)} kg",
    )


def geometry(rng, level):
    if level == "easy":
        a, b = rng.randrange(2, 16), rng.randrange(2, 16)
        if rng.random() < 0.5:
            return Problem(
                f"A rectangle is {a} cm by {b} cm. What is its area?",
                [f"Area = {a} x {b} = {a * b}."],
                a * b,
                [2 * (a + b), a + b, a * b + a, a * b - b, (a + 1) * b],
                ("g1", a, b),
                lambda v: f"{num(v)} sq cm",
            )
        return Problem(
            f"A rectangle is {a} cm by {b} cm. What is its perimeter?",
            [f"Perimeter = 2 x ({a} + {b}) = {2 * (a + b)}."],
            2 * (a + b),
            [a * b, a + b, 2 * a + b, 2 * (a + b) + 2, 4 * a],
            ("g2", a, b),
            lambda v: f"{num(v)} cm",
        )
    if level == "medium":
        s = rng.randrange(3, 30)
        return Problem(
            f"The perimeter of a square is {4 * s} m. What is its area?",
            [f"Side = {4 * s} / 4 = {s} m.", f"Area = {s} x {s} = {s * s} sq m."],
            s * s,
            [4 * s, 16 * s * s, s * s + s, (s + 1) ** 2, 2 * s * s],
            ("g3", s),
            lambda v: f"{num(v)} sq m",
        )
    w, k = rng.randrange(3, 30), rng.randrange(2, 15)
    length = w + k
    p = 2 * (w + length)
    return Problem(
        f"A rectangle's length is {k} m more than its width, and its perimeter is {p} m. "
        f"What is its area?",
        [
            f"2 x (w + w + {k}) = {p}, so 2w + {k} = {p // 2} and w = {w}.",
            f"Length = {w} + {k} = {length}.",
            f"Area = {w} x {length} = {w * length} sq m.",
        ],
        w * length,
        [w * w, length * length, w * length + k, (p // 4) ** 2, w * (length + 1)],
        ("g4", w, k),
        lambda v: f"{num(v)} sq m",
    )


def unitary(rng, level):
    item = rng.choice(ITEMS)
    if level == "easy":
        n, u = rng.randrange(2, 13), rng.randrange(2, 16)
        if rng.random() < 0.5:
            return Problem(
                f"{n} {plural(item)} cost ${n * u}. What does one {item} cost?",
                [f"{n * u} / {n} = {u}."],
                u,
                [n * u - n, u + 1, n, u * 2, u - 1],
                ("u1", n, u),
                money,
            )
        return Problem(
            f"One {item} costs ${u}. What do {n} {plural(item)} cost?",
            [f"{n} x {u} = {n * u}."],
            n * u,
            [n + u, n * u + u, n * u - n, (n + 1) * u + 1, u * u],
            ("u2", n, u),
            money,
        )
    if level == "medium":
        while True:
            a, d, b = rng.randrange(2, 16), rng.randrange(2, 25), rng.randrange(2, 40)
            if b != a and (a * d) % b == 0:
                break
        total = a * d
        return Problem(
            f"{a} men finish a job in {d} days. How many days would {b} men take?",
            [f"Work = {a} x {d} = {total} man-days.", f"Days = {total} / {b} = {total // b}."],
            total // b,
            [
                d * b // a if (d * b) % a == 0 else d + b,
                d,
                total // b + 1,
                abs(d - (b - a)) or d + 2,
                total // b * 2,
            ],
            ("u3", a, d, b),
            lambda v: f"{num(v)} days",
        )
    while True:
        a, h1, d = rng.randrange(2, 13), rng.randrange(4, 11), rng.randrange(3, 25)
        b, h2 = rng.randrange(2, 13), rng.randrange(4, 11)
        if (a * h1 * d) % (b * h2) == 0 and (a, h1) != (b, h2):
            break
    x = a * h1 * d // (b * h2)
    return Problem(
        f"{a} men working {h1} hours a day finish a job in {d} days. "
        f"In how many days would {b} men working {h2} hours a day finish it?",
        [
            f"Total work = {a} x {h1} x {d} = {a * h1 * d} man-hours.",
            f"Days = {a * h1 * d} / ({b} x {h2}) = {x}.",
        ],
        x,
        [a * d // b if (a * d) % b == 0 else x + 3, x + 1, d, x * 2, abs(x - 2) or x + 4],
        ("u4", a, h1, d, b, h2),
        lambda v: f"{num(v)} days",
    )


FAMILIES = {
    "percent": percent,
    "speed": speed,
    "work": work,
    "interest": interest,
    "ratio": ratio,
    "ages": ages,
    "averages": averages,
    "geometry": geometry,
    "unitary": unitary,
}


# ------------------------------------------------------------------------------------------------
# Options, splits, items


def _bucket(family: str, level: str, key: tuple) -> int:
    h = hashlib.sha1(repr((family, level, key)).encode()).hexdigest()
    return int(h, 16) % 20


def _generic_wrong(answer, rng):
    """Near misses of a numeric answer, in random order, for when family distractors run out."""
    out = [answer + d for d in (1, -1, 2, -2, 3, 5, -5, 10, -10)] + [answer * 2, answer * 3]
    if isinstance(answer, int) and answer % 2 == 0:
        out.append(answer // 2)
    rng.shuffle(out)
    return out


def _options(problem: Problem, rng, position: int) -> list[str]:
    """Five distinct option strings with the answer at `position`."""
    right = problem.fmt(problem.answer)
    numeric = not isinstance(problem.answer, tuple)
    pool = list(problem.wrong)
    rng.shuffle(pool)
    if numeric:
        pool += _generic_wrong(problem.answer, rng)
    wrong, seen = [], {right}
    for w in pool:
        if numeric and (w is None or w <= 0):
            continue
        s = problem.fmt(w)
        if s not in seen:
            seen.add(s)
            wrong.append(s)
        if len(wrong) == 4:
            break
    k = 2
    while len(wrong) < 4:  # tuples (ratios) with too few distinct distractors
        s = problem.fmt((problem.answer[0] * k, problem.answer[1] + k))
        if s not in seen:
            seen.add(s)
            wrong.append(s)
        k += 1
    return wrong[:position] + [right] + wrong[position:]


_LEADING_NUMBER = re.compile(
    r"\D*\d+(?:[.:/]\d+)*"
)  # "$96", "90" of "90 sq cm", "3:4", "2.5" of "2.5 kg"


def option_checks(values: list[str], position: int) -> list[str]:
    """The rationale's last lines: the options in order, each marked no, up to the right one
    (marked yes).

    Why: naming the letter of the option that holds a computed value is a backward lookup (the
    letter comes before the value in "B) 12"), and tiny models did not learn it -- not from
    problems, nor from 100,000+ lookup drills (docs/experiments.md, "The answer format"). Walking
    the options forward needs only copying (letter -> its value, what induction heads do) and a
    same-number test, which is learned in a few hundred steps. Each option is cut after its number
    ("C) 90 no" for "90 sq cm") so that the yes/no comes right after the number it judges; options
    the cut would make alike are shown whole."""
    heads = [m.group(0) if (m := _LEADING_NUMBER.match(v)) else v for v in values]
    if len(set(heads)) < len(heads):
        heads = values
    return [
        f"{AQUA_LETTERS[k]}) {heads[k]} " + ("yes" if k == position else "no")
        for k in range(position + 1)
    ]


def generate(
    split: str, index: int, difficulty: str = "easy", seed: int = 0, check_options: bool = True
) -> dict:
    """The item `index` of a split, as a conversation dict (deterministic in all its arguments).

    With check_options the rationale ends with option_checks(); without, it ends at the computed
    value."""
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"split must be one of {tuple(SPLIT_BUCKETS)}, not {split!r}")
    if difficulty not in LEVELS + ("mixed",):
        raise ValueError(f"difficulty must be one of {LEVELS + ('mixed',)}, not {difficulty!r}")
    block = random.Random(f"letters/{seed}/{split}/{index // 5}")
    position = block.sample(range(5), 5)[
        index % 5
    ]  # every 5 consecutive items use each letter once
    for attempt in range(1000):
        rng = random.Random(f"{seed}/{split}/{index}/{attempt}")
        level = rng.choice(LEVELS) if difficulty == "mixed" else difficulty
        family = rng.choice(sorted(FAMILIES))
        problem = FAMILIES[family](rng, level)
        if _bucket(family, level, problem.key) in SPLIT_BUCKETS[split]:
            break
    else:  # pragma: no cover - 1000 misses at p=0.9 each does not happen
        raise RuntimeError(f"could not draw a {split} problem for index {index}")
    values = _options(problem, rng, position)
    steps = problem.steps + (option_checks(values, position) if check_options else [])
    conv = make_aqua_conversation(
        problem.question, values, "\n".join(steps), AQUA_LETTERS[position]
    )
    conv["family"], conv["difficulty"] = family, level
    return conv


class SyntheticAqua(AquaStyleTask):
    """num_examples generated AQuA-style items of one split; same format and grading as AquaRat."""

    name = "synthetic_aqua"

    def __init__(
        self,
        split: str = "train",
        num_examples: int = 1000,
        difficulty: str = "easy",
        seed: int = 0,
        check_options: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        generate(split, 0, difficulty, seed)  # validates split/difficulty now, not at first use
        self.split, self.n, self.difficulty, self.seed = split, int(num_examples), difficulty, seed
        self.check_options = check_options

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return generate(self.split, index, self.difficulty, self.seed, self.check_options)


# ------------------------------------------------------------------------------------------------
# Plain text for pretraining and tokenizer training (train-split problems only: no test leakage)

_INTROS = [
    "",
    "Here is a worked example.\n",
    "Practice problem.\n",
    "Let us solve a word problem.\n",
    "Example:\n",
    "A quick exercise in arithmetic.\n",
]


def _render_doc_problem(conv: dict, rng) -> str:
    prompt = conv["messages"][0]["content"]
    question = prompt.split("\n\n")[0]
    rationale, answer_line = conv["messages"][1]["content"].rsplit("\n", 1)
    letter = conv["answer"]
    value = conv["options"][AQUA_LETTERS.index(letter)].split(")", 1)[1]
    opts = [o.replace(")", ") ", 1) for o in conv["options"]]
    style = rng.randrange(5)
    if style == 0:
        options = " ".join(opts)
        return f"Question: {question}\nOptions: {options}\nRationale: {rationale}\n{answer_line}"
    if style == 1:
        return f"Q: {question}\nA: {rationale} So the answer is {value}."
    if style == 2:
        return (
            f"Problem. {question}\n" + "\n".join(opts) + f"\nSolution. {rationale}\n"
            f"The correct option is {letter}, {value}."
        )
    if style == 3:
        return f"{question} {rationale.replace(chr(10), ' ')} The answer is {value}."
    # the chat prompt's own text, instruction and all: the tokenizer, trained on this corpus,
    # then spends a few tokens on the instruction every prompt repeats, not ~30
    return f"{prompt}\n{rationale}\n{answer_line}"


def synthetic_texts(num_docs: int, seed: int = 0, difficulty: str = "mixed") -> Iterator[str]:
    """num_docs plain-text documents (1-3 solved problems each, varied prose), deterministic in
    seed."""
    counter = 0
    for d in range(num_docs):
        rng = random.Random(f"texts/{seed}/{d}")
        parts = []
        for _ in range(rng.randrange(1, 4)):
            # index space far from SyntheticAqua's usual range so docs aren't verbatim SFT targets
            conv = generate("train", 10_000_000 + seed * 1_000_003 + counter, difficulty, seed)
            counter += 1
            parts.append(_render_doc_problem(conv, rng))
        yield rng.choice(_INTROS) + "\n\n".join(parts)
