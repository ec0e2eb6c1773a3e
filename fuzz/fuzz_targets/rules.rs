//! The Suricata rule parser on arbitrary text: a clear skip reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        virtsec::detect::rules::fuzz_one(text);
    }
});
