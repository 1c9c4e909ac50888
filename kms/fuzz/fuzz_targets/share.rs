//! The share parser never panics on any text, and a parsed share prints back to a text that
//! parses to the same point.
#![no_main]

use kms_unseal::Share;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(share) = Share::parse(text) {
            let again = Share::parse(&share.to_text()).expect("our own text parses");
            assert!(again.same_point(&share));
        }
    }
});
