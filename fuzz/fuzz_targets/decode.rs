//! Packet decoding of arbitrary frames (Ethernet and raw IP): counted, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtsec::decode::fuzz_one(data);
});
