//! `kvctl`: the command-line client and operator tool of kv. It talks HTTP to the LB or any node:
//! data commands (`get`, `put`, `delete`, `list`, `batch`), the cluster's `status`, membership
//! changes, repair, backups and restores, and `doctor`, which checks a cluster and this machine.

mod cli;
mod client;
mod data;
mod doctor;
mod error;
mod ops;
mod out;
mod watch;

use clap::Parser;
use cli::{Cli, Command};
use error::CtlError;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help and version with exit 0, usage errors with exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                error::code::BAD_INPUT
            } else {
                0
            });
        }
    };
    let json = cli.global.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json && !matches!(e, CtlError::Reported { .. }) {
                out::json(&e.to_json());
            }
            out::err(&format!("kvctl: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), CtlError> {
    let global = cli.global;
    match cli.command {
        Command::Completions { shell } => {
            cli::completions(shell);
            Ok(())
        }
        Command::Restore(args) => ops::restore(&global, &args),
        Command::Doctor(args) => doctor::run(&global, &args),
        command => {
            let http = global.http()?;
            match command {
                Command::Get(args) => data::get(&http, &global, &args),
                Command::Put(args) => data::put(&http, &global, &args),
                Command::Delete(args) => data::delete(&http, &global, &args),
                Command::List(args) => data::list(&http, &global, &args),
                Command::Batch(args) => data::batch(&http, &global, &args),
                Command::Status => ops::status(&http, &global),
                Command::Members(args) => ops::members(&http, &global, args),
                Command::Repair(args) => ops::repair(&http, &global, &args),
                Command::Backup(args) => ops::backup(&http, &global, &args),
                Command::Watch(args) => watch::run(&http, &global, &args),
                Command::Completions { .. } | Command::Restore(_) | Command::Doctor(_) => Ok(()),
            }
        }
    }
}
