//! One membership change at a time, cluster-wide: the promise a node gives to a proposed view
//! before anyone adopts it. Pure logic (no I/O); `rebalance.rs` runs the rounds.
//!
//! # The protocol
//! A change (a plan, its commit, or its abort) is a next view `v` proposed by one node. The
//! proposer asks every live member that holds data (active and leaving; not the ones the plan
//! marks down; joining nodes take `v` once it is pushed), itself first, to *promise* `v`
//! (`POST /internal/propose`):
//! - a node promises only a view that is a step it may take from its own view: a plan of its
//!   committed view (epoch + 1), or the commit or the abort of the plan it holds. While a plan is
//!   in progress no other plan is promised: a second change is refused, naming the one in
//!   progress;
//! - a node holds at most one promise, which expires [`PROMISE_TTL`] after it was given (so a
//!   proposer that dies blocks nothing for long) and lapses once the node's view reaches its
//!   epoch. A proposal for the same epoch with a higher [`View::rank`] replaces it; any other is
//!   refused, naming the promised change;
//! - the proposer adopts `v` only if every member it asked promised it *and* its own promise is still
//!   `v` at that moment (checked and adopted under one lock). Otherwise it releases the promises
//!   it got and the change is refused.
//!
//! Of two proposals of one epoch made at once, at most one is adopted: each proposer must also
//! win the other's promise, and a node gives its promise to the other proposal only by dropping
//! its own (which then fails its last check) or after it adopted its own view (and then it
//! refuses any other plan). Usually the higher-ranked one wins and the other is refused naming
//! it; both are refused when each holds promises the other needs (the operator tries again).
//! A proposer that believes a member down does not ask it: two proposers that each believe the
//! other down (a partition) can both adopt, and then the tie rule of [`View::rank`] picks one
//! plan everywhere and the other's nodes restart their transfer for it.

use crate::admission::{judge, Verdict};
use crate::membership::View;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// How long a promise binds a node when its proposer goes silent.
pub const PROMISE_TTL: Duration = Duration::from_secs(20);

/// The body of `POST /internal/propose`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The proposed next view.
    pub view: View,
    /// The node that proposes it.
    pub proposer: String,
    /// True to give back a promise (the proposal failed elsewhere).
    #[serde(default)]
    pub release: bool,
}

/// A node's answer to a [`Proposal`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromiseAnswer {
    /// True when the node promised the view.
    pub granted: bool,
    /// Why not, naming the change in progress when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl PromiseAnswer {
    fn granted() -> PromiseAnswer {
        PromiseAnswer {
            granted: true,
            reason: None,
        }
    }

    fn refused(reason: String) -> PromiseAnswer {
        PromiseAnswer {
            granted: false,
            reason: Some(reason),
        }
    }
}

/// A promise this node holds.
#[derive(Clone, Debug)]
struct Promise {
    view: View,
    proposer: String,
    expires: Instant,
}

/// The promise a node holds, if any.
#[derive(Debug, Default)]
pub struct Promises {
    held: Option<Promise>,
}

/// What kind of step `offered` is from `current`, or why it is none this node may promise.
fn step_of(current: &View, offered: &View, me: &str) -> Result<(), String> {
    if current.in_transition() {
        if *offered == current.committed() || offered.is_abort_of(current) {
            return Ok(());
        }
        return Err(format!(
            "a membership change is in progress ({}); wait until it is committed, or abort it with {{\"abort\": true}}",
            current.describe()
        ));
    }
    if !offered.in_transition() {
        return Err(format!(
            "no change is in progress here: it was committed or aborted already (this node is at epoch {})",
            current.epoch
        ));
    }
    if offered.epoch != current.epoch + 1 {
        return Err(format!(
            "it is not a plan of this node's view (epoch {})",
            current.epoch
        ));
    }
    match judge(current, offered, me) {
        Verdict::Adopt => Ok(()),
        Verdict::Refused(reason) => Err(reason),
        Verdict::Known | Verdict::NeedsMajority => Err(format!(
            "it is not a plan of this node's view (epoch {})",
            current.epoch
        )),
    }
}

impl Promises {
    /// Forgets a promise that expired or that the node's view has reached.
    fn lapse(&mut self, current: &View, now: Instant) {
        if self
            .held
            .as_ref()
            .is_some_and(|p| p.expires <= now || p.view.epoch <= current.epoch)
        {
            self.held = None;
        }
    }

    /// Answers `proposal` for the node `me`, whose view is `current`: promises it (see the
    /// module docs) or says why not. A release gives back the proposer's promise and answers
    /// granted.
    pub fn consider(
        &mut self,
        current: &View,
        proposal: &Proposal,
        me: &str,
        now: Instant,
    ) -> PromiseAnswer {
        self.lapse(current, now);
        let offered = &proposal.view;
        if proposal.release {
            if self
                .held
                .as_ref()
                .is_some_and(|p| p.view == *offered && p.proposer == proposal.proposer)
            {
                self.held = None;
            }
            return PromiseAnswer::granted();
        }
        if *offered == *current {
            return PromiseAnswer::granted();
        }
        if let Err(reason) = step_of(current, offered, me) {
            return PromiseAnswer::refused(reason);
        }
        if let Some(held) = &self.held {
            let same = held.view == *offered;
            let outranks = offered.epoch == held.view.epoch && offered.rank() > held.view.rank();
            if !(same || outranks) {
                let left = held.expires.saturating_duration_since(now).as_secs();
                return PromiseAnswer::refused(format!(
                    "a membership change is in progress ({}, proposed by {}; its promise expires in {left} s)",
                    held.view.describe(),
                    held.proposer
                ));
            }
        }
        self.held = Some(Promise {
            view: offered.clone(),
            proposer: proposal.proposer.clone(),
            expires: now + PROMISE_TTL,
        });
        PromiseAnswer::granted()
    }

    /// True when this node still holds its promise of `view` to `proposer` (the proposer's
    /// last check before it adopts the view).
    pub fn holds(&self, view: &View, proposer: &str, now: Instant) -> bool {
        self.held
            .as_ref()
            .is_some_and(|p| p.view == *view && p.proposer == proposer && p.expires > now)
    }

    /// The change this node has promised and not yet adopted (its view is `current`), for
    /// operators (`None` when it holds no live promise).
    pub fn describe(&self, current: &View, now: Instant) -> Option<String> {
        self.held
            .as_ref()
            .filter(|p| p.expires > now && p.view.epoch > current.epoch)
            .map(|p| format!("{} (proposed by {})", p.view.describe(), p.proposer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(i: usize) -> String {
        format!("http://127.0.0.1:800{i}")
    }

    fn seed(n: usize) -> View {
        View::seed(&(1..=n).map(url).collect::<Vec<_>>())
    }

    fn propose(view: &View, proposer: &str) -> Proposal {
        Proposal {
            view: view.clone(),
            proposer: proposer.to_owned(),
            release: false,
        }
    }

    fn release(view: &View, proposer: &str) -> Proposal {
        Proposal {
            release: true,
            ..propose(view, proposer)
        }
    }

    /// Two rival plans of one base, the higher-ranked one second.
    fn rivals() -> (View, View, View) {
        let base = seed(3);
        let a = base.plan(&[url(4)], &[], &url(1)).unwrap();
        let b = base.plan(&[url(5)], &[], &url(2)).unwrap();
        if a.rank() < b.rank() {
            (base, a, b)
        } else {
            (base, b, a)
        }
    }

    #[test]
    fn a_plan_is_promised_once_and_a_rival_is_refused_naming_it() {
        let (base, low, high) = rivals();
        let now = Instant::now();
        let mut p = Promises::default();
        assert!(
            p.consider(&base, &propose(&high, &url(2)), &url(3), now)
                .granted
        );
        assert!(p.holds(&high, &url(2), now));
        let again = p.consider(&base, &propose(&high, &url(2)), &url(3), now);
        assert!(again.granted, "the same proposal is promised again");
        let refused = p.consider(&base, &propose(&low, &url(1)), &url(3), now);
        assert!(!refused.granted);
        let reason = refused.reason.unwrap();
        assert!(
            reason.contains("in progress") && reason.contains(&url(2)),
            "{reason}"
        );
        assert!(p.holds(&high, &url(2), now), "the refusal changed nothing");
    }

    #[test]
    fn a_higher_ranked_rival_of_the_same_epoch_takes_the_promise_over() {
        let (base, low, high) = rivals();
        let now = Instant::now();
        let mut p = Promises::default();
        assert!(
            p.consider(&base, &propose(&low, &url(1)), &url(3), now)
                .granted
        );
        assert!(
            p.consider(&base, &propose(&high, &url(2)), &url(3), now)
                .granted
        );
        assert!(
            !p.holds(&low, &url(1), now),
            "the low proposer's last check fails"
        );
        assert!(p.holds(&high, &url(2), now));
    }

    #[test]
    fn promises_expire_and_lapse_once_the_view_reaches_their_epoch() {
        let (base, low, high) = rivals();
        let now = Instant::now();
        let mut p = Promises::default();
        assert!(
            p.consider(&base, &propose(&high, &url(2)), &url(3), now)
                .granted
        );
        let later = now + PROMISE_TTL + Duration::from_millis(1);
        assert!(!p.holds(&high, &url(2), later));
        assert!(
            p.consider(&base, &propose(&low, &url(1)), &url(3), later)
                .granted,
            "a dead proposer's promise binds for PROMISE_TTL only"
        );
        // Once the node adopted a view of that epoch, the promise is gone and no other plan of
        // the epoch is a step from it.
        let refused = p.consider(&low, &propose(&high, &url(2)), &url(3), later);
        assert!(!refused.granted);
        assert!(refused.reason.unwrap().contains("in progress"));
        assert_eq!(p.describe(&low, later), None);
    }

    #[test]
    fn a_release_gives_the_promise_back_only_for_its_own_proposer() {
        let (base, low, high) = rivals();
        let now = Instant::now();
        let mut p = Promises::default();
        assert!(
            p.consider(&base, &propose(&high, &url(2)), &url(3), now)
                .granted
        );
        p.consider(&base, &release(&high, &url(1)), &url(3), now);
        assert!(p.holds(&high, &url(2), now), "not the proposer's release");
        p.consider(&base, &release(&high, &url(2)), &url(3), now);
        assert!(!p.holds(&high, &url(2), now));
        assert!(
            p.consider(&base, &propose(&low, &url(1)), &url(3), now)
                .granted
        );
    }

    #[test]
    fn during_a_plan_only_its_commit_or_its_abort_is_promised() {
        let base = seed(3);
        let plan = base.plan(&[url(4)], &[], &url(1)).unwrap();
        let now = Instant::now();
        let mut p = Promises::default();
        let other = base.plan(&[url(5)], &[], &url(2)).unwrap();
        let refused = p.consider(&plan, &propose(&other, &url(2)), &url(3), now);
        assert!(!refused.granted);
        let reason = refused.reason.unwrap();
        assert!(reason.contains(&plan.describe()), "{reason}");
        let next = plan.committed().plan(&[url(5)], &[], &url(2)).unwrap();
        assert!(
            !p.consider(&plan, &propose(&next, &url(2)), &url(3), now)
                .granted
        );
        // Commit and abort are rivals of one epoch: the first is promised, the second only if
        // it ranks higher.
        let (commit, abort) = (plan.committed(), plan.aborted().unwrap());
        assert_eq!(commit.epoch, abort.epoch);
        let (first, second) = if commit.rank() < abort.rank() {
            (commit, abort)
        } else {
            (abort, commit)
        };
        assert!(
            p.consider(&plan, &propose(&second, &url(1)), &url(3), now)
                .granted
        );
        assert!(
            !p.consider(&plan, &propose(&first, &url(2)), &url(3), now)
                .granted
        );
    }

    #[test]
    fn views_that_are_no_step_are_refused() {
        let base = seed(3);
        let now = Instant::now();
        let mut p = Promises::default();
        let mut jump = base.plan(&[url(4)], &[], &url(1)).unwrap();
        jump.epoch += 5;
        assert!(
            !p.consider(&base, &propose(&jump, &url(1)), &url(3), now)
                .granted
        );
        let commit = base.plan(&[url(4)], &[], &url(1)).unwrap().committed();
        assert!(
            !p.consider(&base, &propose(&commit, &url(1)), &url(3), now)
                .granted,
            "a commit of a plan this node never adopted"
        );
        assert!(
            p.consider(&base, &propose(&base, &url(1)), &url(3), now)
                .granted
        );
        assert_eq!(p.describe(&base, now), None, "nothing promised");
        let plan = base.plan(&[url(4)], &[], &url(1)).unwrap();
        assert!(
            p.consider(&base, &propose(&plan, &url(1)), &url(3), now)
                .granted
        );
        assert!(p.describe(&base, now).unwrap().contains(&url(4)));
        assert_eq!(p.describe(&plan, now), None, "adopted: no longer pending");
    }

    /// Two proposers and a third node, with every interleaving of the six promise requests: a
    /// proposer that has all three promises adopts its view if it still holds its own promise
    /// (as `rebalance.rs` does, under one lock). Never do both adopt.
    #[test]
    fn two_concurrent_proposals_never_both_win() {
        let (base, low, high) = rivals();
        let now = Instant::now();
        let proposers = [(low, url(1)), (high, url(2))];
        let mut wins = [0usize; 2];
        for order in permutations(&(0..6).collect::<Vec<_>>()) {
            // Message m: proposer m / 3 asks node m % 3; proposer k runs on node k.
            let mut nodes: Vec<(View, Promises)> = (0..3)
                .map(|_| (base.clone(), Promises::default()))
                .collect();
            let mut grants = [0usize; 2];
            let mut adopted = [false; 2];
            for &m in &order {
                let (who, node) = (m / 3, m % 3);
                let (view, proposer) = &proposers[who];
                let (current, promises) = &mut nodes[node];
                if promises
                    .consider(current, &propose(view, proposer), &url(node + 1), now)
                    .granted
                {
                    grants[who] += 1;
                }
                if grants[who] == 3 {
                    let (own_view, own) = &mut nodes[who];
                    if own.holds(view, proposer, now) {
                        *own_view = view.clone();
                        adopted[who] = true;
                    }
                }
            }
            assert!(!(adopted[0] && adopted[1]), "{order:?}: both adopted");
            for w in 0..2 {
                wins[w] += usize::from(adopted[w]);
            }
        }
        assert!(wins[1] > 0, "the higher-ranked plan wins some orders");
        assert!(
            wins[0] > 0,
            "the lower one wins when it is first everywhere"
        );
    }

    fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first);
                out.push(tail);
            }
        }
        out
    }
}
