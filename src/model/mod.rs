//! The VLA model: Kosmos-2 backbone, action token, LSTM policy head.
pub mod kosmos2;
