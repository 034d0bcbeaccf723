//! `trainer_node`: fine-tunes on request (Finetune action). See `mobile_vla::ros::trainer`.

use mobile_vla::ros::{runtime::run_node, trainer};

fn main() -> std::process::ExitCode {
    run_node(
        trainer::NAME,
        trainer::DEFAULTS,
        "config/trainer_node.yaml",
        trainer::run,
    )
}
