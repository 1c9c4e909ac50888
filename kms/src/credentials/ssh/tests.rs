use p256::elliptic_curve::Generate as _;

use super::{MAX_LINE, Reader, SshKeyError, SubjectKey, Writer};

const RSA_1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDF/JL97gb0MzXGwAIoATeICUg2behoVOHCAPYNKojBCy1ynwq/tnJUM41yYTLcholtsw5Fq6Q0jMpaqKMWbcdiH/ESN5laXfpNprq83zTpBjn5llfTU2TZH3jcE0YOwGgyYnKKQHkbon+5v4hA1Cx3nE0bSAYa8yJC2RuCoTzZcw== small";
const RSA_2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCdbnTSO0xutBhEWuJf5KNMYIy95QlWgGky2Y6nTgmKGVbpX8NRO18U7QkYTMUQqGLjWD1Yhmdc0mKfjBLuVp/ax3nEEjdd95JLkBR+p9+ToZm3cRuymidudwApl8nWh/K61CIeoqbsrOqXG7AqkZKBmPB2DZI493aYEPlrgeRv1AKSSNU44e+ysUDedWBayMvlJdi3iugx6Ko+EBqxDTe4pLior0+JaFc3ScxyF3OiqU+OIEAIO8qevmXJjhEOySjwWYLQs9bqYb+0TdARej8iVhjmJU0gK7kqzD6M9evIg4/8Q7L3u/qTjYPPeDcUiMfikyNQKmE8BNalrNO5MpDt ok";

/// An authorized_keys line of `fields` (encoded after the type string `kind`).
fn line(kind: &str, fields: impl FnOnce(&mut Writer)) -> String {
    let mut w = Writer::default();
    w.string(kind.as_bytes());
    fields(&mut w);
    format!("{kind} {} me@host", data_encoding::BASE64.encode(&w.0))
}

fn ed25519_line() -> String {
    line("ssh-ed25519", |w| w.string(&[7u8; 32]))
}

fn p256_point() -> Vec<u8> {
    let key = p256::ecdsa::SigningKey::try_generate_from_rng(&mut getrandom::SysRng).unwrap();
    key.verifying_key().to_sec1_point(false).as_bytes().to_vec()
}

#[test]
fn the_key_types_kms_certifies_are_read() {
    let ecdsa = line("ecdsa-sha2-nistp256", |w| {
        w.string(b"nistp256");
        w.string(&p256_point());
    });
    let sk_ed = line("sk-ssh-ed25519@openssh.com", |w| {
        w.string(&[7u8; 32]);
        w.string(b"ssh:");
    });
    let sk_ecdsa = line("sk-ecdsa-sha2-nistp256@openssh.com", |w| {
        w.string(b"nistp256");
        w.string(&p256_point());
        w.string(b"ssh:");
    });
    for l in [ed25519_line(), ecdsa, RSA_2048.to_owned(), sk_ed, sk_ecdsa] {
        let key = SubjectKey::parse(&format!("{l}\n")).unwrap();
        assert_eq!(key.comment.as_deref(), l.rsplit(' ').next());
        assert!(l.starts_with(key.kind));
    }
    // No comment is fine.
    let bare = ed25519_line().rsplit_once(' ').unwrap().0.to_owned();
    assert_eq!(SubjectKey::parse(&bare).unwrap().comment, None);
}

#[test]
fn every_bad_key_is_refused_with_its_reason() {
    let ed = ed25519_line();
    let b64 = ed.split(' ').nth(1).unwrap();
    let blob = data_encoding::BASE64.decode(b64.as_bytes()).unwrap();
    let with_blob =
        |kind: &str, blob: &[u8]| format!("{kind} {}", data_encoding::BASE64.encode(blob));
    let mut trailing = blob.clone();
    trailing.push(0);
    let cert_line = line("ssh-ed25519-cert-v01@openssh.com", |w| w.string(&[0u8; 32]));
    let bad_point = line("ecdsa-sha2-nistp256", |w| {
        w.string(b"nistp256");
        let mut q = vec![4u8];
        q.extend_from_slice(&[1u8; 64]);
        w.string(&q);
    });
    let wrong_curve = line("ecdsa-sha2-nistp256", |w| {
        w.string(b"nistp384");
        w.string(&p256_point());
    });
    let negative_e = line("ssh-rsa", |w| {
        w.string(&[0x81]);
        w.string(&[1u8; 256]);
    });
    let even_n = line("ssh-rsa", |w| {
        w.string(&[1, 0, 1]);
        let mut n = vec![0u8];
        n.extend_from_slice(&[0xc0u8; 256]);
        w.string(&n);
    });
    let cases: Vec<(String, SshKeyError)> = vec![
        (String::new(), SshKeyError::UnknownType),
        (format!("{ed}\n{ed}"), SshKeyError::NotOneLine),
        (
            format!("{ed} {}", "x".repeat(MAX_LINE)),
            SshKeyError::NotOneLine,
        ),
        (format!("from=\"10.0.0.1\" {ed}"), SshKeyError::UnknownType),
        ("ssh-dss AAAA".to_owned(), SshKeyError::UnknownType),
        (cert_line, SshKeyError::Certificate),
        (
            with_blob("ssh-ed25519", &{
                let mut w = Writer::default();
                w.string(b"ssh-ed25519-cert-v01@openssh.com");
                w.0
            }),
            SshKeyError::Certificate,
        ),
        (
            "ssh-ed25519".to_owned(),
            SshKeyError::Malformed("no key after the type"),
        ),
        ("ssh-ed25519 !!!!".to_owned(), SshKeyError::NotBase64),
        (
            with_blob("ssh-ed25519", &blob[..blob.len() - 1]),
            SshKeyError::Malformed("truncated"),
        ),
        (
            with_blob("ssh-ed25519", &trailing),
            SshKeyError::TrailingData,
        ),
        (
            with_blob("ecdsa-sha2-nistp256", &blob),
            SshKeyError::Malformed("the key's type is not the line's"),
        ),
        (RSA_1024.to_owned(), SshKeyError::RsaSize(1024)),
        (
            bad_point,
            SshKeyError::Malformed("the point is not one of the curve"),
        ),
        (
            wrong_curve,
            SshKeyError::Malformed("the curve is not the key type's"),
        ),
        (negative_e, SshKeyError::Malformed("a negative integer")),
        (
            even_n,
            SshKeyError::Malformed("an RSA key's e and n are odd"),
        ),
        (
            line("ssh-ed25519", |w| w.string(&[7u8; 31])),
            SshKeyError::Malformed("an Ed25519 key is 32 bytes"),
        ),
        (
            line("sk-ssh-ed25519@openssh.com", |w| {
                w.string(&[7u8; 32]);
                w.string(b"");
            }),
            SshKeyError::Malformed("a security key names its application"),
        ),
    ];
    for (input, want) in cases {
        assert_eq!(
            SubjectKey::parse(&input),
            Err(want.clone()),
            "{}",
            input.chars().take(80).collect::<String>()
        );
    }
}

#[test]
fn mpints_are_minimal_and_positive() {
    let enc = |n: &[u8]| {
        let mut w = Writer::default();
        w.mpint(n);
        w.0
    };
    assert_eq!(enc(&[0, 0]), [0, 0, 0, 0]);
    assert_eq!(enc(&[0, 0x7f]), [0, 0, 0, 1, 0x7f]);
    assert_eq!(enc(&[0x80]), [0, 0, 0, 2, 0, 0x80]);
    assert_eq!(enc(&[0, 0, 0x80, 1]), [0, 0, 0, 3, 0, 0x80, 1]);
    for good in [enc(&[0x80]), enc(&[0x7f]), enc(&[])] {
        assert!(Reader::new(&good).mpint().is_ok());
    }
    for bad in [
        vec![0, 0, 0, 1, 0x80],
        vec![0, 0, 0, 2, 0, 0x7f],
        vec![0, 0, 0, 1, 0],
    ] {
        assert!(Reader::new(&bad).mpint().is_err(), "{bad:?}");
    }
}

mod never_panics {
    use proptest::prelude::*;

    use super::{SubjectKey, Writer};

    proptest! {
        /// Any text is read or refused, never a panic.
        #[test]
        fn on_any_text(line in ".{0,300}") {
            let _ = SubjectKey::parse(&line);
        }

        /// A valid key's bytes, altered anywhere (length fields included), are read or
        /// refused, never a panic.
        #[test]
        fn on_an_altered_key(at in 0usize..60, byte in any::<u8>(), cut in 0usize..60) {
            let mut w = Writer::default();
            w.string(b"ecdsa-sha2-nistp256");
            w.string(b"nistp256");
            w.string(&[4u8; 65]);
            let mut blob = w.0;
            if let Some(b) = blob.get_mut(at) {
                *b = byte;
            }
            blob.truncate(blob.len().saturating_sub(cut));
            let line = format!("ecdsa-sha2-nistp256 {}", data_encoding::BASE64.encode(&blob));
            let _ = SubjectKey::parse(&line);
        }
    }
}
