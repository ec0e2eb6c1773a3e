//! The configuration parser (virtsecd.toml, [[policy]] included) on arbitrary text: a clear
//! file:line error or a configuration, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = virtsec::config::Config::parse(text, std::path::Path::new("fuzz.toml"));
    }
});
