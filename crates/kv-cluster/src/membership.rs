//! Cluster membership: the view (which nodes, in which state, at which epoch), its durable copy
//! in `DATA_DIR/members.json`, plans that add and remove nodes, and the topology the request
//! paths read (the rings before and after a change in progress). No I/O but the view file.
//!
//! # Changing membership
//! A plan moves the view from epoch `e` to `e + 1` with added nodes `joining` and removed nodes
//! `leaving`. While it is in progress, two rings exist: *before* (active + leaving nodes: they
//! hold the data) and *after* (active + joining: where the data goes). Reads use the *before*
//! replicas; writes go to the replicas of both rings but count W on the *before* ones. Every
//! node streams the keys it is the first *before* replica of to their new *after* replicas; once
//! every node has finished (and no hint for a new replica is pending) the plan's coordinator
//! commits epoch `e + 2`: joining nodes become active, leaving ones disappear. Newest view wins
//! everywhere: by epoch, then by a digest of its members so two concurrent plans still agree.
//!
//! A plan may mark leaving members `down` (removed with `force`, or replaced while dead): they
//! stream nothing, the first owner not marked down streams their keys, and the commit does not
//! wait for them. [`View::aborted`] undoes a plan at `e + 2` (its base members, all active).
//! Every plan, commit and abort is applied only once every live data-holding member promised it
//! (`proposal.rs`), so only one change runs at a time.

use crate::error::{Error, Result};
use kv_ring::Ring;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// The state of one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Being added: receives writes and streamed keys, owns nothing yet.
    Joining,
    /// A full member.
    Active,
    /// Being removed: still owns its keys until they have N copies elsewhere.
    Leaving,
}

/// One node of the view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's canonical URL (its identity on the ring).
    pub url: String,
    /// Its state.
    pub state: MemberState,
}

/// The cluster's membership at one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Grows by one with every change; the newest view wins.
    pub epoch: u64,
    /// The members, sorted by URL.
    pub members: Vec<Member>,
    /// The node that applied the plan in progress and will commit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Leaving members that were down when the plan was made (removed with `force`, or replaced):
    /// they send nothing, the surviving replicas stream their ranges, and the commit does not
    /// wait for them. Sorted; empty outside a change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<String>,
}

impl View {
    /// Epoch 0: every node of `CLUSTER_NODES` active.
    pub fn seed<S: AsRef<str>>(urls: &[S]) -> View {
        let mut members: Vec<Member> = urls
            .iter()
            .map(|u| Member {
                url: kv_ring::normalize_node(u.as_ref()).to_owned(),
                state: MemberState::Active,
            })
            .collect();
        members.sort_by(|a, b| a.url.cmp(&b.url));
        members.dedup_by(|a, b| a.url == b.url);
        View {
            epoch: 0,
            members,
            coordinator: None,
            down: Vec::new(),
        }
    }

    /// Orders views: by epoch, then by the digest of their members (ties between plans made at
    /// once on two nodes go the same way everywhere).
    pub fn rank(&self) -> (u64, u32) {
        (self.epoch, self.digest())
    }

    /// A checksum of the members and their states (and of the members marked down, so two
    /// plans that differ only there differ).
    pub fn digest(&self) -> u32 {
        let mut text: String = self
            .members
            .iter()
            .map(|m| format!("{}={:?};", m.url, m.state))
            .collect();
        for url in &self.down {
            text.push_str(&format!("{url}=down;"));
        }
        crc32c::crc32c(text.as_bytes())
    }

    /// True when `url` is a leaving member marked down by the plan in progress.
    pub fn is_down(&self, url: &str) -> bool {
        self.down.iter().any(|d| d == url)
    }

    /// One line naming the change this view carries out, for operators and refusals:
    /// `epoch 3 by http://..: add [..], remove [..] (down: [..])`.
    pub fn describe(&self) -> String {
        let with = |state| -> Vec<&str> {
            self.members
                .iter()
                .filter(|m| m.state == state)
                .map(|m| m.url.as_str())
                .collect()
        };
        let mut text = format!(
            "epoch {} by {}: add {:?}, remove {:?}",
            self.epoch,
            self.coordinator.as_deref().unwrap_or("?"),
            with(MemberState::Joining),
            with(MemberState::Leaving),
        );
        if !self.down.is_empty() {
            text.push_str(&format!(" (down: {:?})", self.down));
        }
        text
    }

    /// True while a plan is being carried out.
    pub fn in_transition(&self) -> bool {
        self.members.iter().any(|m| m.state != MemberState::Active)
    }

    /// Nodes that hold data now: active and leaving.
    pub fn before(&self) -> Vec<&str> {
        self.urls_where(|s| s != MemberState::Joining)
    }

    /// Nodes that hold data once the plan is done: active and joining.
    pub fn after(&self) -> Vec<&str> {
        self.urls_where(|s| s != MemberState::Leaving)
    }

    /// Every member's URL.
    pub fn all(&self) -> Vec<&str> {
        self.urls_where(|_| true)
    }

    fn urls_where(&self, keep: impl Fn(MemberState) -> bool) -> Vec<&str> {
        self.members
            .iter()
            .filter(|m| keep(m.state))
            .map(|m| m.url.as_str())
            .collect()
    }

    /// True when `url` is a member in any state.
    pub fn contains(&self, url: &str) -> bool {
        self.members.iter().any(|m| m.url == url)
    }

    /// The view that carries out a plan: `add` joining, `remove` leaving, epoch + 1.
    pub fn plan(&self, add: &[String], remove: &[String], coordinator: &str) -> Result<View> {
        self.plan_marking(add, remove, &[], coordinator)
    }

    /// [`View::plan`] with `down`: removed members that are down, whose ranges the surviving
    /// replicas stream instead (each must be in `remove`).
    pub fn plan_marking(
        &self,
        add: &[String],
        remove: &[String],
        down: &[String],
        coordinator: &str,
    ) -> Result<View> {
        let bad = |reason: String| Error::BadPlan { reason };
        if let Some(stray) = down.iter().find(|d| !remove.contains(d)) {
            return Err(bad(format!("{stray} is marked down but not removed")));
        }
        if self.in_transition() {
            return Err(Error::ChangeInProgress {
                reason: format!(
                    "a membership change is in progress ({}); wait until it is committed, or abort it with {{\"abort\": true}}",
                    self.describe()
                ),
            });
        }
        if add.is_empty() && remove.is_empty() {
            return Err(bad("the plan adds and removes nothing".into()));
        }
        let mut members: BTreeMap<String, MemberState> = self
            .members
            .iter()
            .map(|m| (m.url.clone(), m.state))
            .collect();
        for url in add {
            if members.insert(url.clone(), MemberState::Joining).is_some() {
                return Err(bad(format!("{url} is already a member")));
            }
        }
        for url in remove {
            match members.get_mut(url) {
                Some(state @ MemberState::Active) => *state = MemberState::Leaving,
                _ => return Err(bad(format!("{url} is not a member and cannot be removed"))),
            }
        }
        if !members.values().any(|s| *s != MemberState::Leaving) {
            return Err(bad("the plan would remove every node".into()));
        }
        if members
            .iter()
            .filter(|(u, s)| **s != MemberState::Joining && !down.contains(u))
            .count()
            == 0
        {
            return Err(bad(
                "no live member holds data to stream to the new owners".into()
            ));
        }
        let mut down = down.to_vec();
        down.sort();
        down.dedup();
        Ok(View {
            epoch: self.epoch + 1,
            members: members
                .into_iter()
                .map(|(url, state)| Member { url, state })
                .collect(),
            coordinator: Some(coordinator.to_owned()),
            down,
        })
    }

    /// The view that aborts the plan in progress: its base again (joining nodes gone, leaving
    /// ones active), at epoch + 1 so that it wins over the plan everywhere.
    pub fn aborted(&self) -> Result<View> {
        if !self.in_transition() {
            return Err(Error::BadPlan {
                reason: format!(
                    "no membership change is in progress (epoch {}); nothing to abort",
                    self.epoch
                ),
            });
        }
        Ok(self.settled(MemberState::Joining))
    }

    /// The view once the plan is done: joining nodes active, leaving ones gone, epoch + 1.
    pub fn committed(&self) -> View {
        self.settled(MemberState::Leaving)
    }

    /// The view at epoch + 1 without the members in state `gone`, every other one active.
    fn settled(&self, gone: MemberState) -> View {
        View {
            epoch: self.epoch + 1,
            members: self
                .members
                .iter()
                .filter(|m| m.state != gone)
                .map(|m| Member {
                    url: m.url.clone(),
                    state: MemberState::Active,
                })
                .collect(),
            coordinator: None,
            down: Vec::new(),
        }
    }

    /// True when `self` (committed, not in transition) is the abort of the plan `plan`.
    pub fn is_abort_of(&self, plan: &View) -> bool {
        plan.aborted().is_ok_and(|a| a == *self)
    }
}

/// Reads the stored view, if there is one.
pub fn load(path: &Path) -> Result<Option<View>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::MembersFile {
                path: path.to_owned(),
                reason: format!("unreadable: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::MembersFile {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// Stores the view atomically: temp file, fsync, rename, fsync of the folder.
pub fn store(path: &Path, view: &View) -> Result<()> {
    let err = |e: std::io::Error| Error::MembersFile {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(view).map_err(|e| err(std::io::Error::other(e)))?;
    let mut file = kv_core::files::create_private(&tmp).map_err(err)?;
    file.write_all(&bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// What the request paths read: the view and the rings it implies. Replaced whole on a change.
#[derive(Debug)]
pub struct Topology {
    /// The view.
    pub view: View,
    before: Ring,
    after: Ring,
    n_before: usize,
    n_after: usize,
    urls: BTreeMap<String, Arc<str>>,
}

impl Topology {
    /// The topology of `view` with N = `replication_factor` (capped per ring) and `vnodes`.
    pub fn new(view: View, replication_factor: usize, vnodes: usize) -> Topology {
        let before = Ring::new(view.before(), vnodes);
        let after = Ring::new(view.after(), vnodes);
        let urls = view
            .all()
            .into_iter()
            .map(|u| (u.to_owned(), Arc::from(u)))
            .collect();
        Topology {
            n_before: replication_factor.clamp(1, before.len().max(1)),
            n_after: replication_factor.clamp(1, after.len().max(1)),
            before,
            after,
            urls,
            view,
        }
    }

    fn resolve(&self, ring: &Ring, key: &str, n: usize) -> Vec<Arc<str>> {
        ring.preference_list(key, n)
            .into_iter()
            .filter_map(|i| ring.nodes().get(i))
            .filter_map(|u| self.urls.get(u).cloned())
            .collect()
    }

    /// The replicas that own `key` now (reads, and the W count of writes).
    pub fn owners(&self, key: &str) -> Vec<Arc<str>> {
        self.resolve(&self.before, key, self.n_before)
    }

    /// The replicas `key` will have once the change in progress is done.
    pub fn future_owners(&self, key: &str) -> Vec<Arc<str>> {
        self.resolve(&self.after, key, self.n_after)
    }

    /// Replicas that get `key`'s writes without being owners yet (empty outside a change).
    pub fn pending(&self, key: &str) -> Vec<Arc<str>> {
        if !self.view.in_transition() {
            return Vec::new();
        }
        let owners = self.owners(key);
        self.future_owners(key)
            .into_iter()
            .filter(|u| !owners.contains(u))
            .collect()
    }

    /// N of the current owners.
    pub fn replication_factor(&self) -> usize {
        self.n_before
    }

    /// Every member's URL.
    pub fn members(&self) -> impl Iterator<Item = &Arc<str>> {
        self.urls.values()
    }

    /// The ring of the current owners.
    pub fn ring(&self) -> &Ring {
        &self.before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (1..=n)
            .map(|i| format!("http://127.0.0.1:800{i}"))
            .collect()
    }

    #[test]
    fn plans_move_through_joining_and_leaving_to_a_committed_view() {
        let seed = View::seed(&urls(3));
        assert_eq!(seed.epoch, 0);
        assert!(!seed.in_transition());
        let add = vec!["http://127.0.0.1:8004".to_owned()];
        let plan = seed.plan(&add, &[], &urls(1)[0]).unwrap();
        assert_eq!(plan.epoch, 1);
        assert!(plan.in_transition());
        assert_eq!(plan.before().len(), 3);
        assert_eq!(plan.after().len(), 4);
        assert!(
            plan.plan(&[], &urls(1), "x").is_err(),
            "one change at a time"
        );
        let done = plan.committed();
        assert_eq!((done.epoch, done.members.len()), (2, 4));
        let remove = plan
            .committed()
            .plan(&[], &[urls(2)[1].clone()], "x")
            .unwrap();
        assert_eq!(remove.before().len(), 4);
        assert_eq!(remove.after().len(), 3);
        assert_eq!(remove.committed().members.len(), 3);
    }

    #[test]
    fn bad_plans_are_refused() {
        let seed = View::seed(&urls(2));
        assert!(seed.plan(&[], &[], "x").is_err());
        assert!(seed.plan(&urls(1), &[], "x").is_err(), "already a member");
        assert!(seed.plan(&[], &["http://nowhere:1".into()], "x").is_err());
        assert!(
            seed.plan(&[], &urls(2), "x").is_err(),
            "would remove every node"
        );
    }

    #[test]
    fn a_change_sends_writes_to_future_owners_and_reads_to_current_ones() {
        let plan = View::seed(&urls(3))
            .plan(&["http://127.0.0.1:8004".to_owned()], &[], "x")
            .unwrap();
        let topology = Topology::new(plan, 3, 64);
        let mut moved = 0;
        for i in 0..1000 {
            let key = format!("k{i}");
            let owners = topology.owners(&key);
            assert_eq!(owners.len(), 3);
            assert!(
                owners.iter().all(|o| !o.ends_with("8004")),
                "joining nodes own nothing yet"
            );
            let pending = topology.pending(&key);
            moved += usize::from(!pending.is_empty());
            assert!(pending.iter().all(|p| p.ends_with("8004")));
        }
        assert!(
            (600..=900).contains(&moved),
            "with N=3 of 3 -> 4 most keys gain node 4: {moved}"
        );
    }

    #[test]
    fn a_replacement_moves_more_than_the_old_nodes_share() {
        // Ring positions come from the URL, so the new node takes other arcs than the old one:
        // the old node's keys move, and so do the keys the new node's arcs take from others.
        let six = urls(6);
        let base = View::seed(&six);
        let new = "http://127.0.0.1:9001".to_owned();
        let old = six[2].clone();
        let plan = base
            .plan(std::slice::from_ref(&new), std::slice::from_ref(&old), "x")
            .unwrap();
        let topology = Topology::new(plan, 3, 256);
        let (mut held_by_old, mut copies_moved) = (0usize, 0usize);
        for i in 0..20_000 {
            let key = format!("k{i}");
            held_by_old += usize::from(topology.owners(&key).iter().any(|o| **o == *old));
            copies_moved += topology.pending(&key).len();
        }
        let ratio = copies_moved as f64 / held_by_old as f64;
        assert!(
            (1.2..=2.5).contains(&ratio),
            "{copies_moved} / {held_by_old} = {ratio}"
        );
        let add_only = Topology::new(base.plan(&[new], &[], "x").unwrap(), 3, 256);
        assert!(
            (0..20_000).any(|i| !add_only.pending(&format!("k{i}")).is_empty()),
            "adding a node moves keys"
        );
    }

    #[test]
    fn views_survive_a_round_trip_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members.json");
        assert_eq!(load(&path).unwrap(), None);
        let view = View::seed(&urls(3))
            .plan(&urls(0), &[urls(3)[2].clone()], "me")
            .unwrap();
        store(&path, &view).unwrap();
        assert_eq!(load(&path).unwrap(), Some(view));
        fs::write(&path, b"{ not json").unwrap();
        assert!(load(&path).is_err());
    }
}
