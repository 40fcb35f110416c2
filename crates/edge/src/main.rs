//! `verge-edge`: the edge runtime's three daemons in one executable.
//!
//! verged, verge-agent and verge-hub link the same crates (tokio, rustls,
//! serde, hyper, the core types). As three executables, each process maps
//! its own copy of that code; run from one file, the kernel keeps one copy
//! of every code page in memory and shares it among the three (the runtime's
//! resident set shrinks by about the size of the common code; BENCHMARKS.md,
//! "Runtime footprint").
//!
//! Which daemon runs is chosen by the name the executable is started under
//! (a symlink or hard link named `verged`, `verge-agent` or `verge-hub`), or
//! by the first argument: `verge-edge verged --config …`,
//! `verge-edge agent …`, `verge-edge hub --config …`. Everything after that
//! is the daemon's own command line, exactly as for its own executable.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

/// The daemons, by the names they answer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Verged,
    Agent,
    Hub,
}

impl Daemon {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "verged" => Some(Self::Verged),
            "verge-agent" | "agent" => Some(Self::Agent),
            "verge-hub" | "hub" => Some(Self::Hub),
            _ => None,
        }
    }

    /// The program name its command-line parser shows in help and errors.
    fn program(self) -> &'static str {
        match self {
            Self::Verged => "verged",
            Self::Agent => "verge-agent",
            Self::Hub => "verge-hub",
        }
    }
}

/// The daemon to run and its command line (program name first).
fn select(mut args: Vec<OsString>) -> Result<(Daemon, Vec<OsString>), String> {
    let invoked = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .and_then(Daemon::from_name);
    if let Some(d) = invoked {
        return Ok((d, args));
    }
    let chosen = args
        .get(1)
        .and_then(|a| a.to_str())
        .and_then(Daemon::from_name);
    match chosen {
        Some(d) => {
            args.drain(..2);
            args.insert(0, d.program().into());
            Ok((d, args))
        }
        None => Err("usage: verge-edge <verged|agent|hub> [ARGS…]\n  \
             (or run it through a link named verged, verge-agent or verge-hub)"
            .into()),
    }
}

fn main() -> ExitCode {
    match select(std::env::args_os().collect()) {
        Ok((Daemon::Verged, args)) => verge_daemon::cli::main(args),
        Ok((Daemon::Agent, args)) => verge_agent::cli::main(args),
        Ok((Daemon::Hub, args)) => verge_hub::cli::main(args),
        Err(usage) => {
            eprintln!("{usage}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_link_name_chooses_the_daemon() {
        let (d, rest) = select(args(&["/usr/bin/verge-hub", "--config", "h.toml"])).unwrap();
        assert_eq!(d, Daemon::Hub);
        assert_eq!(rest, args(&["/usr/bin/verge-hub", "--config", "h.toml"]));
        let (d, _) = select(args(&["verged"])).unwrap();
        assert_eq!(d, Daemon::Verged);
    }

    #[test]
    fn or_the_first_argument() {
        let (d, rest) = select(args(&["/x/verge-edge", "agent", "--storage", "s"])).unwrap();
        assert_eq!(d, Daemon::Agent);
        assert_eq!(rest, args(&["verge-agent", "--storage", "s"]));
        assert!(select(args(&["verge-edge"])).is_err());
        assert!(select(args(&["verge-edge", "cloud"])).is_err());
    }
}
