//! `kv-node restore <file> [--data-dir DIR] [--force]`: rebuilds a data folder from a backup
//! taken with `GET /admin/backup`, without starting a node. The storage work is kv-core's
//! `restore_backup`; this file reads the arguments and turns the outcome into one line and an
//! exit code.

use crate::config::NodeConfig;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// The `restore` paragraph of `kv-node --help`.
pub const HELP: &str = "\
restore: rebuild a data folder from a backup file (GET /admin/backup). The whole file is
checked first; a truncated, corrupt or foreign file is refused (exit code 2) and changes
nothing. The folder is DATA_DIR as the node computes it (same environment), or --data-dir DIR.
A folder that holds data is refused unless --force, which replaces its snapshot and WAL (hints/,
members.json and IDENTITY are kept). The restored snapshot carries the folder's own id, also
when the backup was taken on another node (the output says so): restoring is the operator's
decision. The node must be stopped. Then start kv-node on the folder: it reports healthy once
an anti-entropy round with its peers has completed, so keys deleted since the backup do not
come back.";

/// What the command line asked for.
#[derive(Debug, PartialEq, Eq)]
struct RestoreArgs {
    file: PathBuf,
    data_dir: Option<PathBuf>,
    force: bool,
}

/// Parses the arguments after `restore`.
fn parse(args: &[String]) -> Result<RestoreArgs, String> {
    let mut file = None;
    let mut data_dir = None;
    let mut force = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--force" => force = true,
            "--data-dir" => match args.next() {
                Some(dir) if !dir.is_empty() => data_dir = Some(PathBuf::from(dir)),
                _ => return Err("--data-dir needs a folder".into()),
            },
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag:?}")),
            path if file.is_none() => file = Some(PathBuf::from(path)),
            extra => return Err(format!("unexpected argument {extra:?}")),
        }
    }
    let file = file.ok_or("missing the backup file")?;
    Ok(RestoreArgs {
        file,
        data_dir,
        force,
    })
}

/// Runs `kv-node restore ...`: 0 when restored; 2 when refused (bad arguments or
/// configuration, a bad backup file, a folder in use or not empty), before anything changed;
/// 1 when installing failed part way (the folder's old `snapshot.db` is then still in place).
pub fn main(args: &[String]) -> ExitCode {
    let usage = "usage: kv-node restore <backup file> [--data-dir DIR] [--force]";
    let args = match parse(args) {
        Ok(args) => args,
        Err(e) => return fail(2, &format!("{e}; {usage}")),
    };
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => match NodeConfig::from_env() {
            Ok(config) => config.data_dir,
            Err(e) => return fail(2, &e.to_string()),
        },
    };
    match kv_core::restore_backup(&args.file, &data_dir, args.force) {
        Ok(restored) => {
            let info = &restored.backup;
            // The backup may hold keys deleted since: the node syncs before it reports healthy.
            if let Err(e) = kv_cluster::antientropy::mark_restored(&data_dir) {
                return fail(
                    1,
                    &format!("restore failed: cannot mark the folder as restored: {e}"),
                );
            }
            let origin = match info.data_dir_id {
                _ if restored.same_folder() => "a backup of this data folder".to_owned(),
                Some(id) => format!(
                    "a backup of another data folder (id {id}), re-stamped with this folder's id {}",
                    restored.data_dir_id
                ),
                None => format!(
                    "a backup from before data folder ids, stamped with this folder's id {}",
                    restored.data_dir_id
                ),
            };
            let line = format!(
                "kv-node: restored {} entries ({} bytes, backup begun at unix ms {}) from {} into {} \
                 ({origin}); start kv-node with DATA_DIR={}",
                info.entries,
                info.bytes,
                info.created_ms,
                args.file.display(),
                data_dir.display(),
                data_dir.display(),
            );
            match writeln!(std::io::stdout().lock(), "{line}") {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Err(
            e @ (kv_core::Error::BadBackup { .. }
            | kv_core::Error::DataDirNotEmpty { .. }
            | kv_core::Error::Locked { .. }),
        ) => fail(2, &e.to_string()),
        Err(e) => fail(1, &format!("restore failed: {e}")),
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("kv-node restore: {message}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn file_flags_and_data_dir_in_any_order() {
        let got = parse(&args(&["--force", "b.db", "--data-dir", "/d"])).unwrap();
        assert_eq!(
            got,
            RestoreArgs {
                file: "b.db".into(),
                data_dir: Some("/d".into()),
                force: true
            }
        );
        let got = parse(&args(&["b.db"])).unwrap();
        assert_eq!((got.data_dir, got.force), (None, false));
    }

    #[test]
    fn bad_arguments_are_named() {
        for (given, says) in [
            (&[][..], "missing the backup file"),
            (&["b.db", "c.db"][..], "unexpected argument \"c.db\""),
            (&["b.db", "--data-dir"][..], "--data-dir needs a folder"),
            (&["--frce", "b.db"][..], "unknown option \"--frce\""),
        ] {
            assert_eq!(parse(&args(given)).unwrap_err(), says);
        }
    }
}
