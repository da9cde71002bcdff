//! The demo runs to a "converged" verdict and tells its story.

use jetsync::demo::{DemoOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_converges_and_says_what_happened() {
    let mut out = Vec::new();
    let converged = run(
        DemoOptions {
            records: 200,
            ..DemoOptions::default()
        },
        &mut out,
    )
    .await
    .expect("the demo runs");
    let text = String::from_utf8(out).unwrap();
    assert!(converged, "the demo did not converge:\n{text}");
    for needle in [
        "VERDICT: converged",
        "berlin",
        "lisbon",
        "oslo",
        "conflict kept",
        "caught up",
        "0 customers",
    ] {
        assert!(
            text.contains(needle),
            "the demo output lacks {needle:?}:\n{text}"
        );
    }
}
