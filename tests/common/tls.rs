//! A throwaway CA and a server certificate for 127.0.0.1/localhost, for the tests that
//! start nats-server with TLS (the secure and edge-secure configs, the generator's).

use std::path::{Path, PathBuf};

/// The files [`make`] writes.
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes `ca.pem`, `server.pem` and `server-key.pem` into `dir` (created if missing).
pub fn make(dir: &Path) -> Tls {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "jetsync test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
    let tls = Tls {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    std::fs::write(&tls.ca, ca_cert.pem()).unwrap();
    std::fs::write(&tls.cert, server_cert.pem()).unwrap();
    std::fs::write(&tls.key, server_key.serialize_pem()).unwrap();
    tls
}
