//! nbds3-inspect: see and verify everything nbds3 keeps in a store, without writing to it.
//!
//! A thin CLI over `nbds3::inspect`: parse arguments, open the store read-only, run one
//! command, print its report as aligned text or (with `--json`) one JSON document, and exit
//! with the status the library assigns (see `EXIT CODES` in `--help`).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use nbds3::cli::StoreArgs;
use nbds3::inspect::{self, InspectError, InspectResult, Progress};
use nbds3::util::{parse_duration, parse_size};

const EXIT_CODES_HELP: &str = "\
EXIT CODES:
  0  success (verify: no problems; unreachable objects alone are not problems)
  1  verify found problems (listed in the report)
  2  usage error (bad arguments)
  3  no such export, manifest version or segment
  4  store unreachable or failing (after retries)
  5  an object needed to answer is corrupt or missing";

/// Inspect and verify nbds3 exports in an object store. Never writes to the store.
#[derive(Debug, Parser)]
#[command(name = "nbds3-inspect", version, after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    /// Print one JSON document (errors too: {"error": {...}}) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Stop retrying an unreachable or failing S3 endpoint after this long (e.g. 30s, 500ms).
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    s3_retry_max: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every export: name, size, block size, latest version, bytes stored.
    Exports,
    /// Every manifest version of an export: epoch, time, checkpoint, tail segments.
    Manifests { export: String },
    /// One manifest (the latest, or --version), decoded.
    Manifest {
        export: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// The segments a manifest reaches: size, live blocks and bytes, dead fraction.
    Segments {
        export: String,
        #[arg(long)]
        version: Option<u64>,
        /// Also list each segment's directory (frames and unmapped runs) with live blocks.
        #[arg(long)]
        frames: bool,
    },
    /// One segment read whole and checked frame by frame (orphans too).
    Segment {
        export: String,
        /// Segment id (the number in its key).
        id: u64,
        /// Manifest version whose index gives the live counts (default: latest).
        #[arg(long)]
        version: Option<u64>,
    },
    /// Block ranges → segment and frame (data), zero (allocated zeros) or hole.
    Map {
        export: String,
        #[arg(long)]
        version: Option<u64>,
        /// First byte to show (K/M/G/T suffixes allowed; rounded down to a block).
        #[arg(long, value_parser = parse_size)]
        offset: Option<u64>,
        /// Bytes to show (default: to the end of the export; rounded up to a block).
        #[arg(long, value_parser = parse_size)]
        length: Option<u64>,
    },
    /// Read and check every object the manifest reaches; list unreachable objects.
    Verify {
        export: String,
        #[arg(long)]
        version: Option<u64>,
        /// No progress bar (it is only drawn when stderr is a terminal anyway).
        #[arg(long)]
        no_progress: bool,
    },
}

/// Progress bar on stderr.
struct Bar(Mutex<Option<ProgressBar>>);

impl Progress for Bar {
    fn phase(&self, name: &str, total: u64, bytes: bool) {
        let template = if bytes {
            "{prefix:>11} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{prefix:>11} [{bar:40}] {pos}/{len}"
        };
        let pb = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(template) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_prefix(name.to_string());
        if let Ok(mut g) = self.0.lock() {
            if let Some(old) = g.replace(pb) {
                old.finish_and_clear();
            }
        }
    }
    fn advance(&self, n: u64) {
        if let Ok(g) = self.0.lock() {
            if let Some(pb) = g.as_ref() {
                pb.inc(n);
            }
        }
    }
    fn finish(&self) {
        if let Ok(mut g) = self.0.lock() {
            if let Some(pb) = g.take() {
                pb.finish_and_clear();
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorDoc<'a> {
    error: ErrorBody<'a>,
}
#[derive(Serialize)]
struct ErrorBody<'a> {
    kind: &'a str,
    exit_code: i32,
    message: String,
}

/// Print a report as JSON or text; returns the exit code.
fn emit<T: Serialize>(json: bool, report: &T, text: impl FnOnce(&T) -> String) -> i32 {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("nbds3-inspect: encoding JSON: {e}");
                return inspect::EXIT_STORE;
            }
        }
    } else {
        print!("{}", text(report));
    }
    inspect::EXIT_OK
}

async fn run(cli: &Cli) -> InspectResult<i32> {
    let s3 = cli.store.s3_options(cli.s3_retry_max);
    let store = inspect::open_store(&cli.store.store, &s3).await?;
    let json = cli.json;
    Ok(match &cli.cmd {
        Cmd::Exports => emit(json, &inspect::exports(&store).await?, |r| r.to_text()),
        Cmd::Manifests { export } => emit(json, &inspect::manifests(&store, export).await?, |r| {
            r.to_text()
        }),
        Cmd::Manifest { export, version } => emit(
            json,
            &inspect::manifest(&store, export, *version).await?,
            |r| r.to_text(),
        ),
        Cmd::Segments {
            export,
            version,
            frames,
        } => emit(
            json,
            &inspect::segments(&store, export, *version, *frames).await?,
            |r| r.to_text(),
        ),
        Cmd::Segment {
            export,
            id,
            version,
        } => {
            let r = inspect::segment(&store, export, *id, *version).await?;
            let code = emit(json, &r, |r| r.to_text());
            match r.problems.first() {
                None => code,
                Some(p) => {
                    eprintln!(
                        "nbds3-inspect: segment {} has {} problem(s), first: {}",
                        r.key,
                        r.problems.len(),
                        p.to_text()
                    );
                    inspect::EXIT_PROBLEMS
                }
            }
        }
        Cmd::Map {
            export,
            version,
            offset,
            length,
        } => emit(
            json,
            &inspect::map(&store, export, *version, *offset, *length).await?,
            |r| r.to_text(),
        ),
        Cmd::Verify {
            export,
            version,
            no_progress,
        } => {
            let show = !no_progress && std::io::stderr().is_terminal();
            let bar = Bar(Mutex::new(None));
            let progress: &dyn Progress = if show { &bar } else { &inspect::NoProgress };
            let r = inspect::verify(&store, export, *version, progress).await?;
            let code = emit(json, &r, |r| r.to_text());
            match r.problems.first() {
                None if r.ok => code,
                first => {
                    eprintln!(
                        "nbds3-inspect: verify found {} problem(s) in export {:?}{}",
                        r.problems.len() as u64 + r.problems_omitted,
                        r.export,
                        first.map_or(String::new(), |p| format!(", first: {}", p.to_text()))
                    );
                    inspect::EXIT_PROBLEMS
                }
            }
        }
    })
}

fn report_error(json: bool, e: &InspectError) -> i32 {
    let code = e.exit_code();
    eprintln!("nbds3-inspect: {e}");
    if json {
        let doc = ErrorDoc {
            error: ErrorBody {
                kind: e.kind(),
                exit_code: code,
                message: e.to_string(),
            },
        };
        if let Ok(s) = serde_json::to_string_pretty(&doc) {
            println!("{s}");
        }
    }
    code
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    nbds3::util::init_stderr_logging("warn");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbds3-inspect: starting the runtime: {e}");
            return ExitCode::from(inspect::EXIT_STORE as u8);
        }
    };
    let code = match rt.block_on(run(&cli)) {
        Ok(code) => code,
        Err(e) => report_error(cli.json, &e),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
