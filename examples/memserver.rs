//! A tiny NBD server over in-memory exports, for trying real clients (qemu-io, nbdinfo,
//! nbdsh, nbdcopy, fio) against the protocol layer without the log or a store.
//!
//! ```text
//! cargo run --release --example memserver -- --listen 127.0.0.1:10809 --export disk=1G
//! nbdinfo --list nbd://127.0.0.1:10809
//! qemu-io -f raw -t writeback -c 'write -P 0x55 0 64k' nbd://127.0.0.1:10809/disk
//! ```
//! The first export is also the default (empty name). Stops on Ctrl-C, draining sessions.

use std::sync::Arc;

use clap::Parser;
use nbds3::nbd::mem::{MemExport, MemProvider};
use nbds3::nbd::server::{self, Listener, ServerLimits};

#[derive(Parser)]
#[command(about = "NBD server over sparse in-memory exports")]
struct Args {
    /// TCP address to listen on (repeatable).
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: Vec<String>,
    /// Unix socket path to listen on as well.
    #[arg(long)]
    unix: Option<std::path::PathBuf>,
    /// NAME=SIZE[:ro], e.g. disk=1G or ro=64M:ro (repeatable; default mem=1G).
    #[arg(long = "export")]
    exports: Vec<String>,
    /// Page size of the in-memory exports (advertised as the preferred block size).
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// Concurrent requests per connection.
    #[arg(long, default_value_t = ServerLimits::default().requests_in_flight_max)]
    requests_in_flight_max: usize,
}

fn parse_export(spec: &str, block_size: u32) -> Result<(String, MemExport), String> {
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| format!("export {spec:?}: expected NAME=SIZE[:ro]"))?;
    let (size, read_only) = match rest.strip_suffix(":ro") {
        Some(size) => (size, true),
        None => (rest, false),
    };
    let size = nbds3::util::parse_size(size)?;
    let export = MemExport::new(size, block_size)
        .with_read_only(read_only)
        .with_description(format!("in-memory export {name}"));
    Ok((name.to_owned(), export))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if !args.block_size.is_power_of_two() {
        anyhow::bail!("--block-size must be a power of two");
    }
    let specs = if args.exports.is_empty() {
        vec!["mem=1G".to_owned()]
    } else {
        args.exports.clone()
    };
    let mut provider = MemProvider::new();
    for spec in &specs {
        let (name, export) = parse_export(spec, args.block_size).map_err(anyhow::Error::msg)?;
        provider = provider.with_export(name, export);
    }
    let mut listeners = Vec::new();
    for addr in &args.listen {
        listeners.push(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?));
    }
    if let Some(path) = &args.unix {
        let _ = std::fs::remove_file(path);
        listeners.push(Listener::Unix(tokio::net::UnixListener::bind(path)?));
    }
    let limits = ServerLimits {
        requests_in_flight_max: args.requests_in_flight_max,
        ..ServerLimits::default()
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    server::run(listeners, Arc::new(provider), limits, shutdown).await?;
    Ok(())
}
