//! `policy_node`: serves a VLA policy on the robot. See `mobile_vla::ros::policy`.

use mobile_vla::ros::{policy, runtime::run_node};

fn main() -> std::process::ExitCode {
    // Before any thread or tensor exists.
    mobile_vla::model::init_cpu_threads();
    run_node(
        policy::NAME,
        policy::DEFAULTS,
        "config/policy_node.yaml",
        policy::run,
    )
}
