//! `View::decode` (the body of `POST /internal/members`) on arbitrary bytes: never panics; an
//! accepted view has a valid shape, and judging it against a committed view, a plan and a new
//! node's view never panics and never adopts a view that drops every member holding data.
#![no_main]

use kv_cluster::admission::{judge, Verdict};
use kv_cluster::View;
use libfuzzer_sys::fuzz_target;

fn url(i: usize) -> String {
    format!("http://127.0.0.1:800{i}")
}

fuzz_target!(|data: &[u8]| {
    let Ok(view) = View::decode(data) else {
        return;
    };
    assert!(view.check_shape().is_ok(), "decoded view has a bad shape");
    let committed = View::seed(&[url(1), url(2), url(3)]);
    let plan = committed
        .plan(&[url(4)], &[], &url(1))
        .expect("adding a node is a valid plan");
    let alone = View::seed(&[url(4)]);
    for (mine, me) in [(&committed, url(1)), (&plan, url(1)), (&alone, url(4))] {
        if judge(mine, &view, &me) == Verdict::Adopt {
            assert!(
                view.all().iter().any(|u| mine.before().contains(u)),
                "adopted a view that drops every member holding data"
            );
        }
    }
});
