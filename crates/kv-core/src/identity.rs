//! The data folder's identity `IDENTITY`: a random 128-bit id written when the folder is first
//! used, and the name and URL of the node it belongs to. Snapshots and WAL segments carry the id
//! (recovery refuses a file carrying another folder's id); the name and URL let a node started on
//! another node's folder refuse to start.

use std::fmt;
use std::io::Write;
use std::path::Path;

use crate::vfs::{OsFs, Vfs, VfsFile};
use crate::{segment, Error};

/// File name of the identity in the data folder.
pub const FILE_NAME: &str = "IDENTITY";
const TMP_FILE_NAME: &str = "IDENTITY.tmp";
/// First line of the file.
const FIRST_LINE: &str = "kv data directory identity, format 1";

/// A data folder's id: 128 random bits, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirId(pub [u8; 16]);

impl DirId {
    /// A fresh random id.
    pub fn random() -> DirId {
        DirId(rand::random())
    }

    /// Parses 32 hex digits.
    fn parse(text: &str) -> Option<DirId> {
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut id = [0; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(DirId(id))
    }
}

impl fmt::Display for DirId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for DirId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirId({self})")
    }
}

/// The node a data folder belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOwner {
    /// `NODE_NAME`.
    pub name: String,
    /// The node's canonical URL.
    pub url: String,
}

/// What `IDENTITY` holds. Layout (text, so an operator can read it and fix a name by hand):
///
/// ```text
/// kv data directory identity, format 1
/// id = 32 hex digits
/// id_crc32c = 8 hex digits          (of the id's 16 bytes: bit rot in the id is reported as a
///                                    damaged IDENTITY, not as every file being foreign)
/// name = node1                      (both absent until a node has started on the folder,
/// url = http://127.0.0.1:8001        e.g. right after `kv-node restore` into a new folder)
/// ```
///
/// The name and url lines may be edited by hand (a node renamed or moved on purpose).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The folder's id, stamped on every snapshot and WAL segment written in it.
    pub id: DirId,
    /// The node it belongs to; `None` until a node with a name started on it.
    pub owner: Option<DataOwner>,
}

impl Identity {
    /// A new identity with a random id.
    pub fn new(owner: Option<DataOwner>) -> Identity {
        Identity {
            id: DirId::random(),
            owner,
        }
    }

    fn encode(&self) -> String {
        let mut text = format!(
            "{FIRST_LINE}\nid = {}\nid_crc32c = {:08x}\n",
            self.id,
            crc32c::crc32c(&self.id.0)
        );
        if let Some(owner) = &self.owner {
            text.push_str(&format!("name = {}\nurl = {}\n", owner.name, owner.url));
        }
        text
    }

    fn decode(text: &str) -> Result<Identity, String> {
        let mut lines = text.lines();
        if lines.next() != Some(FIRST_LINE) {
            return Err(format!("the first line is not {FIRST_LINE:?}"));
        }
        let (mut id, mut check, mut name, mut url) = (None, None, None, None);
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?} is not `key = value`"))?;
            let value = value.trim().to_owned();
            let slot = match key.trim() {
                "id" => {
                    id = Some(DirId::parse(&value).ok_or("the id is not 32 hex digits")?);
                    continue;
                }
                "id_crc32c" => &mut check,
                "name" => &mut name,
                "url" => &mut url,
                other => return Err(format!("unknown key {other:?}")),
            };
            *slot = Some(value);
        }
        let id = id.ok_or("no id line")?;
        let expected = format!("{:08x}", crc32c::crc32c(&id.0));
        if check.as_deref() != Some(expected.as_str()) {
            return Err(format!(
                "the id_crc32c line is missing or does not match the id (bit rot?); the id \
                 computes to {expected}"
            ));
        }
        let owner = match (name, url) {
            (Some(name), Some(url)) => Some(DataOwner { name, url }),
            (None, None) => None,
            _ => return Err("a name line needs a url line and the other way round".into()),
        };
        Ok(Identity { id, owner })
    }
}

/// Reads `dir/IDENTITY`; `None` if the folder has none yet. A damaged file stops start-up.
pub fn load(dir: &Path) -> Result<Option<Identity>, Error> {
    load_with(&OsFs, dir)
}

/// [`load`] through the file system `vfs`.
pub(crate) fn load_with(vfs: &impl Vfs, dir: &Path) -> Result<Option<Identity>, Error> {
    let path = dir.join(FILE_NAME);
    let bytes = match vfs.read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path)(e)),
    };
    let text = String::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_owned());
    text.and_then(|t| Identity::decode(&t))
        .map(Some)
        .map_err(|reason| Error::Corrupt {
            path,
            offset: 0,
            reason: format!(
                "the data folder's identity is unreadable ({reason}); write it back from a copy \
                 (the id is also in kv-node's start-up log and in the error a start without \
                 IDENTITY gives)"
            ),
        })
}

/// Writes `dir/IDENTITY` durably: temp file, fsync, rename, fsync of the folder.
pub fn store(dir: &Path, identity: &Identity) -> Result<(), Error> {
    store_with(&OsFs, dir, identity)
}

/// [`store`] through the file system `vfs`.
pub(crate) fn store_with(vfs: &impl Vfs, dir: &Path, identity: &Identity) -> Result<(), Error> {
    let path = dir.join(FILE_NAME);
    if let Some(owner) = &identity.owner {
        if [&owner.name, &owner.url]
            .iter()
            .any(|v| v.trim() != v.as_str() || v.is_empty() || v.contains(char::is_control))
        {
            return Err(Error::BadFormat {
                path,
                reason: format!(
                    "node name {:?} or URL {:?} cannot be stored",
                    owner.name, owner.url
                ),
            });
        }
    }
    let tmp = dir.join(TMP_FILE_NAME);
    let written = vfs
        .create(&tmp)
        .and_then(|mut f| {
            f.write_all(identity.encode().as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| vfs.rename(&tmp, &path));
    if let Err(e) = written {
        let _ = vfs.remove(&tmp);
        return Err(Error::io("write", &path)(e));
    }
    segment::sync_dir(vfs, dir)
}

/// The folder's identity, created (durably, without an owner) if it has none yet.
pub fn load_or_create(dir: &Path) -> Result<Identity, Error> {
    match load(dir)? {
        Some(identity) => Ok(identity),
        None => {
            let identity = Identity::new(None);
            store(dir, &identity)?;
            Ok(identity)
        }
    }
}

/// Refuses a folder that belongs to another node: [`Error::ForeignDataDir`] when `found` names
/// an owner other than `expected`.
pub fn check_owner(dir: &Path, found: &Identity, expected: &DataOwner) -> Result<(), Error> {
    match &found.owner {
        Some(owner) if owner != expected => Err(Error::ForeignDataDir {
            path: dir.to_owned(),
            found_name: owner.name.clone(),
            found_url: owner.url.clone(),
            name: expected.name.clone(),
            url: expected.url.clone(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn owner(name: &str) -> DataOwner {
        DataOwner {
            name: name.into(),
            url: format!("http://127.0.0.1/{name}"),
        }
    }

    #[test]
    fn round_trip_with_and_without_owner() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let bare = load_or_create(dir.path()).unwrap();
        assert_eq!(bare.owner, None);
        assert_eq!(load(dir.path()).unwrap(), Some(bare.clone()));
        let owned = Identity {
            id: bare.id,
            owner: Some(owner("node1")),
        };
        store(dir.path(), &owned).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap(), owned);
        let text = fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(text.contains(&format!("id = {}", bare.id)), "{text}");
        assert!(text.contains("name = node1"), "{text}");
        assert!(!dir.path().join(TMP_FILE_NAME).exists());
        assert_ne!(DirId::random(), DirId::random());
        // The example in the README reads.
        let example = format!(
            "{FIRST_LINE}\nid = 5b0c9e2f8d1a4c7e9f3b6a2d1c0e8f47\nid_crc32c = 2fc55175\n\
             name = node1\nurl = http://127.0.0.1:8001\n"
        );
        assert_eq!(
            Identity::decode(&example).unwrap().owner.unwrap().name,
            "node1"
        );
    }

    /// The text with one hex digit of the id changed (what one flipped bit can do).
    fn flip_hex_digit_of_id(text: &str) -> String {
        let at = text.find("id = ").unwrap() + 5;
        let mut bytes = text.as_bytes().to_vec();
        bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn damaged_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = Identity::new(Some(owner("n"))).encode();
        let bad = [
            String::new(),
            good.replacen("format 1", "format 9", 1),
            good.replacen("id = ", "id = x", 1),
            good.replacen("url", "uri", 1),
            good.replacen("id_crc32c", "crc", 1),
            flip_hex_digit_of_id(&good),
            good.lines().take(4).collect::<Vec<_>>().join("\n"),
            format!("{FIRST_LINE}\nname = a\nurl = b\n"),
        ];
        for text in bad {
            fs::write(dir.path().join(FILE_NAME), &text).unwrap();
            let err = load(dir.path()).unwrap_err();
            assert!(
                matches!(&err, Error::Corrupt { path, .. } if path.ends_with(FILE_NAME)),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn another_owner_is_refused_and_no_owner_is_adopted() {
        let dir = Path::new("/data/node2");
        let found = Identity::new(Some(owner("node2")));
        check_owner(dir, &found, &owner("node2")).unwrap();
        let err = check_owner(dir, &found, &owner("node1")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("node2") && text.contains("node1"), "{text}");
        assert!(text.contains("DATA_DIR"), "says what to do: {text}");
        check_owner(dir, &Identity::new(None), &owner("node1")).unwrap();
        let unstorable = Identity::new(Some(owner("a\nid = 00")));
        assert!(store(Path::new("/nonexistent"), &unstorable).is_err());
    }
}
