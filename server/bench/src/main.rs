use anyhow::{bail, Context};
use clap::Parser;
use dspark_bench::cli::{Cli, Command};
use dspark_bench::report::summary_table;
use dspark_bench::scenarios;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let outcome = scenarios::run(&cli).await.context("benchmark failed")?;
    let report = &outcome.report;
    print!("{}", summary_table(report));
    for f in &outcome.files {
        println!("wrote {}", f.display());
    }
    let total = report.requests.len();
    let failed: u64 = report.errors.values().sum();
    if total > 0 && failed as usize == total {
        bail!("all {total} requests failed");
    }
    if matches!(cli.command, Command::Acceptance(_))
        && report.groups.iter().all(|g| g.acceptance.is_none())
    {
        bail!(
            "no speculative-decoding counters moved at {} (is speculation on? is /metrics reachable?)",
            report.settings["metrics_url"]
        );
    }
    Ok(())
}
