//! The VLA model: Kosmos-2 backbone, action token, LSTM policy head.
