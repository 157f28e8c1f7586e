//! Coalescing of small peer calls: concurrent calls of one kind to one peer share HTTP requests.
//!
//! Quorum reads and replicated writes to `http://` peers take the leaner lanes of
//! [`read_lane`](crate::read_lane) (the same batching, on plain hyper); this coalescer serves
//! them for `https://` peers, on the reqwest client.
//!
//! Every replicated write and every remote quorum read is one small message to a peer. Sent one
//! request each, the HTTP round trips (client, server, loopback TCP, wake-ups) cost several times
//! the work itself. A [`Coalescer`] keeps, per peer, a queue and at most
//! [`MAX_IN_FLIGHT`] requests in flight: a call that finds a free slot leaves at once (no added
//! latency on an idle cluster); calls that arrive while every slot is busy wait in the queue and
//! leave together, up to [`MAX_BATCH`] per request, as soon as a slot frees. Under load the
//! batches grow by themselves, the way a WAL group commit does, and the peer's WAL commits each
//! batch with one fsync. Each caller gets its own answer; a failed request fails every call in it.
//!
//! A batch is capped in bytes too (when the coalescer is given a weight per item): calls are
//! taken while the batch stays within the cap, and a call heavier than the cap alone leaves alone,
//! so a burst of large values never makes a request the peer refuses.
//!
//! A peer that is slow but not down (it answers, late) could let a queue grow without bound, so a
//! lane holds at most [`MAX_QUEUED`] calls: beyond that a call fails at once, and the caller
//! does what it does for any failed call (a write becomes a hint, a read asks another replica).

use crate::peer::CallError;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Requests one peer may have in flight per kind before calls queue up and merge.
pub const MAX_IN_FLIGHT: usize = 2;
/// Most calls merged into one request (it also bounds the request-id header of a batch).
pub const MAX_BATCH: usize = 64;
/// Most calls waiting for one peer; more fail at once (the peer is not keeping up).
pub const MAX_QUEUED: usize = 4096;

/// One queued call: what to send, the request id it belongs to, and where its answer goes.
pub struct Call<I, A> {
    /// The item (a record to replicate, a key to read).
    pub item: I,
    /// The request id of the client request that caused the call (logged by the peer).
    pub request_id: Arc<str>,
    reply: oneshot::Sender<Result<A, CallError>>,
}

/// Sends one batch to a peer: `(peer, items, request ids)` to one answer per item, in order.
pub type SendBatch<I, A> = Arc<
    dyn Fn(Arc<str>, Vec<I>, Vec<Arc<str>>) -> BoxFuture<'static, Result<Vec<A>, CallError>>
        + Send
        + Sync,
>;

/// The queue of one peer.
struct Lane<I, A> {
    queue: VecDeque<Call<I, A>>,
    in_flight: usize,
}

/// A peer's lane, shared by its callers and its in-flight senders.
type SharedLane<I, A> = Arc<Mutex<Lane<I, A>>>;

/// The weight of an item towards a batch's byte cap.
pub type Weigh<I> = fn(&I) -> usize;

/// Merges concurrent calls of one kind, per peer.
pub struct Coalescer<I, A> {
    lanes: Mutex<HashMap<Arc<str>, SharedLane<I, A>>>,
    send: SendBatch<I, A>,
    weigh: Weigh<I>,
    max_batch_bytes: usize,
}

impl<I: Send + 'static, A: Send + 'static> Coalescer<I, A> {
    /// A coalescer that sends its batches with `send`, capped in count only.
    pub fn new(send: SendBatch<I, A>) -> Self {
        Coalescer {
            lanes: Mutex::new(HashMap::new()),
            send,
            weigh: |_| 0,
            max_batch_bytes: usize::MAX,
        }
    }

    /// Caps each batch at `max_batch_bytes` as counted by `weigh` (one item heavier than that
    /// still leaves, alone).
    pub fn with_byte_cap(mut self, weigh: Weigh<I>, max_batch_bytes: usize) -> Self {
        self.weigh = weigh;
        self.max_batch_bytes = max_batch_bytes;
        self
    }

    /// Queues `item` for `peer` and waits for its answer. The request is sent by a spawned task,
    /// so it completes even if this future is dropped.
    pub async fn call(
        &self,
        peer: &Arc<str>,
        item: I,
        request_id: Arc<str>,
    ) -> Result<A, CallError> {
        let (reply, answer) = oneshot::channel();
        let lane = self.lane(peer);
        let start_sender = {
            let mut lane = lane.lock();
            if lane.queue.len() >= MAX_QUEUED {
                return Err(CallError::Failed {
                    peer: peer.to_string(),
                    reason: format!("{MAX_QUEUED} calls already wait for this peer"),
                });
            }
            lane.queue.push_back(Call {
                item,
                request_id,
                reply,
            });
            let free = lane.in_flight < MAX_IN_FLIGHT;
            if free {
                lane.in_flight += 1;
            }
            free
        };
        if start_sender {
            let cap = (self.weigh, self.max_batch_bytes);
            tokio::spawn(drain(lane, peer.clone(), self.send.clone(), cap));
        }
        answer.await.unwrap_or_else(|_| {
            Err(CallError::Failed {
                peer: peer.to_string(),
                reason: "the batch sender stopped".into(),
            })
        })
    }

    fn lane(&self, peer: &Arc<str>) -> SharedLane<I, A> {
        self.lanes
            .lock()
            .entry(peer.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Lane {
                    queue: VecDeque::new(),
                    in_flight: 0,
                }))
            })
            .clone()
    }
}

/// How many calls at the head of `queue` make the next batch: at most [`MAX_BATCH`], and no
/// more than `max_bytes` by `weigh` unless the first call alone is heavier.
fn batch_len<I, A>(queue: &VecDeque<Call<I, A>>, (weigh, max_bytes): (Weigh<I>, usize)) -> usize {
    let mut bytes = 0usize;
    let mut take = 0;
    for call in queue.iter().take(MAX_BATCH) {
        bytes = bytes.saturating_add(weigh(&call.item));
        if take > 0 && bytes > max_bytes {
            break;
        }
        take += 1;
    }
    take
}

/// One in-flight slot: sends what is queued, batch after batch, until the queue is empty.
async fn drain<I, A>(
    lane: SharedLane<I, A>,
    peer: Arc<str>,
    send: SendBatch<I, A>,
    cap: (Weigh<I>, usize),
) {
    loop {
        let calls: Vec<Call<I, A>> = {
            let mut lane = lane.lock();
            if lane.queue.is_empty() {
                lane.in_flight -= 1;
                return;
            }
            let take = batch_len(&lane.queue, cap);
            lane.queue.drain(..take).collect()
        };
        let mut items = Vec::with_capacity(calls.len());
        let mut ids = Vec::with_capacity(calls.len());
        let mut replies = Vec::with_capacity(calls.len());
        for call in calls {
            items.push(call.item);
            ids.push(call.request_id);
            replies.push(call.reply);
        }
        let count = replies.len();
        match send(peer.clone(), items, ids).await {
            Ok(answers) if answers.len() == count => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Ok(answers) => {
                let reason = format!("{} answers to a batch of {count}", answers.len());
                for reply in replies {
                    let _ = reply.send(Err(CallError::Failed {
                        peer: peer.to_string(),
                        reason: reason.clone(),
                    }));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A sender that records batch sizes, answers each item doubled, and fails items equal to 13.
    fn doubling(sizes: Arc<Mutex<Vec<usize>>>, busy: Arc<AtomicUsize>) -> SendBatch<u32, u32> {
        Arc::new(move |peer, items: Vec<u32>, ids| {
            let (sizes, busy) = (sizes.clone(), busy.clone());
            Box::pin(async move {
                assert_eq!(items.len(), ids.len());
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(now <= MAX_IN_FLIGHT, "{now} batches in flight");
                sizes.lock().push(items.len());
                tokio::time::sleep(Duration::from_millis(5)).await;
                busy.fetch_sub(1, Ordering::SeqCst);
                if items.contains(&13) {
                    return Err(CallError::Failed {
                        peer: peer.to_string(),
                        reason: "unlucky".into(),
                    });
                }
                Ok(items.into_iter().map(|i| i * 2).collect())
            })
        })
    }

    #[tokio::test]
    async fn a_lone_call_leaves_at_once_and_gets_its_answer() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let c = Coalescer::new(doubling(sizes.clone(), Arc::default()));
        let peer: Arc<str> = Arc::from("p");
        assert_eq!(c.call(&peer, 21, Arc::from("r")).await.unwrap(), 42);
        assert_eq!(*sizes.lock(), vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_merge_and_each_gets_its_own_answer() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let c = Arc::new(Coalescer::new(doubling(sizes.clone(), Arc::default())));
        let peer: Arc<str> = Arc::from("p");
        let calls = (0..500u32).filter(|i| *i != 13).map(|i| {
            let (c, peer) = (c.clone(), peer.clone());
            tokio::spawn(async move { (i, c.call(&peer, i, Arc::from("r")).await) })
        });
        for call in futures::future::join_all(calls).await {
            let (i, answer) = call.unwrap();
            assert_eq!(answer.unwrap(), i * 2);
        }
        let sizes = sizes.lock();
        assert_eq!(sizes.iter().sum::<usize>(), 499);
        assert!(sizes.len() < 499, "no call was merged: {sizes:?}");
        assert!(sizes.iter().all(|s| *s <= MAX_BATCH));
    }

    #[tokio::test]
    async fn a_failed_batch_fails_only_its_own_calls() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let c = Arc::new(Coalescer::new(doubling(sizes.clone(), Arc::default())));
        let peer: Arc<str> = Arc::from("p");
        assert!(c.call(&peer, 13, Arc::from("r")).await.is_err());
        assert_eq!(c.call(&peer, 1, Arc::from("r")).await.unwrap(), 2);
        let other: Arc<str> = Arc::from("q");
        assert_eq!(c.call(&other, 2, Arc::from("r")).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_keep_up_gets_no_more_than_the_queue_holds() {
        let (release, released) = tokio::sync::watch::channel(false);
        let send: SendBatch<u32, u32> = Arc::new(move |_, items: Vec<u32>, _| {
            let mut released = released.clone();
            Box::pin(async move {
                let _ = released.wait_for(|r| *r).await;
                Ok(items)
            })
        });
        let c = Arc::new(Coalescer::new(send));
        let peer: Arc<str> = Arc::from("slow");
        // Calls until the queue is full: the senders hold what they took, the rest waits.
        let mut calls = Vec::new();
        while c.lane(&peer).lock().queue.len() < MAX_QUEUED {
            let (c, peer) = (c.clone(), peer.clone());
            let i = calls.len() as u32;
            calls.push(tokio::spawn(async move {
                c.call(&peer, i, Arc::from("r")).await
            }));
            tokio::task::yield_now().await;
        }
        let refused = c.call(&peer, 0, Arc::from("r")).await;
        assert!(refused.is_err(), "a call beyond the queue fails at once");
        release.send(true).unwrap();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(
                call.await.unwrap().unwrap(),
                i as u32,
                "queued calls are answered"
            );
        }
    }

    #[tokio::test]
    async fn batches_stay_within_the_byte_cap_and_a_heavy_call_leaves_alone() {
        let (release, released) = tokio::sync::watch::channel(false);
        let batches = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let seen = batches.clone();
        let send: SendBatch<u32, u32> = Arc::new(move |_, items: Vec<u32>, _| {
            let (mut released, seen) = (released.clone(), seen.clone());
            Box::pin(async move {
                seen.lock().push(items.clone());
                let _ = released.wait_for(|r| *r).await;
                Ok(items)
            })
        });
        let c = Arc::new(Coalescer::new(send).with_byte_cap(|w| *w as usize, 100));
        let peer: Arc<str> = Arc::from("p");
        let weights = [60u32, 30, 30, 200, 10, 10, 50, 50, 1];
        let calls: Vec<_> = weights
            .iter()
            .map(|w| {
                let (c, peer, w) = (c.clone(), peer.clone(), *w);
                tokio::spawn(async move { c.call(&peer, w, Arc::from("r")).await })
            })
            .collect();
        // Let every call queue up before any batch is answered (bounded: without a cap the
        // first batch takes everything and the second never comes).
        for _ in 0..1000 {
            if batches.lock().len() >= MAX_IN_FLIGHT {
                break;
            }
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        for (call, w) in calls.into_iter().zip(weights) {
            assert_eq!(call.await.unwrap().unwrap(), w);
        }
        let batches = batches.lock();
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), weights.len());
        for batch in batches.iter() {
            let bytes: u32 = batch.iter().sum();
            assert!(
                bytes <= 100 || batch.len() == 1,
                "batch over the cap: {batch:?}"
            );
        }
        assert!(
            batches.iter().any(|b| b.len() > 1),
            "small calls still merge: {batches:?}"
        );
        assert!(
            batches.contains(&vec![200]),
            "the heavy call went alone: {batches:?}"
        );
    }

    #[tokio::test]
    async fn a_short_answer_is_an_error_for_every_call() {
        let send: SendBatch<u32, u32> = Arc::new(|_, _, _| Box::pin(async { Ok(Vec::new()) }));
        let c = Coalescer::new(send);
        assert!(c.call(&Arc::from("p"), 1, Arc::from("r")).await.is_err());
    }
}
