//! Test helper: talks to a SoftHSM token through cryptoki directly, not through kms, so the
//! tests check the token's own answers. Run with `SOFTHSM2_CONF` set.
//!
//! ```text
//! hsm-tool provision MODULE LABEL PIN_FILE     make a token, user PIN from PIN_FILE
//! hsm-tool inspect MODULE LABEL PIN_FILE KEY   print the key's attributes as JSON
//! hsm-tool weak-key MODULE LABEL PIN_FILE KEY [ID]
//!                                               make an extractable, non-sensitive AES key
//!                                               (with CKA_ID ID, hex, if given)
//! hsm-tool set-pin MODULE LABEL PIN_FILE NEW    change the user PIN to NEW
//! hsm-tool count MODULE LABEL PIN_FILE PREFIX   count token objects whose label starts so
//! hsm-tool list MODULE LABEL PIN_FILE PREFIX    print those labels, one a line
//! hsm-tool orphan MODULE LABEL PIN_FILE KEY     make a sensitive AES key labelled KEY (no id),
//!                                               as a crash before a commit would leave
//! hsm-tool destroy MODULE LABEL PIN_FILE KEY   destroy every secret key labelled KEY
//! hsm-tool loose-key MODULE LABEL PIN_FILE KEY WEAKNESS
//!                                               make a sensitive, never extractable AES key
//!                                               with one WEAKNESS: derive, wrap, public
//! hsm-tool orphan-id MODULE LABEL PIN_FILE KEY ID
//!                                               as orphan, with CKA_ID ID (hex)
//! hsm-tool known-key MODULE LABEL PIN_FILE KEY ID VALUE
//!                                               create a sensitive, not extractable AES key
//!                                               from VALUE (hex), with CKA_ID ID (hex): what
//!                                               an insider with the PIN could swap in
//! hsm-tool marker MODULE LABEL PIN_FILE MARK     make a marker as kms makes them (a private
//!                                               data object labelled MARK, application kms)
//! hsm-tool many-data MODULE LABEL PIN_FILE N     make N small private data objects (a
//!                                               token with many objects is slow to list)
//! hsm-tool ids MODULE LABEL PIN_FILE PREFIX     print "LABEL ID" (ID in hex) of the token
//!                                               objects whose label starts with PREFIX
//! hsm-tool hmac MODULE LABEL PIN_FILE KEY       HMAC-SHA256 of standard input with the one
//!                                               secret key labelled KEY, in hex (what an
//!                                               insider with the PIN can compute)
//! ```

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;

fn read_pin(path: &str) -> SecretString {
    SecretString::from(std::fs::read_to_string(path).unwrap().trim().to_owned())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let module = Path::new(&args[1]);
    let label = &args[2];
    let pin = read_pin(&args[3]);
    let pkcs11 = kms_pkcs11_conf::token::load(module).unwrap();
    if cmd == "provision" {
        let so = kms_pkcs11_conf::softhsm::random_pin().unwrap();
        kms_pkcs11_conf::softhsm::provision_token(&pkcs11, label, &so, &pin).unwrap();
        return;
    }
    let slot = kms_pkcs11_conf::token::find_token(&pkcs11, label).unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    session.login(UserType::User, Some(&pin)).unwrap();
    let arg = args[4].as_str();
    match cmd {
        "orphan" | "loose-key" => loose_key(&session, arg, args.get(5).map_or("", String::as_str)),
        "orphan-id" => kms_like_aes_key(
            &session,
            arg,
            data_encoding::HEXLOWER.decode(args[5].as_bytes()).unwrap(),
            None,
        ),
        "known-key" => kms_like_aes_key(
            &session,
            arg,
            data_encoding::HEXLOWER.decode(args[5].as_bytes()).unwrap(),
            Some(data_encoding::HEXLOWER.decode(args[6].as_bytes()).unwrap()),
        ),
        "marker" => {
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Label(arg.as_bytes().to_vec()),
                    Attribute::Application(b"kms".to_vec()),
                    Attribute::Value(b"1".to_vec()),
                ])
                .unwrap();
        }
        "many-data" => {
            for i in 0..arg.parse::<usize>().unwrap() {
                session
                    .create_object(&[
                        Attribute::Class(ObjectClass::DATA),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Label(format!("filler/{i}").into_bytes()),
                        Attribute::Value(vec![0u8; 8]),
                    ])
                    .unwrap();
            }
        }
        "ids" => {
            for h in session.find_objects(&[Attribute::Token(true)]).unwrap() {
                let (mut label, mut id) = (Vec::new(), Vec::new());
                for a in session
                    .get_attributes(h, &[AttributeType::Label, AttributeType::Id])
                    .unwrap()
                {
                    match a {
                        Attribute::Label(l) => label = l,
                        Attribute::Id(i) => id = i,
                        _ => {}
                    }
                }
                if label.starts_with(arg.as_bytes()) {
                    println!(
                        "{} {}",
                        String::from_utf8_lossy(&label),
                        data_encoding::HEXLOWER.encode(&id)
                    );
                }
            }
        }
        "hmac" => {
            let found = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(arg.as_bytes().to_vec()),
                ])
                .unwrap();
            assert_eq!(found.len(), 1, "expected exactly one key with that label");
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut data).unwrap();
            let tag = session
                .sign(&Mechanism::Sha256Hmac, found[0], &data)
                .unwrap();
            println!("{}", data_encoding::HEXLOWER.encode(&tag));
        }
        "list" => {
            for l in labels(&session, arg) {
                println!("{l}");
            }
        }
        "count" => println!("{}", labels(&session, arg).len()),
        "set-pin" => session
            .set_pin(&pin, &SecretString::from(arg.to_owned()))
            .unwrap(),
        "weak-key" => weak_key(&session, arg, args.get(5).map(String::as_str)),
        "destroy" => {
            let found = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(arg.as_bytes().to_vec()),
                ])
                .unwrap();
            for h in found {
                session.destroy_object(h).unwrap();
            }
        }
        "inspect" => println!("{}", inspect(&session, arg)),
        "inspect-all" => {
            for line in inspect_all(&session, arg) {
                println!("{line}");
            }
        }
        other => panic!("unknown command {other:?}"),
    }
}

/// An AES key with a kms key's attributes (token, private, sensitive, not extractable,
/// encrypt and decrypt only), labelled `label` with CKA_ID `id`: generated in the token, or,
/// with `value`, created from it (then never "always sensitive" nor "never extractable").
fn kms_like_aes_key(session: &Session, label: &str, id: Vec<u8>, value: Option<Vec<u8>>) {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Derive(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ];
    match value {
        Some(value) => {
            template.push(Attribute::Value(value));
            session.create_object(&template).unwrap();
        }
        None => {
            template.push(Attribute::ValueLen(32.into()));
            session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .unwrap();
        }
    }
}

/// A sensitive, never extractable AES key labelled `label` with no CKA_ID, and with one
/// `weakness` (`derive`, `wrap`, `public`) or none.
fn loose_key(session: &Session, label: &str, weakness: &str) {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Token(true),
                Attribute::Private(weakness != "public"),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Copyable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Derive(weakness == "derive"),
                Attribute::Wrap(weakness == "wrap"),
                Attribute::Unwrap(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
            ],
        )
        .unwrap();
}

/// The labels of the token objects whose label starts with `prefix`.
fn labels(session: &Session, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for h in session.find_objects(&[Attribute::Token(true)]).unwrap() {
        for a in session.get_attributes(h, &[AttributeType::Label]).unwrap() {
            if let Attribute::Label(l) = a
                && l.starts_with(prefix.as_bytes())
            {
                out.push(String::from_utf8_lossy(&l).into_owned());
            }
        }
    }
    out
}

/// An AES key that breaks kms's rules: extractable and not sensitive.
fn weak_key(session: &Session, label: &str, id: Option<&str>) {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ];
    if let Some(id) = id {
        template.push(Attribute::Id(
            data_encoding::HEXLOWER.decode(id.as_bytes()).unwrap(),
        ));
    }
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .unwrap();
}

/// The one secret key labelled `label`, its attributes as JSON, as the token reports them.
/// Every secret and private key whose label starts with `prefix`, as the token reports it:
/// one JSON object per key (its label, class and the attributes kms's rules are about).
fn inspect_all(session: &Session, prefix: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (class, name) in [
        (ObjectClass::SECRET_KEY, "secret"),
        (ObjectClass::PRIVATE_KEY, "private"),
    ] {
        for h in session
            .find_objects(&[Attribute::Token(true), Attribute::Class(class)])
            .unwrap()
        {
            let label = session
                .get_attributes(h, &[AttributeType::Label])
                .unwrap()
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Label(l) => Some(l),
                    _ => None,
                })
                .unwrap_or_default();
            if !label.starts_with(prefix.as_bytes()) {
                continue;
            }
            let mut o = attributes_of(session, h);
            o.insert(
                "label".to_owned(),
                String::from_utf8_lossy(&label).into_owned().into(),
            );
            o.insert("class".to_owned(), name.into());
            out.push(serde_json::Value::Object(o));
        }
    }
    out
}

fn inspect(session: &Session, label: &str) -> serde_json::Value {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1, "expected exactly one key with that label");
    serde_json::Value::Object(attributes_of(session, found[0]))
}

/// The attributes kms's rules are about, as the token reports them.
fn attributes_of(
    session: &Session,
    key: cryptoki::object::ObjectHandle,
) -> serde_json::Map<String, serde_json::Value> {
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Modifiable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Sign,
                AttributeType::Derive,
                AttributeType::ValueLen,
                AttributeType::Value,
            ],
        )
        .unwrap();
    let mut out = serde_json::Map::new();
    // cryptoki skips attributes the token refuses to reveal (CKR_ATTRIBUTE_SENSITIVE).
    out.insert("value_readable".to_owned(), false.into());
    for a in attrs {
        let (k, v) = match a {
            Attribute::Sensitive(v) => ("sensitive", v.into()),
            Attribute::AlwaysSensitive(v) => ("always_sensitive", v.into()),
            Attribute::Extractable(v) => ("extractable", v.into()),
            Attribute::NeverExtractable(v) => ("never_extractable", v.into()),
            Attribute::Token(v) => ("token", v.into()),
            Attribute::Private(v) => ("private", v.into()),
            Attribute::Modifiable(v) => ("modifiable", v.into()),
            Attribute::Encrypt(v) => ("encrypt", v.into()),
            Attribute::Decrypt(v) => ("decrypt", v.into()),
            Attribute::Wrap(v) => ("wrap", v.into()),
            Attribute::Unwrap(v) => ("unwrap", v.into()),
            Attribute::Sign(v) => ("sign", v.into()),
            Attribute::Derive(v) => ("derive", v.into()),
            Attribute::ValueLen(v) => ("value_len", u64::from(v).into()),
            // A sensitive key's value must not be readable: if it is, say so.
            Attribute::Value(v) => ("value_readable", (!v.is_empty()).into()),
            _ => continue,
        };
        out.insert(k.to_owned(), v);
    }
    out
}
