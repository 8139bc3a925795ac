//! Envelopes on a node link (to be written).
