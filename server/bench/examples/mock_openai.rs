//! Run the tests' mock OpenAI server standalone: `cargo run -p dspark-bench --example
//! mock_openai -- [PORT]` (default 8100). Useful to try dspark-bench or aiperf without a GPU
//! and to compare their figures against a known schedule (see docs/BENCHMARKS.md).

#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = match std::env::args().nth(1) {
        Some(p) => p
            .parse()
            .map_err(|_| std::io::Error::other(format!("bad port {p:?}")))?,
        None => 8100,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!(
        "mock OpenAI server on http://127.0.0.1:{port}/v1 (first token after {:?}, then one every {:?})",
        common::TTFT_BASE,
        common::TOKEN_GAP
    );
    axum::serve(listener, common::router()).await
}
