//! The command line (clap derive) and shell completions (clap_complete).

use crate::client::Http;
use crate::error::CtlError;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueHint};
use std::path::PathBuf;
use std::time::Duration;

const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  not found (404: no such key)
  2  bad input or usage (a bad argument or file; 400, 413 from the server)
  3  precondition failed (412 from --if-match / --if-absent; 409 version conflict)
  4  unavailable (503, 504, 507, connection refused or timed out; `status`: a node is
     not healthy; `repair`: a round did not complete)
  5  auth (401, 403: missing or wrong --token / KV_TOKEN)
  6  other server error; `doctor` found a failing check

Values: `put KEY VALUE` stores VALUE as JSON when it parses as JSON (42, true, {\"a\":1},
\"quoted\"), else as a JSON string (hello -> \"hello\"); --string always stores a string.";

/// kvctl: client and operator tool for kv, over HTTP to the load balancer or any node.
#[derive(Debug, Parser)]
#[command(name = "kvctl", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options of every command.
#[derive(Debug, Args)]
pub struct Global {
    /// The LB's or any node's URL.
    #[arg(
        long,
        env = "KV_URL",
        default_value = "http://127.0.0.1:9000",
        global = true,
        value_hint = ValueHint::Url
    )]
    pub url: String,
    /// Bearer token (AUTH_TOKEN for data, AUTH_TOKEN or CLUSTER_SECRET for /admin).
    #[arg(long, env = "KV_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM CA certificate to trust for https URLs (only it: no system roots).
    #[arg(long, env = "KV_CACERT", global = true, value_hint = ValueHint::FilePath)]
    pub cacert: Option<PathBuf>,
    /// Print machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Deadline of one request, in seconds.
    #[arg(long, default_value_t = 30, global = true)]
    pub timeout: u64,
}

impl Global {
    /// The HTTP client for `--url`.
    pub fn http(&self) -> Result<Http, CtlError> {
        Http::new(
            &self.url,
            self.token.clone(),
            self.cacert.as_deref(),
            Duration::from_secs(self.timeout.max(1)),
        )
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a key: `kvctl get users/42`.
    Get(GetArgs),
    /// Write a key from an argument, --file or stdin: `kvctl put users/42 '{"name":"ada"}'`.
    Put(PutArgs),
    /// Delete a key.
    Delete(DeleteArgs),
    /// List keys in order, following pages: `kvctl list --prefix users/`.
    List(ListArgs),
    /// Run a batch file (`{"ops": [...]}` or a bare array of ops) through POST /batch.
    Batch(BatchArgs),
    /// One table of the cluster: every node's GET / and the LB's view.
    Status,
    /// Show, plan and apply membership changes (POST /admin/members).
    Members(MembersArgs),
    /// Run an anti-entropy round now (POST /admin/repair) and print its report.
    Repair(RepairArgs),
    /// Download a node's backup (GET /admin/backup) to FILE.
    Backup(BackupArgs),
    /// Restore a backup into a stopped node's DATA_DIR (runs `kv-node restore` on this machine).
    Restore(RestoreArgs),
    /// Check the cluster and this machine; one line per check with what to do.
    Doctor(DoctorArgs),
    /// Print a shell completion script: `kvctl completions bash > /etc/bash_completion.d/kvctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Follow changes of a key or a prefix (Server-Sent Events); resumes after a dropped
    /// connection; exits 4 when the node cut the watch off (`lagged`: list, then watch again).
    Watch(WatchArgs),
}

/// `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Key to watch.
    pub key: Option<String>,
    /// Prefix to watch (empty: every key).
    #[arg(long, conflicts_with = "key")]
    pub prefix: Option<String>,
    /// Stop after this many events (exit 0).
    #[arg(long)]
    pub count: Option<u64>,
    /// Reconnections in a row that may fail before giving up (exit 4).
    #[arg(long, default_value_t = 10)]
    pub reconnects: u32,
}

/// `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The key (slashes allowed).
    pub key: String,
    /// Read consistency: one, quorum, all or 1..N.
    #[arg(long)]
    pub r: Option<String>,
    /// Print only the value (as JSON), nothing else.
    #[arg(long)]
    pub value_only: bool,
}

/// `put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// The key (slashes allowed).
    pub key: String,
    /// The value: JSON if it parses as JSON, else a string. Without it, --file or stdin.
    #[arg(conflicts_with = "file")]
    pub value: Option<String>,
    /// Read the value from this file (`-`: stdin).
    #[arg(long, short = 'f', value_hint = ValueHint::FilePath)]
    pub file: Option<PathBuf>,
    /// Store the value as a JSON string even if it parses as JSON.
    #[arg(long)]
    pub string: bool,
    /// Time to live: seconds, or 30s, 5m, 2h, 1d.
    #[arg(long)]
    pub ttl: Option<String>,
    /// Write only if the key's current version is this one (from `get`).
    #[arg(long, conflicts_with = "if_absent")]
    pub if_match: Option<String>,
    /// Write only if the key does not exist (create only).
    #[arg(long)]
    pub if_absent: bool,
    /// Write consistency: one, quorum, all or 1..N.
    #[arg(long)]
    pub w: Option<String>,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The key.
    pub key: String,
    /// Delete only if the key's current version is this one.
    #[arg(long)]
    pub if_match: Option<String>,
    /// Write consistency.
    #[arg(long)]
    pub w: Option<String>,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only keys starting with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// At most this many keys in all (default: every key).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Keys asked per page (1..1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub page_size: u64,
    /// Show values and versions too.
    #[arg(long)]
    pub values: bool,
}

/// `batch`.
#[derive(Debug, Args)]
pub struct BatchArgs {
    /// JSON file with `{"ops": [...]}` or `[...]` (`-`: stdin).
    #[arg(value_hint = ValueHint::FilePath)]
    pub file: PathBuf,
    /// Write consistency of the batch's writes.
    #[arg(long)]
    pub w: Option<String>,
    /// Read consistency of the batch's reads.
    #[arg(long)]
    pub r: Option<String>,
}

/// `members`.
#[derive(Debug, Args)]
pub struct MembersArgs {
    #[command(subcommand)]
    pub action: Option<MembersAction>,
}

/// What `members` does.
#[derive(Debug, Subcommand)]
pub enum MembersAction {
    /// The view: every member, its state and transfer progress (the default).
    Show,
    /// What a change would move (a dry run; changes nothing).
    Plan {
        /// Node URLs to add.
        #[arg(long)]
        add: Vec<String>,
        /// Node URLs to remove.
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Add nodes: plan, confirm, apply, follow the transfer.
    Add {
        /// URLs of the new nodes (started, knowing only themselves).
        #[arg(required = true)]
        urls: Vec<String>,
        #[command(flatten)]
        apply: ApplyArgs,
    },
    /// Remove nodes (drained first; --force for a dead node).
    Remove {
        /// URLs of the nodes to remove.
        #[arg(required = true)]
        urls: Vec<String>,
        /// The node is dead: remove it without asking it (its keys are copied from replicas).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        apply: ApplyArgs,
    },
    /// Replace a node by a new one (OLD leaves, NEW joins, in one change).
    Replace {
        /// The node that leaves.
        old: String,
        /// The node that takes its place.
        new: String,
        #[command(flatten)]
        apply: ApplyArgs,
    },
    /// Abort the change in progress.
    Abort {
        /// Do not ask.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// Options of the membership changes that apply a plan.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Apply without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Return once the change started instead of following it to its commit.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to follow the change, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub wait_secs: u64,
}

/// `repair`.
#[derive(Debug, Args)]
pub struct RepairArgs {
    /// The node to run the round on (default: --url, or a healthy node when --url is the LB).
    #[arg(long)]
    pub node: Option<String>,
    /// Run a round on every member, one after another.
    #[arg(long, conflicts_with = "node")]
    pub all: bool,
    /// Show the last round instead of running one (GET /admin/repair).
    #[arg(long)]
    pub last: bool,
}

/// `backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The node: its URL, or its name (NODE_NAME) as `status` shows it.
    pub node: String,
    /// Where to write the backup (written to FILE.part, renamed when complete).
    #[arg(value_hint = ValueHint::FilePath)]
    pub file: PathBuf,
}

/// `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup file.
    #[arg(value_hint = ValueHint::FilePath)]
    pub file: PathBuf,
    /// The stopped node's data folder.
    #[arg(long, env = "DATA_DIR", value_hint = ValueHint::DirPath)]
    pub data_dir: PathBuf,
    /// Replace a folder that holds data.
    #[arg(long)]
    pub force: bool,
    /// The kv-node program (default: next to kvctl, else on PATH).
    #[arg(long, value_hint = ValueHint::ExecutablePath)]
    pub kv_node: Option<PathBuf>,
    /// Print the command instead of running it.
    #[arg(long)]
    pub print: bool,
}

/// `doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// A node's DATA_DIR on this machine: measure its disk's fsync rate.
    #[arg(long, value_hint = ValueHint::DirPath)]
    pub data_dir: Option<PathBuf>,
    /// fsyncs to time for the rate.
    #[arg(long, default_value_t = 300)]
    pub fsyncs: u32,
}

/// Writes the completion script of `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "kvctl", &mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = Cli::try_parse_from(["kvctl", "get", "k", "--json", "--url", "http://h:1"]);
        let cli = cli.ok();
        assert!(cli.as_ref().is_some_and(|c| c.global.json));
        assert_eq!(cli.map(|c| c.global.url), Some("http://h:1".to_owned()));
    }

    #[test]
    fn conflicting_conditions_are_usage_errors() {
        let parsed =
            Cli::try_parse_from(["kvctl", "put", "k", "v", "--if-match", "x", "--if-absent"]);
        assert!(parsed.is_err());
        let parsed = Cli::try_parse_from(["kvctl", "list", "--page-size", "0"]);
        assert!(parsed.is_err());
    }
}
