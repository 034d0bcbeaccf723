//! The policy runtime: what turns a stream of predicted action chunks into the velocity the robot
//! is commanded, without a ROS graph. `policy_node` only wires topics, parameters and threads to it.
//!
//! Times are seconds on one clock (the node's ROS clock: image stamps and "now" must agree).

pub mod executor;
pub mod safety;
pub mod worker;

pub use executor::{ChunkExecutor, ExecutionMode, TimedChunk};
pub use safety::{Gate, HoldReason, SafetyFilter, SafetyLimits};

/// A planar base command `(vx, vy, wz)`, the robot layout of [`crate::model::policy::ActionChunk`].
pub type Command = [f32; 3];

/// Standing still.
pub const ZERO: Command = [0.0; 3];
