//! The `pitcher` command: parses the command line and hands over to the
//! master, a worker, or a one-shot action (`-t`). Errors end here as a
//! message on stderr and a non-zero exit status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;

use pitcher::config::Config;

/// Default configuration file.
const DEFAULT_CONFIG: &str = "/etc/pitcher/pitcher.toml";

#[derive(Debug, Parser)]
#[command(name = "pitcher", version, about = "HTTP/1.1 reverse proxy: master + mio workers")]
struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "config", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Test the configuration file and exit.
    #[arg(short = 't', long = "test")]
    test: bool,
    /// Run one worker in the foreground, without a master (for debugging).
    #[arg(long = "single-process")]
    single_process: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pitcher: {e}");
            if cli.test {
                eprintln!("pitcher: configuration file {} test failed", cli.config.display());
            }
            return ExitCode::FAILURE;
        }
    };
    if cli.test {
        println!("pitcher: configuration ok: {}", cli.config.display());
        return ExitCode::SUCCESS;
    }
    if cli.single_process {
        return single_process(config);
    }
    eprintln!("pitcher: master mode is not available yet; use --single-process");
    ExitCode::FAILURE
}

/// `--single-process`: bind the listeners here and run one worker.
fn single_process(config: Config) -> ExitCode {
    let (log, _guard) = match pitcher::log::build(&config.error_log, config.log_level, "worker") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pitcher: cannot open the error log: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut listeners = Vec::new();
    for l in &config.listeners {
        match pitcher::net::bind(&l.address, l.backlog) {
            Ok(fd) => listeners.push((l.address.clone(), fd)),
            Err(e) => {
                eprintln!("pitcher: cannot listen on {}: {e}", l.address);
                return ExitCode::FAILURE;
            }
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGQUIT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("pitcher: cannot install signal handler: {e}");
            return ExitCode::FAILURE;
        }
    }
    let init = pitcher::worker::WorkerInit { config: Arc::new(config), listeners, log: log.clone(), stop };
    match pitcher::worker::run(init) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            slog::crit!(log, "worker failed"; "error" => %e);
            eprintln!("pitcher: worker failed: {e}");
            ExitCode::FAILURE
        }
    }
}
