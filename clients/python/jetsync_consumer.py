#!/usr/bin/env python3
"""A jetsync reference consumer: keeps a SQLite read model of a jetsync stream.

It implements docs/consuming.md and nothing else: decode and refuse exactly as a node
does, merge with the node's rule, keep the checkpoint in the same SQLite transaction as
the records, and resume by recreating its consumer at checkpoint + 1.

    python3 jetsync_consumer.py follow nats://127.0.0.1:4222 model.sqlite [--stream JETSYNC]
    python3 jetsync_consumer.py vectors schemas/vectors     # check against the vectors
    python3 jetsync_consumer.py dump model.sqlite           # every record's state, as JSON lines
    python3 jetsync_consumer.py checkpoint model.sqlite     # the last stream sequence applied

Needs Python 3.9+ and, for `follow` only, nats-py.
"""

import asyncio
import json
import re
import sqlite3
import sys
from pathlib import Path

ENVELOPE_VERSION = 1  # the envelope of the v1 decoder below
ENVELOPES = (1, 2)  # every envelope this consumer reads
MAX_DOC_DEPTH = 127
NODE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ENTITY_RE = re.compile(r"[a-z0-9_]{1,64}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
U64 = 2**64 - 1


class Refused(Exception):
    """A message every node quarantines, with its stable reason code."""

    def __init__(self, code, detail=""):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# --- decoding: docs/consuming.md "Refusals", in the order a node checks them ----------


class _Obj(dict):
    """A parsed JSON object that remembers whether a member name occurred twice in it."""

    dup = False


def _obj(pairs):
    o = _Obj(pairs)
    o.dup = len(o) != len(pairs)
    return o


def _int(text):
    """Envelope integers have no sign: `-0` becomes a float, which no integer check takes
    (the node reads it as -0.0). Inside the document it does not matter."""
    return -0.0 if text == "-0" else int(text)


def _lone_surrogate(text):
    """The index of the first lone surrogate escape: a \\uD800-\\uDBFF escape not directly
    followed by a \\uDC00-\\uDFFF one, or such a low one not directly after a high one.
    Python's json keeps lone surrogates, so check the text. A backslash occurs only inside
    strings, so scanning from backslash to backslash sees every escape."""

    def unit(at):
        h = text[at + 2 : at + 6]
        if text[at + 1 : at + 2] != "u" or len(h) != 4 or not all(c in "0123456789abcdefABCDEF" for c in h):
            return None
        return int(h, 16)

    i = text.find("\\")
    while i >= 0:
        u = unit(i)
        if u is None:
            i = text.find("\\", i + 2)
        elif 0xD800 <= u <= 0xDBFF:
            low = unit(i + 6)
            if low is None or not 0xDC00 <= low <= 0xDFFF:
                return i
            i = text.find("\\", i + 12)
        elif 0xDC00 <= u <= 0xDFFF:
            return i
        else:
            i = text.find("\\", i + 6)
    return None


def _reject_constant(name):
    raise Refused("malformed", f"{name} is not JSON")


def _skip_value(text, i):
    """The end of the JSON value starting at text[i], without recursion (any depth)."""
    if text[i] not in "{[":
        return json.JSONDecoder().raw_decode(text, i)[1]
    depth = 0
    while True:
        c = text[i]
        if c == '"':
            i = json.decoder.scanstring(text, i + 1)[1]
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1


def _raw_doc_span(text):
    """(start, end) of the body's top-level `doc` value exactly as written, or None."""
    ws = " \t\n\r"
    i = text.index("{") + 1
    while True:
        while text[i] in ws:
            i += 1
        if text[i] == "}":
            return None
        name, i = json.decoder.scanstring(text, i + 1)
        while text[i] in ws + ":":
            i += 1
        end = _skip_value(text, i)
        if name == "doc":
            return i, end
        i = end
        while text[i] in ws + ",":
            i += 1


def _depth_and_dup(value):
    """Nesting of objects and arrays ({} is 1), and whether any object has a name twice."""
    deepest, dup, stack = 0, False, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            dup = dup or getattr(v, "dup", False)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest, dup


def _u(v, bits):
    return type(v) is int and 0 <= v < 2**bits


def _version(v):
    """A version as a comparable tuple (ms, c, node bytes)."""
    if not (isinstance(v, dict) and not getattr(v, "dup", False) and set(v) == {"ms", "c", "node"}):
        raise Refused("malformed", f"bad version {v!r}")
    if not (_u(v["ms"], 48) and _u(v["c"], 16)):
        raise Refused("malformed", f"version out of range {v!r}")
    if not (type(v["node"]) is str and NODE_RE.fullmatch(v["node"])):
        raise Refused("malformed", f"bad node id {v['node']!r}")
    return (v["ms"], v["c"], v["node"].encode())


def _envelope_of(text):
    """The body's envelope version as a node dispatches on it: the writers' own bodies start
    with it; otherwise `v` occurring once at the top level of valid JSON, an integer in
    0..2^64. None when neither (the v1 decoder then names what is wrong)."""
    if text.startswith('{"v":1,'):
        return 1
    if text.startswith('{"v":2,'):
        return 2
    try:
        top = json.loads(text, object_pairs_hook=lambda p: p, parse_int=_int)
    except (ValueError, RecursionError):
        return None
    vs = [v for k, v in top if k == "v"] if type(top) is list else []
    return vs[0] if len(vs) == 1 and _u(vs[0], 64) else None


def decode(subject, body, stream_time_ms, limits):
    """The checked event of one stream message, or raises Refused (see docs/consuming.md)."""
    try:
        text = body.decode("utf-8")
    except ValueError as e:
        raise Refused("malformed", str(e)) from None
    # Before anything else, whatever v says: JSON text must be valid Unicode.
    if _lone_surrogate(text) is not None:
        raise Refused("malformed", "lone surrogate escape")
    envelope = _envelope_of(text)
    if envelope == 2:
        return _decode_v2(subject, text, stream_time_ms, limits)
    if envelope is not None and envelope != ENVELOPE_VERSION:
        raise Refused("unsupported_envelope", str(envelope))
    try:
        ev = json.loads(text, object_pairs_hook=_obj, parse_constant=_reject_constant, parse_int=_int)
        structure_error = _structure(ev)
    except RecursionError:
        # Deeper than Python's parser goes, but a node checks the size before the depth.
        return _too_deep(subject, text, limits)
    except (ValueError, Refused) as e:
        structure_error = e
        ev = None
    if structure_error is not None:
        # A newer envelope is named as such, not as garbage.
        try:
            top = json.loads(text, object_pairs_hook=lambda p: p, parse_int=_int)
            vs = [v for k, v in top if k == "v"] if type(top) is list else []
        except (ValueError, RecursionError):
            vs = []
        if len(vs) == 1 and _u(vs[0], 64) and vs[0] not in ENVELOPES:
            raise Refused("unsupported_envelope", str(vs[0]))
        raise Refused("malformed", str(structure_error))
    if ev["v"] != ENVELOPE_VERSION:
        raise Refused("unsupported_envelope", str(ev["v"]))
    # The document: presence, size as written, object, depth, duplicate names.
    if ev["op"] == "put" and "doc" not in ev:
        raise Refused("malformed", "put without doc")
    if ev["op"] == "delete" and "doc" in ev:
        raise Refused("malformed", "delete with a doc")
    raw = _check_doc(text, ev["doc"], limits) if ev["op"] == "put" else None
    # Versions.
    version = _version(ev["version"])
    if version[2] != ev["origin"].encode():
        raise Refused("invalid_version", "version not written by origin")
    if ev["origin_seq"] == 0:
        raise Refused("invalid_version", "origin_seq must start at 1")
    base = _version(ev["base"]) if "base" in ev else None
    resolves = [_version(r) for r in ev.get("resolves", [])]
    if any(n >= version for n in ([base] if base else []) + resolves):
        raise Refused("invalid_version", "names a version not older than its own")
    # The subject: <prefix>.<entity>.<scope>.<origin>.<id> or <prefix>_in.<same>.
    tokens = [ev["entity"], ev["scope"], ev["origin"], ev["id"]]
    prefix = limits["prefix"]
    tail = None
    for p in (prefix + ".", prefix + "_in."):
        if subject.startswith(p):
            tail = subject[len(p):]
    if tail is None or tail.split(".") != tokens:
        got = tail.split(".") if tail is not None else []
        if len(got) > 2 and got[2] != ev["origin"]:
            raise Refused("forged_origin", f"subject origin {got[2]!r}")
        raise Refused("subject_mismatch", subject)
    # Drift against the message's stream timestamp, never this machine's clock.
    if version[0] - stream_time_ms > limits["max_clock_drift_ms"]:
        raise Refused("clock_drift", f"{version[0] - stream_time_ms} ms ahead")
    return {
        "entity": ev["entity"],
        "scope": ev["scope"],
        "id": ev["id"],
        "origin_seq": ev["origin_seq"],
        "version": version,
        "base": base,
        "resolves": resolves,
        "doc": raw,
    }


def _check_doc(text, doc, limits):
    """The document's checks, the same in both envelopes: its size as written, then that
    it is an object, its depth, duplicate names. Returns its text as written."""
    start, end = _raw_doc_span(text)
    raw = text[start:end]
    size = len(raw.encode("utf-8"))
    if size > limits["max_doc_bytes"]:
        raise Refused("doc_too_large", str(size))
    if not isinstance(doc, dict):
        raise Refused("malformed", "doc must be a JSON object")
    depth, dup = _depth_and_dup(doc)
    if depth > MAX_DOC_DEPTH:
        raise Refused("malformed", "doc nested too deep")
    if dup:
        raise Refused("malformed", "doc has a member name twice")
    return raw


def _compact(v, origin):
    """A v2 version [ms, c] (node: the subject's origin) or [ms, c, node] (another node) as
    a comparable tuple; spelling the origin out is malformed."""
    if not (type(v) is list and len(v) in (2, 3) and _u(v[0], 48) and _u(v[1], 16)):
        raise Refused("malformed", f"bad version {v!r}")
    if len(v) == 2:
        return (v[0], v[1], origin.encode())
    if not (type(v[2]) is str and NODE_RE.fullmatch(v[2])):
        raise Refused("malformed", f"bad node id {v[2]!r}")
    if v[2] == origin:
        raise Refused("malformed", "a version names the subject's origin, which v2 leaves out")
    return (v[0], v[1], v[2].encode())


def _decode_v2(subject, text, stream_time_ms, limits):
    """Envelope v2 (docs/consuming.md "Envelope v2"): the record and origin from the
    subject alone, versions as arrays, put if doc is present. In a node's order: the body's
    shape, the subject, the document, the versions, the drift."""
    try:
        ev = json.loads(text, object_pairs_hook=_obj, parse_constant=_reject_constant, parse_int=_int)
    except RecursionError:
        return _too_deep(subject, text, limits)
    except (ValueError, Refused) as e:
        raise Refused("malformed", str(e)) from None
    if type(ev) is not _Obj or ev.dup:
        raise Refused("malformed", "not an object, or a member name twice")
    if not {"v", "seq", "ver"} <= set(ev) or not set(ev) <= {"v", "seq", "ver", "base", "resolves", "doc"}:
        raise Refused("malformed", "missing or unknown members")
    if not _u(ev["seq"], 64) or type(ev.get("resolves", [])) is not list:
        raise Refused("malformed", "a member has the wrong type")
    named = [ev["ver"]] + ([ev["base"]] if "base" in ev else []) + ev.get("resolves", [])
    for v in named:
        _compact(v, "\0")
    prefix = limits["prefix"]
    tail = None
    for p in (prefix + ".", prefix + "_in."):
        if subject.startswith(p):
            tail = subject[len(p):]
    tokens = tail.split(".") if tail is not None else []
    if len(tokens) != 4:
        raise Refused("malformed", f"subject {subject!r} is not <prefix>.<entity>.<scope>.<origin>.<id>")
    entity, scope, origin, rid = tokens
    if not (ENTITY_RE.fullmatch(entity) and NODE_RE.fullmatch(scope) and NODE_RE.fullmatch(origin)
            and UUID_RE.fullmatch(rid)):
        raise Refused("malformed", f"subject {subject!r} has an invalid token")
    version = _compact(ev["ver"], origin)
    base = _compact(ev["base"], origin) if "base" in ev else None
    resolves = [_compact(r, origin) for r in ev.get("resolves", [])]
    raw = _check_doc(text, ev["doc"], limits) if "doc" in ev else None
    if version[2] != origin.encode():
        raise Refused("invalid_version", "version not written by origin")
    if ev["seq"] == 0:
        raise Refused("invalid_version", "seq must start at 1")
    if any(n >= version for n in ([base] if base else []) + resolves):
        raise Refused("invalid_version", "names a version not older than its own")
    if version[0] - stream_time_ms > limits["max_clock_drift_ms"]:
        raise Refused("clock_drift", f"{version[0] - stream_time_ms} ms ahead")
    return {
        "entity": entity,
        "scope": scope,
        "id": rid,
        "origin_seq": ev["seq"],
        "version": version,
        "base": base,
        "resolves": resolves,
        "doc": raw,
    }


def _too_deep(subject, text, limits):
    """The reason for a body too deep for json.loads: the envelope checked with its
    document replaced by {}, then the document's size as written, else its depth."""
    try:
        start, end = _raw_doc_span(text)
    except (ValueError, IndexError, TypeError):
        raise Refused("malformed", "too deep to parse") from None
    envelope_only = text[:start] + "{}" + text[end:]
    try:
        decode(subject, envelope_only.encode(), 0, limits)
    except Refused as r:
        # Only these come before the size; the rest (versions, v1's subject checks,
        # drift) after it.
        if r.code in ("malformed", "unsupported_envelope"):
            raise
    size = len(text[start:end].encode("utf-8"))
    if size > limits["max_doc_bytes"]:
        raise Refused("doc_too_large", str(size))
    raise Refused("malformed", "doc nested too deep")


def _structure(ev):
    """None if `ev` has the change-event shape (schemas/change-event.schema.json), else why."""
    if type(ev) is not _Obj:
        return "not an object"
    if ev.dup:
        return "duplicate member name"
    required = {"v", "op", "entity", "scope", "id", "origin", "origin_seq", "version"}
    if not required <= set(ev) or not set(ev) <= required | {"base", "resolves", "doc"}:
        return "missing or unknown members"
    checks = [
        _u(ev["v"], 32),
        ev["op"] in ("put", "delete"),
        type(ev["entity"]) is str and ENTITY_RE.fullmatch(ev["entity"]),
        type(ev["scope"]) is str and NODE_RE.fullmatch(ev["scope"]),
        type(ev["origin"]) is str and NODE_RE.fullmatch(ev["origin"]),
        type(ev["id"]) is str and UUID_RE.fullmatch(ev["id"]),
        _u(ev["origin_seq"], 64),
        type(ev.get("resolves", [])) is list,
    ]
    if not all(checks):
        return "a member has the wrong type or form"
    for v in [ev["version"], ev.get("base", {"ms": 0, "c": 0, "node": "x"})] + ev.get("resolves", []):
        _version(v)
    return None


# --- the merge rule: docs/consuming.md "The merge rule" ----------------------------------


def _content_key(leaf):
    """Leaf::content_cmp: doc (absent lowest, then by bytes), scope, base, resolves, origin_seq."""
    doc = leaf["doc"]
    return (
        (0, b"") if doc is None else (1, doc.encode()),
        leaf["scope"].encode(),
        (0,) if leaf["base"] is None else (1, leaf["base"]),
        leaf["resolves"],
        leaf["origin_seq"],
    )


class Record:
    """One record's state: origins (greatest version per origin), leaves, pending names."""

    def __init__(self, state=None):
        s = state or {"origins": {}, "leaves": [], "pending": []}
        self.origins = {n.encode(): _t(v) for n, v in s["origins"].items()}
        self.leaves = [dict(leaf, version=_t(leaf["version"]), base=leaf["base"] and _t(leaf["base"]),
                            resolves=[_t(r) for r in leaf["resolves"]]) for leaf in s["leaves"]]
        self.pending = {_t(p) for p in s["pending"]}

    def to_json(self):
        return {
            "origins": {n.decode(): _j(v) for n, v in self.origins.items()},
            "leaves": [dict(leaf, version=_j(leaf["version"]), base=leaf["base"] and _j(leaf["base"]),
                            resolves=[_j(r) for r in leaf["resolves"]]) for leaf in self.leaves],
            "pending": [_j(p) for p in sorted(self.pending)],
        }

    def _name(self, v):
        """Clause 1: a named version stops being a leaf (now or when it arrives)."""
        top = self.origins.get(v[2])
        if top is not None and v <= top:
            self.leaves = [leaf for leaf in self.leaves if leaf["version"] != v]
        else:
            self.pending.add(v)

    def apply(self, ev):
        v, origin = ev["version"], ev["version"][2]
        names = ([ev["base"]] if ev["base"] else []) + ev["resolves"]
        for n in names:
            self._name(n)
        top = self.origins.get(origin)
        leaf = {k: ev[k] for k in ("version", "scope", "base", "resolves", "origin_seq", "doc")}
        if top == v:
            # The same version again: an exact duplicate, or an equivocation (greater content stays).
            for i, kept in enumerate(self.leaves):
                if kept["version"] == v and _content_key(leaf) > _content_key(kept):
                    self.leaves[i] = leaf
            return
        if top is not None and v < top:
            return  # Clause 2: superseded by a later version of its origin.
        # Clause 2: this origin's earlier leaf goes; names of it up to v are covered.
        self.origins[origin] = v
        self.leaves = [x for x in self.leaves if x["version"][2] != origin]
        named = v in self.pending
        self.pending = {p for p in self.pending if not (p[2] == origin and p <= v)}
        if not named:
            self.leaves.append(leaf)
        self.leaves.sort(key=lambda x: x["version"], reverse=True)

    def winner(self):
        return self.leaves[0] if self.leaves else None


def _t(v):
    return (v["ms"], v["c"], v["node"].encode())


def _j(v):
    return {"ms": v[0], "c": v[1], "node": v[2].decode()}


# --- the read model: records and checkpoint in one SQLite transaction ---------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
  entity TEXT NOT NULL, scope TEXT NOT NULL, id TEXT NOT NULL,
  deleted INTEGER, version TEXT, doc TEXT, conflicts INTEGER,
  state TEXT NOT NULL,                     -- the merge state (Record.to_json)
  PRIMARY KEY (entity, scope, id));        -- a record is (entity, scope, id)
CREATE TABLE IF NOT EXISTS quarantine (stream_seq INTEGER PRIMARY KEY, subject TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS checkpoint (one INTEGER PRIMARY KEY CHECK (one = 1), seq INTEGER NOT NULL);
"""


class ReadModel:
    def __init__(self, path, limits):
        # Autocommit mode: transactions are the explicit BEGIN/COMMIT in handle().
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.executescript(SCHEMA)
        self.limits = limits

    def checkpoint(self):
        row = self.db.execute("SELECT seq FROM checkpoint").fetchone()
        return row[0] if row else 0

    def handle(self, seq, subject, body, stream_time_ms):
        """Applies one message and moves the checkpoint, in one transaction. Returns the
        event or the Refused, or None for a message at or below the checkpoint."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if seq <= self.checkpoint():
                self.db.execute("ROLLBACK")
                return None
            try:
                ev = decode(subject, body, stream_time_ms, self.limits)
                self._apply(ev)
                result = ev
            except Refused as r:
                self.db.execute("INSERT OR REPLACE INTO quarantine VALUES (?, ?, ?)", (seq, subject, r.code))
                result = r
            self.db.execute("INSERT OR REPLACE INTO checkpoint VALUES (1, ?)", (seq,))
            self.db.execute("COMMIT")
            return result
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _apply(self, ev):
        key = (ev["entity"], ev["scope"], ev["id"])
        row = self.db.execute("SELECT state FROM records WHERE entity = ? AND scope = ? AND id = ?", key).fetchone()
        rec = Record(json.loads(row[0]) if row else None)
        rec.apply(ev)
        w = rec.winner()
        self.db.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (*key, w["doc"] is None, json.dumps(_j(w["version"])),
             w["doc"], len(rec.leaves) - 1, json.dumps(rec.to_json())),
        )

    def record(self, entity, scope, id):
        """The expected-record shape of schemas/vectors (winner, conflicts)."""
        row = self.db.execute("SELECT state FROM records WHERE entity = ? AND scope = ? AND id = ?",
                              (entity, scope, id)).fetchone()
        if row is None:
            return None
        rec = Record(json.loads(row[0]))
        w = rec.winner()
        return {
            "entity": entity, "id": id, "scope": w["scope"], "deleted": w["doc"] is None,
            "version": _j(w["version"]), "doc": w["doc"],
            "conflicts": [{"version": _j(x["version"]), "deleted": x["doc"] is None, "scope": x["scope"]}
                          for x in rec.leaves[1:]],
        }

    def records(self):
        rows = self.db.execute("SELECT entity, scope, id FROM records ORDER BY entity, id, scope").fetchall()
        for entity, scope, id in rows:
            yield self.record(entity, scope, id)


# --- following a live stream ---------------------------------------------------------------


async def follow(url, path, stream="JETSYNC", prefix="jetsync", idle_exit=None):
    """Follows the stream into the read model at `path`. Resumes at its own checkpoint + 1
    with an ordered (ephemeral) consumer: never at a durable consumer's server-side
    position, which can be ahead of what was committed here (docs/consuming.md)."""
    import nats

    nc = await nats.connect(url, max_reconnect_attempts=-1)
    js = nc.jetstream()
    meta = (await js.stream_info(stream)).config.metadata or {}
    # The deployment's refusal limits are pinned in the stream's metadata.
    limits = {
        "prefix": prefix,
        "max_doc_bytes": int(meta.get("jetsync.max_doc_bytes", 256 * 1024)),
        "max_clock_drift_ms": int(meta.get("jetsync.max_clock_drift_ms", 60_000)),
    }
    model = ReadModel(path, limits)
    start = model.checkpoint() + 1
    sub = await js.subscribe(f"{prefix}.>", ordered_consumer=True, stream=stream,
                             deliver_policy=nats.js.api.DeliverPolicy.BY_START_SEQUENCE,
                             config=nats.js.api.ConsumerConfig(opt_start_seq=start, filter_subjects=[]))
    print(f"following {stream} from {start}", flush=True)
    gaps = GapCheck()
    while True:
        try:
            msg = await sub.next_msg(timeout=idle_exit or 3600)
        except nats.errors.TimeoutError:
            if idle_exit:
                break
            continue
        seq, ms = _ack_meta(msg.reply)
        model.handle(seq, msg.subject, msg.data, ms)
        gaps.see((msg.headers or {}).get("Nats-Msg-Id", ""), seq, msg.subject, msg.data)
    await nc.close()


class GapCheck:
    """Warns when an origin's origin_seq jumps (docs/consuming.md section 6): a hint of lost
    messages when reading the whole stream, never a rule (filters, retention, parked
    writes and retried publishes make gaps or late arrivals that are normal)."""

    def __init__(self):
        self.last = {}  # (origin, incarnation) -> greatest origin_seq seen

    def see(self, msg_id, seq, subject="", body=b""):
        parts = msg_id.split(":")
        if len(parts) >= 4 and parts[2].isdigit():
            key, n = (parts[0], parts[1]), int(parts[2])
        else:
            # Envelope v2: the id is a bare tag; the origin is the subject's next to last
            # token and the body (as nodes write it) starts with its seq.
            m = re.match(rb'\{"v":2,"seq":([0-9]+)[,}]', body)
            tokens = subject.split(".")
            if not m or len(tokens) < 2:
                return
            key, n = (tokens[-2], "v2"), int(m.group(1))
        prev = self.last.get(key)
        if prev is not None and n > prev + 1:
            print(f"warning: {key[0]} origin_seq {prev} -> {n} at stream seq {seq}", flush=True)
        if prev is None or n > prev:
            self.last[key] = n


def _ack_meta(reply):
    """(stream sequence, stream timestamp ms) from a JetStream message's reply subject,
    exactly (nats-py's metadata timestamp goes through a float)."""
    t = reply.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>, or the form
    # with <domain>.<account hash> after ACK and a random token at the end.
    off = 0 if len(t) == 9 else 2
    return int(t[5 + off]), int(t[7 + off]) // 1_000_000


# --- the conformance vectors -----------------------------------------------------------------


def run_vectors(directory):
    failed = passed = 0
    for f in sorted(Path(directory).glob("*.json")):
        for case in json.loads(f.read_text())["cases"]:
            model = ReadModel(":memory:", case["limits"])
            errors = []
            for m in case["messages"]:
                got = model.handle(m["stream_seq"], m["subject"], m["body"].encode(), m["stream_time_ms"])
                want = m["expect"]
                if isinstance(got, Refused):
                    if want["outcome"] != "quarantined" or want["reason"] != got.code:
                        errors.append(f"message {m['stream_seq']}: refused {got} but expected {want}")
                    elif "doc_bytes" in want and got.detail != str(want["doc_bytes"]):
                        errors.append(f"message {m['stream_seq']}: size {got.detail} != {want['doc_bytes']}")
                elif want["outcome"] == "quarantined":
                    errors.append(f"message {m['stream_seq']}: accepted but expected {want}")
                elif "doc_bytes" in want and len(got["doc"].encode()) != want["doc_bytes"]:
                    errors.append(f"message {m['stream_seq']}: doc size {len(got['doc'].encode())}")
            for want in case["records"]:
                got = model.record(want["entity"], want["scope"], want["id"])
                if got != want:
                    errors.append(f"record {want['entity']}/{want['id']}: got {got}, expected {want}")
            if len(list(model.records())) != len(case["records"]):
                errors.append("records that the vector does not expect")
            name = f"{f.name}/{case['name']}"
            if errors:
                failed += 1
                print(f"FAIL {name}\n  " + "\n  ".join(errors))
            else:
                passed += 1
    print(f"vectors: {passed} passed, {failed} failed")
    return failed == 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "vectors":
        return 0 if run_vectors(argv[1]) else 1
    if len(argv) >= 2 and argv[0] == "dump":
        model = ReadModel(argv[1], {})
        for r in model.records():
            print(json.dumps(r, sort_keys=True))
        return 0
    if len(argv) >= 2 and argv[0] == "checkpoint":
        print(ReadModel(argv[1], {}).checkpoint())
        return 0
    if len(argv) >= 3 and argv[0] == "follow":
        opts = dict(zip(argv[3::2], argv[4::2]))
        asyncio.run(follow(argv[1], argv[2], stream=opts.get("--stream", "JETSYNC"),
                           prefix=opts.get("--prefix", "jetsync"),
                           idle_exit=float(opts["--idle-exit"]) if "--idle-exit" in opts else None))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
