//! mobile_vla: record demonstrations, fine-tune and serve a Kosmos-2
//! vision-language-action policy on a ROS 2 mobile robot.
//!
//! The library holds everything that can be tested without a ROS graph; the
//! node binaries (feature `ros`) only wire topics and parameters to it.

pub mod cli;
pub mod config;
pub mod data;
pub mod fsutil;
pub mod logging;
pub mod model;
#[cfg(feature = "ros")]
pub mod ros;
pub mod runtime;
pub mod train;
