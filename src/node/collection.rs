//! Typed documents: [`Collection<T>`], one entity type of a running node read and written
//! as a serde type `T` (`node.collection::<Order>("orders")?`), with [`Doc<T>`] (a live
//! record), [`Conflict<T>`] (a record's concurrent versions) and [`DocError`] (a document
//! that does not serialise, or a stored one that does not deserialise into `T`).
//!
//! A collection is a thin typed view over the [`NodeHandle`]: every call goes through the
//! handle's untyped path (`serde_json::Value`), so writes reach watchers and the publisher
//! the same way, and nothing about storage or replication depends on `T`. A stored
//! document that does not fit `T` (written by another version of the service, or through
//! the untyped path) is an error for that record only: [`Collection::list`] and
//! [`Collection::conflicts`] return it in place of the item, never a panic.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::watch::{ChangeFeed, FeedError, Position};
use super::{NodeError, NodeHandle};
use crate::clock::Version;
use crate::error::{Error, InvalidName};
use crate::ids::{EntityName, Scope};
use crate::store::{ConflictSet, Page, Record, Written};

/// A document that does not (de)serialise: serde's error and the record it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// The value given to a write does not serialise to JSON (nothing was written).
    #[error("{entity}/{id}: the document does not serialise: {source}")]
    Encode {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored document does not deserialise into the collection's type (read it
    /// untyped with [`NodeHandle::get`] to see it).
    #[error("{entity}/{id}: the stored document does not fit the collection's type: {source}")]
    Decode {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
}

impl DocError {
    /// The id of the record concerned.
    pub fn id(&self) -> Uuid {
        match self {
            DocError::Encode { id, .. } | DocError::Decode { id, .. } => *id,
        }
    }
}

/// A live record of a [`Collection<T>`].
#[derive(Clone, Debug, PartialEq)]
pub struct Doc<T> {
    /// The record's id.
    pub id: Uuid,
    /// The winning version: pass it to [`Collection::put_if`].
    pub version: Version,
    /// The record's scope.
    pub scope: Scope,
    /// The winning document.
    pub doc: T,
    /// Versions of concurrent writes besides the winner, greatest first (see
    /// [`Collection::conflicts`]).
    pub conflicts: Vec<Version>,
}

/// A record with concurrent versions, each decoded into `T`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict<T> {
    /// The record's id.
    pub id: Uuid,
    /// Greatest first: `leaves[0]` is the current winner. `(version, None)` is a delete.
    pub leaves: Vec<(Version, Option<T>)>,
}

impl<T> Conflict<T> {
    /// Every leaf's version: what a [`Collection::resolve`] settling them all names.
    pub fn versions(&self) -> Vec<Version> {
        self.leaves.iter().map(|(v, _)| v.clone()).collect()
    }
}

/// One entity type of a running node, read and written as `T` (see the module docs).
/// Cheap to clone; obtained from [`NodeHandle::collection`]. Errors are the umbrella
/// [`Error`]: [`Error::Doc`] for serde, [`Error::Write`] for a refused write (such as
/// [`WriteError::VersionMismatch`](crate::WriteError::VersionMismatch)), [`Error::Node`]
/// once the node has stopped.
pub struct Collection<T> {
    node: NodeHandle,
    entity: EntityName,
    // `fn() -> T`: the collection holds no `T`, so it is Send + Sync whatever `T` is.
    _doc: PhantomData<fn() -> T>,
}

impl<T> Clone for Collection<T> {
    fn clone(&self) -> Self {
        Collection {
            node: self.node.clone(),
            entity: self.entity.clone(),
            _doc: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Collection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("entity", &self.entity)
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl NodeHandle {
    /// The entity type `entity` as a collection of `T` documents; refused only for an
    /// invalid entity name.
    pub fn collection<T>(&self, entity: &str) -> Result<Collection<T>, InvalidName>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        Ok(Collection {
            node: self.clone(),
            entity: EntityName::new(entity)?,
            _doc: PhantomData,
        })
    }
}

impl<T> Collection<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    /// The entity type.
    pub fn entity(&self) -> &EntityName {
        &self.entity
    }

    /// The node it belongs to (for the untyped calls).
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    fn decode(&self, id: Uuid, doc: serde_json::Value) -> Result<T, DocError> {
        serde_json::from_value(doc).map_err(|source| DocError::Decode {
            entity: self.entity.clone(),
            id,
            source,
        })
    }

    fn decode_text(&self, id: Uuid, doc: &str) -> Result<T, DocError> {
        serde_json::from_str(doc).map_err(|source| DocError::Decode {
            entity: self.entity.clone(),
            id,
            source,
        })
    }

    fn encode(&self, id: Uuid, doc: &T) -> Result<serde_json::Value, DocError> {
        serde_json::to_value(doc).map_err(|source| DocError::Encode {
            entity: self.entity.clone(),
            id,
            source,
        })
    }

    fn doc(&self, r: Record) -> Result<Doc<T>, DocError> {
        Ok(Doc {
            doc: self.decode(r.id, r.doc)?,
            id: r.id,
            version: r.version,
            scope: r.scope,
            conflicts: r.conflicts,
        })
    }

    fn conflict(&self, c: ConflictSet) -> Result<Conflict<T>, DocError> {
        let leaves = c
            .leaves
            .into_iter()
            .map(|l| {
                let doc = match l.doc.as_deref() {
                    Some(text) => Some(self.decode_text(c.id, text)?),
                    None => None,
                };
                Ok((l.version, doc))
            })
            .collect::<Result<_, DocError>>()?;
        Ok(Conflict { id: c.id, leaves })
    }

    /// The live document `id`: `None` if it does not exist or is deleted;
    /// [`Error::Doc`] if it does not deserialise into `T`.
    pub async fn get(&self, id: Uuid) -> Result<Option<Doc<T>>, Error> {
        match self.node.get(&self.entity, id).await? {
            None => Ok(None),
            Some(r) => Ok(Some(self.doc(r)?)),
        }
    }

    /// Live documents in id order after `after`, at most `limit`; pass the page's `next`
    /// as `after` for the next page. A document that does not deserialise into `T` is
    /// an `Err` in its place (the others are still there).
    pub async fn list(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page<Result<Doc<T>, DocError>>, NodeError> {
        let page = self.node.list(&self.entity, after, limit).await?;
        Ok(Page {
            items: page.items.into_iter().map(|r| self.doc(r)).collect(),
            next: page.next,
        })
    }

    /// Records with concurrent versions, in id order after `after`, at most `limit`,
    /// every version decoded (an `Err` in place of a record one of whose versions does
    /// not deserialise into `T`). Settle one with [`Collection::resolve`].
    pub async fn conflicts(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page<Result<Conflict<T>, DocError>>, NodeError> {
        let page = self.node.conflicts(&self.entity, after, limit).await?;
        Ok(Page {
            items: page.items.into_iter().map(|c| self.conflict(c)).collect(),
            next: page.next,
        })
    }

    /// Creates a document with a new time-ordered (UUIDv7) id; the id is in the result.
    pub async fn insert(&self, doc: &T) -> Result<Written, Error> {
        let id = Uuid::now_v7();
        let value = self.encode(id, doc)?;
        Ok(self
            .node
            .write_one(
                crate::store::Write::put(self.entity.clone(), id, value)
                    .expect(crate::store::Expect::Absent),
            )
            .await?)
    }

    /// Writes document `id` (last writer wins; see [`Collection::put_if`]).
    pub async fn put(&self, id: Uuid, doc: &T) -> Result<Written, Error> {
        let value = self.encode(id, doc)?;
        Ok(self.node.put(&self.entity, id, value).await?)
    }

    /// Writes document `id` only if its live winner is `expected`
    /// ([`WriteError::VersionMismatch`](crate::WriteError::VersionMismatch) otherwise,
    /// nothing written).
    pub async fn put_if(&self, id: Uuid, doc: &T, expected: &Version) -> Result<Written, Error> {
        let value = self.encode(id, doc)?;
        Ok(self.node.put_if(&self.entity, id, value, expected).await?)
    }

    /// Deletes document `id`.
    pub async fn delete(&self, id: Uuid) -> Result<Written, Error> {
        Ok(self.node.delete(&self.entity, id).await?)
    }

    /// Settles a conflict: writes `doc` (a delete for `None`) superseding the winner and
    /// every version in `resolves` (usually [`Conflict::versions`]).
    pub async fn resolve(
        &self,
        id: Uuid,
        doc: Option<&T>,
        resolves: Vec<Version>,
    ) -> Result<Written, Error> {
        let value = doc.map(|d| self.encode(id, d)).transpose()?;
        Ok(self.node.resolve(&self.entity, id, value, resolves).await?)
    }

    /// A resumable change feed of this collection from `from` (`None`: from now), each
    /// [`Update`](super::Update) carrying the document as `T` (see
    /// [`NodeHandle::watch_from`] and [`ChangeFeed`]). A stored document that does not
    /// deserialise is a [`FeedError::Doc`] item; the feed goes on past it.
    pub async fn watch_from(&self, from: Option<Position>) -> Result<ChangeFeed<T>, FeedError> {
        self.node.feed(&self.entity, from).await
    }

    /// Where the node's change log stands now (see [`NodeHandle::position`]).
    pub async fn position(&self) -> Result<Position, NodeError> {
        self.node.position().await
    }
}
