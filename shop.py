"""
The built-in dataset: a simulated shop, generated deterministically (no download), prepared
through the ordinary event-log path of data.py. `python data.py --builtin` (or a plain
`python train.py`) builds it into data/builtin; --n_users, --n_items, --session_scale and --repeat
give logs of other shapes.

The ground truth (what a model can learn, and why a GPT with context beats first-order Markov):
- 434 pages (builtin_pages): 10 hubs (home, search, deals, new-arrivals, cart, wishlist,
  checkout, purchase, account, help), 8 category pages c/X, 320 items p/X/k with Zipf(1.1)
  popularity by k, 96 reviews pages p/X/k/reviews (k < 12). Most pages hold < 1% of events.
- 5 segments (SEGMENTS) with their own liked categories (recoverable by clustering users'
  page counts), landing pages, next page from home and from an item, checkout and purchase
  rates (the outcome page `purchase`) and session lengths: the same page is left differently
  by different segments, so knowing the segment (from the context) helps.
- Tail pages are predictable: from item p/X/k the user opens its companion p/X/c(k), c(k) =
  20 + (7k+3) mod 20 (a tail item), with a segment-dependent probability; reviews pages are
  reached only from their item; new-arrivals leads to the newest items p/X/30..39.
- Second-order rules (the page two or more steps back matters): after a companion, 40% go
  back to the item it came from; after reviews, 50% back to the item and 35% to the cart;
  search leads to an item of the category browsed before the search; cart and wishlist lead
  to checkout or back to the category page of the item put there; purchase ends the session
  70% of the time.
- Sessions are separated by gaps of 1 hour to 4 days; events within one by 5 s to 2 minutes.
"""

import gzip
import math
import os
from bisect import bisect

import numpy as np

from data import DERIVED, build_dataset
from files import building, write_atomic


CATEGORIES = ["electronics", "books", "fashion", "beauty", "toys", "home-living", "sports", "garden"]
HUBS = ["home", "search", "deals", "new-arrivals", "cart", "wishlist", "checkout", "purchase", "account", "help"]
N_ITEMS, N_REVIEWED = 40, 12  # items per category (Zipf popularity by index); items 0..11 have a reviews page
SEGMENTS = [  # the ground truth of the simulated shop (the module docstring); weights need not sum to 1
    dict(name="deal hunters", share=.24, likes={"fashion": 5, "beauty": 4}, sessions=4, p_end=.14,
         land=[3, 6, 1, 0, 0],                   # session starts at: home, deals, category, search, new-arrivals
         home=[6, 2, 1, .5, .5],                 # home -> deals, category, search, account/help, new-arrivals
         item=[25, 5, 4, 36, 2, 10, 5, 13],      # item -> item of the same category, its companion, its reviews,
         checkout=.35, purchase=.5),             #         cart, wishlist, category page, search, home
    dict(name="researchers", share=.20, likes={"electronics": 6, "books": 4}, sessions=3, p_end=.07,
         land=[5, 0, 3, 2, 0], home=[.5, 5, 3, 1, .5], item=[20, 25, 35, 8, 2, 5, 7, 0],
         checkout=.5, purchase=.6),
    dict(name="family shoppers", share=.20, likes={"toys": 5, "home-living": 4}, sessions=4, p_end=.12,
         land=[6, 1, 3, 0, 0], home=[1, 7, .5, 1, .5], item=[28, 10, 5, 42, 0, 10, 0, 5],
         checkout=.75, purchase=.85),
    dict(name="outdoor searchers", share=.20, likes={"sports": 5, "garden": 4}, sessions=4, p_end=.10,
         land=[2, 0, 1, 7, 0], home=[.5, 2, 7, .5, 0], item=[18, 15, 10, 12, 0, 0, 45, 0],
         checkout=.5, purchase=.5),
    dict(name="window shoppers", share=.16, likes={}, sessions=5, p_end=.2,
         land=[6, 1, 1, 0, 2], home=[1, 3, 0, 1, 5], item=[15, 5, 5, 2, 25, 20, 3, 25],
         checkout=.2, purchase=.3),
]


def builtin_pages(n_items=N_ITEMS):
    return (HUBS + [f"c/{c}" for c in CATEGORIES] + [f"p/{c}/{k}" for c in CATEGORIES for k in range(n_items)]
            + [f"p/{c}/{k}/reviews" for c in CATEGORIES for k in range(N_REVIEWED)])


def companion(k, n_items=N_ITEMS):
    """Item k's companion (think: camera -> its lens): a tail item (20..39 of 40) of the same category."""
    half = n_items // 2
    return half + (7 * k + 3) % half


def cum(w):
    """Cumulative weights, normalized (draw with Rules.draw)."""
    return (np.cumsum(w) / np.sum(w)).tolist()


def item(c, k):                                   # a page is (name, category, item)
    return (f"p/{CATEGORIES[c]}/{k}", c, k)


def category(c):
    return (f"c/{CATEGORIES[c]}", c, None)


def hub(name, c=None, k=None):
    return (name, c, k)


class Rules:
    """The shop's seeded random stream and its rules for the next page (the module docstring)."""

    def __init__(self, seed, n_items, repeat_decay):
        self.rng = np.random.default_rng(seed)
        self.U = self.uniforms()
        self.n_items, self.repeat_decay, self.log_decay = n_items, repeat_decay, math.log(repeat_decay)
        self.newest = n_items - n_items // 4
        self.zipf_item = cum(1 / np.arange(1, n_items + 1) ** 1.1)
        self.flat_item = cum(1 / np.arange(1, n_items + 1) ** 0.5)

    def uniforms(self):  # scalar draws from a seeded stream, fast
        while True:
            yield from self.rng.random(1 << 16).tolist()

    def u(self):
        return next(self.U)

    def draw(self, c):   # an index drawn with cumulative weights c
        return min(bisect(c, next(self.U)), len(c) - 1)

    def revisit(self, seen):
        """One of seen (the user's page events so far, oldest first), the one `age` events back (1 = the
        newest) drawn with weight repeat_decay**(age - 1): a truncated geometric age, by inverting its
        CDF (1 - d**a) / (1 - d**n), so no weights are built per draw."""
        n = len(seen)
        age = math.ceil(math.log(1.0 - next(self.U) * (1.0 - self.repeat_decay ** n)) / self.log_decay)
        return seen[n - min(max(age, 1), n)]

    def landing(self, land, cats):
        """A session's first page."""
        draw = self.draw
        return [hub("home"), hub("deals"), category(draw(cats)), hub("search", draw(cats)),
                hub("new-arrivals")][draw(land)]

    def next_page(self, page, prev, seg, cats, home, acts):
        """The page after `page` (prev: the one before it) for a user of segment seg."""
        draw, U, n_items = self.draw, self.U, self.n_items
        name, c, k = page
        if name == "home":
            a = draw(home)
            return [hub("deals"), category(draw(cats)), hub("search", draw(cats)),
                    hub("account" if next(U) < .6 else "help"), hub("new-arrivals")][a]
        if name == "deals":  # sale items 8, 13, 17 of a liked category
            return item(draw(cats), (8, 13, 17)[min(int(3 * next(U)), 2)])
        if name == "new-arrivals":  # the newest items, the last quarter (30..39 of 40): tail pages
            newest = self.newest
            return item(draw(cats), newest + min(int((n_items - newest) * next(U)), n_items - newest - 1))
        if name.startswith("c/"):
            return item(c, draw(self.zipf_item))
        if name == "search":  # an item of the category browsed before the search
            return item(c if c is not None else draw(cats), draw(self.flat_item))
        if name.endswith("/reviews"):
            a = next(U)
            return item(c, k) if a < .5 else hub("cart", c, k) if a < .85 else hub("search", c)
        if name.startswith("p/"):
            if prev[2] is not None and prev[1] == c and companion(prev[2], n_items) == k and next(U) < .4:
                return prev  # back from the companion to the item it came from
            a = draw(acts)
            if a == 2 and k >= N_REVIEWED:
                a = 0
            return [item(c, draw(self.zipf_item)), item(c, companion(k, n_items)), hub(f"{name}/reviews", c, k),
                    hub("cart", c, k), hub("wishlist", c, k), category(c), hub("search", c), hub("home")][a]
        if name in ("cart", "wishlist"):  # checkout, or back to the category of the item put there
            go = next(U) < (seg["checkout"] if name == "cart" else .1)
            return hub("checkout") if go else category(c) if c is not None else hub("home")
        if name == "checkout":
            return hub("purchase") if next(U) < seg["purchase"] else hub("help")
        # purchase, account, help
        return hub("home") if next(U) < .7 else hub("account" if name == "help" else "help")


def simulate_site(n_users=5000, seed=1337, n_items=N_ITEMS, session_scale=1.0, repeat=0.0, repeat_decay=0.8):
    """Simulated shop log: rows (user, epoch seconds, page) and the ground-truth segment of each user
    (the module's docstring says what a model can learn from it).
    Other shapes (the defaults give the built-in shop): n_items per category scales the catalogue
    (companions are items n/2..n-1, new arrivals the last quarter); session_scale scales each
    segment's mean number of sessions (0.25: mostly one session per user, short histories).
    repeat in [0, 1] makes a repeat-heavy log: with probability `repeat` the next event (a
    session's first one included) revisits one of the user's own earlier page events instead of
    following the rules (Rules.next_page), drawn with recency weights repeat_decay**(age - 1) over all the user's
    page events so far (age 1 = the newest: the current page, a reload; at a session's start, the
    previous session's last page), so recent pages come back most; the session then goes on by the
    ordinary rules from the page revisited.
    The share of events that revisit a user's earlier pages rises with `repeat`; repeat=0 draws
    nothing extra (the log is the one without the knob, event for event)."""
    if not 0.0 <= repeat <= 1.0 or not 0.0 < repeat_decay < 1.0:
        raise ValueError("simulate_site needs 0 <= repeat <= 1 and 0 < repeat_decay < 1")
    sim = Rules(seed, n_items, repeat_decay)
    rng, U = sim.rng, sim.U
    seg_of = np.minimum(np.searchsorted(np.cumsum([s["share"] for s in SEGMENTS]), rng.random(n_users)),
                        len(SEGMENTS) - 1)
    rows, t_first = [], 1704067200 + rng.integers(0, 30 * 86400, size=n_users)  # from 2024-01-01 UTC
    for u in range(n_users):
        seg = SEGMENTS[seg_of[u]]
        cats = cum([seg["likes"].get(c, .2) if seg["likes"] else 1 for c in CATEGORIES])
        land, home, acts = cum(seg["land"]), cum(seg["home"]), cum(seg["item"])
        t, seen = float(t_first[u]), []  # seen: the user's page events so far (only with repeat > 0)
        for _ in range(1 + rng.poisson(max(0.0, seg["sessions"] * session_scale - 1))):
            if repeat > 0 and seen and next(U) < repeat:  # the session opens on a page visited before
                page = sim.revisit(seen)
            else:
                page = sim.landing(land, cats)
            hist = []
            while True:
                hist.append(page)
                rows.append((u, int(t), page[0]))
                if repeat > 0:
                    seen.append(page)
                t += 5 + 115 * next(U) ** 2
                if len(hist) >= 40 or next(U) < (.7 if page[0] == "purchase" else seg["p_end"]):
                    break
                if repeat > 0 and next(U) < repeat:  # back to a page visited before (the current one too)
                    page = sim.revisit(seen)
                    continue
                page = sim.next_page(page, hist[-2] if len(hist) > 1 else hub(None), seg, cats, home, acts)
            t += 3600 + 3 * 86400 * next(U)
    return rows, seg_of.astype(np.int64)


def make_builtin(data_dir="data/builtin", seed=1337, n_users=5000, n_items=N_ITEMS, session_scale=1.0, split="page",
                 repeat=0.0):
    """Simulate the shop (repeat: see simulate_site), write data_dir/events.csv.gz (user,time,page), prepare it
    through the ordinary event-log reader with 30-minute time-gap sessions, then write segments.npy (ground-truth
    segment per user index); all in one atomic build (see building). Returns meta."""
    rows, segments = simulate_site(n_users, seed, n_items, session_scale, repeat)  # tests, other shapes
    order = sorted(range(len(rows)), key=lambda i: (rows[i][1], i))  # a real log: global time order
    lines = ["user,time,page"] + [f"u{rows[i][0]:05d},{rows[i][1]},{rows[i][2]}" for i in order]
    with building(data_dir, DERIVED) as folder:
        path = os.path.join(folder, "events.csv.gz")
        with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            gz.write(("\n".join(lines) + "\n").encode())  # mtime=0: the same bytes on every run
        meta = build_dataset(path, folder, time_col="time", session_gap=1800.0,
                             source=os.path.join(data_dir, "events.csv.gz"), split=split)
        with open(os.path.join(folder, "users.txt"), encoding="utf-8") as f:  # users in order of first visit
            users = f.read().split()
        write_atomic(os.path.join(folder, "segments.npy"), segments[[int(u[1:]) for u in users]])
    return meta


