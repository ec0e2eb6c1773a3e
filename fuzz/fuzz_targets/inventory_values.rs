//! A reconcile pass fed arbitrary reply payloads (what a hostile or broken XenStore tree could
//! hold): it must finish without panicking and only keep validated values.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtsec::inventory::reconcile::fuzz_pass(data);
});
