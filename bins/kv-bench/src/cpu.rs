//! What a run cost in CPU: user + system time of the server processes named by `--server-pid`
//! (and of kv-bench itself), read from `/proc/PID/stat` right at the edges of the measured
//! phase, so that "µs of CPU per successful request" covers exactly the requests it divides by.

use std::str::FromStr;

use crate::error::BenchError;

/// One process whose CPU time a run measures: `NAME=PID`, or a bare `PID` named after its
/// command (`comm` in `/proc/PID/stat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Name in the table and the JSON results (empty until resolved for a bare PID).
    pub name: String,
    /// Process id.
    pub pid: u32,
}

impl FromStr for Process {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, pid) = match s.trim().split_once('=') {
            Some((name, pid)) => (name.trim(), pid.trim()),
            None => ("", s.trim()),
        };
        match pid.parse::<u32>() {
            Ok(pid) if pid > 0 => Ok(Process {
                name: name.to_string(),
                pid,
            }),
            _ => Err(format!(
                "server pid {s:?}: expected PID or NAME=PID with a process id above 0"
            )),
        }
    }
}

/// CPU clock ticks of each measured process at one instant.
#[derive(Debug, Clone)]
pub struct Sample(Vec<u64>);

/// Reads the CPU time of a fixed set of processes, plus kv-bench's own where /proc has it.
#[derive(Debug, Clone)]
pub struct CpuProbe {
    /// The servers, in `--server-pid` order, then kv-bench itself last if `with_client`.
    processes: Vec<Process>,
    /// Whether kv-bench's own CPU is measured (not where there is no /proc, when no server
    /// was named either: a run without `--server-pid` works anywhere).
    with_client: bool,
    /// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`).
    ticks_per_sec: u64,
}

/// CPU time used by one process between two samples.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessCpu {
    /// Its name.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Seconds of CPU (user + system, all threads).
    pub secs: f64,
}

/// CPU time used between two samples: the servers', and kv-bench's own.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuUsage {
    /// One entry per `--server-pid` (empty when none was given).
    pub servers: Vec<ProcessCpu>,
    /// The load generator itself, where /proc has it.
    pub client: Option<ProcessCpu>,
}

impl CpuProbe {
    /// A probe for `servers`; checks that each can be read now and names the unnamed ones
    /// after their command.
    pub fn new(servers: &[Process]) -> Result<Self, BenchError> {
        let me = Process {
            name: "kv-bench".into(),
            pid: std::process::id(),
        };
        let with_client = !servers.is_empty() || read_stat(me.pid).is_ok();
        let client = with_client.then_some(&me);
        let mut processes = Vec::with_capacity(servers.len() + 1);
        for process in servers.iter().chain(client) {
            let stat = read_stat(process.pid)
                .map_err(|e| BenchError::Invalid(format!("--server-pid {}: {e}", process.pid)))?;
            let name = match process.name.is_empty() {
                false => process.name.clone(),
                true => comm(&stat).unwrap_or("?").to_string(),
            };
            processes.push(Process {
                name,
                pid: process.pid,
            });
        }
        Ok(CpuProbe {
            processes,
            with_client,
            ticks_per_sec: rustix::param::clock_ticks_per_second().max(1),
        })
    }

    /// The CPU ticks of every process now; fails when one has exited.
    pub fn sample(&self) -> Result<Sample, String> {
        self.processes
            .iter()
            .map(|p| {
                let stat =
                    read_stat(p.pid).map_err(|e| format!("{} (pid {}): {e}", p.name, p.pid))?;
                ticks(&stat).ok_or_else(|| {
                    format!(
                        "{} (pid {}): unexpected /proc/{}/stat",
                        p.name, p.pid, p.pid
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(Sample)
    }

    /// What each process used from `start` to `end` (two samples of this probe).
    pub fn usage(&self, start: &Sample, end: &Sample) -> CpuUsage {
        let mut used: Vec<ProcessCpu> = self
            .processes
            .iter()
            .zip(start.0.iter().zip(&end.0))
            .map(|(p, (a, b))| ProcessCpu {
                name: p.name.clone(),
                pid: p.pid,
                secs: b.saturating_sub(*a) as f64 / self.ticks_per_sec as f64,
            })
            .collect();
        let client = match self.with_client {
            true => used.pop(),
            false => None,
        };
        CpuUsage {
            servers: used,
            client,
        }
    }
}

/// The text of `/proc/PID/stat`.
fn read_stat(pid: u32) -> Result<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))
}

/// The command name of a `/proc/PID/stat` line: the text between the first `(` and the last
/// `)` (a command may itself hold parentheses and spaces).
fn comm(stat: &str) -> Option<&str> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    stat.get(open + 1..close)
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks.
fn ticks(stat: &str) -> Option<u64> {
    let after_comm = stat.get(stat.rfind(')')? + 1..)?;
    // Fields from 3 (state) on: utime and stime are the 12th and 13th of them.
    let mut fields = after_comm.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (kv (node) x) S 1 4242 4242 0 -1 4194560 9170 0 0 0 \
                        1234 567 0 0 20 0 9 0 1000 123456789 5000 18446744073709551615";

    #[test]
    fn stat_lines_give_ticks_and_names_even_with_odd_commands() {
        assert_eq!(ticks(STAT), Some(1234 + 567));
        assert_eq!(comm(STAT), Some("kv (node) x"));
        assert_eq!(ticks("1 (x) S 1 2"), None);
        assert_eq!(ticks("garbage"), None);
    }

    #[test]
    fn processes_parse_with_or_without_a_name() {
        assert_eq!(
            "node1=17".parse::<Process>(),
            Ok(Process {
                name: "node1".into(),
                pid: 17
            })
        );
        assert_eq!("17".parse::<Process>().map(|p| p.pid), Ok(17));
        for bad in ["", "x", "node1=", "=0", "0", "-3", "a=b"] {
            assert!(
                bad.parse::<Process>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn a_probe_measures_the_cpu_a_process_burns() {
        let me = Process {
            name: String::new(),
            pid: std::process::id(),
        };
        let probe = CpuProbe::new(&[me]).unwrap();
        let start = probe.sample().unwrap();
        // Burn CPU until /proc shows it (it counts in ticks: 10 ms at the usual 100 Hz), at
        // most 10 s of wall time on a loaded machine.
        let begun = std::time::Instant::now();
        let mut x = 0u64;
        let usage = loop {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            let usage = probe.usage(&start, &probe.sample().unwrap());
            let client = usage.client.as_ref().map_or(0.0, |c| c.secs);
            if client >= 0.05 || begun.elapsed() > std::time::Duration::from_secs(10) {
                break usage;
            }
        };
        let wall = begun.elapsed().as_secs_f64();
        assert_eq!(usage.servers.len(), 1);
        assert!(!usage.servers[0].name.is_empty());
        // The process is both the "server" and the client here.
        for used in [usage.client.as_ref().unwrap(), &usage.servers[0]] {
            assert!(used.secs >= 0.04, "{usage:?} in {wall} s");
            assert!(used.secs <= wall * 64.0 + 0.05, "{usage:?} in {wall} s");
        }
        assert!(CpuProbe::new(&["1=4294967295".parse().unwrap()]).is_err());
    }
}
