//! Driving a `Scheduler` by hand (no scheduler thread, no API) on the test's thread.

use std::time::Instant;

use dspark_server::scheduler::{GenerateRequest, SamplingParams, Scheduler, SeqEvent};
use tokio::sync::mpsc::UnboundedReceiver;

/// Adds request `id`; its events arrive on the returned receiver.
pub fn submit(
    s: &mut Scheduler,
    id: u64,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> UnboundedReceiver<SeqEvent> {
    let (req, rx) = GenerateRequest::new(prompt, params, Instant::now());
    s.add(id, req);
    rx
}

/// Steps until no work is left, checking after every step that the live tokens fit the pool
/// and the running sequences fit `max_num_seqs`.
pub fn run(s: &mut Scheduler) {
    while s.has_work() {
        s.step().expect("engine step");
        assert!(s.live_tokens() <= s.pool().pool_tokens());
        assert!(s.num_running() <= s.config().max_num_seqs);
    }
}

/// The tokens received so far, over all choices; an engine failure fails the test.
pub fn tokens(rx: &mut UnboundedReceiver<SeqEvent>) -> Vec<u32> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            SeqEvent::Token { token, .. } => out.push(token),
            SeqEvent::Finished { .. } => {}
            SeqEvent::Failed(m) => panic!("{m}"),
        }
    }
    out
}
