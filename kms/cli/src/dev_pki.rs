//! The development PKI `kms dev` writes: a CA, a server certificate for the loopback
//! addresses, and client certificates for an admin, an auditor, a key custodian and an
//! application, so that
//! mTLS can be tried at once. Never for production: the CA's key is thrown away after
//! issuing, and the names are fixed.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The SPIFFE trust domain of the development certificates.
pub const TRUST_DOMAIN: &str = "kms.dev";

/// The development clients: file stem and SPIFFE path.
pub const CLIENTS: [&str; 4] = ["admin", "auditor", "custodian", "app"];

/// How long the development certificates are valid.
const VALIDITY_DAYS: i64 = 90;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the files are.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The directory.
    pub dir: PathBuf,
}

impl DevPki {
    /// `DIR/tls`.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.join("tls"),
        }
    }

    /// The CA certificate (clients' `--ca`, the server's `client_ca`).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate: `server`, `admin`, `auditor`, `custodian`, `app`.
    pub fn cert(&self, who: &str) -> PathBuf {
        self.dir.join(format!("{who}.pem"))
    }

    /// Its private key.
    pub fn key(&self, who: &str) -> PathBuf {
        self.dir.join(format!("{who}-key.pem"))
    }

    /// A client's principal.
    pub fn principal(who: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{who}")
    }

    /// Writes the CA and every certificate, unless the server certificate is there and
    /// valid for at least another day. Returns whether it wrote them.
    pub fn ensure(&self) -> Result<bool, BoxError> {
        if self.fresh() {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.dir)?;
        let now = time::OffsetDateTime::now_utc();
        let validity = |p: &mut CertificateParams| {
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + time::Duration::days(VALIDITY_DAYS);
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "kms dev CA (development only)");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut ca);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let mut files = vec![(self.ca(), ca_cert.pem())];
        let leaf = |cn: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.subject_alt_names = sans;
            p.extended_key_usages = vec![usage];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            validity(&mut p);
            let cert = p.signed_by(&key, &issuer)?;
            Ok::<_, BoxError>((cert.pem(), key.serialize_pem()))
        };
        let (cert, key) = leaf(
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into()?),
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        files.push((self.cert("server"), cert));
        files.push((self.key("server"), key));
        for who in CLIENTS {
            let (cert, key) = leaf(
                who,
                vec![SanType::URI(Self::principal(who).as_str().try_into()?)],
                ExtendedKeyUsagePurpose::ClientAuth,
            )?;
            files.push((self.cert(who), cert));
            files.push((self.key(who), key));
        }
        for (path, text) in files {
            write_private(&path, text.as_bytes())?;
        }
        Ok(true)
    }

    /// Whether the server certificate exists and is valid for at least another day.
    fn fresh(&self) -> bool {
        let Ok(pem) = std::fs::read(self.cert("server")) else {
            return false;
        };
        let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(&pem) else {
            return false;
        };
        let Ok(cert) = pem.parse_x509() else {
            return false;
        };
        let tomorrow = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        cert.validity().not_after.timestamp() > tomorrow.unix_timestamp()
            && CLIENTS
                .iter()
                .all(|w| self.cert(w).is_file() && self.key(w).is_file())
    }
}

/// Writes a file readable by its owner only (0600), durably. A file that existed (a
/// `--dir` of an older `kms dev`, which wrote its config 0644) is made 0600 too.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}
