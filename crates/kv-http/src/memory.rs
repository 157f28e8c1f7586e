//! Process memory settings both binaries apply at start.

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` decides;
/// answers a warning to log when the kernel refused.
///
/// mimalloc asks the kernel for huge pages on its arenas (`madvise(MADV_HUGEPAGE)`), so with the
/// common THP setting `madvise` every 2 MiB region the process touches, or khugepaged collapses,
/// becomes resident whole: a node with 10,000 keys sat at 50 MB of RSS instead of 33 MB, and
/// its RSS moved by megabytes as khugepaged collapsed and mimalloc's purges split huge pages
/// (docs/PERFORMANCE.md, "Soak memory"). `MIMALLOC_ALLOW_THP=1` keeps them (`=0` has mimalloc
/// turn them off itself). Call it first in `main`, before other threads start: the setting is
/// inherited by threads created afterwards.
pub fn limit_transparent_huge_pages() -> Option<String> {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return None;
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        return Some(format!(
            "cannot turn transparent huge pages off (prctl PR_SET_THP_DISABLE): {e}"
        ));
    }
    None
}
