//! Change feeds: [`Watch`], one entity type's changes as they are applied or written, and
//! [`Lagged`], the error a feed that fell behind reports.

use tokio::sync::broadcast;

use crate::ids::EntityName;
use crate::store::Change;

/// A change feed for one entity type.
pub struct Watch {
    pub(super) entity: EntityName,
    pub(super) rx: broadcast::Receiver<Change>,
}

/// The feed fell behind and `missed` changes were dropped; re-read the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("watcher fell behind; {missed} changes were dropped")]
pub struct Lagged {
    /// How many changes were dropped.
    pub missed: u64,
}

impl Watch {
    /// The next change, `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<Result<Change, Lagged>> {
        loop {
            match self.rx.recv().await {
                Ok(c) if c.entity == self.entity => return Some(Ok(c)),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Some(Err(Lagged { missed }));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
