//! Change feeds: [`Watch`], one entity type's changes as they are applied or written (ending
//! when the node stops), and [`Lagged`], the error a feed that fell behind reports.

use tokio::sync::broadcast;

use crate::ids::EntityName;
use crate::store::Change;

/// A change feed for one entity type.
pub struct Watch {
    pub(super) entity: EntityName,
    pub(super) rx: broadcast::Receiver<Change>,
    /// The node's stop signal: a handle may outlive the node, and with it the sender.
    pub(super) stop: tokio::sync::watch::Receiver<bool>,
}

/// The feed fell behind and `missed` changes were dropped; re-read the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("watcher fell behind; {missed} changes were dropped")]
pub struct Lagged {
    /// How many changes were dropped.
    pub missed: u64,
}

impl Watch {
    /// The feed as a [`futures::Stream`] (same items as [`Watch::next`]; it ends when the
    /// node stops), for `StreamExt` combinators and `select!` over several feeds.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Change, Lagged>> + Send {
        futures::stream::unfold(self, |mut w| async move { w.next().await.map(|c| (c, w)) })
    }

    /// The next change, `None` once the node has stopped (after the changes made before
    /// the stop).
    pub async fn next(&mut self) -> Option<Result<Change, Lagged>> {
        loop {
            if *self.stop.borrow() {
                // Stopped: hand out what was sent before, then end.
                match self.rx.try_recv() {
                    Ok(c) if c.entity == self.entity => return Some(Ok(c)),
                    Ok(_) => continue,
                    Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                        return Some(Err(Lagged { missed }));
                    }
                    Err(_) => return None,
                }
            }
            let received = tokio::select! {
                r = self.rx.recv() => r,
                // The node sends `true` before it goes; a sender gone without it ends too.
                stopped = self.stop.wait_for(|s| *s) => match stopped {
                    Ok(_) => continue,
                    Err(_) => return None,
                },
            };
            match received {
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
