//! Shared test support: loopback backends and the network-namespace node harness.
