//! Decode + flow + reassembly + detection on a sequence of arbitrary frames (a hostile guest's
//! traffic): the first bytes choose segment cuts, the rest are frames.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtsec::inspect::fuzz_frames(data);
});
