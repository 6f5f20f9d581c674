//! gamma-node's per-node agent.
