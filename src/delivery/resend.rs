//! The replays' ordered re-send: a batch of already stored events, read in position order from
//! a fixed range, goes to a destination (the broker for the replay Job, the in-process handlers
//! for the library's `replay_events`) in waves, retried per the policy. A replay has no
//! `failed_events` row to hold an aggregate behind: once one of its events is given up the
//! aggregate is *parked* and none of its later events in the replay is sent, so no consumer sees
//! them out of order. The caller persists the parked set with its checkpoint, so a resumed run
//! keeps them parked too.
//!
//! Both replays share this one loop; the outbox relay's loop ([`super::engine`]) differs in
//! what it must record (cursors, failed events, dead letters, circuits) but cuts batches with
//! the same [`waves`](super::waves) and decides with the same [`RetryPolicy`].

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use uuid::Uuid;

use super::retry::{RetryDecision, RetryPolicy};
use super::waves;
use crate::broker::{Broker, Message};

/// (aggregate type, aggregate id).
pub type AggregateKey = (String, String);

fn aggregate_of(message: &Message) -> AggregateKey {
    (message.event.aggregate_type.clone(), message.event.aggregate_id.clone())
}

/// Paces sends to `rate` events/s on average since the start.
#[derive(Debug)]
pub struct Pacer {
    rate: Option<u32>,
    start: Instant,
    sent: u64,
}

impl Pacer {
    /// `None`: as fast as the destination takes them.
    pub fn new(rate: Option<u32>) -> Self {
        Self {
            rate,
            start: Instant::now(),
            sent: 0,
        }
    }

    fn delay_before(&self, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / f64::from(rate.max(1)));
        due.saturating_duration_since(now)
    }

    /// Messages per broker call: at most one second's worth, so pacing stays smooth.
    fn chunk(&self, len: usize) -> usize {
        self.rate
            .map_or(len, |r| usize::try_from(r).unwrap_or(usize::MAX))
            .max(1)
    }
}

/// What re-sending one batch did.
#[derive(Debug, Default, PartialEq)]
pub struct Resent {
    /// Acknowledged, in position order.
    pub delivered: Vec<Uuid>,
    /// Given up, or skipped because their aggregate was parked.
    pub failed: i64,
    /// Aggregates parked by this batch (the caller saves them with its checkpoint).
    pub parked: Vec<AggregateKey>,
}

/// Resolves when `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Re-sends batches to one destination; `parked` carries over from batch to batch (and, via
/// the caller's checkpoint, from run to run).
pub struct Resender<'a> {
    pub destination: &'a dyn Broker,
    pub retry: &'a RetryPolicy,
    pub parked: HashSet<AggregateKey>,
    /// Names the replay in logs.
    pub replay: &'a str,
}

impl Resender<'_> {
    /// Sends `batch` (in position order) in waves, retrying failures per the policy;
    /// `progress` sees the outcome so far after every broker call that settled its messages.
    /// Returns `None` when `shutdown` came first: then nothing of this batch may be
    /// checkpointed.
    pub async fn send(
        &mut self,
        batch: &[Message],
        pacer: &mut Pacer,
        shutdown: &mut watch::Receiver<bool>,
        progress: &mut (dyn FnMut(&Resent) + Send),
    ) -> Option<Resent> {
        let mut resent = Resent::default();
        // Strict waves whatever the destination: a call holds at most one event of an
        // aggregate, so a given-up event's successor has never been sent when it is parked.
        // (The relay lets Kafka take an aggregate's run in one call and detects the rare
        // broker-side refusal with a successor already queued; a replay has no held rows to
        // fall back on, and a replay's speed is its rate limit's, not the live path's.)
        let planned = waves(
            batch,
            |m| {
                (
                    m.event.aggregate_type.as_str(),
                    m.event.aggregate_id.as_str(),
                    m.destination.as_str(),
                )
            },
            false,
        );
        for wave in planned {
            let wave: Vec<&Message> = wave.into_iter().map(|i| &batch[i]).collect();
            for part in wave.chunks(pacer.chunk(wave.len())) {
                // Parked since the wave was cut, by an earlier part or wave: never sent.
                let sendable: Vec<Message> = part
                    .iter()
                    .filter(|m| {
                        let parked = self.parked.contains(&aggregate_of(m));
                        resent.failed += i64::from(parked);
                        !parked
                    })
                    .map(|m| (*m).clone())
                    .collect();
                if sendable.is_empty() {
                    continue;
                }
                let wait = pacer.delay_before(Instant::now());
                if !wait.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stopped(shutdown) => return None,
                    }
                }
                pacer.sent += sendable.len() as u64;
                self.send_with_retries(sendable, &mut resent, shutdown).await?;
                progress(&resent);
            }
        }
        Some(resent)
    }

    /// Sends `messages` (one wave: at most one per aggregate) until each is acknowledged or
    /// given up; a given-up message parks its aggregate.
    async fn send_with_retries(
        &mut self,
        mut pending: Vec<Message>,
        resent: &mut Resent,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<()> {
        let mut attempt = 1_u32;
        while !pending.is_empty() {
            let results = self.destination.send_batch(&pending).await;
            let mut again = Vec::new();
            let mut delay = Duration::ZERO;
            for (message, result) in pending.into_iter().zip(results) {
                let Err(error) = result else {
                    resent.delivered.push(message.event.event_id);
                    continue;
                };
                match self.retry.decide(attempt, &error) {
                    RetryDecision::RetryAfter(d) => {
                        delay = delay.max(d);
                        again.push(message);
                    }
                    RetryDecision::DeadLetter { reason } => {
                        tracing::warn!(
                            replay = self.replay,
                            event_id = %message.event.event_id,
                            reason,
                            "replayed event given up; its aggregate's later events in this replay are skipped"
                        );
                        let aggregate = aggregate_of(&message);
                        resent.failed += 1;
                        self.parked.insert(aggregate.clone());
                        resent.parked.push(aggregate);
                    }
                }
            }
            pending = again;
            if !pending.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(shutdown) => return None,
                }
                attempt += 1;
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::broker::{BoxFuture, SendError};
    use crate::delivery::retry::RetryPolicy;
    use crate::event::NewEvent;
    use crate::event::validate::enrich;

    #[test]
    fn the_pacer_spreads_sends_over_time() {
        let start = Instant::now();
        let mut p = Pacer {
            rate: Some(10),
            start,
            sent: 0,
        };
        assert_eq!(p.delay_before(start), Duration::ZERO);
        p.sent = 10;
        assert_eq!(p.delay_before(start), Duration::from_secs(1));
        assert_eq!(p.delay_before(start + Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(p.chunk(500), 10);
        p.rate = None;
        assert_eq!(p.delay_before(start), Duration::ZERO);
        assert_eq!(p.chunk(500), 500);
        assert_eq!(p.chunk(0), 1);
    }

    /// A destination that rejects the events whose id is listed (as a message error, or
    /// transiently until the attempt given) and records every call. It claims to keep an
    /// aggregate's order within a call, which a replay does not rely on.
    struct Scripted {
        permanent: Vec<Uuid>,
        transient_until: Vec<(Uuid, usize)>,
        calls: Mutex<Vec<Vec<(Uuid, String)>>>,
    }

    impl Broker for Scripted {
        fn kind(&self) -> &'static str {
            "scripted"
        }

        fn send_batch<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Vec<Result<(), SendError>>> {
            let mut calls = self.calls.lock().unwrap();
            let seen = |id: Uuid| calls.iter().flatten().filter(|(c, _)| *c == id).count();
            let results = messages
                .iter()
                .map(|m| {
                    let id = m.event.event_id;
                    if self.permanent.contains(&id) {
                        Err(SendError::Message("rejected".into()))
                    } else if self.transient_until.iter().any(|&(t, n)| t == id && seen(id) + 1 < n) {
                        Err(SendError::Transient("busy".into()))
                    } else {
                        Ok(())
                    }
                })
                .collect();
            calls.push(
                messages
                    .iter()
                    .map(|m| (m.event.event_id, m.event.aggregate_id.clone()))
                    .collect(),
            );
            Box::pin(std::future::ready(results))
        }

        fn send_dead_letter<'a>(&'a self, _: &'a Message, _: &'a str) -> BoxFuture<'a, Result<(), SendError>> {
            Box::pin(std::future::ready(Ok(())))
        }

        fn ensure_destinations<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<(), SendError>> {
            Box::pin(std::future::ready(Ok(())))
        }

        fn keeps_aggregate_order(&self) -> bool {
            true
        }

        fn check_health(&self) -> BoxFuture<'_, Result<(), SendError>> {
            Box::pin(std::future::ready(Ok(())))
        }
    }

    fn batch(aggregates: &[&str]) -> Vec<Message> {
        aggregates
            .iter()
            .zip(1..)
            .map(|(id, position)| {
                let new = NewEvent::raw("StockLevelChanged", "Item", *id, 1, serde_json::json!({}));
                let event = enrich(new, "test", chrono::Utc::now());
                Message {
                    position,
                    destination: "t".into(),
                    event: Arc::new(event),
                }
            })
            .collect()
    }

    fn quick_retry() -> RetryPolicy {
        RetryPolicy {
            initial_interval_ms: 1,
            max_interval_ms: 1,
            max_attempts: 3,
            ..RetryPolicy::default()
        }
    }

    async fn resend(destination: &Scripted, batch: &[Message], parked: &[&str]) -> Resent {
        let retry = quick_retry();
        let mut resender = Resender {
            destination,
            retry: &retry,
            parked: parked.iter().map(|id| ("Item".to_owned(), (*id).to_owned())).collect(),
            replay: "test",
        };
        let (_stop, mut shutdown) = watch::channel(false);
        resender
            .send(batch, &mut Pacer::new(None), &mut shutdown, &mut |_| {})
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_given_up_event_parks_its_aggregate_before_its_successor_was_ever_sent() {
        let events = batch(&["a", "b", "a", "b", "a"]);
        let ids: Vec<Uuid> = events.iter().map(|m| m.event.event_id).collect();
        let destination = Scripted {
            permanent: vec![ids[2]],
            transient_until: vec![(ids[1], 2)],
            calls: Mutex::default(),
        };
        let resent = resend(&destination, &events, &[]).await;
        assert_eq!(resent.delivered, vec![ids[0], ids[1], ids[3]]);
        assert_eq!(resent.failed, 2, "the given-up event and the one after it");
        assert_eq!(resent.parked, vec![("Item".to_owned(), "a".to_owned())]);
        let calls = destination.calls.lock().unwrap();
        assert!(
            calls.iter().flatten().all(|(id, _)| *id != ids[4]),
            "the parked aggregate's later event was sent: {calls:?}"
        );
        for call in calls.iter() {
            let aggregates: HashSet<&String> = call.iter().map(|(_, a)| a).collect();
            assert_eq!(
                aggregates.len(),
                call.len(),
                "two events of an aggregate in one call: {calls:?}"
            );
        }
        let b_sent = calls.iter().flatten().filter(|(id, _)| *id == ids[1]).count();
        assert_eq!(b_sent, 2, "b's first event was retried once: {calls:?}");
    }

    #[tokio::test]
    async fn an_aggregate_parked_by_an_earlier_run_sends_nothing() {
        let events = batch(&["a", "b", "a"]);
        let destination = Scripted {
            permanent: vec![],
            transient_until: vec![],
            calls: Mutex::default(),
        };
        let resent = resend(&destination, &events, &["a"]).await;
        assert_eq!(resent.delivered, vec![events[1].event.event_id]);
        assert_eq!(resent.failed, 2);
        assert!(resent.parked.is_empty(), "already parked, so not parked again");
        assert_eq!(destination.calls.lock().unwrap().len(), 1);
    }
}
