//! The control protocol and XenStore quarantine requests on arbitrary bytes: a request or an
//! error reply, never a panic (both are parsed from peers: the control socket's clients and
//! XenStore nodes).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = virtsec::control::parse_request(data);
    let (value, perms) = data.split_at(data.len() / 2);
    // As dom0's service and as a driver domain's (domain 3).
    let _ = virtsec::quarantine::requests::decide(value, perms, 0);
    let _ = virtsec::quarantine::requests::decide(value, perms, 3);
});
