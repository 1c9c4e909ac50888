//! Certificates for the tests, made with rcgen: a CA per test, the server's certificate
//! for 127.0.0.1, and client certificates of any shape (SPIFFE URI SAN or CN, validity,
//! extended key usage), including ones the server must refuse.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The test trust domain.
pub const TRUST_DOMAIN: &str = "test.kms";

/// The principal of a SPIFFE path in the test trust domain.
pub fn spiffe(path: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{path}")
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Cred {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
    /// The principal the server should see (if the certificate names one).
    pub principal: String,
}

/// What a client certificate looks like.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// URI SANs.
    pub uris: Vec<String>,
    /// Subject CN.
    pub cn: Option<String>,
    /// Validity, relative to now: (start, end) offsets.
    pub valid: (time::Duration, time::Duration),
    /// The extended key usage.
    pub usage: ExtendedKeyUsagePurpose,
}

impl ClientSpec {
    /// A normal SPIFFE client certificate for `spiffe://test.kms/PATH`.
    pub fn spiffe(path: &str) -> Self {
        Self {
            uris: vec![spiffe(path)],
            cn: None,
            valid: (-time::Duration::hours(1), time::Duration::days(1)),
            usage: ExtendedKeyUsagePurpose::ClientAuth,
        }
    }
}

/// A test CA: its certificate file and the issuer (key in memory).
pub struct Pki {
    dir: PathBuf,
    /// The CA certificate (PEM file).
    pub ca: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The server's certificate for 127.0.0.1 and localhost.
    pub server: Cred,
}

impl Pki {
    /// A CA named `name` with files in `dir`, and a server certificate.
    pub fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, cert.pem()).unwrap();
        let mut pki = Self {
            dir: dir.to_owned(),
            ca,
            issuer: Issuer::new(params, key),
            server: Cred {
                cert: PathBuf::new(),
                key: PathBuf::new(),
                principal: String::new(),
            },
        };
        pki.server = pki.server_cert(&format!("{name}-server"), time::Duration::days(1));
        pki
    }

    /// A server certificate for 127.0.0.1 and localhost, valid for `valid` from now.
    pub fn server_cert(&self, stem: &str, valid: time::Duration) -> Cred {
        let now = time::OffsetDateTime::now_utc();
        self.issue(
            stem,
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
            (now - time::Duration::hours(1), now + valid),
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate, in files `STEM.pem` and `STEM-key.pem`.
    pub fn client(&self, stem: &str, spec: &ClientSpec) -> Cred {
        let now = time::OffsetDateTime::now_utc();
        let sans = spec
            .uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().unwrap()))
            .collect();
        let mut cred = self.issue(
            stem,
            spec.cn.as_deref().unwrap_or(""),
            sans,
            (now + spec.valid.0, now + spec.valid.1),
            spec.usage.clone(),
        );
        cred.principal = spec
            .uris
            .first()
            .cloned()
            .or_else(|| spec.cn.as_ref().map(|cn| format!("cn:{cn}")))
            .unwrap_or_default();
        cred
    }

    fn issue(
        &self,
        stem: &str,
        cn: &str,
        sans: Vec<SanType>,
        (not_before, not_after): (time::OffsetDateTime, time::OffsetDateTime),
        usage: ExtendedKeyUsagePurpose,
    ) -> Cred {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        if !cn.is_empty() {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cred = Cred {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}-key.pem")),
            principal: cn.to_owned(),
        };
        // Write the key first and the certificate last, each by rename, as a rotation
        // tool would.
        // The key is private (0600): the server refuses a TLS key others can read.
        for (path, text) in [(&cred.key, key.serialize_pem()), (&cred.cert, cert.pem())] {
            let tmp = path.with_extension("tmp");
            if path == &cred.key {
                crate::write_private(&tmp, text);
            } else {
                std::fs::write(&tmp, text).unwrap();
            }
            std::fs::rename(&tmp, path).unwrap();
        }
        cred
    }
}
