//! Publish de-duplication ids (`Nats-Msg-Id`) that nobody else can predict, and that prove
//! "this node wrote this exact message".
//!
//! JetStream drops a publish whose `Nats-Msg-Id` it saw within the duplicate window and
//! acknowledges it as a duplicate. If a node's next id could be guessed (it used to be
//! `<node>:<incarnation>:<origin_seq>`, with the prefix visible in every stored message's
//! headers), any client allowed to publish anywhere in the stream could take that id first
//! and the node's real write would be acknowledged and dropped. So an id
//! `<node>:<incarnation hex>:<origin_seq>:<tag>` carries a tag: the first 16 bytes of an
//! HMAC-SHA256, under a random secret kept in the node's store (new with each
//! incarnation), of
//!
//! `"jetsync-msgid-2" 0x00 ‖ node 0x00 ‖ incarnation (u64 BE) ‖ origin_seq (u64 BE) ‖
//! len(tail) (u64 BE) ‖ tail ‖ len(payload) (u64 BE) ‖ payload`
//!
//! where `tail` is the subject after its prefix, `<entity>.<scope>.<origin>.<id>`, and
//! `payload` the message body's bytes. Past ids do not reveal the secret.
//!
//! Why the subject and the body: the node passes over a message whose id verifies as its
//! own echo, unread ([`crate::store::Store::wrote`]), and its self-check counts only
//! refusals of messages it can prove it wrote. An id is readable in every stored
//! message's headers; had the tag covered only `(node, incarnation, origin_seq)`, a copy
//! of it on any other message (another event, published after the duplicate window)
//! would have been skipped by this node alone and applied by every other: permanent
//! divergence. Bound to the exact bytes, a copied id proves nothing about another
//! message, which then goes through the checks and the merge like everyone's; the real
//! message itself replayed is harmless (the merge skips known versions).
//!
//! The tail, not the whole subject: an edge site's own events come back to it on the
//! import subject `<prefix>_in.<tail>` as well as on `<prefix>.<tail>` (see
//! [`crate::event::subject_tail`]), and both must verify. The prefix carries nothing the
//! merge reads; the tail's tokens (entity, scope, origin, id) are what decoding checks
//! against the body.
//!
//! Retries: the outbox rebuilds an event from its leaf (or from the copy `unpublished`
//! keeps, the same encoding) byte for byte on every attempt, so the id of a retried
//! publish is unchanged and JetStream de-duplicates it. An id squatted by someone else is
//! replaced by [`MsgIds::fresh_id`], the same tag plus `:r<32 hex>`: never used before,
//! still bound to the content, so it verifies too. An event published again because the
//! stream lost it (see `store::republish`) takes the same shape with a nonce kept in its
//! outbox entry ([`MsgIds::republish_id`]): the original id may still be in the server's
//! duplicate window, which would drop the republish although the message is gone.
//!
//! Ids in the pre-content format (tag over `(node, incarnation, origin_seq)` only),
//! already in streams, no longer verify: those messages go through the merge like
//! anyone's, which finds their versions known and changes nothing.
//!
//! The tag alone does not make a duplicate acknowledgement trustworthy (a leaked secret,
//! a bug): the publisher also checks the stored message of every duplicate ack.
//!
//! ## The compact id (envelope v2)
//!
//! A v2 event (its body starts `{"v":2,`, see [`crate::event::V2_START`]) is published
//! with a 16-character id: the first 12 bytes of the HMAC, in base64url without padding,
//! of
//!
//! `"jetsync-msgid-3" 0x00 ‖ node 0x00 ‖ incarnation (u64 BE) ‖ len(tail) (u64 BE) ‖ tail ‖
//! len(payload) (u64 BE) ‖ payload`
//!
//! The node, the incarnation and `origin_seq` are not spelled out: the subject carries the
//! origin (and [`MsgIds::made`] checks the tail's origin token is this node before any
//! HMAC, so another node's message still costs no HMAC), the body carries `seq`, and the
//! incarnation only selects the secret, which the verifying node holds. Fresh and
//! republish ids append `:r<32 hex>` as for v1. A v1 event keeps the v1 layout above, so a
//! node upgraded mid-outbox retries with the very id its old build used and JetStream
//! de-duplicates it.
//!
//! Why 96 bits are enough: every stored id is readable, but HMAC-SHA256 is a PRF, so ids
//! on known content reveal nothing about the tag of any other content. What a reader can
//! do is guess: publish a message carrying a guessed tag for content of its choosing, on
//! this node's subject, hoping this node passes over it as its own echo (while the others
//! apply it). Each guess is one published message and succeeds with probability 2^-96; at
//! a million messages a second that is one success in ~2.5·10^15 years. Uniqueness within
//! the server's duplicate window is what the id is also for: two different events of any
//! nodes share an id with probability ~n²/2^97, negligible for any window. (Squatting a
//! not yet published id needs the tag of unpublished content: the same guess.)

use ring::hmac;

use crate::ids::NodeId;

/// Length of the secret kept in the store.
pub const SECRET_LEN: usize = 32;

/// Bytes of the HMAC kept in an id (128 bits: not guessable).
const TAG_LEN: usize = 16;

/// What the HMAC input starts with: names this layout, apart from the earlier one.
const DOMAIN: &[u8] = b"jetsync-msgid-2\0";

/// The compact layout's (envelope v2) domain.
const DOMAIN_COMPACT: &[u8] = b"jetsync-msgid-3\0";

/// Bytes of the HMAC kept in a compact id (96 bits, see the module doc).
const COMPACT_TAG_LEN: usize = 12;

/// Characters of a compact id: [`COMPACT_TAG_LEN`] bytes in unpadded base64url.
const COMPACT_LEN: usize = COMPACT_TAG_LEN * 4 / 3;

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Hex digits of a fresh id's random suffix (a simple UUID).
const FRESH_LEN: usize = 32;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Makes this node's message ids.
#[derive(Clone)]
pub struct MsgIds {
    node: NodeId,
    incarnation: u64,
    key: hmac::Key,
}

impl std::fmt::Debug for MsgIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgIds")
            .field("node", &self.node)
            .field("incarnation", &format_args!("{:016x}", self.incarnation))
            .finish_non_exhaustive()
    }
}

impl MsgIds {
    /// The ids of `node`'s incarnation `incarnation`, tagged with `secret`.
    pub fn new(node: NodeId, incarnation: u64, secret: &[u8]) -> Self {
        MsgIds {
            node,
            incarnation,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A fresh random secret.
    pub fn new_secret() -> [u8; SECRET_LEN] {
        let mut out = [0u8; SECRET_LEN];
        out[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        out[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        out
    }

    /// `<node>:<incarnation>:<origin_seq>:<tag>`: the id of the event with `origin_seq`
    /// published on a subject whose tail (after the prefix) is `tail`, with body
    /// `payload`. The same for every attempt with the same bytes, so a retried publish is
    /// de-duplicated. A v2 body gets the compact id instead ([`MsgIds::compact_id`]).
    pub fn id(&self, origin_seq: u64, tail: &str, payload: &[u8]) -> String {
        use std::fmt::Write;
        if payload.starts_with(crate::event::V2_START) {
            return self.compact_id(tail, payload);
        }
        // One allocation: every published event of this node makes one.
        let mut id = String::with_capacity(self.node.as_str().len() + 2 * TAG_LEN + 40);
        let _ = write!(
            id,
            "{}:{:016x}:{origin_seq}:",
            self.node.as_str(),
            self.incarnation
        );
        for b in self.tag(origin_seq, tail, payload) {
            id.push(char::from(HEX[usize::from(b >> 4)]));
            id.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        id
    }

    /// Whether `msg_id` is [`MsgIds::id`] (or a [`MsgIds::fresh_id`]) of some
    /// `origin_seq` for exactly this `tail` and `payload`, checked without building the
    /// id or allocating: the apply loop asks this of every message it receives. Another
    /// node's id costs a string comparison; this node's, one HMAC over the message.
    pub fn made(&self, msg_id: &str, tail: &str, payload: &[u8]) -> bool {
        // The v1 layout has three or four `:`-separated fields after the first; a compact
        // id none, or a fresh suffix.
        let (base, fresh) = match msg_id.split_once(':') {
            Some((_, rest)) if rest.contains(':') => {
                return self.made_v1(msg_id, tail, payload);
            }
            Some((base, rest)) => (base, Some(rest)),
            None => (msg_id, None),
        };
        // A fresh id's suffix: `r` and 32 lowercase hex digits; nothing after it.
        let fresh_ok = fresh.is_none_or(|f| {
            f.len() == 1 + FRESH_LEN
                && f.as_bytes()[0] == b'r'
                && f.as_bytes()[1..].iter().all(|b| HEX.contains(b))
        });
        // The subject names the origin: another node's message costs no HMAC.
        fresh_ok
            && base.len() == COMPACT_LEN
            && tail.split('.').nth(2) == Some(self.node.as_str())
            && base.as_bytes() == self.compact_tag(tail, payload).as_slice()
    }

    /// The compact id of a v2 event on `tail` with body `payload` (see the module doc).
    pub fn compact_id(&self, tail: &str, payload: &[u8]) -> String {
        // Base64url of 12 bytes is 16 characters, ASCII.
        String::from_utf8(self.compact_tag(tail, payload).to_vec()).unwrap_or_default()
    }

    /// The compact tag, already in base64url.
    fn compact_tag(&self, tail: &str, payload: &[u8]) -> [u8; COMPACT_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(DOMAIN_COMPACT);
        ctx.update(self.node.as_str().as_bytes());
        ctx.update(&[0]);
        ctx.update(&self.incarnation.to_be_bytes());
        ctx.update(&(tail.len() as u64).to_be_bytes());
        ctx.update(tail.as_bytes());
        ctx.update(&(payload.len() as u64).to_be_bytes());
        ctx.update(payload);
        let mac = ctx.sign();
        let mut out = [0u8; COMPACT_LEN];
        for (i, chunk) in mac.as_ref()[..COMPACT_TAG_LEN].chunks_exact(3).enumerate() {
            let n = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
            for j in 0..4 {
                out[4 * i + j] = B64URL[((n >> (18 - 6 * j)) & 63) as usize];
            }
        }
        out
    }

    /// [`MsgIds::made`] for the v1 layout.
    fn made_v1(&self, msg_id: &str, tail: &str, payload: &[u8]) -> bool {
        let mut parts = msg_id.split(':');
        let (Some(node), Some(incarnation), Some(seq), Some(tag)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        // A fresh id's suffix: `r` and 32 lowercase hex digits; nothing after it.
        let fresh_ok = match parts.next() {
            None => true,
            Some(fresh) => {
                parts.next().is_none()
                    && fresh.len() == 1 + FRESH_LEN
                    && fresh.as_bytes()[0] == b'r'
                    && fresh.as_bytes()[1..].iter().all(|b| HEX.contains(b))
            }
        };
        if !fresh_ok || node != self.node.as_str() {
            return false;
        }
        let Ok(seq) = seq.parse::<u64>() else {
            return false;
        };
        incarnation.len() == 16
            && u64::from_str_radix(incarnation, 16) == Ok(self.incarnation)
            // `parse` accepts a leading `+`, which `id` never writes.
            && !msg_id.contains('+')
            && tag.len() == 2 * TAG_LEN
            && tag
                .as_bytes()
                .chunks_exact(2)
                .zip(self.tag(seq, tail, payload))
                .all(|(hex, b)| hex == [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]])
    }

    /// The first [`TAG_LEN`] bytes of the HMAC of the layout in the module doc.
    fn tag(&self, origin_seq: u64, tail: &str, payload: &[u8]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(DOMAIN);
        ctx.update(self.node.as_str().as_bytes());
        ctx.update(&[0]);
        ctx.update(&self.incarnation.to_be_bytes());
        ctx.update(&origin_seq.to_be_bytes());
        // Lengths first, so no two (tail, payload) pairs give the same input.
        ctx.update(&(tail.len() as u64).to_be_bytes());
        ctx.update(tail.as_bytes());
        ctx.update(&(payload.len() as u64).to_be_bytes());
        ctx.update(payload);
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(&ctx.sign().as_ref()[..TAG_LEN]);
        out
    }

    /// An id never used before for the event with `origin_seq`, to republish it when
    /// someone else's message took its id: [`MsgIds::id`] plus `:r<32 hex>`, so it is
    /// bound to the same content and verifies as this node's.
    pub fn fresh_id(&self, origin_seq: u64, tail: &str, payload: &[u8]) -> String {
        format!(
            "{}:r{}",
            self.id(origin_seq, tail, payload),
            uuid::Uuid::new_v4().simple()
        )
    }
}

impl MsgIds {
    /// The id of the event with `origin_seq` published again after the stream lost it
    /// (see `store::republish`): [`MsgIds::id`] plus `:r<nonce as 32 hex>`, the shape of a
    /// [`MsgIds::fresh_id`], so it verifies as this node's and binds the same content; the
    /// nonce, kept with the outbox entry, keeps it the same on every retry of that entry
    /// and apart from the original's, which the server's duplicate window may still hold.
    pub fn republish_id(&self, origin_seq: u64, tail: &str, payload: &[u8], nonce: u64) -> String {
        format!("{}:r{:032x}", self.id(origin_seq, tail, payload), nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAIL: &str = "orders._.a.0195e5a4-7a3c-7cc2-9b6f-3c1f0a9d2e11";
    const BODY: &[u8] = br#"{"v":1,"op":"put","doc":{"x":1}}"#;

    fn ids() -> MsgIds {
        MsgIds::new(NodeId::new("a").unwrap(), 7, &MsgIds::new_secret())
    }

    #[test]
    fn ids_are_stable_per_secret_and_content_and_unpredictable_without_it() {
        let node = NodeId::new("a").unwrap();
        let s1 = MsgIds::new_secret();
        let s2 = MsgIds::new_secret();
        assert_ne!(s1, s2);
        let ids = MsgIds::new(node.clone(), 7, &s1);
        // A retry of the same bytes gets the same id: JetStream de-duplicates it.
        assert_eq!(ids.id(5, TAIL, BODY), ids.id(5, TAIL, BODY));
        assert_ne!(ids.id(5, TAIL, BODY), ids.id(6, TAIL, BODY));
        assert!(ids.id(5, TAIL, BODY).starts_with("a:0000000000000007:5:"));
        // Another secret (another incarnation's, an attacker's guess) gives other ids.
        assert_ne!(
            ids.id(5, TAIL, BODY),
            MsgIds::new(node, 7, &s2).id(5, TAIL, BODY)
        );
        assert_ne!(ids.fresh_id(5, TAIL, BODY), ids.fresh_id(5, TAIL, BODY));
    }

    #[test]
    fn a_republish_id_is_its_own_stable_and_proves_the_same_content() {
        let ids = ids();
        let id = ids.republish_id(5, TAIL, BODY, 42);
        assert_eq!(id, ids.republish_id(5, TAIL, BODY, 42));
        assert_ne!(id, ids.republish_id(5, TAIL, BODY, 43));
        assert!(id.starts_with(&ids.id(5, TAIL, BODY)));
        assert!(ids.made(&id, TAIL, BODY));
        assert!(!ids.made(&id, TAIL, br#"{"v":1,"op":"delete"}"#));
    }

    #[test]
    fn made_recognises_exactly_its_own_ids() {
        let node = NodeId::new("a").unwrap();
        let secret = MsgIds::new_secret();
        let ids = MsgIds::new(node.clone(), 7, &secret);
        for seq in [0, 1, 5, u64::MAX] {
            let id = ids.id(seq, TAIL, BODY);
            assert!(ids.made(&id, TAIL, BODY), "{id}");
        }
        let id = ids.id(5, TAIL, BODY);
        // The tag: 32 lowercase hex digits of the HMAC's start.
        let tag = id.rsplit(':').next().unwrap();
        assert_eq!(tag.len(), 32);
        assert!(
            tag.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let other_secret = MsgIds::new(node.clone(), 7, &MsgIds::new_secret());
        let other_incarnation = MsgIds::new(node, 8, &secret);
        let other_node = MsgIds::new(NodeId::new("b").unwrap(), 7, &secret);
        let fresh = ids.fresh_id(5, TAIL, BODY);
        for (what, forged) in [
            ("another secret", other_secret.id(5, TAIL, BODY)),
            ("another incarnation", other_incarnation.id(5, TAIL, BODY)),
            ("another node", other_node.id(5, TAIL, BODY)),
            ("another seq's tag", id.replace(":5:", ":6:")),
            ("uppercase tag", id.to_uppercase().replacen("A:", "a:", 1)),
            ("plus sign", id.replace(":5:", ":+5:")),
            ("truncated", id[..id.len() - 1].to_string()),
            ("extra field", format!("{id}:x")),
            (
                "fresh suffix too short",
                fresh[..fresh.len() - 1].to_string(),
            ),
            (
                "fresh suffix uppercase",
                fresh.to_uppercase().replacen("A:", "a:", 1),
            ),
            ("fields after a fresh suffix", format!("{fresh}:r")),
            ("empty", String::new()),
        ] {
            assert!(!ids.made(&forged, TAIL, BODY), "{what}: {forged}");
        }
        // A fresh id is bound to the same content: it verifies for it, and only for it.
        assert!(ids.made(&fresh, TAIL, BODY), "{fresh}");
        assert!(!ids.made(&fresh, TAIL, b"{}"), "{fresh}");
    }

    #[test]
    fn the_tag_proves_this_exact_subject_tail_and_payload() {
        let ids = ids();
        let id = ids.id(5, TAIL, BODY);
        let fresh = ids.fresh_id(5, TAIL, BODY);
        assert!(ids.made(&id, TAIL, BODY));
        // One byte of the payload changed, anywhere; one byte more or less.
        for i in 0..BODY.len() {
            let mut body = BODY.to_vec();
            body[i] ^= 1;
            assert!(!ids.made(&id, TAIL, &body), "payload byte {i} flipped");
            assert!(!ids.made(&fresh, TAIL, &body), "fresh, payload byte {i}");
        }
        assert!(!ids.made(&id, TAIL, &BODY[..BODY.len() - 1]));
        assert!(!ids.made(&id, TAIL, &[BODY, b" "].concat()));
        assert!(!ids.made(&id, TAIL, b""));
        // One byte of the subject's tail changed, anywhere.
        for i in 0..TAIL.len() {
            let mut tail = TAIL.as_bytes().to_vec();
            tail[i] ^= 1;
            let tail = String::from_utf8(tail).unwrap();
            assert!(!ids.made(&id, &tail, BODY), "subject byte {i}: {tail}");
        }
        // Each token replaced: entity, scope, the origin, the record id.
        let tokens: Vec<&str> = TAIL.split('.').collect();
        for (i, other) in [
            "invoices",
            "shop42",
            "b",
            "0195e5a4-7a3c-7cc2-9b6f-3c1f0a9d2e12",
        ]
        .into_iter()
        .enumerate()
        {
            let mut t = tokens.clone();
            t[i] = other;
            let tail = t.join(".");
            assert!(!ids.made(&id, &tail, BODY), "token {i}: {tail}");
        }
        // The tail and the payload are not interchangeable at their boundary.
        let (a, b) = BODY.split_at(4);
        let moved = format!("{TAIL}{}", std::str::from_utf8(a).unwrap());
        assert!(!ids.made(&ids.id(5, &moved, b), TAIL, BODY));
        assert!(!ids.made(&id, &moved, b));
    }

    #[test]
    fn an_id_of_the_old_layout_no_longer_verifies() {
        // The tag over (node, incarnation, origin_seq) only, as ids were made before.
        let secret = MsgIds::new_secret();
        let ids = MsgIds::new(NodeId::new("a").unwrap(), 7, &secret);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"a");
        ctx.update(&[0]);
        ctx.update(&7u64.to_be_bytes());
        ctx.update(&5u64.to_be_bytes());
        let tag: String = ctx.sign().as_ref()[..TAG_LEN]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let old = format!("a:0000000000000007:5:{tag}");
        assert!(!ids.made(&old, TAIL, BODY), "{old}");
        assert!(!ids.made(&old, "", b""), "{old}");
    }

    const BODY_V2: &[u8] = br#"{"v":2,"seq":5,"ver":[1796000000000,0],"doc":{"x":1}}"#;

    #[test]
    fn a_v2_payload_gets_a_compact_id_that_proves_exactly_its_content() {
        let ids = ids();
        let id = ids.id(5, TAIL, BODY_V2);
        assert_eq!(id.len(), 16, "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{id}"
        );
        assert_eq!(id, ids.id(5, TAIL, BODY_V2), "a retry gets the same id");
        assert!(ids.made(&id, TAIL, BODY_V2));
        // The v1 layout is still made for a v1 body, and both verify.
        assert!(ids.id(5, TAIL, BODY).starts_with("a:0000000000000007:5:"));
        assert!(ids.made(&ids.id(5, TAIL, BODY), TAIL, BODY));
        for i in 0..BODY_V2.len() {
            let mut body = BODY_V2.to_vec();
            body[i] ^= 1;
            assert!(!ids.made(&id, TAIL, &body), "payload byte {i} flipped");
        }
        for i in 0..TAIL.len() {
            let mut tail = TAIL.as_bytes().to_vec();
            tail[i] ^= 1;
            let tail = String::from_utf8(tail).unwrap();
            assert!(!ids.made(&id, &tail, BODY_V2), "subject byte {i}: {tail}");
        }
        let fresh = ids.fresh_id(5, TAIL, BODY_V2);
        assert!(fresh.starts_with(&format!("{id}:r")), "{fresh}");
        assert!(ids.made(&fresh, TAIL, BODY_V2));
        assert!(ids.made(&ids.republish_id(5, TAIL, BODY_V2, 9), TAIL, BODY_V2));
        let node = NodeId::new("a").unwrap();
        let secret = MsgIds::new_secret();
        let mine = MsgIds::new(node.clone(), 7, &secret);
        let id = mine.id(5, TAIL, BODY_V2);
        for (what, other) in [
            (
                "another secret",
                MsgIds::new(node.clone(), 7, &MsgIds::new_secret()),
            ),
            ("another incarnation", MsgIds::new(node, 8, &secret)),
            (
                "another node",
                MsgIds::new(NodeId::new("b").unwrap(), 7, &secret),
            ),
        ] {
            assert!(!other.made(&id, TAIL, BODY_V2), "{what}");
        }
        for forged in [
            id[..15].to_string(),
            format!("{id}x"),
            format!("{id}:r"),
            format!("{id}:x:y"),
            id.to_uppercase(),
            String::new(),
        ] {
            assert!(!mine.made(&forged, TAIL, BODY_V2), "{forged}");
        }
    }

    #[test]
    fn v1_ids_of_a_node_named_like_a_compact_id_still_verify() {
        // 16 characters, the length of a compact id.
        let ids = MsgIds::new(
            NodeId::new("abcdefghijklmnop").unwrap(),
            7,
            &MsgIds::new_secret(),
        );
        let tail = "orders._.abcdefghijklmnop.0195e5a4-7a3c-7cc2-9b6f-3c1f0a9d2e11";
        let id = ids.id(5, tail, BODY);
        assert!(ids.made(&id, tail, BODY), "{id}");
        assert!(ids.made(&ids.fresh_id(5, tail, BODY), tail, BODY));
    }
}
