//! The ciphertext parser never panics, and what it accepts re-assembles to the same bytes.
#![no_main]

use kms::keyring::ciphertext::{assemble, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse(data) {
        assert_eq!(assemble(p.version, &p.nonce, p.body), data);
    }
});
