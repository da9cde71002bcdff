//! How values are stored: record states as postcard with a trailing xxh3-64 checksum,
//! other rows as postcard, outbox entries as a packed index, and the event a leaf records.

use serde::{Deserialize, Serialize};

use uuid::Uuid;
use xxhash_rust::xxh3::xxh3_64;

use crate::clock::Hlc;
use crate::digest::{BUCKETS, Digest};
use crate::error::StorageError;
use crate::event::ChangeEvent;
use crate::ids::EntityName;
use crate::merge::{IdState, Leaf, RecordState};

/// Decodes a stored record value, checking its checksum first.
///
/// The value is the first scope's [`RecordState`], then, only when the id is held in more
/// than one scope, the other scopes' states as a postcard sequence. An id in one scope is
/// therefore stored byte for byte as before scoped identity, and a value written then
/// (whose leaves may span scopes) is split by [`IdState::from_parts`].
pub(super) fn decode_state(
    entity: &EntityName,
    id: &Uuid,
    bytes: &[u8],
) -> Result<IdState, StorageError> {
    let body = checked_body(bytes).ok_or_else(|| StorageError::ChecksumMismatch {
        entity: entity.clone(),
        id: *id,
    })?;
    decode_state_body(body).map_err(|e| StorageError::UndecodableRecord {
        entity: entity.clone(),
        id: *id,
        detail: e.to_string(),
    })
}

/// [`decode_state`] of a body whose checksum was checked.
pub(super) fn decode_state_body(body: &[u8]) -> Result<IdState, postcard::Error> {
    let (first, rest) = postcard::take_from_bytes::<RecordState>(body)?;
    let mut parts = vec![first];
    if !rest.is_empty() {
        parts.extend(postcard::from_bytes::<Vec<RecordState>>(rest)?);
    }
    Ok(IdState::from_parts(parts))
}

/// Decodes a checksummed record value of any stored layout (the current one, or an older
/// format's during an upgrade).
pub(super) fn decode_checked_record<T: serde::de::DeserializeOwned>(
    entity: &EntityName,
    id: &Uuid,
    bytes: &[u8],
) -> Result<T, StorageError> {
    let body = checked_body(bytes).ok_or_else(|| StorageError::ChecksumMismatch {
        entity: entity.clone(),
        id: *id,
    })?;
    postcard::from_bytes(body).map_err(|e| StorageError::UndecodableRecord {
        entity: entity.clone(),
        id: *id,
        detail: e.to_string(),
    })
}

/// Decodes a stored record value (as snapshots carry them), checking its checksum.
pub fn decode_stored_state(
    entity: &EntityName,
    id: &Uuid,
    bytes: &[u8],
) -> Result<IdState, StorageError> {
    decode_state(entity, id, bytes)
}

/// The postcard body of a stored record value if its trailing checksum matches.
pub(super) fn checked_body(bytes: &[u8]) -> Option<&[u8]> {
    let split = bytes.len().checked_sub(8)?;
    let (body, sum) = bytes.split_at(split);
    (xxh3_64(body).to_le_bytes() == sum).then_some(body)
}

/// A record value as stored: the postcard body, then its xxh3-64 (little-endian).
pub(super) fn append_checksum(mut body: Vec<u8>) -> Vec<u8> {
    let sum = xxh3_64(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    body
}

/// Encodes an id's state for storing, checksum included (layout: [`decode_state`]).
pub(super) fn encode_state(state: &IdState) -> Result<Vec<u8>, StorageError> {
    // Sized up front: growing the buffer by doubling showed up in write profiles.
    let docs: usize = state
        .leaves()
        .map(|l| l.doc.as_ref().map_or(0, String::len))
        .sum();
    let counts = state.parts().iter().fold((0, 0), |(l, o), p| {
        (l + p.leaves.len(), o + p.origins.len() + p.pending.len())
    });
    let guess = 24 + docs + 96 * counts.0 + 24 * counts.1;
    let encode_err = |e: postcard::Error| StorageError::Encode {
        what: "record state",
        detail: e.to_string(),
    };
    let (first, rest) = match state.parts() {
        [] => (&RecordState::default(), &[][..]),
        [first, rest @ ..] => (first, rest),
    };
    let mut body = postcard::to_extend(first, Vec::with_capacity(guess)).map_err(encode_err)?;
    if !rest.is_empty() {
        body = postcard::to_extend(rest, body).map_err(encode_err)?;
    }
    Ok(append_checksum(body))
}

/// Encodes a row of `table` (a quarantine entry, a damaged record) as postcard.
pub(super) fn encode_postcard<T: Serialize>(
    value: &T,
    table: &'static str,
) -> Result<Vec<u8>, StorageError> {
    postcard::to_stdvec(value).map_err(|e| StorageError::Encode {
        what: table,
        detail: e.to_string(),
    })
}

/// Decodes the postcard row of `table` stored under `key`.
pub(super) fn decode_postcard<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    table: &'static str,
    key: impl std::fmt::Display,
) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::UndecodableEntry {
        table,
        key: key.to_string(),
        detail: e.to_string(),
    })
}

/// Decodes the stored digest of `entity`.
pub(super) fn decode_digest(entity: &EntityName, bytes: &[u8]) -> Result<Digest, StorageError> {
    Digest::from_bytes(bytes).ok_or_else(|| StorageError::UndecodableEntry {
        table: "digests",
        key: entity.to_string(),
        detail: format!("{} bytes, expected {}", bytes.len(), BUCKETS * 16),
    })
}

/// Outbox value: entity length (u8), entity, id (16 bytes), hlc (u64 LE).
pub(super) fn encode_outbox(entity: &EntityName, id: &Uuid, hlc: Hlc) -> Vec<u8> {
    let name = entity.as_str().as_bytes();
    let mut out = Vec::with_capacity(1 + name.len() + 24);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&hlc.to_u64().to_le_bytes());
    out
}

/// [`encode_outbox`] of an own version queued again by a republish (see
/// `store::republish`), followed by `nonce`: the entry's message id must differ from the
/// original's, which the server may still hold in its duplicate window.
pub(super) fn encode_outbox_republish(
    entity: &EntityName,
    id: &Uuid,
    hlc: Hlc,
    nonce: u64,
) -> Vec<u8> {
    let mut out = encode_outbox(entity, id, hlc);
    out.extend_from_slice(&nonce.to_le_bytes());
    out
}

/// The republish nonce of an outbox value, if it has one.
pub(super) fn outbox_nonce(bytes: &[u8]) -> Option<u64> {
    let len = usize::from(*bytes.first()?);
    Some(u64::from_le_bytes(
        bytes.get(25 + len..33 + len)?.try_into().ok()?,
    ))
}

/// The `(entity, id, hlc)` of an outbox value (a republish nonce after it is ignored);
/// `None` if it is malformed.
pub(super) fn decode_outbox(bytes: &[u8]) -> Option<(EntityName, Uuid, Hlc)> {
    let len = *bytes.first()? as usize;
    let entity = EntityName::new(std::str::from_utf8(bytes.get(1..1 + len)?).ok()?).ok()?;
    let id = Uuid::from_slice(bytes.get(1 + len..17 + len)?).ok()?;
    let hlc = u64::from_le_bytes(bytes.get(17 + len..25 + len)?.try_into().ok()?);
    Some((entity, id, Hlc::from_u64(hlc)))
}

/// The event that created `leaf` ([`crate::merge::leaf_event`]), a document that is not
/// JSON being a damaged record.
pub(super) fn leaf_event(
    entity: &EntityName,
    id: Uuid,
    leaf: &Leaf,
) -> Result<ChangeEvent, StorageError> {
    crate::merge::leaf_event(entity, id, leaf).map_err(|detail| StorageError::UndecodableRecord {
        entity: entity.clone(),
        id,
        detail: format!("version {}: {detail}", leaf.version),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders() -> EntityName {
        EntityName::new("orders").unwrap()
    }

    #[test]
    fn an_id_in_one_scope_is_stored_as_its_record_state_and_two_scopes_round_trip() {
        use crate::clock::{Hlc, Version};
        use crate::ids::{NodeId, Scope};
        let id = Uuid::now_v7();
        let leaf = |ms: u64, scope: &str| Leaf {
            version: Version::new(Hlc::new(ms, 0).unwrap(), NodeId::new("a").unwrap()),
            scope: Scope::new(scope).unwrap(),
            base: None,
            resolves: vec![],
            origin_seq: ms,
            doc: Some("{}".into()),
        };
        let one = RecordState {
            leaves: vec![leaf(1, "_")],
            origins: vec![leaf(1, "_").version],
            pending: vec![],
        };
        let bytes = encode_state(&IdState::from(one.clone())).unwrap();
        // Byte for byte what a store wrote before scoped identity.
        assert_eq!(bytes, append_checksum(postcard::to_stdvec(&one).unwrap()));
        let other = RecordState {
            leaves: vec![leaf(2, "zz")],
            origins: vec![leaf(2, "zz").version],
            pending: vec![],
        };
        let mut two = IdState::from(one);
        two.merge_state(IdState::from(other));
        assert_eq!(two.parts().len(), 2);
        let bytes = encode_state(&two).unwrap();
        assert_eq!(decode_state(&orders(), &id, &bytes).unwrap(), two);
    }

    #[test]
    fn a_value_failing_its_checksum_names_the_record() {
        let id = Uuid::now_v7();
        let mut bytes = encode_state(&IdState::default()).unwrap();
        assert!(decode_state(&orders(), &id, &bytes).is_ok());
        bytes[0] ^= 1;
        let err = decode_state(&orders(), &id, &bytes).unwrap_err();
        let StorageError::ChecksumMismatch { entity, id: got } = &err else {
            panic!("{err:?}");
        };
        assert!(*entity == orders() && *got == id, "{err:?}");
        // Too short to hold a checksum at all.
        let err = decode_stored_state(&orders(), &id, &[1, 2, 3]).unwrap_err();
        assert!(
            matches!(err, StorageError::ChecksumMismatch { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_checksummed_value_that_is_no_record_state_is_undecodable() {
        let id = Uuid::now_v7();
        let bytes = append_checksum(vec![0xff; 4]);
        let err = decode_state(&orders(), &id, &bytes).unwrap_err();
        let StorageError::UndecodableRecord {
            entity, id: got, ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert!(*entity == orders() && *got == id, "{err:?}");
    }

    #[test]
    fn other_rows_name_their_table_and_key() {
        let err = decode_postcard::<(u64, String)>(&[0xff], "quarantine", 7).unwrap_err();
        let StorageError::UndecodableEntry {
            table: "quarantine",
            key,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert!(key == "7", "{err:?}");
        let err = decode_digest(&orders(), &[0; 15]).unwrap_err();
        let StorageError::UndecodableEntry {
            table: "digests",
            key,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert!(key == "orders", "{err:?}");
        assert!(decode_digest(&orders(), &Digest::default().to_bytes()).is_ok());
    }

    #[test]
    fn outbox_value_round_trips() {
        let e = EntityName::new("orders").unwrap();
        let id = Uuid::now_v7();
        let hlc = Hlc::new(1_700_000_000_000, 3).unwrap();
        assert_eq!(
            decode_outbox(&encode_outbox(&e, &id, hlc)),
            Some((e, id, hlc))
        );
        assert_eq!(decode_outbox(&[5, b'a']), None);
    }
}
