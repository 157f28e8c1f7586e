//! `kv-node tls-certs <dir> [host...]`: writes a throwaway CA (`ca.pem`, `ca-key.pem`) and one
//! certificate signed by it (`node.pem`, `node-key.pem`) valid for 127.0.0.1, localhost and the
//! given hosts, for test clusters and `scripts/cluster.sh up --tls`. Not for production PKI.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "usage: kv-node tls-certs <dir> [host...]";

/// Runs the subcommand: exit 0 once the four files are written, 2 on bad arguments, 1 on failure.
pub fn main(args: &[String]) -> ExitCode {
    let Some((dir, hosts)) = args.split_first() else {
        eprintln!("kv-node: {USAGE}");
        return ExitCode::from(2);
    };
    if dir.starts_with('-') {
        eprintln!("kv-node: {USAGE}");
        return ExitCode::from(2);
    }
    match write_certificates(Path::new(dir), hosts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv-node: tls-certs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Generates the CA and the node certificate and writes them into `dir` (created if needed).
fn write_certificates(dir: &Path, hosts: &[String]) -> Result<(), String> {
    let fail = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kv throwaway CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;

    let mut names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let node_key = KeyPair::generate().map_err(fail)?;
    let mut node = CertificateParams::new(names).map_err(fail)?;
    node.distinguished_name.push(DnType::CommonName, "kv node");
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let node_cert = node.signed_by(&node_key, &ca_cert, &ca_key).map_err(fail)?;

    create_private_dir(dir)?;
    write_file(&dir.join("ca.pem"), &ca_cert.pem(), 0o644)?;
    write_file(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), 0o600)?;
    write_file(&dir.join("node.pem"), &node_cert.pem(), 0o644)?;
    write_file(&dir.join("node-key.pem"), &node_key.serialize_pem(), 0o600)
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Writes `text` to a new or truncated file; on unix with `mode` (keys: owner only).
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_load_as_a_server_and_a_client_config() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        write_certificates(&out, &["node-a.example".into()]).unwrap();
        assert!(
            kv_http::tls::acceptor_from_pem(&out.join("node.pem"), &out.join("node-key.pem"))
                .is_ok()
        );
        assert!(kv_http::tls::client_config(Some(&out.join("ca.pem"))).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join("ca-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
