"""The labelling store: items to compare, annotators, who was served what, and their labels, in one SQLite file.

Protocol (Llama 2's pairwise comparison, with Argilla's task distribution):

- An item is a prompt and two canonical responses A and B (``kind`` ``pair``, or ``battle``: an arena match whose
  model names stay hidden until the vote). A ``gold`` item has a known answer on the 8-point scale and is mixed,
  unmarked, into annotators' queues to measure their accuracy.
- Each annotator has a secret token. ``next_card`` hands out one card at a time and returns the same card until it
  is answered, so a reload or a server restart resumes where the annotator was.
- Overlap K: a regular item is served to K different annotators, never twice to one. Items already served to
  someone come first, so items reach K before new ones open (a record is finished rather than many started).
- Left/right order is drawn per (item, annotator) and stored; the annotator answers on the LEFT/RIGHT scale they
  saw (1 = left much better ... 8 = right much better) and the store un-swaps it to the canonical A/B value
  (1 = A much better ... 8 = B much better). The order is randomised in blocks of two cards per annotator (one of
  each order, which comes first drawn at random), so each annotator sees A on the left on half their cards to
  within one card and position bias can be measured and cancels in the aggregate.
- A skip (with a reason) is an answer: the annotator says they cannot judge the item; it counts toward the item's
  K answers and never comes back to them. An item is done after K answers, votes or skips; ``is_complete`` is true
  when every regular item is done (gold items are never waited for). An item all K annotators skipped has no vote
  and is not exported.

Durability: WAL journal, one committed transaction per submission. A label is committed with
``synchronous=FULL``: once ``submit`` returns it is in the WAL and fsynced, so neither a SIGKILL of the server nor
a power cut loses it (an fsync per label costs nothing at human speed). Serving a card commits with ``NORMAL``: in
WAL mode that survives a killed process (the OS holds the written WAL), and a power cut can at worst forget a card
served and not yet answered, which is then served afresh; it halves the fsyncs, which dominate bulk use (the loop,
tests). The next FULL commit syncs every frame before it, so answered cards are always durable.
``BEGIN IMMEDIATE`` serialises writers across processes (the loop may read the database while a server writes).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import sqlite3
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SCALE = range(1, 9)
"""The 8-point scale: 1 = A (or left) much better ... 4 = A negligibly better | 5 = B negligibly better ... 8 = B
much better."""
DEGREES = ("much better", "better", "slightly better", "negligibly better")
"""Degree of a vote by distance from the middle: value 1 or 8 is ``much better`` (index 0) ... 4 or 5 ``negligibly
better`` (index 3), as Llama 2's annotators rate it (significantly / better / slightly / negligibly-unsure)."""
DEFAULT_MARGINS = (3.0, 2.0, 1.0, 0.0)
"""The reward model's margin per degree (Llama 2's larger margin set), ``much better`` first."""
SAFETY_LABELS = ("chosen_only_safe", "both_safe", "both_unsafe")
"""Llama 2's 3-way safety label, relative to the response the annotator chose (so it needs no un-swapping)."""
FLAGS = ("unsafe", "pii")
KINDS = ("pair", "battle")
SKIP_REASONS = ("cannot judge", "prompt unclear", "responses identical", "other")
"""The reasons the app offers; ``submit`` takes any short text."""
MAX_TEXT = 4000  # a rationale or skip reason longer than this is a paste accident, not a label

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_MIN_TOKEN_LENGTH = 16


class LabelError(ValueError):
    """Bad input to the store; ``status`` is the HTTP status the app answers with."""

    status = 400


class UnknownToken(LabelError):
    status = 401


class NotAssigned(LabelError):
    status = 403


class AlreadyAnswered(LabelError):
    status = 409


class UnknownItem(LabelError):
    status = 404


@dataclass
class Item:
    """A comparison to label: ``prompt`` (chat messages) and the canonical responses A and B.

    ``model_a``/``model_b`` name where each response came from (shown after the vote in a ``battle``); ``gold`` is
    the known canonical answer on the 8-point scale for a hidden gold item. ``id`` defaults to a hash of the
    content, so adding the same comparison twice adds it once."""

    prompt: list[dict[str, Any]]
    response_a: str
    response_b: str
    model_a: str | None = None
    model_b: str | None = None
    gold: int | None = None
    kind: Literal["pair", "battle"] = "pair"
    id: str | None = None

    def content_id(self) -> str:
        content = [self.prompt, self.response_a, self.response_b, self.model_a, self.model_b]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Card:
    """What one annotator is shown: the prompt and the two responses in the order drawn for them. It carries no
    model names, no gold mark and not which side is A (for pairs made from chosen/rejected data, A is the chosen)."""

    item_id: str
    prompt: list[dict[str, Any]]
    left: str
    right: str
    battle: bool


@dataclass
class Submitted:
    """A stored label: the canonical ``value`` (None for a skip) and, for a battle, the models on the left and
    right, now that the vote is in."""

    item_id: str
    value: int | None
    revealed: dict[str, str] | None = None


@dataclass
class Progress:
    """An annotator's progress: ``done`` answers (gold included) out of ``assigned`` = done + the card open now +
    the regular items still open to them (that number falls as other annotators take items)."""

    done: int
    assigned: int


@dataclass
class Vote:
    """One answered label in canonical terms, with the order the annotator saw."""

    item_id: str
    annotator: str
    value: int | None
    skip_reason: str | None
    flag: str | None
    safety: str | None
    rationale: str | None
    left_is_a: bool
    submitted_at: float
    kind: str
    gold: int | None
    model_a: str | None = None
    model_b: str | None = None


@dataclass(frozen=True)
class Settings:
    """The store's stored settings: ``overlap`` K, ``gold_rate`` (share of cards that are gold), ``seed`` of the
    order and gold draws."""

    overlap: int
    gold_rate: float
    seed: int


def _settings(db: sqlite3.Connection) -> Settings:
    stored = dict(db.execute("SELECT key, value FROM settings").fetchall())
    return Settings(int(stored["overlap"]), float(stored["gold_rate"]), int(stored["seed"]))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    model_a TEXT,
    model_b TEXT,
    gold INTEGER CHECK (gold IS NULL OR gold BETWEEN 1 AND 8),
    kind TEXT NOT NULL CHECK (kind IN ('pair', 'battle'))
);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    token TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS assignments (
    item_id TEXT NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL REFERENCES annotators(name),
    left_is_a INTEGER NOT NULL,
    served_at REAL NOT NULL,
    sequence INTEGER NOT NULL,
    PRIMARY KEY (item_id, annotator)
);
CREATE TABLE IF NOT EXISTS labels (
    item_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    value INTEGER CHECK (value IS NULL OR value BETWEEN 1 AND 8),
    skip_reason TEXT,
    flag TEXT CHECK (flag IS NULL OR flag IN ('unsafe', 'pii')),
    safety TEXT CHECK (safety IS NULL OR safety IN ('chosen_only_safe', 'both_safe', 'both_unsafe')),
    rationale TEXT,
    left_is_a INTEGER NOT NULL,
    submitted_at REAL NOT NULL,
    PRIMARY KEY (item_id, annotator),
    FOREIGN KEY (item_id, annotator) REFERENCES assignments(item_id, annotator),
    CHECK ((value IS NULL) != (skip_reason IS NULL))
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments (annotator, sequence);
"""


def canonical_value(shown_value: int, left_is_a: bool) -> int:
    """The A/B value of a vote given on the left/right scale: when B was on the left, 1 (left much better) is 8
    (B much better), so the scale mirrors."""
    return shown_value if left_is_a else 9 - shown_value


def vote_side(value: int) -> Literal["a", "b"]:
    return "a" if value <= 4 else "b"


def vote_degree(value: int) -> int:
    """Index into :data:`DEGREES`: 0 for 1 and 8 (much better) ... 3 for 4 and 5 (negligibly better)."""
    return value - 1 if value <= 4 else 8 - value


class LabelStore:
    """Items, annotators, assignments and labels in the SQLite file ``path`` (created if missing).

    Safe to share between threads of one process (one connection behind a lock) and between processes (WAL,
    ``BEGIN IMMEDIATE`` for writes). ``overlap`` and ``gold_rate`` are stored settings (``configure``), so a
    restarted server, ``export`` and the loop all see the same ones."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            with self._lock:
                self._db.executescript(_SCHEMA)  # executescript commits first, so it runs outside _write
            with self._write() as db:
                # The seed of the left/right draws: fixed at creation so a restart draws as before.
                db.execute(
                    "INSERT OR IGNORE INTO settings VALUES ('seed', ?), ('overlap', '1'), ('gold_rate', '0.05')",
                    (str(secrets.randbits(63)),),
                )
        except sqlite3.DatabaseError as error:  # not a database, a missing folder, no permission
            raise LabelError(f"{self.path}: cannot open as a label database ({error})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction: committed when the block ends (fsynced when ``durable``), rolled back if it raises."""
        with self._lock:
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several queries."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    # ---------------------------------------------------------------------------------------------- settings

    def configure(self, overlap: int | None = None, gold_rate: float | None = None, seed: int | None = None) -> None:
        """Set the overlap K (annotators per regular item), the share of cards that are hidden gold items, and the
        seed of the left/right draws (set it before anything is served, for a reproducible order)."""
        if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1):
            raise LabelError(f"overlap: expected an integer >= 1 (annotators per item), got {overlap!r}")
        if gold_rate is not None and not 0 <= gold_rate < 1:
            raise LabelError(f"gold rate: expected a share in [0, 1), got {gold_rate!r}")
        with self._write() as db:
            for key, value in (("overlap", overlap), ("gold_rate", gold_rate), ("seed", seed)):
                if value is not None:
                    db.execute("UPDATE settings SET value = ? WHERE key = ?", (str(value), key))

    def settings(self) -> Settings:
        with self._read() as db:
            return _settings(db)

    # ------------------------------------------------------------------------------------------ items, people

    def add_items(self, items: Iterable[Item]) -> list[str]:
        """Store comparisons (one transaction); returns their ids in order. An item already stored (same id) is
        kept as it was."""
        rows = []
        for index, item in enumerate(items):
            _check_item(item, index)
            rows.append(item)
        ids = []
        with self._write() as db:
            (position,) = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM items").fetchone()
            for item in rows:
                item_id = item.id or item.content_id()
                inserted = db.execute(
                    "INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        item_id,
                        position,
                        json.dumps(item.prompt, ensure_ascii=False),
                        item.response_a,
                        item.response_b,
                        item.model_a,
                        item.model_b,
                        item.gold,
                        item.kind,
                    ),
                ).rowcount
                position += inserted
                ids.append(item_id)
        return ids

    def items(self) -> list[Item]:
        with self._read() as db:
            rows = db.execute(
                "SELECT prompt, response_a, response_b, model_a, model_b, gold, kind, id FROM items ORDER BY position"
            ).fetchall()
        return [Item(json.loads(row[0]), *row[1:]) for row in rows]

    def add_annotators(self, annotators: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
        """Register annotators; returns ``{name: token}``. Names alone get a new random token (``secrets``), or keep
        the one they have; a mapping ``{name: token}`` sets the tokens given (at least 16 characters)."""
        wanted = dict(annotators) if isinstance(annotators, Mapping) else {name: None for name in annotators}
        if not wanted:
            raise LabelError("no annotators given")
        for name, token in wanted.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise LabelError(
                    f"annotator name {name!r}: expected letters, digits, '.', '_', '-' or '@' (at most 64 characters)"
                )
            if token is not None and (not isinstance(token, str) or len(token) < _MIN_TOKEN_LENGTH):
                raise LabelError(f"annotator {name}: a token must be at least {_MIN_TOKEN_LENGTH} characters")
        tokens = {}
        with self._write() as db:
            for name, token in wanted.items():
                existing = db.execute("SELECT token FROM annotators WHERE name = ?", (name,)).fetchone()
                token = token or (existing[0] if existing else secrets.token_urlsafe(18))
                holder = db.execute("SELECT name FROM annotators WHERE token = ?", (token,)).fetchone()
                if holder and holder[0] != name:
                    raise LabelError(f"annotator {name}: the token given is already {holder[0]}'s")
                db.execute("INSERT OR REPLACE INTO annotators VALUES (?, ?)", (name, token))
                tokens[name] = token
        return tokens

    def annotator(self, token: str | None) -> str:
        """The annotator holding ``token``; :class:`UnknownToken` otherwise."""
        with self._read() as db:
            return self._annotator(db, token)

    def _annotator(self, db: sqlite3.Connection, token: str | None) -> str:
        row = db.execute("SELECT name FROM annotators WHERE token = ?", (token or "",)).fetchone()
        if row is None:
            raise UnknownToken("unknown or missing annotator token: use the URL you were given")
        return str(row[0])

    # -------------------------------------------------------------------------------------------- the queue

    def next_card(self, token: str) -> Card | None:
        """The annotator's current card: the one served and not yet answered, else a new one (assigned now, its
        left/right order drawn and stored); None when there is nothing left for them."""
        with self._write(durable=False) as db:
            name = self._annotator(db, token)
            open_card = db.execute(
                "SELECT item_id, left_is_a FROM assignments WHERE annotator = ? AND NOT EXISTS (SELECT 1 FROM labels l"
                " WHERE l.item_id = assignments.item_id AND l.annotator = assignments.annotator) ORDER BY sequence",
                (name,),
            ).fetchone()
            if open_card is not None:
                return self._card(db, open_card[0], bool(open_card[1]))
            item_id = self._pick(db, name)
            if item_id is None:
                return None
            (sequence,) = db.execute("SELECT COUNT(*) FROM assignments WHERE annotator = ?", (name,)).fetchone()
            left_is_a = self._draw_order(db, name, sequence)
            db.execute(
                "INSERT INTO assignments VALUES (?, ?, ?, ?, ?)",
                (item_id, name, int(left_is_a), time.time(), sequence),
            )
            return self._card(db, item_id, left_is_a)

    def _pick(self, db: sqlite3.Connection, name: str) -> str | None:
        settings = _settings(db)
        # Served items (answered or open) count toward K, so no more than K annotators ever hold one.
        regular = db.execute(
            "SELECT i.id FROM items i WHERE i.gold IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.annotator = ?)"
            " AND (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id) < ?"
            " ORDER BY (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id) DESC,"
            " (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id) DESC, i.position LIMIT 1",
            (name, settings.overlap),
        ).fetchone()
        if regular is None:
            return None  # gold items are mixed into real work, never served alone
        (served,) = db.execute("SELECT COUNT(*) FROM assignments WHERE annotator = ?", (name,)).fetchone()
        # A draw that is a function of (seed, annotator, card number): a restart serves as before.
        draw = random.Random(f"{settings.seed}:gold:{name}:{served}").random()
        if draw < settings.gold_rate:
            gold = db.execute(
                "SELECT i.id FROM items i WHERE i.gold IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.annotator = ?)"
                " ORDER BY i.position LIMIT 1",
                (name,),
            ).fetchone()
            if gold is not None:
                return str(gold[0])
        return str(regular[0])

    def _draw_order(self, db: sqlite3.Connection, name: str, sequence: int) -> bool:
        """A on the left or not, in blocks of two cards per annotator: the first card of a block draws, the second
        takes the other order."""
        if sequence % 2 == 1:
            (previous,) = db.execute(
                "SELECT left_is_a FROM assignments WHERE annotator = ? AND sequence = ?", (name, sequence - 1)
            ).fetchone()
            return not previous
        return random.Random(f"{_settings(db).seed}:order:{name}:{sequence}").random() < 0.5

    def _card(self, db: sqlite3.Connection, item_id: str, left_is_a: bool) -> Card:
        prompt, response_a, response_b, kind = db.execute(
            "SELECT prompt, response_a, response_b, kind FROM items WHERE id = ?", (item_id,)
        ).fetchone()
        left, right = (response_a, response_b) if left_is_a else (response_b, response_a)
        return Card(item_id, json.loads(prompt), left, right, kind == "battle")

    def submit(
        self,
        token: str,
        item_id: str,
        value: int | None = None,
        skip_reason: str | None = None,
        flag: str | None = None,
        safety: str | None = None,
        rationale: str | None = None,
    ) -> Submitted:
        """Store the annotator's answer to a card they were served: ``value`` on the LEFT/RIGHT scale they saw (1 =
        left much better ... 8 = right much better; stored un-swapped, as A/B), or ``skip_reason`` instead; an
        optional ``flag`` (unsafe, pii), ``safety`` (chosen_only_safe, both_safe, both_unsafe; needs a vote) and
        free-text ``rationale``. One committed transaction."""
        if (value is None) == (skip_reason is None or not skip_reason.strip()):
            raise LabelError("give either a value on the 1-8 scale or a skip reason (not both, not neither)")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value not in SCALE):
            raise LabelError(
                f"value: expected an integer 1-8 (1 = left much better, 8 = right much better), got {value!r}"
            )
        if flag is not None and flag not in FLAGS:
            raise LabelError(f"flag: expected one of {', '.join(FLAGS)} or none, got {flag!r}")
        if safety is not None and safety not in SAFETY_LABELS:
            raise LabelError(f"safety: expected one of {', '.join(SAFETY_LABELS)} or none, got {safety!r}")
        if safety is not None and value is None:
            raise LabelError("safety: a safety label is about the chosen response, so it needs a vote, not a skip")
        for name, text in (("skip reason", skip_reason), ("rationale", rationale)):
            if text is not None and len(text) > MAX_TEXT:
                raise LabelError(f"{name}: at most {MAX_TEXT} characters, got {len(text)}")
        with self._write() as db:
            name = self._annotator(db, token)
            item = db.execute("SELECT kind, model_a, model_b FROM items WHERE id = ?", (item_id,)).fetchone()
            if item is None:
                raise UnknownItem(f"no item {item_id!r}")
            assignment = db.execute(
                "SELECT left_is_a FROM assignments WHERE item_id = ? AND annotator = ?", (item_id, name)
            ).fetchone()
            if assignment is None:
                raise NotAssigned(f"item {item_id} was not served to {name}: answer the card /api/next gives")
            if db.execute("SELECT 1 FROM labels WHERE item_id = ? AND annotator = ?", (item_id, name)).fetchone():
                raise AlreadyAnswered(f"{name} already answered item {item_id}")
            left_is_a = bool(assignment[0])
            canonical = canonical_value(value, left_is_a) if value is not None else None
            db.execute(
                "INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item_id,
                    name,
                    canonical,
                    skip_reason.strip() if skip_reason else None,
                    flag,
                    safety,
                    (rationale.strip() or None) if rationale else None,
                    int(left_is_a),
                    time.time(),
                ),
            )
        kind, model_a, model_b = item
        revealed = None
        if kind == "battle":
            left, right = (model_a, model_b) if left_is_a else (model_b, model_a)
            revealed = {"left": left, "right": right}
        return Submitted(item_id, canonical, revealed)

    # ------------------------------------------------------------------------------------------------ status

    def annotator_progress(self, token: str) -> Progress:
        """That annotator's :class:`Progress`."""
        with self._read() as db:
            name = self._annotator(db, token)
            overlap = _settings(db).overlap
            (done,) = db.execute("SELECT COUNT(*) FROM labels WHERE annotator = ?", (name,)).fetchone()
            (open_now,) = db.execute(
                "SELECT COUNT(*) FROM assignments a WHERE a.annotator = ? AND NOT EXISTS (SELECT 1 FROM labels l"
                " WHERE l.item_id = a.item_id AND l.annotator = a.annotator)",
                (name,),
            ).fetchone()
            (available,) = db.execute(
                "SELECT COUNT(*) FROM items i WHERE i.gold IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.annotator = ?)"
                " AND (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id) < ?",
                (name, overlap),
            ).fetchone()
        return Progress(done, done + open_now + available)

    def progress(self) -> dict[str, Any]:
        """The whole store: regular and gold items, the overlap, answers needed (regular items x K) and given
        (each item's answers counted up to K), answers per annotator, and whether it is complete."""
        with self._read() as db:
            overlap = _settings(db).overlap
            (regular,) = db.execute("SELECT COUNT(*) FROM items WHERE gold IS NULL").fetchone()
            (gold,) = db.execute("SELECT COUNT(*) FROM items WHERE gold IS NOT NULL").fetchone()
            (answered,) = db.execute(
                "SELECT COALESCE(SUM(MIN(n, ?)), 0) FROM (SELECT COUNT(*) AS n FROM labels l JOIN items i"
                " ON i.id = l.item_id WHERE i.gold IS NULL GROUP BY l.item_id)",
                (overlap,),
            ).fetchone()
            per_annotator = dict(
                db.execute(
                    "SELECT a.name, COUNT(l.item_id) FROM annotators a LEFT JOIN labels l ON l.annotator = a.name"
                    " GROUP BY a.name ORDER BY a.name"
                ).fetchall()
            )
        needed = regular * overlap
        return {
            "items": regular,
            "gold_items": gold,
            "overlap": overlap,
            "answers_needed": needed,
            "answers_given": answered,
            "annotators": per_annotator,
            "complete": answered >= needed,
        }

    def is_complete(self) -> bool:
        """Every regular item has K answers (votes or skips)."""
        return bool(self.progress()["complete"])

    # --------------------------------------------------------------------------------------------- results

    def votes(self) -> list[Vote]:
        """Every answer, canonical, in the order given."""
        with self._read() as db:
            rows = db.execute(
                "SELECT l.item_id, l.annotator, l.value, l.skip_reason, l.flag, l.safety, l.rationale, l.left_is_a,"
                " l.submitted_at, i.kind, i.gold, i.model_a, i.model_b FROM labels l JOIN items i ON i.id = l.item_id"
                " ORDER BY l.submitted_at, l.rowid"
            ).fetchall()
        return [Vote(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), *row[8:]) for row in rows]

    def ratings(self, include_gold: bool = False) -> list[tuple[str, str, int]]:
        """``(item_id, annotator, canonical value)`` for every vote (skips left out), the triples the agreement
        measures take; gold items only with ``include_gold``."""
        return [
            (vote.item_id, vote.annotator, vote.value)
            for vote in self.votes()
            if vote.value is not None and (include_gold or vote.gold is None)
        ]

    def gold(self) -> dict[str, int]:
        """``{item_id: canonical gold value}`` of the gold items."""
        with self._read() as db:
            return dict(db.execute("SELECT id, gold FROM items WHERE gold IS NOT NULL").fetchall())

    def left_chosen(self) -> list[bool]:
        """For every vote: whether the annotator chose the response shown on the left (position bias)."""
        return [vote.left_is_a == (vote.value <= 4) for vote in self.votes() if vote.value is not None]

    def preferences(self, margins: Sequence[float] = DEFAULT_MARGINS) -> list[dict[str, Any]]:
        """Preference rows aggregated over each regular item's votes, in the item order, ready to write as JSONL
        for the reward and DPO stages: ``prompt``, ``chosen``, ``rejected`` (message lists), ``margin``, with
        ``degree``, ``votes`` (canonical values), ``n_votes``, ``agreement`` (share of votes on the winning side),
        ``annotator_ids``, ``safety``, ``flags``, the models and the item ``id``.

        The majority side wins; the degree is the median degree of the winning side's votes (the weaker of the two
        middle ones when their number is even: a split between "better" and "slightly better" claims the less),
        and ``margin = margins[degree]`` (``much better`` first). Items whose votes split evenly, and items with
        no vote, are left out: :meth:`aggregate` counts them."""
        return self.aggregate(margins)[0]

    def aggregate(self, margins: Sequence[float] = DEFAULT_MARGINS) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """:meth:`preferences` and the count of what was left out: ``ties``, ``no_votes`` (skipped by everyone or
        not served yet), ``gold`` items."""
        if len(margins) != len(DEGREES):
            raise LabelError(f"margins: expected {len(DEGREES)} numbers ({', '.join(DEGREES)}), got {len(margins)}")
        by_item: dict[str, list[Vote]] = {}
        for vote in self.votes():
            if vote.value is not None:
                by_item.setdefault(vote.item_id, []).append(vote)
        rows: list[dict[str, Any]] = []
        left_out = {"ties": 0, "no_votes": 0, "gold": 0}
        for item in self.items():
            if item.gold is not None:
                left_out["gold"] += 1
                continue
            assert item.id is not None
            votes = by_item.get(item.id, [])
            sides = Counter(vote_side(vote.value) for vote in votes if vote.value is not None)
            if not votes:
                left_out["no_votes"] += 1
                continue
            if sides["a"] == sides["b"]:
                left_out["ties"] += 1
                continue
            winner = "a" if sides["a"] > sides["b"] else "b"
            winning = [vote for vote in votes if vote.value is not None and vote_side(vote.value) == winner]
            degree = statistics.median_high(vote_degree(vote.value) for vote in winning if vote.value is not None)
            safety = Counter(vote.safety for vote in winning if vote.safety is not None).most_common(1)
            chosen, rejected = (
                (item.response_a, item.response_b) if winner == "a" else (item.response_b, item.response_a)
            )
            models = (item.model_a, item.model_b) if winner == "a" else (item.model_b, item.model_a)
            rows.append(
                {
                    "id": item.id,
                    "prompt": item.prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "margin": float(margins[degree]),
                    "degree": DEGREES[degree],
                    "votes": [vote.value for vote in votes],
                    "n_votes": len(votes),
                    "agreement": len(winning) / len(votes),
                    "annotator_ids": [vote.annotator for vote in votes],
                    "safety": safety[0][0] if safety else None,
                    "flags": sorted({vote.flag for vote in votes if vote.flag}),
                    "model_chosen": models[0],
                    "model_rejected": models[1],
                }
            )
        return rows, left_out

    def battles(self) -> list[tuple[str, str, str]]:
        """``(model_a, model_b, winner)`` for every vote on a battle item, winner ``a``, ``b``, or ``tie`` for a
        "negligibly better / unsure" vote (4 or 5): Chatbot Arena's tie, which Bradley-Terry counts half each."""
        battles: list[tuple[str, str, str]] = []
        for vote in self.votes():
            if vote.kind != "battle" or vote.value is None or vote.gold is not None:
                continue
            assert vote.model_a is not None and vote.model_b is not None
            winner = "tie" if vote.value in (4, 5) else vote_side(vote.value)
            battles.append((vote.model_a, vote.model_b, winner))
        return battles


def _check_item(item: Item, index: int) -> None:
    where = f"item {item.id or index}"
    if (
        not isinstance(item.prompt, list)
        or not item.prompt
        or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in item.prompt)
    ):
        raise LabelError(f"{where}: prompt: expected a non-empty list of {{role, content}} messages")
    for side in ("response_a", "response_b"):
        if not isinstance(getattr(item, side), str):
            raise LabelError(f"{where}: {side}: expected a string")
    if item.gold is not None and (isinstance(item.gold, bool) or item.gold not in SCALE):
        raise LabelError(f"{where}: gold: expected an integer 1-8 on the A/B scale, got {item.gold!r}")
    if item.kind not in KINDS:
        raise LabelError(f"{where}: kind: expected one of {', '.join(KINDS)}, got {item.kind!r}")
    if item.kind == "battle" and not (item.model_a and item.model_b):
        raise LabelError(f"{where}: a battle needs model_a and model_b (the names revealed after the vote)")
