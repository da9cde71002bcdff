//! Detecting deliveries lost in transit. A JetStream consumer numbers its deliveries 1, 2,
//! 3…; when a connection drops with deliveries in flight, those are gone, and the next ones
//! arrive with a jump in that number (an ack-less consumer never redelivers them, an acked
//! one only after `ack_wait`). Every reader of the stream (the apply loop, backfill, replay)
//! checks the numbers with [`DeliveryOrder`] and resumes from what it has processed instead
//! of reading on past the hole.

/// Deliveries after `after` were lost; the next one that arrived was `got`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "deliveries {} to {} were lost in transit (a dropped connection); resuming from the last processed message",
    .after + 1,
    .got.saturating_sub(1)
)]
pub struct LostDeliveries {
    /// The last delivery number processed.
    pub after: u64,
    /// The delivery number that arrived next.
    pub got: u64,
}

/// The delivery numbers seen from one consumer, in order.
#[derive(Clone, Debug, Default)]
pub struct DeliveryOrder {
    last: u64,
}

impl DeliveryOrder {
    /// For a consumer that has delivered nothing yet.
    pub fn new() -> Self {
        DeliveryOrder::default()
    }

    /// The last delivery number accepted.
    #[cfg(test)]
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Accepts `delivery` if it is the next one; otherwise reports the gap and stays put.
    pub fn check(&mut self, delivery: u64) -> Result<(), LostDeliveries> {
        if delivery == self.last + 1 {
            self.last = delivery;
            Ok(())
        } else {
            Err(LostDeliveries {
                after: self.last,
                got: delivery,
            })
        }
    }

    /// The index of the first delivery in `deliveries` that does not follow the one
    /// before, with the gap; everything before it is accepted.
    pub fn first_gap(
        &mut self,
        deliveries: impl IntoIterator<Item = u64>,
    ) -> Option<(usize, LostDeliveries)> {
        for (i, d) in deliveries.into_iter().enumerate() {
            if let Err(gap) = self.check(d) {
                return Some((i, gap));
            }
        }
        None
    }
}

/// The consumer's delivery number of a message (0 if it carries no JetStream info, which
/// never follows and so counts as a gap).
pub fn delivery_of(m: &async_nats::jetstream::Message) -> u64 {
    m.info().map_or(0, |i| i.consumer_sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jump_is_a_gap_and_nothing_after_it_is_accepted() {
        let mut order = DeliveryOrder::new();
        assert_eq!(order.first_gap([1, 2, 3]), None);
        assert_eq!(
            order.first_gap([4, 7, 8]),
            Some((1, LostDeliveries { after: 4, got: 7 }))
        );
        assert_eq!(order.last(), 4);
        assert!(order.check(5).is_ok());
        let gap = order.check(5).unwrap_err();
        assert!(gap.to_string().contains("lost in transit"), "{gap}");
    }
}
