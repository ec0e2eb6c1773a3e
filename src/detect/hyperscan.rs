//! Hyperscan literal matching in streaming mode, loaded at run time.
//!
//! Why not the `hyperscan` crate: its `Literal` holds a `String`, so literals with bytes
//! ≥ 0x80 or NUL (about 30% of binary content rules) cannot be expressed, and it links the
//! library at build time. Here `libhs.so.5` (Debian `libhyperscan5`) is opened with `dlopen`
//! through `libloading`, so a virtsec binary runs where Hyperscan is absent (aho-corasick then
//! serves) and needs no C headers to build. Only the handful of functions below are used:
//! `hs_compile_lit_multi` (literals as bytes with lengths, `HS_FLAG_CASELESS` per literal),
//! one scratch per matcher, one `hs_stream_t` per flow direction (52 bytes of state for the
//! benchmark rule sets), match ids reported with their end offset in the stream.
//!
//! A matcher (and its scratch) belongs to one thread: `HsMatcher` is `Send` but not `Sync`;
//! data-plane workers each build or clone their own.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::ptr;
use std::sync::OnceLock;

use super::matcher::{Literal, MatcherError};

const HS_SUCCESS: c_int = 0;
const HS_FLAG_CASELESS: c_uint = 1;
const HS_MODE_STREAM: c_uint = 2;

#[repr(C)]
struct HsCompileError {
    message: *const c_char,
    expression: c_int,
}

type MatchHandler =
    unsafe extern "C" fn(c_uint, c_ulonglong, c_ulonglong, c_uint, *mut c_void) -> c_int;

#[allow(clippy::type_complexity)]
struct Api {
    _lib: libloading::Library,
    valid_platform: unsafe extern "C" fn() -> c_int,
    compile_lit_multi: unsafe extern "C" fn(
        *const *const c_char,
        *const c_uint,
        *const c_uint,
        *const usize,
        c_uint,
        c_uint,
        *const c_void,
        *mut *mut c_void,
        *mut *mut HsCompileError,
    ) -> c_int,
    free_compile_error: unsafe extern "C" fn(*mut HsCompileError) -> c_int,
    free_database: unsafe extern "C" fn(*mut c_void) -> c_int,
    alloc_scratch: unsafe extern "C" fn(*const c_void, *mut *mut c_void) -> c_int,
    free_scratch: unsafe extern "C" fn(*mut c_void) -> c_int,
    open_stream: unsafe extern "C" fn(*const c_void, c_uint, *mut *mut c_void) -> c_int,
    scan_stream: unsafe extern "C" fn(
        *mut c_void,
        *const c_char,
        c_uint,
        c_uint,
        *mut c_void,
        Option<MatchHandler>,
        *mut c_void,
    ) -> c_int,
    close_stream:
        unsafe extern "C" fn(*mut c_void, *mut c_void, Option<MatchHandler>, *mut c_void) -> c_int,
    stream_size: unsafe extern "C" fn(*const c_void, *mut usize) -> c_int,
    database_size: unsafe extern "C" fn(*const c_void, *mut usize) -> c_int,
}

fn load() -> Result<Api, String> {
    let names = ["libhs.so.5", "libhs.so"];
    let mut last = String::new();
    for n in names {
        // SAFETY: loading Hyperscan runs its (side-effect free) library constructors only.
        match unsafe { libloading::Library::new(n) } {
            Ok(lib) => {
                macro_rules! sym {
                    ($name:literal) => {
                        // SAFETY: the symbol has the C signature declared in `Api` (hs.h of
                        // Hyperscan 5.x); the pointer stays valid while `_lib` lives, which
                        // is as long as `Api`.
                        *unsafe { lib.get($name) }.map_err(|e| format!("{n}: {e}"))?
                    };
                }
                return Ok(Api {
                    valid_platform: sym!(b"hs_valid_platform\0"),
                    compile_lit_multi: sym!(b"hs_compile_lit_multi\0"),
                    free_compile_error: sym!(b"hs_free_compile_error\0"),
                    free_database: sym!(b"hs_free_database\0"),
                    alloc_scratch: sym!(b"hs_alloc_scratch\0"),
                    free_scratch: sym!(b"hs_free_scratch\0"),
                    open_stream: sym!(b"hs_open_stream\0"),
                    scan_stream: sym!(b"hs_scan_stream\0"),
                    close_stream: sym!(b"hs_close_stream\0"),
                    stream_size: sym!(b"hs_stream_size\0"),
                    database_size: sym!(b"hs_database_size\0"),
                    _lib: lib,
                });
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "Hyperscan not available ({last}); install Debian's libhyperscan5"
    ))
}

fn api() -> Result<&'static Api, MatcherError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .map_err(|why| MatcherError::Build {
            backend: "hyperscan",
            why: why.clone(),
        })
}

/// A compiled literal database and its scratch.
pub struct HsMatcher {
    api: &'static Api,
    db: *mut c_void,
    scratch: *mut c_void,
    stream_bytes: usize,
    db_bytes: usize,
}

// SAFETY: the database is immutable after compilation and may be used from any thread; the
// scratch is used only through `&self` methods of a matcher that is not `Sync`, so by one
// thread at a time.
unsafe impl Send for HsMatcher {}

/// One direction's stream state.
pub struct HsStream {
    api: &'static Api,
    stream: *mut c_void,
}

// SAFETY: an hs_stream_t is plain memory owned by this value; Hyperscan has no thread
// affinity for it.
unsafe impl Send for HsStream {}

impl Drop for HsStream {
    fn drop(&mut self) {
        if !self.stream.is_null() {
            // SAFETY: `stream` came from hs_open_stream and is closed exactly once; a NULL
            // scratch is allowed with a NULL callback (hs_runtime.h).
            unsafe { (self.api.close_stream)(self.stream, ptr::null_mut(), None, ptr::null_mut()) };
        }
    }
}

impl Drop for HsMatcher {
    fn drop(&mut self) {
        // SAFETY: both were allocated by Hyperscan for this matcher and are freed once; no
        // stream uses the scratch after the matcher is gone (streams never hold it).
        unsafe {
            (self.api.free_scratch)(self.scratch);
            (self.api.free_database)(self.db);
        }
    }
}

struct Ctx<'a> {
    on: &'a mut dyn FnMut(u32, u64),
}

unsafe extern "C" fn on_match(
    id: c_uint,
    _from: c_ulonglong,
    to: c_ulonglong,
    _flags: c_uint,
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: `ctx` is the `&mut Ctx` passed to hs_scan_stream by `scan`, alive for the call.
    let ctx = unsafe { &mut *(ctx as *mut Ctx<'_>) };
    (ctx.on)(id, to);
    0
}

impl HsMatcher {
    /// Compiles `lits` for streaming.
    pub fn new(lits: &[Literal]) -> Result<HsMatcher, MatcherError> {
        let api = api()?;
        let err = |why: String| MatcherError::Build {
            backend: "hyperscan",
            why,
        };
        // SAFETY: no arguments; returns whether this CPU has what Hyperscan needs (SSSE3).
        if unsafe { (api.valid_platform)() } != HS_SUCCESS {
            return Err(err("this CPU lacks the instructions Hyperscan needs".into()));
        }
        if lits.is_empty() {
            return Err(err("no literals".into()));
        }
        let ptrs: Vec<*const c_char> = lits
            .iter()
            .map(|l| l.bytes.as_ptr() as *const c_char)
            .collect();
        let lens: Vec<usize> = lits.iter().map(|l| l.bytes.len()).collect();
        let flags: Vec<c_uint> = lits
            .iter()
            .map(|l| if l.nocase { HS_FLAG_CASELESS } else { 0 })
            .collect();
        let ids: Vec<c_uint> = (0..lits.len() as c_uint).collect();
        let mut db = ptr::null_mut();
        let mut cerr: *mut HsCompileError = ptr::null_mut();
        // SAFETY: the four arrays have `lits.len()` elements and outlive the call; literals
        // are passed with explicit lengths (NUL and high bytes allowed); out-pointers are valid.
        let rc = unsafe {
            (api.compile_lit_multi)(
                ptrs.as_ptr(),
                flags.as_ptr(),
                ids.as_ptr(),
                lens.as_ptr(),
                lits.len() as c_uint,
                HS_MODE_STREAM,
                ptr::null(),
                &mut db,
                &mut cerr,
            )
        };
        if rc != HS_SUCCESS {
            let msg = if cerr.is_null() {
                format!("hs_compile_lit_multi failed ({rc})")
            } else {
                // SAFETY: on failure Hyperscan returns an error struct with a NUL-terminated
                // message, freed right after we copy it.
                let m = unsafe { CStr::from_ptr((*cerr).message) }
                    .to_string_lossy()
                    .into_owned();
                // SAFETY: `cerr` came from the failed compile and is freed once.
                unsafe { (api.free_compile_error)(cerr) };
                m
            };
            return Err(err(msg));
        }
        let mut scratch = ptr::null_mut();
        // SAFETY: `db` is a valid database; `scratch` is an out-pointer.
        if unsafe { (api.alloc_scratch)(db, &mut scratch) } != HS_SUCCESS {
            // SAFETY: `db` is freed once on this error path.
            unsafe { (api.free_database)(db) };
            return Err(err("hs_alloc_scratch failed".into()));
        }
        let (mut stream_bytes, mut db_bytes) = (0usize, 0usize);
        // SAFETY: valid database and out-pointers.
        unsafe {
            (api.stream_size)(db, &mut stream_bytes);
            (api.database_size)(db, &mut db_bytes);
        }
        Ok(HsMatcher {
            api,
            db,
            scratch,
            stream_bytes,
            db_bytes,
        })
    }

    /// Bytes of state per stream.
    pub fn stream_bytes(&self) -> usize {
        self.stream_bytes
    }

    /// Bytes of the compiled database.
    pub fn database_bytes(&self) -> usize {
        self.db_bytes
    }

    pub fn new_stream(&self) -> HsStream {
        let mut s = ptr::null_mut();
        // SAFETY: valid streaming database; `s` is an out-pointer. On failure `s` stays NULL
        // and the stream matches nothing (scan checks for NULL).
        unsafe { (self.api.open_stream)(self.db, 0, &mut s) };
        HsStream {
            api: self.api,
            stream: s,
        }
    }

    /// Feeds the next in-order chunk of the stream.
    pub fn scan(&self, st: &mut HsStream, data: &[u8], on: &mut dyn FnMut(u32, u64)) {
        if st.stream.is_null() || data.is_empty() {
            return;
        }
        let mut ctx = Ctx { on };
        for chunk in data.chunks(u32::MAX as usize) {
            // SAFETY: `st.stream` is an open stream of this database, `self.scratch` belongs
            // to this (single-threaded) matcher, `chunk` is valid for its length, and `ctx`
            // outlives the call that passes it to `on_match`.
            unsafe {
                (self.api.scan_stream)(
                    st.stream,
                    chunk.as_ptr() as *const c_char,
                    chunk.len() as c_uint,
                    0,
                    self.scratch,
                    Some(on_match),
                    &mut ctx as *mut Ctx<'_> as *mut c_void,
                );
            }
        }
    }
}
