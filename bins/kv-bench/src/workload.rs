//! What the load looks like: the operation mix, the key distribution and the consistency levels,
//! each parsed from its command-line spelling, plus the per-worker sampler that draws from them.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand_distr::{Distribution, Zipf};

/// One kind of kv request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `GET /v1/{key}`.
    Read,
    /// `POST /v1/{key}` with `{"value": ...}`.
    Write,
    /// `DELETE /v1/{key}`.
    Delete,
    /// `GET /v1?prefix={prefix}&after={prefix}{key}&limit=N`: one listing page that starts at
    /// a drawn key.
    List,
}

impl Op {
    /// Every operation, in report order.
    pub const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Delete, Op::List];

    /// Name used in the table, the JSON results and the mix syntax.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Delete => "delete",
            Op::List => "list",
        }
    }

    /// Whether a 404 answer is an expected result (the key may not exist) rather than an error.
    pub fn accepts_not_found(self) -> bool {
        matches!(self, Op::Read | Op::Delete)
    }
}

/// Relative weights of reads, writes, deletes and listings: `read=95,write=5[,delete=0][,list=0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Weight of reads.
    pub read: u32,
    /// Weight of writes.
    pub write: u32,
    /// Weight of deletes.
    pub delete: u32,
    /// Weight of listing pages.
    pub list: u32,
}

impl Mix {
    /// Weight of one operation.
    pub fn weight(&self, op: Op) -> u32 {
        match op {
            Op::Read => self.read,
            Op::Write => self.write,
            Op::Delete => self.delete,
            Op::List => self.list,
        }
    }

    /// Sum of the weights; never zero for a parsed mix.
    fn total(&self) -> u32 {
        self.read + self.write + self.delete + self.list
    }

    /// Picks an operation with probability proportional to its weight.
    pub fn pick(&self, rng: &mut impl Rng) -> Op {
        let x = rng.random_range(0..self.total().max(1));
        if x < self.read {
            Op::Read
        } else if x < self.read + self.write {
            Op::Write
        } else if x < self.read + self.write + self.delete {
            Op::Delete
        } else {
            Op::List
        }
    }
}

impl FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mix = Mix {
            read: 0,
            write: 0,
            delete: 0,
            list: 0,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("mix part {part:?}: expected NAME=WEIGHT"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .ok()
                .filter(|w| *w <= 1_000_000)
                .ok_or_else(|| {
                    format!("mix part {part:?}: weight must be a whole number 0..=1000000")
                })?;
            match name.trim() {
                "read" | "get" => mix.read = weight,
                "write" | "post" | "put" => mix.write = weight,
                "delete" | "del" => mix.delete = weight,
                "list" => mix.list = weight,
                other => {
                    return Err(format!(
                        "mix part {part:?}: unknown operation {other:?} (read, write, delete, list)"
                    ))
                }
            }
        }
        if mix.total() == 0 {
            return Err(format!("mix {s:?}: at least one weight must be above 0"));
        }
        Ok(mix)
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "read={},write={},delete={}",
            self.read, self.write, self.delete
        )?;
        if self.list > 0 {
            write!(f, ",list={}", self.list)?;
        }
        Ok(())
    }
}

/// How keys are drawn from the key space `0..keys`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyDist {
    /// Every key equally likely.
    Uniform,
    /// Zipf with exponent `s`: key 0 is the hottest, key `i` has weight `1 / (i + 1)^s`.
    Zipf(f64),
}

/// Exponent used by a bare `zipf` without `:S`, the usual YCSB skew.
const DEFAULT_ZIPF_EXPONENT: f64 = 0.99;

impl FromStr for KeyDist {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().split_once(':') {
            None if s.trim() == "uniform" => Ok(KeyDist::Uniform),
            None if s.trim() == "zipf" => Ok(KeyDist::Zipf(DEFAULT_ZIPF_EXPONENT)),
            Some(("zipf", exponent)) => match exponent.trim().parse::<f64>() {
                Ok(e) if e.is_finite() && e > 0.0 && e <= 10.0 => Ok(KeyDist::Zipf(e)),
                _ => Err(format!(
                    "dist {s:?}: zipf exponent must be a number in (0, 10]"
                )),
            },
            _ => Err(format!(
                "dist {s:?}: expected uniform or zipf:S (for example zipf:0.99)"
            )),
        }
    }
}

impl fmt::Display for KeyDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyDist::Uniform => write!(f, "uniform"),
            KeyDist::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

/// A consistency level for the `w` or `r` query parameter, as kv spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// One replica.
    One,
    /// A majority of the N replicas.
    Quorum,
    /// All N replicas.
    All,
    /// An explicit count 1..N.
    Count(u32),
}

impl FromStr for Consistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "one" => Ok(Consistency::One),
            "quorum" => Ok(Consistency::Quorum),
            "all" => Ok(Consistency::All),
            n => match n.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(Consistency::Count(n)),
                _ => Err(format!(
                    "consistency {s:?}: expected one, quorum, all or a number >= 1"
                )),
            },
        }
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consistency::One => write!(f, "one"),
            Consistency::Quorum => write!(f, "quorum"),
            Consistency::All => write!(f, "all"),
            Consistency::Count(n) => write!(f, "{n}"),
        }
    }
}

/// Draws key indexes in `0..keys` following a [`KeyDist`].
#[derive(Debug, Clone)]
pub enum KeySampler {
    /// Uniform over `0..keys`.
    Uniform(u64),
    /// Zipf over ranks `1..=keys`, shifted to `0..keys`.
    Zipf {
        /// The distribution over ranks.
        zipf: Zipf<f64>,
        /// Size of the key space.
        keys: u64,
    },
}

impl KeySampler {
    /// Builds a sampler for a key space of `keys` (at least 1) keys.
    pub fn new(dist: KeyDist, keys: u64) -> Result<Self, String> {
        let keys = keys.max(1);
        match dist {
            KeyDist::Uniform => Ok(KeySampler::Uniform(keys)),
            KeyDist::Zipf(s) => Zipf::new(keys as f64, s)
                .map(|zipf| KeySampler::Zipf { zipf, keys })
                .map_err(|e| format!("dist zipf:{s}: {e}")),
        }
    }

    /// Draws one key index.
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeySampler::Uniform(keys) => rng.random_range(0..*keys),
            KeySampler::Zipf { zipf, keys } => {
                let rank = zipf.sample(rng) as u64;
                rank.saturating_sub(1).min(keys - 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn mix_parses_names_aliases_and_defaults_missing_to_zero() {
        let mix: Mix = "read=95,write=5".parse().unwrap();
        assert_eq!(
            mix,
            Mix {
                read: 95,
                write: 5,
                delete: 0,
                list: 0
            }
        );
        let mix: Mix = " get=1, put=2 ,del=3".parse().unwrap();
        assert_eq!(
            mix,
            Mix {
                read: 1,
                write: 2,
                delete: 3,
                list: 0
            }
        );
        let mix: Mix = "write=9,list=1".parse().unwrap();
        assert_eq!((mix.write, mix.list), (9, 1));
        assert_eq!(mix.to_string(), "read=0,write=9,delete=0,list=1");
    }

    #[test]
    fn mix_rejects_bad_input() {
        for bad in [
            "",
            "read=0",
            "read",
            "read=x",
            "read=-1",
            "scan=5",
            "read=5,write=1e3",
            "read=2000000",
        ] {
            assert!(bad.parse::<Mix>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn mix_pick_follows_weights() {
        let mix: Mix = "read=3,write=1".parse().unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let reads = (0..40_000)
            .filter(|_| mix.pick(&mut rng) == Op::Read)
            .count();
        assert!((29_000..31_000).contains(&reads), "reads = {reads}");
        let only_deletes: Mix = "delete=1".parse().unwrap();
        assert!((0..100).all(|_| only_deletes.pick(&mut rng) == Op::Delete));
        let only_lists: Mix = "list=1".parse().unwrap();
        assert!((0..100).all(|_| only_lists.pick(&mut rng) == Op::List));
    }

    #[test]
    fn dist_parses_uniform_and_zipf() {
        assert_eq!("uniform".parse::<KeyDist>().unwrap(), KeyDist::Uniform);
        assert_eq!("zipf:0.5".parse::<KeyDist>().unwrap(), KeyDist::Zipf(0.5));
        assert_eq!("zipf".parse::<KeyDist>().unwrap(), KeyDist::Zipf(0.99));
        for bad in [
            "",
            "zipf:",
            "zipf:0",
            "zipf:-1",
            "zipf:nan",
            "zipf:inf",
            "normal",
            "uniform:1",
        ] {
            assert!(
                bad.parse::<KeyDist>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn consistency_parses_names_and_counts() {
        assert_eq!("one".parse::<Consistency>().unwrap(), Consistency::One);
        assert_eq!(
            "quorum".parse::<Consistency>().unwrap(),
            Consistency::Quorum
        );
        assert_eq!("all".parse::<Consistency>().unwrap(), Consistency::All);
        assert_eq!("2".parse::<Consistency>().unwrap(), Consistency::Count(2));
        assert_eq!(Consistency::Count(2).to_string(), "2");
        for bad in ["", "0", "-1", "most", "1.5"] {
            assert!(
                bad.parse::<Consistency>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn samplers_stay_in_range_and_zipf_is_skewed() {
        let mut rng = SmallRng::seed_from_u64(1);
        let uniform = KeySampler::new(KeyDist::Uniform, 10).unwrap();
        assert!((0..1000).all(|_| uniform.sample(&mut rng) < 10));
        let zipf = KeySampler::new(KeyDist::Zipf(0.99), 1000).unwrap();
        let draws: Vec<u64> = (0..20_000).map(|_| zipf.sample(&mut rng)).collect();
        assert!(draws.iter().all(|k| *k < 1000));
        let hottest = draws.iter().filter(|k| **k == 0).count();
        assert!(hottest > 1000, "key 0 drawn {hottest} times of 20000");
    }
}
