//! The record API a service uses on a running node: async reads ([`NodeHandle::get`],
//! [`NodeHandle::list`], [`NodeHandle::conflicts`]) and the single-record writes
//! ([`NodeHandle::insert`], [`NodeHandle::put_if`], [`NodeHandle::resolve`]; `put`,
//! `delete` and the batch `write` live with the write path in `mod.rs`).
//!
//! Reads run on tokio's blocking pool, so a current-thread runtime never stalls on redb;
//! every write goes through [`NodeHandle::write`], so watchers are told and the publisher
//! is woken. The logic is the store's: this file only moves calls to the right place.

use uuid::Uuid;

use super::{NodeError, NodeHandle};
use crate::clock::Version;
use crate::error::{StorageError, WriteError};
use crate::ids::{EntityName, Scope};
use crate::store::{ConflictSet, Expect, Page, Record, Store, Write, Written};

impl NodeHandle {
    /// `Err(NodeError::Stopped)` once the node has stopped.
    pub(super) fn running(&self) -> Result<(), NodeError> {
        if self.0.stopping() {
            Err(NodeError::Stopped)
        } else {
            Ok(())
        }
    }

    /// Runs the store read `f` on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, NodeError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StorageError> + Send + 'static,
    {
        self.running()?;
        let store = self.0.store.clone();
        let out = tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|source| StorageError::TaskFailed {
                task: "node read",
                source,
            })?;
        match out {
            // The node stopped while the read waited: say so, not "store closed".
            Err(StorageError::Closed { .. }) => Err(NodeError::Stopped),
            out => Ok(out?),
        }
    }

    /// The live record `entity/id`: `None` if it does not exist or is deleted.
    pub async fn get(&self, entity: &EntityName, id: Uuid) -> Result<Option<Record>, NodeError> {
        let entity = entity.clone();
        self.read(move |s| s.get(&entity, id)).await
    }

    /// The live record `(entity, scope, id)`: an id written in two scopes is two records
    /// (see [`crate::merge`]); [`NodeHandle::get`] reads the primary one.
    pub async fn get_in(
        &self,
        entity: &EntityName,
        scope: &Scope,
        id: Uuid,
    ) -> Result<Option<Record>, NodeError> {
        let (entity, scope) = (entity.clone(), scope.clone());
        self.read(move |s| s.get_in(&entity, &scope, id)).await
    }

    /// Live records of `entity` in id order, after `after`, at most `limit`; pass the
    /// page's `next` as `after` for the next page.
    pub async fn list(
        &self,
        entity: &EntityName,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page<Record>, NodeError> {
        let entity = entity.clone();
        self.read(move |s| s.list(&entity, after, limit)).await
    }

    /// Records of `entity` with concurrent versions (conflicts), in id order, after
    /// `after`, at most `limit`. Settle one with [`NodeHandle::resolve`].
    pub async fn conflicts(
        &self,
        entity: &EntityName,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page<ConflictSet>, NodeError> {
        let entity = entity.clone();
        self.read(move |s| s.conflicts(&entity, after, limit)).await
    }

    /// Creates a record with a new time-ordered (UUIDv7) id; the id is in the result.
    pub async fn insert(
        &self,
        entity: &EntityName,
        doc: serde_json::Value,
    ) -> Result<Written, WriteError> {
        self.write_one(Write::put(entity.clone(), Uuid::now_v7(), doc).expect(Expect::Absent))
            .await
    }

    /// Writes `doc` only if the live winner is `expected` (else
    /// [`WriteError::VersionMismatch`], nothing written).
    pub async fn put_if(
        &self,
        entity: &EntityName,
        id: Uuid,
        doc: serde_json::Value,
        expected: &Version,
    ) -> Result<Written, WriteError> {
        self.write_one(
            Write::put(entity.clone(), id, doc).expect(Expect::Version(expected.clone())),
        )
        .await
    }

    /// Settles conflicts: writes `doc` (a tombstone for `None`) superseding the current
    /// winner and every version in `resolves` (usually all leaves of a
    /// [`ConflictSet`]).
    pub async fn resolve(
        &self,
        entity: &EntityName,
        id: Uuid,
        doc: Option<serde_json::Value>,
        resolves: Vec<Version>,
    ) -> Result<Written, WriteError> {
        let write = match doc {
            Some(doc) => Write::put(entity.clone(), id, doc),
            None => Write::delete(entity.clone(), id),
        };
        self.write_one(write.resolving(resolves)).await
    }

    pub(super) async fn write_one(&self, write: Write) -> Result<Written, WriteError> {
        self.write(vec![write])
            .await?
            .pop()
            .ok_or(WriteError::Storage(StorageError::NoWriteResult))
    }
}
