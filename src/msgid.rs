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
        let mut msg = Vec::with_capacity(self.node.as_str().len() + 17);
        msg.extend_from_slice(self.node.as_str().as_bytes());
        msg.push(0);
        msg.extend_from_slice(&self.incarnation.to_be_bytes());
        msg.extend_from_slice(&origin_seq.to_be_bytes());
        let tag = hmac::sign(&self.key, &msg);
        let hex: String = tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}:{:016x}:{origin_seq}:{hex}", self.node, self.incarnation)
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
}
