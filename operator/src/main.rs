//! `dspark-operator run` (the controller) and `dspark-operator crd` (prints the CRD YAML).

use anyhow::Context as _;
use axum::{extract::State, routing::get, Router};
use clap::{Parser, Subcommand};
use dspark_operator::controller::{self, Context};
use dspark_operator::leader::{LeaderElector, LeaseConfig};
use dspark_operator::metrics::Metrics;
use dspark_operator::resources::BuildContext;
use dspark_operator::{crd, telemetry};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "dspark-operator",
    version,
    about = "Kubernetes operator for DSparkDeployment"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(RunArgs),
    /// Print the CustomResourceDefinition YAML (what crds/ holds).
    Crd,
    /// Print the children the operator would apply for a DSparkDeployment manifest (a dry run).
    Render(RenderArgs),
}

#[derive(clap::Args)]
struct RenderArgs {
    /// DSparkDeployment manifest (YAML).
    file: std::path::PathBuf,
    /// Namespace when the manifest sets none.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Server image when the manifest sets no spec.image.
    #[arg(long, env = "DSPARK_SERVER_IMAGE", default_value = DEFAULT_IMAGE)]
    server_image: String,
}

const DEFAULT_IMAGE: &str = concat!("ghcr.io/dspark-dev/dspark:", env!("CARGO_PKG_VERSION"));

fn render(args: RenderArgs) -> anyhow::Result<()> {
    use dspark_operator::resources;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let mut dsd: crd::DSparkDeployment =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", args.file.display()))?;
    if let Err(problems) = crd::validate_spec(&dsd.spec) {
        anyhow::bail!("invalid spec: {}", problems.join("; "));
    }
    dsd.metadata.namespace.get_or_insert(args.namespace);
    // Owner references need a uid; a placeholder stands in for the one the API server assigns.
    dsd.metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
    let ctx = resources::BuildContext {
        default_image: args.server_image,
    };
    let mut docs = vec![
        serde_yaml::to_string(&resources::headless_service(&dsd)?)?,
        serde_yaml::to_string(&resources::client_service(&dsd)?)?,
    ];
    for g in 0..dsd.spec.replicas.max(0) {
        docs.push(serde_yaml::to_string(&resources::stateful_set(
            &dsd, g, &ctx,
        )?)?);
        docs.push(serde_yaml::to_string(&resources::pod_disruption_budget(
            &dsd, g,
        )?)?);
    }
    print!("---\n{}", docs.join("---\n"));
    Ok(())
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the /metrics and /health endpoints.
    #[arg(
        long,
        env = "DSPARK_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,
    /// Server image used when a DSparkDeployment sets no spec.image.
    #[arg(long, env = "DSPARK_SERVER_IMAGE", default_value = DEFAULT_IMAGE)]
    server_image: String,
    /// Log format.
    #[arg(
        long,
        env = "DSPARK_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    log_format: telemetry::LogFormat,
    /// Take part in leader election (needed when more than one replica runs).
    #[arg(long, env = "DSPARK_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "DSPARK_OPERATOR_LEASE_NAME",
        default_value = "dspark-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease (default: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Identity in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> String {
    metrics.render()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(|| async { "ok" }))
        .with_state(metrics.clone());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    info!(addr = %args.metrics_addr, "serving /metrics and /health");
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        let _ = signal_tx.send(true);
    });

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let lost_leadership = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let elector = if args.leader_elect {
        let identity = args
            .identity
            .clone()
            .unwrap_or_else(|| format!("dspark-operator-{}", std::process::id()));
        let elector = Arc::new(LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
            LeaseConfig {
                name: args.lease_name.clone(),
                identity,
                lease_duration: Duration::from_secs(15),
                retry_period: Duration::from_secs(2),
            },
        ));
        let mut wait_stop = stop_rx.clone();
        tokio::select! {
            _ = elector.acquire() => {}
            _ = wait_stop.wait_for(|s| *s) => {
                let _ = http.await;
                return Ok(());
            }
        }
        metrics.set_leader(true);
        // Losing the lease stops this replica's controller: never two reconcilers at once.
        let holder = elector.clone();
        let lost_tx = stop_tx.clone();
        let lost = lost_leadership.clone();
        tokio::spawn(async move {
            holder.hold().await;
            error!("lost leadership, stopping");
            lost.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = lost_tx.send(true);
        });
        Some(elector)
    } else {
        metrics.set_leader(true);
        None
    };

    let ctx = Arc::new(Context::new(
        client,
        metrics.clone(),
        BuildContext {
            default_image: args.server_image,
        },
    ));
    let mut ctl_stop = stop_rx.clone();
    controller::run(ctx, async move {
        let _ = ctl_stop.wait_for(|s| *s).await;
    })
    .await;
    let _ = stop_tx.send(true);
    if let Some(elector) = elector {
        elector.release().await;
    }
    metrics.set_leader(false);
    http.await
        .context("metrics server task")?
        .context("metrics server")?;
    if lost_leadership.load(std::sync::atomic::Ordering::SeqCst) {
        // Non-zero so the pod restarts and rejoins the election as a candidate.
        anyhow::bail!("lost the leader Lease");
    }
    info!("stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml().context("serialising the CRD")?);
            Ok(())
        }
        Command::Render(args) => render(args),
        Command::Run(args) => run(args).await,
    }
}
