//! Publish de-duplication ids (`Nats-Msg-Id`) that nobody else can predict.
//!
//! JetStream drops a publish whose `Nats-Msg-Id` it saw within the duplicate window and
//! acknowledges it as a duplicate. If a node's next id could be guessed (it used to be
//! `<node>:<incarnation>:<origin_seq>`, with the prefix visible in every stored message's
//! headers), any client allowed to publish anywhere in the stream could take that id first
//! and the node's real write would be acknowledged and dropped. So an id carries a tag:
//! an HMAC-SHA256 of `(node, incarnation, origin_seq)` under a random secret kept in the
//! node's store, which past ids do not reveal.
//!
//! The tag alone does not make a duplicate acknowledgement trustworthy (a leaked secret,
//! a bug): the publisher also checks the stored message of every duplicate ack.

use ring::hmac;

use crate::ids::NodeId;

/// Length of the secret kept in the store.
pub const SECRET_LEN: usize = 32;

/// Bytes of the HMAC kept in an id (128 bits: not guessable).
const TAG_LEN: usize = 16;

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

    /// `<node>:<incarnation>:<origin_seq>:<tag>`: the id of the event with `origin_seq`.
    /// The same for every attempt, so a retried publish is de-duplicated.
    pub fn id(&self, origin_seq: u64) -> String {
        use std::fmt::Write;
        // One allocation: every published and every applied event of this node makes one.
        let mut id = String::with_capacity(self.node.as_str().len() + 2 * TAG_LEN + 40);
        let _ = write!(
            id,
            "{}:{:016x}:{origin_seq}:",
            self.node.as_str(),
            self.incarnation
        );
        for b in self.tag(origin_seq) {
            id.push(char::from(HEX[usize::from(b >> 4)]));
            id.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        id
    }

    /// Whether `msg_id` is [`MsgIds::id`] of some `origin_seq`, checked without building
    /// the id: the apply loop asks this of every message it receives.
    pub fn made(&self, msg_id: &str) -> bool {
        let mut parts = msg_id.split(':');
        let (Some(node), Some(incarnation), Some(seq), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return false;
        };
        let Ok(seq) = seq.parse::<u64>() else {
            return false;
        };
        node == self.node.as_str()
            && incarnation.len() == 16
            && u64::from_str_radix(incarnation, 16) == Ok(self.incarnation)
            // `parse` accepts a leading `+`, which `id` never writes.
            && !msg_id.contains('+')
            && tag.len() == 2 * TAG_LEN
            && tag
                .as_bytes()
                .chunks_exact(2)
                .zip(self.tag(seq))
                .all(|(hex, b)| hex == [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]])
    }

    /// The first [`TAG_LEN`] bytes of the HMAC of `(node, incarnation, origin_seq)`.
    fn tag(&self, origin_seq: u64) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(self.node.as_str().as_bytes());
        ctx.update(&[0]);
        ctx.update(&self.incarnation.to_be_bytes());
        ctx.update(&origin_seq.to_be_bytes());
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(&ctx.sign().as_ref()[..TAG_LEN]);
        out
    }

    /// An id never used before for `origin_seq`, to republish an event whose id someone
    /// else's message took.
    pub fn fresh_id(&self, origin_seq: u64) -> String {
        format!("{}:r{}", self.id(origin_seq), uuid::Uuid::new_v4().simple())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_secret_and_unpredictable_without_it() {
        let node = NodeId::new("a").unwrap();
        let s1 = MsgIds::new_secret();
        let s2 = MsgIds::new_secret();
        assert_ne!(s1, s2);
        let ids = MsgIds::new(node.clone(), 7, &s1);
        assert_eq!(ids.id(5), ids.id(5));
        assert_ne!(ids.id(5), ids.id(6));
        assert!(ids.id(5).starts_with("a:0000000000000007:5:"));
        // Another secret (another incarnation's, an attacker's guess) gives other ids.
        assert_ne!(ids.id(5), MsgIds::new(node, 7, &s2).id(5));
        assert_ne!(ids.fresh_id(5), ids.fresh_id(5));
    }

    #[test]
    fn made_recognises_exactly_its_own_ids() {
        let node = NodeId::new("a").unwrap();
        let secret = MsgIds::new_secret();
        let ids = MsgIds::new(node.clone(), 7, &secret);
        for seq in [0, 1, 5, u64::MAX] {
            assert!(ids.made(&ids.id(seq)), "{}", ids.id(seq));
        }
        let id = ids.id(5);
        // The tag is the old formatting's: 32 lowercase hex digits of the HMAC's start.
        let tag = id.rsplit(':').next().unwrap();
        assert_eq!(tag.len(), 32);
        assert!(
            tag.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let other_secret = MsgIds::new(node.clone(), 7, &MsgIds::new_secret());
        let other_incarnation = MsgIds::new(node, 8, &secret);
        let other_node = MsgIds::new(NodeId::new("b").unwrap(), 7, &secret);
        for (what, forged) in [
            ("another secret", other_secret.id(5)),
            ("another incarnation", other_incarnation.id(5)),
            ("another node", other_node.id(5)),
            ("another seq's tag", id.replace(":5:", ":6:")),
            ("a fresh id", ids.fresh_id(5)),
            ("uppercase tag", id.to_uppercase().replacen("A:", "a:", 1)),
            ("plus sign", id.replace(":5:", ":+5:")),
            ("truncated", id[..id.len() - 1].to_string()),
            ("extra field", format!("{id}:x")),
            ("empty", String::new()),
        ] {
            assert!(!ids.made(&forged), "{what}: {forged}");
        }
    }
}
