//! The control protocol and XenStore quarantine requests on arbitrary bytes: a request or an
//! error reply, never a panic (both are parsed from peers: the control socket's clients and
//! XenStore nodes).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = virtsec::control::parse_request(data);
    let (value, perms) = data.split_at(data.len() / 2);
    let _ = virtsec::quarantine::requests::decide(value, perms);
});
