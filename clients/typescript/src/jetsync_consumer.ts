// A jetsync reference consumer in TypeScript (Node 20, the official `nats` package).
//
// It implements docs/consuming.md and nothing else: decode and refuse exactly as a node
// does, merge with the node's rule, and keep the checkpoint with the records. The read
// model is one JSON file replaced atomically (write + rename) after each batch, so the
// records and the checkpoint always move together.
//
//   node dist/jetsync_consumer.js follow nats://127.0.0.1:4222 model.json [--stream JETSYNC] [--prefix jetsync]
//   node dist/jetsync_consumer.js vectors ../../schemas/vectors
//   node dist/jetsync_consumer.js dump model.json
//   node dist/jetsync_consumer.js checkpoint model.json

import { existsSync, readFileSync, readdirSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const ENVELOPE_VERSION = 1n; // the envelope of the v1 decoder below
const ENVELOPES = [1n, 2n]; // every envelope this consumer reads
const MAX_DOC_DEPTH = 127;
const NODE_RE = /^[A-Za-z0-9_-]{1,64}$/;
const ENTITY_RE = /^[a-z0-9_]{1,64}$/;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export class Refused extends Error {
  constructor(public code: string, public detail = "") {
    super(`${code}: ${detail}`);
  }
}

// --- a strict JSON parser that keeps what JSON.parse loses: spans, duplicate names, the
// --- exact text of numbers (JSON.parse reads 1.0 as 1 and rounds integers above 2^53) ---

type J =
  | { t: "obj"; m: [string, J][]; dup: boolean; s: number; e: number }
  | { t: "arr"; v: J[]; s: number; e: number }
  | { t: "str"; v: string; s: number; e: number }
  | { t: "num"; raw: string; s: number; e: number }
  | { t: "lit"; v: boolean | null; s: number; e: number };

class Bad extends Error {}

const NUMBER = /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;

function parse(text: string): J {
  let i = 0;
  const ws = () => {
    while (i < text.length && " \t\n\r".includes(text[i])) i++;
  };
  const str = (): string => {
    let out = "";
    i++; // opening quote
    for (;;) {
      if (i >= text.length) throw new Bad("unterminated string");
      const c = text[i++];
      if (c === '"') return out;
      if (c < " ") throw new Bad("control character in string");
      if (c !== "\\") {
        out += c;
        continue;
      }
      const esc = text[i++];
      const simple: Record<string, string> = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" };
      if (esc in simple) out += simple[esc];
      else if (esc === "u" && /^[0-9a-fA-F]{4}$/.test(text.slice(i, i + 4))) {
        out += String.fromCharCode(parseInt(text.slice(i, i + 4), 16));
        i += 4;
      } else throw new Bad("bad escape");
    }
  };
  const value = (): J => {
    ws();
    const s = i;
    const c = text[i];
    if (c === "{") {
      i++;
      const m: [string, J][] = [];
      ws();
      if (text[i] === "}") return { t: "obj", m, dup: false, s, e: ++i };
      for (;;) {
        ws();
        if (text[i] !== '"') throw new Bad("expected a name");
        const k = str();
        ws();
        if (text[i++] !== ":") throw new Bad("expected ':'");
        m.push([k, value()]);
        ws();
        if (text[i] === ",") { i++; continue; }
        if (text[i] === "}") break;
        throw new Bad("expected ',' or '}'");
      }
      const names = new Set(m.map(([k]) => k));
      return { t: "obj", m, dup: names.size !== m.length, s, e: ++i };
    }
    if (c === "[") {
      i++;
      const v: J[] = [];
      ws();
      if (text[i] === "]") return { t: "arr", v, s, e: ++i };
      for (;;) {
        v.push(value());
        ws();
        if (text[i] === ",") { i++; continue; }
        if (text[i] === "]") break;
        throw new Bad("expected ',' or ']'");
      }
      return { t: "arr", v, s, e: ++i };
    }
    if (c === '"') return { t: "str", v: str(), s, e: i };
    NUMBER.lastIndex = i;
    const num = NUMBER.exec(text);
    if (num && num[0].length > 0) {
      i += num[0].length;
      return { t: "num", raw: num[0], s, e: i };
    }
    for (const [w, v] of [["true", true], ["false", false], ["null", null]] as const) {
      if (text.startsWith(w, i)) {
        i += w.length;
        return { t: "lit", v, s, e: i };
      }
    }
    throw new Bad("unexpected character");
  };
  const v = value();
  ws();
  if (i !== text.length) throw new Bad("trailing characters");
  return v;
}

/** An unsigned integer written without sign, fraction or exponent, below 2^bits, or null
 * (`-0` is refused: the node reads it as a float). */
function uint(j: J | undefined, bits: number): bigint | null {
  if (!j || j.t !== "num" || !/^(0|[1-9][0-9]*)$/.test(j.raw)) return null;
  const n = BigInt(j.raw);
  return n >= 0n && n < 1n << BigInt(bits) ? n : null;
}

function member(o: J, name: string): J | undefined {
  return o.t === "obj" ? o.m.find(([k]) => k === name)?.[1] : undefined;
}

// --- versions: (ms, c, node bytes); node ids are ASCII, so string order is byte order ---

export type Version = { ms: bigint; c: bigint; node: string };

export function cmpVersion(a: Version, b: Version): number {
  if (a.ms !== b.ms) return a.ms < b.ms ? -1 : 1;
  if (a.c !== b.c) return a.c < b.c ? -1 : 1;
  return a.node < b.node ? -1 : a.node > b.node ? 1 : 0;
}

function version(j: J | undefined): Version {
  if (!j || j.t !== "obj" || j.dup || j.m.length !== 3) throw new Bad("bad version");
  const ms = uint(member(j, "ms"), 48);
  const c = uint(member(j, "c"), 16);
  const node = member(j, "node");
  if (ms === null || c === null || !node || node.t !== "str" || !NODE_RE.test(node.v)) throw new Bad("bad version");
  return { ms, c, node: node.v };
}

// --- decoding: docs/consuming.md "Refusals", in the node's order ---------------------------

export type Event = {
  entity: string; scope: string; id: string; originSeq: bigint;
  version: Version; base: Version | null; resolves: Version[]; doc: string | null;
};
export type Limits = { prefix: string; max_doc_bytes: number; max_clock_drift_ms: number };

const MEMBERS = ["v", "op", "entity", "scope", "id", "origin", "origin_seq", "version", "base", "resolves", "doc"];
const REQUIRED = MEMBERS.slice(0, 8);

function structure(ev: J): void {
  if (ev.t !== "obj" || ev.dup) throw new Bad("not an object, or a duplicate member");
  const names = ev.m.map(([k]) => k);
  if (!REQUIRED.every((k) => names.includes(k)) || !names.every((k) => MEMBERS.includes(k))) throw new Bad("members");
  const s = (k: string, re: RegExp) => {
    const j = member(ev, k);
    if (!j || j.t !== "str" || !re.test(j.v)) throw new Bad(k);
  };
  if (uint(member(ev, "v"), 32) === null || uint(member(ev, "origin_seq"), 64) === null) throw new Bad("integers");
  const op = member(ev, "op");
  if (!op || op.t !== "str" || !["put", "delete"].includes(op.v)) throw new Bad("op");
  s("entity", ENTITY_RE); s("scope", NODE_RE); s("origin", NODE_RE); s("id", UUID_RE);
  version(member(ev, "version"));
  if (member(ev, "base")) version(member(ev, "base"));
  const r = member(ev, "resolves");
  if (r) {
    if (r.t !== "arr") throw new Bad("resolves");
    r.v.forEach(version);
  }
}

function depthAndDup(doc: J): [number, boolean] {
  let deepest = 0, dup = false;
  const stack: [J, number][] = [[doc, 1]];
  while (stack.length) {
    const [j, d] = stack.pop()!;
    if (j.t === "obj" || j.t === "arr") {
      deepest = Math.max(deepest, d);
      if (j.t === "obj") {
        dup ||= j.dup;
        j.m.forEach(([, c]) => stack.push([c, d + 1]));
      } else j.v.forEach((c) => stack.push([c, d + 1]));
    }
  }
  return [deepest, dup];
}

/** The end of the JSON value at text[i], without recursion (any depth). */
function skipValue(text: string, i: number): number {
  if (text[i] === '"') {
    for (i++; i < text.length && text[i] !== '"'; i++) if (text[i] === "\\") i++;
    return i + 1;
  }
  if (text[i] !== "{" && text[i] !== "[") {
    while (i < text.length && !",}] \t\n\r".includes(text[i])) i++;
    return i;
  }
  let depth = 0;
  for (;;) {
    if (i >= text.length) throw new Bad("unterminated");
    const c = text[i];
    if (c === '"') {
      for (i++; i < text.length && text[i] !== '"'; i++) if (text[i] === "\\") i++;
    } else if (c === "{" || c === "[") depth++;
    else if (c === "}" || c === "]") {
      if (--depth === 0) return i + 1;
    }
    i++;
  }
}

/** (start, end) of the body's top-level `doc` value as written, or null. */
function rawDocSpan(text: string): [number, number] | null {
  const ws = " \t\n\r";
  let i = text.indexOf("{") + 1;
  for (;;) {
    while (ws.includes(text[i])) i++;
    if (text[i] === "}") return null;
    const nameStart = i;
    for (i++; i < text.length && text[i] !== '"'; i++) if (text[i] === "\\") i++;
    const name = (parse(text.slice(nameStart, ++i)) as { v: string }).v;
    while (ws.includes(text[i]) || text[i] === ":") i++;
    const end = skipValue(text, i);
    if (name === "doc") return [i, end];
    i = end;
    while (ws.includes(text[i]) || text[i] === ",") i++;
  }
}

/** The reason for a body too deep to parse: the envelope checked with its document
 * replaced by {}, then the document's size as written, else its depth. */
function tooDeep(subject: string, text: string, limits: Limits): never {
  let span: [number, number] | null;
  try {
    span = rawDocSpan(text);
  } catch {
    throw new Refused("malformed", "too deep to parse");
  }
  if (!span) throw new Refused("malformed", "too deep to parse");
  try {
    decode(subject, new TextEncoder().encode(text.slice(0, span[0]) + "{}" + text.slice(span[1])), 0n, limits);
  } catch (r) {
    // Only these come before the size; the rest (versions, v1's subject checks, drift)
    // after it.
    if (!(r instanceof Refused) || r.code === "malformed" || r.code === "unsupported_envelope") throw r;
  }
  const size = Buffer.byteLength(text.slice(span[0], span[1]), "utf8");
  if (size > limits.max_doc_bytes) throw new Refused("doc_too_large", String(size));
  throw new Refused("malformed", "doc nested too deep");
}

/** The index of the first lone surrogate escape: a \\uD800-\\uDBFF escape not directly
 * followed by a \\uDC00-\\uDFFF one, or such a low one not directly after a high one. A
 * backslash occurs only inside strings, so scanning from backslash to backslash sees every
 * escape, in names and values. */
export function loneSurrogate(text: string): number | null {
  const unit = (at: number): number | null =>
    text[at + 1] === "u" && /^[0-9a-fA-F]{4}$/.test(text.slice(at + 2, at + 6)) ? parseInt(text.slice(at + 2, at + 6), 16) : null;
  let i = text.indexOf("\\");
  while (i >= 0) {
    const u = unit(i);
    if (u === null) i = text.indexOf("\\", i + 2);
    else if (u >= 0xd800 && u <= 0xdbff) {
      const low = unit(i + 6);
      if (low === null || low < 0xdc00 || low > 0xdfff) return i;
      i = text.indexOf("\\", i + 12);
    } else if (u >= 0xdc00 && u <= 0xdfff) return i;
    else i = text.indexOf("\\", i + 6);
  }
  return null;
}

export function decode(subject: string, body: Uint8Array, streamTimeMs: bigint, limits: Limits): Event {
  let text: string;
  let ev: J;
  try {
    // ignoreBOM: a BOM stays in the text, and is refused as JSON.
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(body);
  } catch (e) {
    throw new Refused("malformed", String(e));
  }
  // Before anything else, whatever v says: JSON text must be valid Unicode.
  if (loneSurrogate(text) !== null) throw new Refused("malformed", "lone surrogate escape");
  const envelope = envelopeOf(text);
  if (envelope === 2n) return decodeV2(subject, text, streamTimeMs, limits);
  if (envelope !== null && envelope !== ENVELOPE_VERSION) throw new Refused("unsupported_envelope", String(envelope));
  try {
    ev = parse(text);
    structure(ev);
  } catch (e) {
    // Deeper than this parser goes, but a node checks the size before the depth.
    if (e instanceof RangeError) tooDeep(subject, text, limits);
    // A newer envelope is named as such, not as garbage.
    try {
      const top = parse(text);
      const vs = top.t === "obj" ? top.m.filter(([k]) => k === "v") : [];
      const v = vs.length === 1 ? uint(vs[0][1], 64) : null;
      if (v !== null && !ENVELOPES.includes(v)) throw new Refused("unsupported_envelope", String(v));
    } catch (inner) {
      if (inner instanceof Refused) throw inner;
    }
    throw new Refused("malformed", String(e));
  }
  const str = (k: string) => (member(ev, k) as { v: string }).v;
  const v = uint(member(ev, "v"), 32)!;
  if (v !== ENVELOPE_VERSION) throw new Refused("unsupported_envelope", String(v));
  const op = str("op");
  const docJ = member(ev, "doc");
  if (op === "put" && !docJ) throw new Refused("malformed", "put without doc");
  if (op === "delete" && docJ) throw new Refused("malformed", "delete with a doc");
  const doc = docJ ? checkDoc(text, docJ, limits) : null;
  const ver = version(member(ev, "version"));
  const origin = str("origin");
  if (ver.node !== origin) throw new Refused("invalid_version", "version not written by origin");
  const originSeq = uint(member(ev, "origin_seq"), 64)!;
  if (originSeq === 0n) throw new Refused("invalid_version", "origin_seq must start at 1");
  const base = member(ev, "base") ? version(member(ev, "base")) : null;
  const r = member(ev, "resolves");
  const resolves = r && r.t === "arr" ? r.v.map(version) : [];
  if ([...(base ? [base] : []), ...resolves].some((n) => cmpVersion(n, ver) >= 0))
    throw new Refused("invalid_version", "names a version not older than its own");
  const tokens = [str("entity"), str("scope"), origin, str("id")];
  let tail: string | null = null;
  for (const p of [limits.prefix + ".", limits.prefix + "_in."]) if (subject.startsWith(p)) tail = subject.slice(p.length);
  const got = tail === null ? [] : tail.split(".");
  if (got.join("\u0000") !== tokens.join("\u0000") || tail === null) {
    if (got.length > 2 && got[2] !== origin) throw new Refused("forged_origin", got[2]);
    throw new Refused("subject_mismatch", subject);
  }
  // Against the message's stream timestamp, never this machine's clock.
  if (ver.ms - streamTimeMs > BigInt(limits.max_clock_drift_ms)) throw new Refused("clock_drift", String(ver.ms - streamTimeMs));
  return { entity: tokens[0], scope: tokens[1], id: tokens[3], originSeq, version: ver, base, resolves, doc };
}

/** The document's checks, the same in both envelopes: its size as written, then that it is
 * an object, its depth, duplicate names. Returns its text as written. */
function checkDoc(text: string, docJ: J, limits: Limits): string {
  const doc = text.slice(docJ.s, docJ.e); // the text exactly as written
  const size = Buffer.byteLength(doc, "utf8");
  if (size > limits.max_doc_bytes) throw new Refused("doc_too_large", String(size));
  if (docJ.t !== "obj") throw new Refused("malformed", "doc must be a JSON object");
  const [depth, dup] = depthAndDup(docJ);
  if (depth > MAX_DOC_DEPTH) throw new Refused("malformed", "doc nested too deep");
  if (dup) throw new Refused("malformed", "doc has a member name twice");
  return doc;
}

/** The body's envelope version as a node dispatches on it: the writers' own bodies start
 * with it; otherwise `v` occurring once at the top level of valid JSON, an integer in
 * 0..2^64. null when neither (the v1 decoder then names what is wrong). */
function envelopeOf(text: string): bigint | null {
  if (text.startsWith('{"v":1,')) return 1n;
  if (text.startsWith('{"v":2,')) return 2n;
  try {
    const top = parse(text);
    const vs = top.t === "obj" ? top.m.filter(([k]) => k === "v") : [];
    return vs.length === 1 ? uint(vs[0][1], 64) : null;
  } catch {
    return null;
  }
}

/** A v2 version [ms, c] (node: the subject's origin) or [ms, c, node] (another node);
 * spelling the origin out is malformed. */
function compact(j: J | undefined, origin: string): Version {
  if (!j || j.t !== "arr" || (j.v.length !== 2 && j.v.length !== 3)) throw new Refused("malformed", "bad version");
  const ms = uint(j.v[0], 48);
  const c = uint(j.v[1], 16);
  if (ms === null || c === null) throw new Refused("malformed", "bad version");
  if (j.v.length === 2) return { ms, c, node: origin };
  const node = j.v[2];
  if (node.t !== "str" || !NODE_RE.test(node.v)) throw new Refused("malformed", "bad node id");
  if (node.v === origin) throw new Refused("malformed", "a version names the subject's origin, which v2 leaves out");
  return { ms, c, node: node.v };
}

const MEMBERS_V2 = ["v", "seq", "ver", "base", "resolves", "doc"];

/** Envelope v2 (docs/consuming.md "Envelope v2"): the record and origin from the subject
 * alone, versions as arrays, put if doc is present. In a node's order: the body's shape,
 * the subject, the document, the versions, the drift. */
function decodeV2(subject: string, text: string, streamTimeMs: bigint, limits: Limits): Event {
  let ev: J;
  try {
    ev = parse(text);
  } catch (e) {
    if (e instanceof RangeError) tooDeep(subject, text, limits);
    throw new Refused("malformed", String(e));
  }
  if (ev.t !== "obj" || ev.dup) throw new Refused("malformed", "not an object, or a member name twice");
  const names = ev.m.map(([k]) => k);
  if (!["v", "seq", "ver"].every((k) => names.includes(k)) || !names.every((k) => MEMBERS_V2.includes(k)))
    throw new Refused("malformed", "missing or unknown members");
  const seq = uint(member(ev, "seq"), 64);
  const r = member(ev, "resolves");
  if (seq === null || (r && r.t !== "arr")) throw new Refused("malformed", "a member has the wrong type");
  const baseJ = member(ev, "base");
  const resolvesJ = r && r.t === "arr" ? r.v : [];
  [member(ev, "ver"), ...(baseJ ? [baseJ] : []), ...resolvesJ].forEach((j) => compact(j, "\u0000"));
  let tail: string | null = null;
  for (const p of [limits.prefix + ".", limits.prefix + "_in."]) if (subject.startsWith(p)) tail = subject.slice(p.length);
  const tokens = tail === null ? [] : tail.split(".");
  if (tokens.length !== 4) throw new Refused("malformed", `subject ${subject} is not <prefix>.<entity>.<scope>.<origin>.<id>`);
  const [entity, scope, origin, id] = tokens;
  if (!ENTITY_RE.test(entity) || !NODE_RE.test(scope) || !NODE_RE.test(origin) || !UUID_RE.test(id))
    throw new Refused("malformed", `subject ${subject} has an invalid token`);
  const ver = compact(member(ev, "ver"), origin);
  const base = baseJ ? compact(baseJ, origin) : null;
  const resolves = resolvesJ.map((j) => compact(j, origin));
  const docJ = member(ev, "doc");
  const doc = docJ ? checkDoc(text, docJ, limits) : null;
  if (ver.node !== origin) throw new Refused("invalid_version", "version not written by origin");
  if (seq === 0n) throw new Refused("invalid_version", "seq must start at 1");
  if ([...(base ? [base] : []), ...resolves].some((n) => cmpVersion(n, ver) >= 0))
    throw new Refused("invalid_version", "names a version not older than its own");
  if (ver.ms - streamTimeMs > BigInt(limits.max_clock_drift_ms)) throw new Refused("clock_drift", String(ver.ms - streamTimeMs));
  return { entity, scope, id, originSeq: seq, version: ver, base, resolves, doc };
}

// --- the merge rule: docs/consuming.md "The merge rule" -------------------------------------

type Leaf = { version: Version; scope: string; base: Version | null; resolves: Version[]; originSeq: bigint; doc: string | null };

function cmpBytes(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, "utf8"), Buffer.from(b, "utf8"));
}

/** Leaf::content_cmp: doc (absent lowest, then bytes), scope, base, resolves, origin_seq. */
function contentCmp(a: Leaf, b: Leaf): number {
  if (a.doc === null || b.doc === null) {
    if (a.doc !== b.doc) return a.doc === null ? -1 : 1;
  } else if (a.doc !== b.doc) return cmpBytes(a.doc, b.doc);
  if (a.scope !== b.scope) return cmpBytes(a.scope, b.scope);
  if ((a.base === null) !== (b.base === null)) return a.base === null ? -1 : 1;
  if (a.base && b.base && cmpVersion(a.base, b.base) !== 0) return cmpVersion(a.base, b.base);
  for (let k = 0; k < Math.min(a.resolves.length, b.resolves.length); k++) {
    const c = cmpVersion(a.resolves[k], b.resolves[k]);
    if (c !== 0) return c;
  }
  if (a.resolves.length !== b.resolves.length) return a.resolves.length - b.resolves.length;
  return a.originSeq === b.originSeq ? 0 : a.originSeq < b.originSeq ? -1 : 1;
}

const eq = (a: Version, b: Version) => cmpVersion(a, b) === 0;

export class RecordState {
  origins = new Map<string, Version>(); // greatest version seen per origin
  leaves: Leaf[] = []; // greatest first
  pending: Version[] = []; // named, above their origin's greatest seen

  private name(v: Version) {
    const top = this.origins.get(v.node);
    if (top && cmpVersion(v, top) <= 0) this.leaves = this.leaves.filter((l) => !eq(l.version, v));
    else if (!this.pending.some((p) => eq(p, v))) this.pending.push(v);
  }

  apply(ev: Event) {
    const v = ev.version;
    for (const n of [...(ev.base ? [ev.base] : []), ...ev.resolves]) this.name(n);
    const leaf: Leaf = { version: v, scope: ev.scope, base: ev.base, resolves: ev.resolves, originSeq: ev.originSeq, doc: ev.doc };
    const top = this.origins.get(v.node);
    if (top && eq(top, v)) {
      // The same version again: a duplicate, or an equivocation (the greater content stays).
      this.leaves = this.leaves.map((k) => (eq(k.version, v) && contentCmp(leaf, k) > 0 ? leaf : k));
      return;
    }
    if (top && cmpVersion(v, top) < 0) return; // clause 2: superseded by its origin's later version
    this.origins.set(v.node, v);
    this.leaves = this.leaves.filter((l) => l.version.node !== v.node);
    const named = this.pending.some((p) => eq(p, v));
    this.pending = this.pending.filter((p) => !(p.node === v.node && cmpVersion(p, v) <= 0));
    if (!named) this.leaves.push(leaf);
    this.leaves.sort((a, b) => cmpVersion(b.version, a.version));
  }

  toJSON() {
    return { origins: [...this.origins.values()].map(vj), pending: this.pending.map(vj), leaves: this.leaves.map(lj) };
  }

  static from(j: ReturnType<RecordState["toJSON"]>): RecordState {
    const r = new RecordState();
    j.origins.map(jv).forEach((v) => r.origins.set(v.node, v));
    r.pending = j.pending.map(jv);
    r.leaves = j.leaves.map((l) => ({ ...l, version: jv(l.version), base: l.base && jv(l.base), resolves: l.resolves.map(jv), originSeq: BigInt(l.originSeq) }));
    return r;
  }
}

type VJ = { ms: number; c: number; node: string };
const vj = (v: Version): VJ => ({ ms: Number(v.ms), c: Number(v.c), node: v.node }); // ms < 2^48: exact
const jv = (v: VJ): Version => ({ ms: BigInt(v.ms), c: BigInt(v.c), node: v.node });
const lj = (l: Leaf) => ({ ...l, version: vj(l.version), base: l.base && vj(l.base), resolves: l.resolves.map(vj), originSeq: l.originSeq.toString() });

// --- the read model: records and checkpoint in one file, replaced atomically ---------------

export class ReadModel {
  checkpoint = 0;
  records = new Map<string, RecordState>(); // "<entity> <id> <scope>": a record is (entity, scope, id)
  quarantined: { seq: number; subject: string; reason: string }[] = [];

  constructor(public path: string | null, public limits: Limits) {
    if (path && existsSync(path)) {
      const j = JSON.parse(readFileSync(path, "utf8"));
      this.checkpoint = j.checkpoint;
      this.quarantined = j.quarantined;
      for (const [k, s] of Object.entries(j.records)) this.records.set(k, RecordState.from(s as never));
    }
  }

  /** Applies one message in memory; `save` makes it durable with the checkpoint. */
  handle(seq: number, subject: string, body: Uint8Array, streamTimeMs: bigint): Event | Refused | null {
    if (seq <= this.checkpoint) return null;
    let out: Event | Refused;
    try {
      const ev = decode(subject, body, streamTimeMs, this.limits);
      const key = `${ev.entity} ${ev.id} ${ev.scope}`;
      const r = this.records.get(key) ?? new RecordState();
      r.apply(ev);
      this.records.set(key, r);
      out = ev;
    } catch (e) {
      if (!(e instanceof Refused)) throw e;
      this.quarantined.push({ seq, subject, reason: e.code });
      out = e;
    }
    this.checkpoint = seq;
    return out;
  }

  save() {
    if (!this.path) return;
    const tmp = this.path + ".tmp";
    writeFileSync(tmp, JSON.stringify({ checkpoint: this.checkpoint, quarantined: this.quarantined, records: Object.fromEntries(this.records) }));
    renameSync(tmp, this.path); // atomic: the old file or the new one, never half
  }

  record(entity: string, scope: string, id: string) {
    const r = this.records.get(`${entity} ${id} ${scope}`);
    if (!r || !r.leaves.length) return null;
    const w = r.leaves[0];
    return {
      entity, id, scope: w.scope, deleted: w.doc === null, version: vj(w.version), doc: w.doc,
      conflicts: r.leaves.slice(1).map((l) => ({ version: vj(l.version), deleted: l.doc === null, scope: l.scope })),
    };
  }
}

// --- following a live stream -----------------------------------------------------------------

async function follow(url: string, path: string, stream: string, prefix: string) {
  const { connect } = await import("nats");
  const nc = await connect({ servers: url, maxReconnectAttempts: -1 });
  const jsm = await nc.jetstreamManager();
  const meta = (await jsm.streams.info(stream)).config.metadata ?? {};
  const model = new ReadModel(path, {
    prefix,
    max_doc_bytes: Number(meta["jetsync.max_doc_bytes"] ?? 256 * 1024),
    max_clock_drift_ms: Number(meta["jetsync.max_clock_drift_ms"] ?? 60_000),
  });
  // Resume at our own checkpoint + 1 (never at a durable consumer's server position).
  const consumer = await nc.jetstream().consumers.get(stream, {
    filterSubjects: [`${prefix}.>`],
    opt_start_seq: model.checkpoint + 1,
  });
  console.log(`following ${stream} from ${model.checkpoint + 1}`);
  for (;;) {
    const batch = await consumer.fetch({ max_messages: 100, expires: 1000 });
    let n = 0;
    for await (const m of batch) {
      const reply = (m as unknown as { reply: string }).reply;
      model.handle(m.seq, m.subject, m.data, ackTimestampMs(reply));
      n++;
    }
    if (n) model.save(); // the batch's records and its checkpoint, together
  }
}

/** The stream timestamp (ms) from a JetStream reply subject, exactly (ns as BigInt). */
function ackTimestampMs(reply: string): bigint {
  const t = reply.split(".");
  return BigInt(t[t.length === 9 ? 7 : 9]) / 1_000_000n;
}

// --- the conformance vectors -------------------------------------------------------------------

function runVectors(dir: string): boolean {
  let passed = 0, failed = 0;
  for (const f of readdirSync(dir).filter((f) => f.endsWith(".json")).sort()) {
    for (const c of JSON.parse(readFileSync(join(dir, f), "utf8")).cases) {
      const model = new ReadModel(null, c.limits);
      const errors: string[] = [];
      for (const m of c.messages) {
        const got = model.handle(m.stream_seq, m.subject, new TextEncoder().encode(m.body), BigInt(m.stream_time_ms));
        const want = m.expect;
        if (got instanceof Refused) {
          if (want.outcome !== "quarantined" || want.reason !== got.code) errors.push(`message ${m.stream_seq}: refused ${got.message}, expected ${JSON.stringify(want)}`);
          else if (want.doc_bytes !== undefined && got.detail !== String(want.doc_bytes)) errors.push(`message ${m.stream_seq}: size ${got.detail}`);
        } else if (want.outcome === "quarantined") errors.push(`message ${m.stream_seq}: accepted, expected ${JSON.stringify(want)}`);
        else if (want.doc_bytes !== undefined && got && Buffer.byteLength(got.doc ?? "", "utf8") !== want.doc_bytes) errors.push(`message ${m.stream_seq}: doc size`);
      }
      for (const want of c.records) {
        const got = model.record(want.entity, want.scope, want.id);
        if (canonical(got) !== canonical(want)) errors.push(`record ${want.entity}/${want.id}: got ${canonical(got)}, expected ${canonical(want)}`);
      }
      if (model.records.size !== c.records.length) errors.push("records the vector does not expect");
      if (errors.length) {
        failed++;
        console.log(`FAIL ${f}/${c.name}\n  ${errors.join("\n  ")}`);
      } else passed++;
    }
  }
  console.log(`vectors: ${passed} passed, ${failed} failed`);
  return failed === 0;
}

/** JSON with sorted keys, for comparing. */
function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x) =>
    x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort(([a], [b]) => (a < b ? -1 : 1))) : x,
  );
}

async function main(argv: string[]): Promise<number> {
  const opt = (k: string, d: string) => (argv.indexOf(k) >= 0 ? argv[argv.indexOf(k) + 1] : d);
  if (argv[0] === "vectors" && argv[1]) return runVectors(argv[1]) ? 0 : 1;
  if (argv[0] === "checkpoint" && argv[1]) {
    console.log(new ReadModel(argv[1], { prefix: "", max_doc_bytes: 0, max_clock_drift_ms: 0 }).checkpoint);
    return 0;
  }
  if (argv[0] === "dump" && argv[1]) {
    const model = new ReadModel(argv[1], { prefix: "", max_doc_bytes: 0, max_clock_drift_ms: 0 });
    for (const k of [...model.records.keys()].sort()) {
      const [entity, id, scope] = k.split(" ");
      console.log(canonical(model.record(entity, scope, id)));
    }
    return 0;
  }
  if (argv[0] === "follow" && argv[2]) {
    await follow(argv[1], argv[2], opt("--stream", "JETSYNC"), opt("--prefix", "jetsync"));
    return 0;
  }
  console.error("usage: jetsync_consumer.js follow <nats url> <model.json> | vectors <dir> | dump <model.json> | checkpoint <model.json>");
  return 2;
}

main(process.argv.slice(2)).then((code) => process.exit(code));
