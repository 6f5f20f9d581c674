//! Context field accesses the verifier accepts.
//!
//! The verifier allows a context access only as `ctx + constant offset`. Left to itself, LLVM copies
//! an address array through a pointer into the context, or merges two loads from different fields
//! into one load from a selected offset; both are rejected. Volatile accesses, one per word, keep
//! every access at its own constant offset.

/// Reads one context word.
///
/// # Safety
/// `field` points into the program's context.
#[inline(always)]
pub(crate) unsafe fn read_u32(field: *const u32) -> u32 {
    // SAFETY: per the function contract.
    unsafe { core::ptr::read_volatile(field) }
}

/// Reads an IPv6 address field (`user_ip6`, `local_ip6`, ...).
///
/// # Safety
/// `field` points into the program's context.
#[inline(always)]
pub(crate) unsafe fn read_ip6(field: *const [u32; 4]) -> [u32; 4] {
    // SAFETY: per the function contract.
    unsafe {
        [
            read_u32(&raw const (*field)[0]),
            read_u32(&raw const (*field)[1]),
            read_u32(&raw const (*field)[2]),
            read_u32(&raw const (*field)[3]),
        ]
    }
}

/// Writes an IPv6 address field (`user_ip6`).
///
/// # Safety
/// `field` points into the program's context, in a program allowed to rewrite it.
#[inline(always)]
pub(crate) unsafe fn write_ip6(field: *mut [u32; 4], ip6: [u32; 4]) {
    // SAFETY: per the function contract.
    unsafe {
        core::ptr::write_volatile(&raw mut (*field)[0], ip6[0]);
        core::ptr::write_volatile(&raw mut (*field)[1], ip6[1]);
        core::ptr::write_volatile(&raw mut (*field)[2], ip6[2]);
        core::ptr::write_volatile(&raw mut (*field)[3], ip6[3]);
    }
}
