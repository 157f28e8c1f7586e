//! Consistency levels (`w` / `r`): how many replicas must answer before a request succeeds.

use crate::error::Error;
use std::fmt;
use std::str::FromStr;

/// How many of a key's N replicas must acknowledge a write (W) or answer a read (R).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// One replica.
    One,
    /// A majority: N / 2 + 1.
    Quorum,
    /// Every replica.
    All,
    /// An exact number of replicas, 1..=N.
    Count(usize),
}

impl Consistency {
    /// The number of replicas this level needs when a key has `n` replicas.
    ///
    /// `Count(k)` with `k > n` is refused by [`Consistency::parse`], so here it is capped at `n`.
    pub fn required(self, n: usize) -> usize {
        let n = n.max(1);
        match self {
            Consistency::One => 1,
            Consistency::Quorum => n / 2 + 1,
            Consistency::All => n,
            Consistency::Count(k) => k.clamp(1, n),
        }
    }

    /// Parses `one`, `quorum`, `all` or a number in `1..=n`; `name` (`w` or `r`) goes into the error.
    pub fn parse(name: &'static str, value: &str, n: usize) -> Result<Consistency, Error> {
        let bad = || Error::BadConsistency {
            name,
            value: value.to_owned(),
            max: n,
        };
        match value.trim().to_ascii_lowercase().as_str() {
            "one" => Ok(Consistency::One),
            "quorum" => Ok(Consistency::Quorum),
            "all" => Ok(Consistency::All),
            digits => match digits.parse::<usize>() {
                Ok(k) if (1..=n).contains(&k) => Ok(Consistency::Count(k)),
                _ => Err(bad()),
            },
        }
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consistency::One => f.write_str("one"),
            Consistency::Quorum => f.write_str("quorum"),
            Consistency::All => f.write_str("all"),
            Consistency::Count(k) => write!(f, "{k}"),
        }
    }
}

/// Parses a level without an upper bound check; for configuration defaults, where N is applied later.
impl FromStr for Consistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Consistency::parse("consistency", s, usize::MAX).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_resolve_against_n() {
        assert_eq!(Consistency::One.required(3), 1);
        assert_eq!(Consistency::Quorum.required(3), 2);
        assert_eq!(Consistency::Quorum.required(5), 3);
        assert_eq!(Consistency::Quorum.required(1), 1);
        assert_eq!(Consistency::All.required(3), 3);
        assert_eq!(Consistency::Count(2).required(3), 2);
        assert_eq!(Consistency::Count(9).required(3), 3);
    }

    #[test]
    fn parse_accepts_names_and_numbers_in_range() {
        assert_eq!(Consistency::parse("w", "ONE", 3).unwrap(), Consistency::One);
        assert_eq!(
            Consistency::parse("w", "quorum", 3).unwrap(),
            Consistency::Quorum
        );
        assert_eq!(
            Consistency::parse("r", "3", 3).unwrap(),
            Consistency::Count(3)
        );
        for bad in ["0", "4", "-1", "most", ""] {
            let err = Consistency::parse("r", bad, 3).unwrap_err().to_string();
            assert!(err.starts_with(&format!("r={bad}:")), "{err}");
        }
    }
}
