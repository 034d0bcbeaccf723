//! `echo_node`: camera image + last Twist → ActionChunk (plumbing check). See `mobile_vla::ros::echo`.

use mobile_vla::ros::{echo, runtime::run_node};

fn main() -> std::process::ExitCode {
    run_node(
        echo::NAME,
        echo::DEFAULTS,
        "config/echo_node.yaml",
        echo::run,
    )
}
