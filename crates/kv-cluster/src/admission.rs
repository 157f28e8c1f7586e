//! Admission of membership views a node is offered (pushed by a peer, or pulled by gossip): the
//! shape a view must have to be read at all ([`View::decode`], [`View::check_shape`]), and whether
//! this node may move from its own view to an offered one ([`judge`]). Pure functions, no I/O.
//!
//! # Which views a node adopts
//! A view is only ever a checked step away from the node's own, whatever credential it came with:
//! - epoch `e + 1` from a committed view `e`: a plan of it (`current.plan(add, remove, c)` for some
//!   `add`, `remove`, and a coordinator `c` that is a member);
//! - from a plan `e`: its own commit at `e + 1`, or at `e + 2` a plan of that commit (the node
//!   missed the commit);
//! - the same epoch: only a rival plan of the same base, and then the higher rank wins (the tie
//!   rule of [`View::rank`]);
//! - a node alone in its epoch-0 view (a new node waiting to be added) takes a plan that names it
//!   as joining.
//!
//! A commit this node cannot match with the plan it holds (it missed the plan: `e + 2` from a
//! committed `e`, or the commit of a rival plan that won the tie elsewhere) must still be the
//! commit of a valid plan of the node's committed view, and any view further ahead is
//! possible only after missed changes: both are [`Verdict::NeedsMajority`]. Since a commit may
//! add and remove any nodes, the node adopts such a view only once a majority of the members of
//! its own view report that very view (`Cluster::catch_up`), so one forged message cannot move
//! it. Nothing that drops every member holding data now is ever adopted. Lower epochs and
//! unequal views of a committed epoch are refused.

use crate::error::{Error, Result};
use crate::membership::{MemberState, View};

/// The most members a view may name.
pub const MAX_MEMBERS: usize = 256;
/// The longest member URL accepted, in bytes.
pub const MAX_URL_BYTES: usize = 256;

/// What a node does with an offered view that has a valid shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A checked next step from this node's view: adopt it.
    Adopt,
    /// This node has it already, or it is a rival plan that loses the tie: nothing to do.
    Known,
    /// Possible, but not checkable from this node's view alone: adopt it only once a majority of
    /// this node's members hold it.
    NeedsMajority,
    /// Not a step this node may take, and why.
    Refused(String),
}

impl View {
    /// Reads a view offered on the wire: JSON, then [`View::check_shape`]. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<View> {
        let view: View = serde_json::from_slice(bytes).map_err(|e| Error::MalformedView {
            reason: format!("not a membership view: {e}"),
        })?;
        view.check_shape()
            .map_err(|reason| Error::MalformedView { reason })?;
        Ok(view)
    }

    /// Checks what a view must be whatever the node's own: 1 to [`MAX_MEMBERS`] members sorted by
    /// canonical `http(s)://host:port` URL without duplicates, at least one holding data now and
    /// one after, and a coordinator (a member) exactly while a plan is in progress.
    pub fn check_shape(&self) -> Result<(), String> {
        if self.members.is_empty() || self.members.len() > MAX_MEMBERS {
            return Err(format!(
                "{} members; expected 1 to {MAX_MEMBERS}",
                self.members.len()
            ));
        }
        if let Some(bad) = self.members.iter().find(|m| !is_canonical_url(&m.url)) {
            return Err(format!(
                "member {:?} is not a URL like http://127.0.0.1:8001",
                bad.url
            ));
        }
        if self.members.windows(2).any(|w| w[0].url >= w[1].url) {
            return Err("members must be sorted by URL, each named once".into());
        }
        if self.before().is_empty() || self.after().is_empty() {
            return Err("no member would hold data before or after the change".into());
        }
        if self.down.windows(2).any(|w| w[0] >= w[1]) {
            return Err("members marked down must be sorted, each named once".into());
        }
        if let Some(d) = self
            .down
            .iter()
            .find(|d| self.state_of(d) != Some(MemberState::Leaving))
        {
            return Err(format!("{d:?} is marked down but is not a leaving member"));
        }
        match (&self.coordinator, self.in_transition()) {
            (Some(c), true) if self.contains(c) => Ok(()),
            (Some(c), true) => Err(format!("coordinator {c:?} is not a member")),
            (None, true) => Err("a change in progress needs a coordinator".into()),
            (Some(_), false) => Err("a view with no change in progress has no coordinator".into()),
            (None, false) => Ok(()),
        }
    }

    /// The state of `url` in this view, if it is a member.
    pub fn state_of(&self, url: &str) -> Option<MemberState> {
        self.members.iter().find(|m| m.url == url).map(|m| m.state)
    }

    /// The committed view a plan was made from: joining nodes gone, leaving ones active again.
    /// `None` for a view with no change in progress (or an epoch no plan can have).
    fn base(&self) -> Option<View> {
        if !self.in_transition() {
            return None;
        }
        Some(View {
            epoch: self.epoch.checked_sub(1)?,
            members: self
                .members
                .iter()
                .filter(|m| m.state != MemberState::Joining)
                .map(|m| crate::membership::Member {
                    url: m.url.clone(),
                    state: MemberState::Active,
                })
                .collect(),
            coordinator: None,
            down: Vec::new(),
        })
    }
}

/// True for `http(s)://host:port` exactly as the node's configuration writes URLs.
fn is_canonical_url(raw: &str) -> bool {
    if raw.len() > MAX_URL_BYTES {
        return false;
    }
    let Ok(url) = url::Url::parse(raw) else {
        return false;
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return false;
    };
    matches!(url.scheme(), "http" | "https")
        && !host.is_empty()
        && url.username().is_empty()
        && url.password().is_none()
        && url.path() == "/"
        && url.query().is_none()
        && url.fragment().is_none()
        && raw == format!("{}://{host}:{port}", url.scheme())
}

/// True when `offered` is exactly a plan of the committed view `base`.
fn is_plan_of(base: &View, offered: &View) -> bool {
    let Some(coordinator) = offered.coordinator.as_deref() else {
        return false;
    };
    let with = |state| -> Vec<String> {
        offered
            .members
            .iter()
            .filter(|m| m.state == state)
            .map(|m| m.url.clone())
            .collect()
    };
    let (add, remove) = (with(MemberState::Joining), with(MemberState::Leaving));
    base.plan_marking(&add, &remove, &offered.down, coordinator)
        .is_ok_and(|plan| plan == *offered)
}

/// True when `offered` is exactly the commit of some plan of the committed view `base`.
fn is_commit_of_a_plan_of(base: &View, offered: &View) -> bool {
    if offered.in_transition() {
        return false;
    }
    let add: Vec<String> = offered
        .all()
        .into_iter()
        .filter(|u| !base.contains(u))
        .map(str::to_owned)
        .collect();
    let remove: Vec<String> = base
        .all()
        .into_iter()
        .filter(|u| !offered.contains(u))
        .map(str::to_owned)
        .collect();
    // The coordinator leaves no trace in a committed view; any member stands in for it.
    let stand_in = base.all().first().map_or("", |u| *u).to_owned();
    base.plan(&add, &remove, &stand_in)
        .is_ok_and(|plan| plan.committed() == *offered)
}

/// A new node: alone in the view it was started with, never part of a change.
fn is_fresh(current: &View, me: &str) -> bool {
    current.epoch == 0
        && current.members.len() == 1
        && current.state_of(me) == Some(MemberState::Active)
}

/// Decides whether the node `me`, holding `current`, may adopt `offered` (whose shape is checked).
pub fn judge(current: &View, offered: &View, me: &str) -> Verdict {
    if offered == current {
        return Verdict::Known;
    }
    let holders = current.before();
    if !offered.all().iter().any(|u| holders.contains(u)) {
        return Verdict::Refused(format!(
            "it drops every member holding data now ({})",
            holders.join(", ")
        ));
    }
    if is_fresh(current, me)
        && offered.epoch > 0
        && offered.state_of(me) == Some(MemberState::Joining)
    {
        return Verdict::Adopt;
    }
    let checked = |ok: bool, then: Verdict, what: &str| {
        if ok {
            then
        } else {
            Verdict::Refused(format!("it is not {what} of this node's view"))
        }
    };
    let adopt = Verdict::Adopt;
    let majority = Verdict::NeedsMajority;
    match (offered.epoch.checked_sub(current.epoch), current.base()) {
        (None, _) => Verdict::Refused("its epoch is older than this node's".into()),
        (Some(0), Some(base)) if is_plan_of(&base, offered) => {
            if offered.rank() > current.rank() {
                Verdict::Adopt
            } else {
                Verdict::Known
            }
        }
        (Some(0), _) => {
            Verdict::Refused("it differs from this node's view of the same epoch".into())
        }
        (Some(1), None) => checked(is_plan_of(current, offered), adopt, "a plan"),
        // The abort of a plan this node missed: the same members, nothing to carry out.
        (Some(2), None) if !offered.in_transition() && offered.members == current.members => {
            Verdict::Adopt
        }
        (Some(2), None) => checked(
            is_commit_of_a_plan_of(current, offered),
            majority,
            "the commit of a plan",
        ),
        (Some(1), Some(_)) if *offered == current.committed() => Verdict::Adopt,
        (Some(1), Some(_)) if offered.is_abort_of(current) => Verdict::Adopt,
        (Some(1), Some(base)) => checked(
            is_commit_of_a_plan_of(&base, offered),
            majority,
            "the commit of a plan",
        ),
        (Some(2), Some(_)) => checked(
            is_plan_of(&current.committed(), offered)
                || current.aborted().is_ok_and(|a| is_plan_of(&a, offered)),
            adopt,
            "a plan following the commit",
        ),
        (Some(_), _) => Verdict::NeedsMajority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Member;
    use proptest::prelude::*;

    fn url(i: usize) -> String {
        format!("http://127.0.0.1:800{i}")
    }

    fn seed(n: usize) -> View {
        View::seed(&(1..=n).map(url).collect::<Vec<_>>())
    }

    fn refused(v: Verdict) -> bool {
        matches!(v, Verdict::Refused(_))
    }

    #[test]
    fn the_attack_of_issue_14_is_refused() {
        let body =
            br#"{"epoch": 999999, "members": [{"url": "http://127.0.0.1:9", "state": "active"}]}"#;
        let forged = View::decode(body).unwrap();
        assert!(refused(judge(&seed(3), &forged, &url(1))));
        let mut jump = seed(3);
        jump.epoch = 999_999;
        assert_eq!(judge(&seed(3), &jump, &url(1)), Verdict::NeedsMajority);
    }

    #[test]
    fn malformed_views_are_refused_when_decoded() {
        let members = |m: &str| format!(r#"{{"epoch": 1, "members": [{m}]}}"#);
        for bad in [
            "not json".to_owned(),
            members(""),
            members(r#"{"url": "http://127.0.0.1:8001/", "state": "active"}"#),
            members(r#"{"url": "ftp://127.0.0.1:8001", "state": "active"}"#),
            members(r#"{"url": "http://127.0.0.1", "state": "active"}"#),
            members(r#"{"url": "http://127.0.0.1:8001", "state": "gone"}"#),
            members(
                r#"{"url": "http://127.0.0.1:8002", "state": "active"},
                   {"url": "http://127.0.0.1:8001", "state": "active"}"#,
            ),
            members(
                r#"{"url": "http://127.0.0.1:8001", "state": "active"},
                   {"url": "http://127.0.0.1:8001", "state": "active"}"#,
            ),
            members(r#"{"url": "http://127.0.0.1:8001", "state": "joining"}"#),
            members(
                r#"{"url": "http://127.0.0.1:8001", "state": "active"},
                   {"url": "http://127.0.0.1:8002", "state": "joining"}"#,
            ),
        ] {
            assert!(View::decode(bad.as_bytes()).is_err(), "{bad}");
        }
        let good = serde_json::to_vec(&seed(3)).unwrap();
        assert_eq!(View::decode(&good).unwrap(), seed(3));
        let mut stray = seed(2).plan(&[url(3)], &[], &url(1)).unwrap();
        stray.coordinator = Some(url(9));
        assert!(stray.check_shape().is_err(), "coordinator not a member");
    }

    #[test]
    fn the_plan_protocol_is_followed_step_by_step() {
        let current = seed(3);
        let plan = current.plan(&[url(4)], &[], &url(2)).unwrap();
        let commit = plan.committed();
        assert_eq!(judge(&current, &plan, &url(1)), Verdict::Adopt);
        assert_eq!(
            judge(&current, &commit, &url(1)),
            Verdict::NeedsMajority,
            "missed plan"
        );
        assert_eq!(judge(&plan, &commit, &url(1)), Verdict::Adopt);
        assert_eq!(judge(&plan, &plan, &url(1)), Verdict::Known);
        let next = commit.plan(&[], &[url(1)], &url(2)).unwrap();
        assert_eq!(
            judge(&plan, &next, &url(1)),
            Verdict::Adopt,
            "missed commit"
        );
        assert_eq!(judge(&current, &next, &url(1)), Verdict::NeedsMajority);
        assert!(refused(judge(&commit, &plan, &url(1))), "older epoch");
        let shrink = next.committed();
        assert_eq!(
            judge(&next, &shrink, &url(1)),
            Verdict::Adopt,
            "removed node"
        );
    }

    #[test]
    fn steps_that_are_not_plans_are_refused() {
        let current = seed(3);
        let mut two_things = current.plan(&[url(4)], &[], &url(2)).unwrap();
        two_things.members[0].state = MemberState::Joining; // an existing member turned joining
        assert!(refused(judge(&current, &two_things, &url(1))));
        let mut changed_commit = current.plan(&[url(4)], &[], &url(2)).unwrap().committed();
        changed_commit.members.retain(|m| m.url != url(4));
        changed_commit.members.push(Member {
            url: url(5),
            state: MemberState::Active,
        });
        let plan = current.plan(&[url(4)], &[], &url(2)).unwrap();
        assert_eq!(
            judge(&plan, &changed_commit, &url(1)),
            Verdict::NeedsMajority,
            "not this node's plan: perhaps a rival's that won the tie"
        );
        let mut not_a_commit = plan.committed();
        not_a_commit.members[0].state = MemberState::Leaving;
        not_a_commit.coordinator = Some(url(1));
        assert!(refused(judge(&plan, &not_a_commit, &url(1))));
        let unknown_only = View {
            epoch: 2,
            members: vec![Member {
                url: url(9),
                state: MemberState::Active,
            }],
            coordinator: None,
            down: Vec::new(),
        };
        assert!(refused(judge(&current, &unknown_only, &url(1))));
        let mut same_epoch = seed(2);
        same_epoch.epoch = 0;
        assert!(refused(judge(&current, &same_epoch, &url(1))));
    }

    #[test]
    fn aborts_are_steps_from_the_plan_and_from_a_node_that_missed_it() {
        let current = seed(3);
        let plan = current.plan(&[url(4)], &[url(3)], &url(2)).unwrap();
        let abort = plan.aborted().unwrap();
        assert_eq!(abort.epoch, plan.epoch + 1);
        assert_eq!(
            abort.members, current.members,
            "back to the previous members"
        );
        assert_eq!(judge(&plan, &abort, &url(1)), Verdict::Adopt);
        assert_eq!(
            judge(&current, &abort, &url(1)),
            Verdict::Adopt,
            "missed the plan"
        );
        assert_eq!(
            judge(&plan, &abort, &url(4)),
            Verdict::Adopt,
            "the joining node"
        );
        let after = abort.plan(&[url(5)], &[], &url(1)).unwrap();
        assert_eq!(
            judge(&plan, &after, &url(1)),
            Verdict::Adopt,
            "missed the abort"
        );
        assert!(current.aborted().is_err(), "nothing to abort");
        let mut forged = abort.clone();
        forged.members.pop();
        assert_ne!(
            judge(&plan, &forged, &url(1)),
            Verdict::Adopt,
            "not the abort"
        );
    }

    #[test]
    fn members_marked_down_must_be_leaving_and_survive_the_checks() {
        let current = seed(4);
        let dead = url(4);
        let plan = current
            .plan_marking(
                &[],
                std::slice::from_ref(&dead),
                std::slice::from_ref(&dead),
                &url(1),
            )
            .unwrap();
        assert_eq!(plan.down, vec![dead.clone()]);
        assert!(plan.is_down(&dead) && !plan.is_down(&url(1)));
        assert!(plan.check_shape().is_ok());
        assert_eq!(judge(&current, &plan, &url(2)), Verdict::Adopt);
        assert_ne!(
            plan.digest(),
            current
                .plan(&[], std::slice::from_ref(&dead), &url(1))
                .unwrap()
                .digest(),
            "marking a node down is another plan"
        );
        assert!(plan.committed().down.is_empty());
        assert!(current
            .plan_marking(&[], &[], std::slice::from_ref(&dead), &url(1))
            .is_err());
        let mut stray = plan.clone();
        stray.down = vec![url(1)];
        assert!(stray.check_shape().is_err(), "marked down but not leaving");
        let wire = serde_json::to_vec(&plan).unwrap();
        assert_eq!(View::decode(&wire).unwrap(), plan);
    }

    #[test]
    fn rival_plans_of_one_epoch_follow_the_tie_rule() {
        let base = seed(3);
        let a = base.plan(&[url(4)], &[], &url(1)).unwrap();
        let b = base.plan(&[url(5)], &[], &url(2)).unwrap();
        let (low, high) = if a.rank() < b.rank() { (a, b) } else { (b, a) };
        assert_eq!(judge(&low, &high, &url(3)), Verdict::Adopt);
        assert_eq!(judge(&high, &low, &url(3)), Verdict::Known);
        assert_eq!(
            judge(&low, &high.committed(), &url(3)),
            Verdict::NeedsMajority,
            "commit of the plan that won the tie"
        );
    }

    #[test]
    fn a_new_node_takes_the_plan_that_adds_it_and_nothing_else() {
        let me = url(4);
        let alone = View::seed(std::slice::from_ref(&me));
        let mut cluster = seed(3);
        cluster.epoch = 6;
        let plan = cluster
            .plan(std::slice::from_ref(&me), &[], &url(1))
            .unwrap();
        assert_eq!(judge(&alone, &plan, &me), Verdict::Adopt);
        let other = cluster.plan(&[url(5)], &[], &url(1)).unwrap();
        assert!(refused(judge(&alone, &other, &me)));
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(view) = View::decode(&bytes) {
                prop_assert!(view.check_shape().is_ok());
            }
        }

        #[test]
        fn decoded_views_are_well_formed_and_judged_without_panic(
            epoch in prop_oneof![0u64..6, any::<u64>()],
            members in proptest::collection::vec((0usize..6, 0u8..3, any::<bool>()), 0..6),
            coordinator in proptest::option::of(0usize..6),
        ) {
            let state = |s: u8| ["active", "joining", "leaving"][usize::from(s % 3)];
            let list: Vec<serde_json::Value> = members
                .iter()
                .map(|(i, s, slash)| serde_json::json!({
                    "url": format!("{}{}", url(*i), if *slash { "/" } else { "" }),
                    "state": state(*s),
                }))
                .collect();
            let mut json = serde_json::json!({"epoch": epoch, "members": list});
            if let Some(c) = coordinator {
                json["coordinator"] = serde_json::json!(url(c));
            }
            if let Ok(view) = View::decode(json.to_string().as_bytes()) {
                prop_assert!(view.check_shape().is_ok());
                let current = seed(3);
                let plan = current.plan(&[url(4)], &[], &url(1)).unwrap();
                for mine in [&current, &plan, &plan.committed()] {
                    if judge(mine, &view, &url(1)) != Verdict::Known
                        && !matches!(judge(mine, &view, &url(1)), Verdict::Refused(_))
                    {
                        prop_assert!(view.all().iter().any(|u| mine.before().contains(u)));
                        prop_assert!(view.epoch > mine.epoch
                            || (view.epoch == mine.epoch && view.rank() > mine.rank()));
                    }
                }
            }
        }
    }
}
