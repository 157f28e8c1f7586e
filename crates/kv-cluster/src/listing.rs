//! Key listing across the cluster: each node pages through its own keys in order, and the
//! coordinator merges the pages (newest version of each key wins, tombstones hidden) into one
//! sorted page with a cursor. Memory is bounded by `limit` times the number of nodes, and each
//! node's page by [`SEND_BATCH_BYTES`]. Values travel between nodes only when the listing shows
//! them (`values=true`); otherwise a live key comes with an empty value.

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::peer::{batch_item_bytes, PageQuery, SEND_BATCH_BYTES};
use kv_core::Record;
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::debug;

/// One page of a cluster-wide listing.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// Live keys in order, with their newest record.
    pub records: Vec<Record>,
    /// Cursor for the next page (`after=`), `None` when the listing is complete.
    pub next: Option<String>,
    /// True when some node could not be asked: keys held only there may be missing.
    pub incomplete: bool,
}

/// One node's page of a listing.
#[derive(Debug, Clone, Default)]
pub struct LocalPage {
    /// Entries in key order (tombstones included; live values empty unless asked for).
    pub records: Vec<Record>,
    /// True when the node may hold more matching keys after the last one: the page reached its
    /// `limit` or was cut at [`SEND_BATCH_BYTES`].
    pub full: bool,
}

impl Cluster {
    /// This node's entries (tombstones included) whose key starts with `prefix` and sorts after
    /// `after`: the first `limit` of them in key order, cut short at [`SEND_BATCH_BYTES`] (one
    /// entry at least). Live entries carry their value only when `values` is asked for (values
    /// are not even read otherwise). Costs O(log n + limit) through the store's ordered index.
    pub fn local_page(&self, query: &PageQuery<'_>) -> LocalPage {
        let PageQuery {
            prefix,
            after,
            limit,
            values,
        } = *query;
        let limit = limit.max(1);
        let page = self.inner.store.range(&kv_core::KeyRange {
            prefix,
            after,
            limit,
            values,
        });
        let mut full = page.len() >= limit;
        let mut records = Vec::with_capacity(page.len());
        let mut bytes = 4;
        for (key, entry) in page {
            let record = Record {
                key,
                version: entry.version,
                value: entry.value,
                expires_at_ms: entry.expires_at_ms,
            };
            bytes += batch_item_bytes(&record);
            if !records.is_empty() && bytes > SEND_BATCH_BYTES {
                full = true;
                break;
            }
            records.push(record);
        }
        LocalPage { records, full }
    }

    /// One page of the live keys of the whole cluster that start with `prefix` and sort after
    /// `after`, at most `limit` of them. Pages may hold fewer than `limit` keys when tombstones
    /// were among the candidates; only `next == None` means the end.
    /// Values are gathered only when `query.values` asks for them.
    pub async fn list(&self, query: &PageQuery<'_>, request_id: &str) -> Result<ListPage> {
        let query = PageQuery {
            limit: query.limit.max(1),
            ..*query
        };
        let query = &query;
        let members: Vec<Arc<str>> = self.topology().members().cloned().collect();
        let asks = members.iter().map(|node| async move {
            if *node == self.inner.me {
                return Some(self.local_page(query));
            }
            if !self.inner.detector.is_up(node) {
                return None;
            }
            match self.inner.peers.list(node, query, request_id).await {
                Ok((records, full)) => Some(LocalPage { records, full }),
                Err(e) => {
                    debug!(peer = %node, error = %e, "listing: node did not answer");
                    self.inner.detector.record_failure(node, e.is_connect());
                    None
                }
            }
        });
        let pages = futures::future::join_all(asks).await;
        let incomplete = pages.iter().any(Option::is_none);
        let pages: Vec<LocalPage> = pages.into_iter().flatten().collect();
        if pages.is_empty() {
            return Err(Error::Unavailable {
                needed: 1,
                answered: 0,
            });
        }
        Ok(merge_pages(pages, query.limit, incomplete))
    }
}

/// Merges per-node pages. A node that returned a full page may hold more keys past its last
/// one, so only keys up to the smallest such last key are known complete; the page stops there.
fn merge_pages(pages: Vec<LocalPage>, limit: usize, incomplete: bool) -> ListPage {
    let bound: Option<String> = pages
        .iter()
        .filter(|p| p.full)
        .filter_map(|p| p.records.last().map(|r| r.key.clone()))
        .min();
    let mut newest: BTreeMap<String, Record> = BTreeMap::new();
    for record in pages.into_iter().flat_map(|p| p.records) {
        if bound.as_ref().is_some_and(|b| record.key > *b) {
            continue;
        }
        match newest.get(&record.key) {
            Some(seen) if seen.version >= record.version => {}
            _ => {
                newest.insert(record.key.clone(), record);
            }
        }
    }
    let now = crate::quorum::now_ms();
    let mut live = newest
        .into_values()
        .filter(|r| r.value.is_some() && r.expires_at_ms.is_none_or(|e| e > now));
    let records: Vec<Record> = live.by_ref().take(limit).collect();
    let next = if live.next().is_some() {
        records.last().map(|r| r.key.clone())
    } else {
        bound
    };
    ListPage {
        records,
        next,
        incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kv_core::Version;

    fn rec(key: &str, hlc: u64, live: bool) -> Record {
        Record {
            key: key.to_owned(),
            version: Version { hlc, node: 1 },
            value: live.then(|| Bytes::from_static(b"1")),
            expires_at_ms: None,
        }
    }

    fn page(records: Vec<Record>, limit: usize) -> LocalPage {
        let full = records.len() >= limit;
        LocalPage { records, full }
    }

    fn keys(page: &ListPage) -> Vec<&str> {
        page.records.iter().map(|r| r.key.as_str()).collect()
    }

    #[test]
    fn replicas_are_merged_and_the_newest_version_wins() {
        let a = vec![rec("a", 1, true), rec("b", 5, false), rec("c", 1, true)];
        let b = vec![rec("a", 1, true), rec("b", 4, true), rec("c", 2, true)];
        let page = merge_pages(vec![page(a, 10), page(b, 10)], 10, false);
        assert_eq!(keys(&page), ["a", "c"]);
        assert_eq!(page.records[1].version.hlc, 2);
        assert_eq!(page.next, None);
    }

    #[test]
    fn a_full_page_bounds_what_is_known_complete() {
        // Node 1 returned a full page ending at "c": it may hold "d" too, so stop at "c".
        let full = vec![rec("a", 1, true), rec("c", 1, true)];
        let short = vec![rec("b", 1, true), rec("e", 1, true)];
        let merged = merge_pages(vec![page(full, 2), page(short, 2)], 2, false);
        assert_eq!(keys(&merged), ["a", "b"]);
        assert_eq!(merged.next.as_deref(), Some("b"));
        let tombs = page(vec![rec("a", 1, false), rec("b", 1, false)], 2);
        let page = merge_pages(vec![tombs], 2, false);
        assert!(page.records.is_empty());
        assert_eq!(
            page.next.as_deref(),
            Some("b"),
            "tombstones still advance the cursor"
        );
    }

    #[test]
    fn a_page_cut_by_bytes_bounds_the_merge_like_a_full_one() {
        // Node 1 stopped at "b" for size, well short of the limit: keys after it are unknown.
        let cut = LocalPage {
            records: vec![rec("a", 1, true), rec("b", 1, true)],
            full: true,
        };
        let other = page(vec![rec("c", 1, true)], 10);
        let merged = merge_pages(vec![cut, other], 10, false);
        assert_eq!(keys(&merged), ["a", "b"]);
        assert_eq!(merged.next.as_deref(), Some("b"));
    }
}
