//! ROS 2 plumbing shared by every node (feature `ros`): the node runtime (spinning,
//! typed parameters, clean shutdown), QoS choices and message conversions.
//! Node logic lives in the library; binaries in `src/bin/*_node.rs` only wire it up.

pub mod convert;
pub mod echo;
pub mod lifecycle;
pub mod params;
pub mod policy;
pub mod recorder;
pub mod runtime;
pub mod trainer;

pub use params::{NodeParams, ParamsError};
pub use runtime::{run_node, NodeError, NodeHandle};

use r2r::QosProfile;

/// Camera images: best effort, shallow queue. A late frame is worth less than a fresh one,
/// and a reliable subscription would make a fast camera back up behind a slow consumer.
pub fn image_qos() -> QosProfile {
    QosProfile::sensor_data()
}

/// Commands, chunks and instructions: reliable, keep last 10 (the ROS default).
pub fn command_qos() -> QosProfile {
    QosProfile::default()
}

/// Status topics: reliable and transient-local with depth 1, so a tool that starts
/// late (`ros2 topic echo`) still sees the current state.
pub fn status_qos() -> QosProfile {
    QosProfile::default().keep_last(1).transient_local()
}
