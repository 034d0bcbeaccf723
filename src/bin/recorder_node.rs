//! `recorder_node`: records Mobile VLA episodes from live topics. See `mobile_vla::ros::recorder`.

use mobile_vla::ros::{recorder, runtime::run_node};

fn main() -> std::process::ExitCode {
    run_node(
        recorder::NAME,
        recorder::DEFAULTS,
        "config/recorder_node.yaml",
        recorder::run,
    )
}
