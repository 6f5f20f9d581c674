//! The `#[repr(C)]` types shared by the eBPF programs (`proxy-ebpf`) and the agent (`proxy-agent`):
//! map keys and values, compiled by both sides from this one place.
#![no_std]
