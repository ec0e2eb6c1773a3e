//! XenStore wire codec, both directions: arbitrary bytes through the stream decoder (split
//! reads), every decoded frame through the request parser, and parse∘emit must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtsec::xenstore::wire::fuzz_one(data);
});
