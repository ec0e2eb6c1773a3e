//! nftables transactions in-process, through libnftables.
//!
//! The `nft` command is a thin front-end of `libnftables.so.1` (Debian's `nftables` package
//! depends on `libnftables1`): the same parser, the same netlink batch, the same atomic
//! transaction. Calling the library directly removes a fork, an exec, the dynamic loading
//! of `nft` and its first ruleset cache fill from every transaction, which is most of the
//! cost of an isolation on the quarantine path (tests/quarantine_netns.rs measures it; the
//! figures are in docs/performance.md). The script text is unchanged, so what an
//! administrator reads in `nft list ruleset` and in the error messages is the same either way.
//!
//! Design:
//! - the library is loaded with `dlopen` (as Hyperscan and libxenctrl are), so a host whose
//!   nftables is built without the shared library still works: [`run`] returns `None` and
//!   the caller runs the `nft` command. `VIRTSEC_NFT_PROCESS=1` forces the command (for
//!   comparison, and as an operator's escape hatch);
//! - contexts kept between calls behind mutexes (a libnftables context is not thread-safe;
//!   keeping it keeps its netlink socket and cache warm): one for transactions, one for
//!   listings, so that the periodic read of the counters (a thread of its own, which may
//!   take a while on a big table) never holds up an isolation;
//! - the context's netlink socket belongs to the network namespace of the thread that
//!   created it, while `nft` would run in the calling thread's. The context is therefore
//!   tied to the namespace it was made in (device and inode of `/proc/thread-self/ns/net`)
//!   and remade when a caller is in another one;
//! - output and errors are buffered in the context and copied out under the lock
//!   (`nft_ctx_get_*_buffer` returns the buffer and rewinds it for the next command).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, OnceLock};

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxBuf = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// `NFT_CTX_OUTPUT_JSON` of `<nftables/libnftables.h>`.
const OUTPUT_JSON: c_uint = 1 << 4;

struct Api {
    _lib: libloading::Library,
    new: CtxNew,
    free: CtxFree,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    output: CtxBuf,
    error: CtxBuf,
    set_flags: SetFlags,
    run: RunCmd,
}

impl Api {
    fn load() -> Option<Api> {
        // SAFETY: loading nftables' own shared library; its initialisers are nftables'.
        let lib = unsafe { libloading::Library::new("libnftables.so.1") }.ok()?;
        // SAFETY: these are the C signatures of <nftables/libnftables.h> (LIBNFTABLES_1,
        // unchanged since nftables 0.9); the pointers stay valid while `_lib` is held.
        unsafe {
            Some(Api {
                new: *lib.get::<CtxNew>(b"nft_ctx_new\0").ok()?,
                free: *lib.get::<CtxFree>(b"nft_ctx_free\0").ok()?,
                buffer_output: *lib.get::<CtxInt>(b"nft_ctx_buffer_output\0").ok()?,
                buffer_error: *lib.get::<CtxInt>(b"nft_ctx_buffer_error\0").ok()?,
                output: *lib.get::<CtxBuf>(b"nft_ctx_get_output_buffer\0").ok()?,
                error: *lib.get::<CtxBuf>(b"nft_ctx_get_error_buffer\0").ok()?,
                set_flags: *lib.get::<SetFlags>(b"nft_ctx_output_set_flags\0").ok()?,
                run: *lib.get::<RunCmd>(b"nft_run_cmd_from_buffer\0").ok()?,
                _lib: lib,
            })
        }
    }
}

/// A context and the network namespace its socket lives in.
struct Ctx {
    ptr: *mut c_void,
    netns: (u64, u64),
}

// SAFETY: the context is only used under the mutex that holds it, one thread at a time;
// libnftables keeps no thread-local state.
unsafe impl Send for Ctx {}

struct Lib {
    api: Api,
    /// The transactions' context and the listings' (JSON output).
    ctx: [Mutex<Option<Ctx>>; 2],
}

fn lib() -> Option<&'static Lib> {
    static LIB: OnceLock<Option<Lib>> = OnceLock::new();
    LIB.get_or_init(|| {
        Api::load().map(|api| Lib {
            api,
            ctx: [Mutex::new(None), Mutex::new(None)],
        })
    })
    .as_ref()
}

/// Whether the library is used: loadable and not turned off by `VIRTSEC_NFT_PROCESS=1`.
pub fn available() -> bool {
    std::env::var_os("VIRTSEC_NFT_PROCESS").is_none_or(|v| v != "1") && lib().is_some()
}

fn current_netns() -> Option<(u64, u64)> {
    let m = std::fs::metadata("/proc/thread-self/ns/net").ok()?;
    Some((m.dev(), m.ino()))
}

/// What one command produced: its standard output, or nftables' error message.
pub type Outcome = Result<String, String>;

/// Runs `script` (the text `nft -f -` reads; with `json`, output as `nft -j` prints it) in
/// the calling thread's network namespace. `None` when the library is not used: run the
/// `nft` command instead.
pub fn run(script: &str, json: bool) -> Option<Outcome> {
    if !available() {
        return None;
    }
    let lib = lib()?;
    let Ok(text) = CString::new(script) else {
        return Some(Err("the nftables script holds a NUL byte".into()));
    };
    let netns = current_netns()?;
    let mut guard = lib.ctx[usize::from(json)]
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if guard.as_ref().is_some_and(|c| c.netns != netns) {
        if let Some(old) = guard.take() {
            // SAFETY: `old.ptr` came from nft_ctx_new and is freed once, here.
            unsafe { (lib.api.free)(old.ptr) };
        }
    }
    if guard.is_none() {
        // SAFETY: NFT_CTX_DEFAULT (0) is the flag `nft` uses; the result is checked.
        let ptr = unsafe { (lib.api.new)(0) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `ptr` is a live context; buffering only redirects its output streams.
        let buffered =
            unsafe { (lib.api.buffer_output)(ptr) == 0 && (lib.api.buffer_error)(ptr) == 0 };
        if !buffered {
            // SAFETY: freed once; no other reference to it exists.
            unsafe { (lib.api.free)(ptr) };
            return None;
        }
        *guard = Some(Ctx { ptr, netns });
    }
    let ctx = guard.as_ref()?.ptr;
    // SAFETY: `ctx` is live and only used under `guard`; `text` outlives the call; the
    // buffers returned are NUL-terminated and copied before the next call on `ctx`.
    unsafe {
        (lib.api.set_flags)(ctx, if json { OUTPUT_JSON } else { 0 });
        let rc = (lib.api.run)(ctx, text.as_ptr());
        let copy = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let out = copy((lib.api.output)(ctx));
        let err = copy((lib.api.error)(ctx));
        Some(if rc == 0 {
            Ok(out)
        } else {
            Err(err.trim().to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a host with nftables: a transaction applies, a listing comes back as JSON, a bad
    /// transaction fails with nftables' own message and leaves nothing half-applied. Needs
    /// CAP_NET_ADMIN (root); skipped, loudly, without it or without the library.
    #[test]
    fn transactions_in_process() {
        if !available() || !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: libnftables.so.1 not loadable or not root");
            return;
        }
        let t = format!("virtsec_libnft_{}", std::process::id());
        struct Cleanup(String);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = run(&format!("delete table inet {}", self.0), false);
            }
        }
        let _cleanup = Cleanup(t.clone());
        let ok = run(
            &format!("add table inet {t}\nadd chain inet {t} c\nadd rule inet {t} c counter accept comment \"x\"\n"),
            false,
        );
        assert_eq!(ok, Some(Ok(String::new())));
        let listed = run(&format!("list table inet {t}"), true).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
        assert!(v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["rule"]["comment"] == "x"));
        // Atomic: the kernel refuses a rule for a chain that does not exist (`nosuch`), and
        // the chain added by the same transaction is not there either.
        let bad = run(
            &format!("add chain inet {t} d\nadd rule inet {t} nosuch accept\n"),
            false,
        )
        .unwrap();
        let msg = bad.unwrap_err();
        assert!(msg.contains("No such file or directory"), "{msg}");
        let listed = run(&format!("list table inet {t}"), false)
            .unwrap()
            .unwrap();
        assert!(listed.contains("chain c"), "{listed}");
        assert!(!listed.contains("chain d"), "{listed}");
    }
}
