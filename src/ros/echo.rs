//! `echo_node`: the smallest real node, proving the plumbing end to end.
//!
//! For every camera image that the bridge accepts it publishes an `ActionChunk` whose
//! header is the image's (stamp preserved, frame_id from the parameter) and whose
//! actions repeat the last velocity command seen. A malformed image is logged with the
//! bridge's error and skipped; the node keeps running.

use super::convert::{action_to_twist, decode_image, twist_to_action};
use super::params::NodeParams;
use super::runtime::NodeHandle;
use super::{command_qos, image_qos};
use futures::StreamExt;
use r2r::geometry_msgs::msg::Twist;
use r2r::mobile_vla::msg::ActionChunk;
use r2r::sensor_msgs::msg::Image;
use r2r::RosParams;
use serde::Deserialize;
use tracing::{info, warn};

pub const NAME: &str = "echo_node";
pub const DEFAULTS: &str = include_str!("../../config/echo_node.yaml");

#[derive(Debug, Clone, Deserialize, RosParams)]
#[serde(deny_unknown_fields)]
pub struct EchoParams {
    /// Camera topic (sensor_msgs/Image)
    pub image_topic: String,
    /// Velocity commands to repeat in the chunk (geometry_msgs/Twist)
    pub cmd_topic: String,
    /// Output topic (mobile_vla/ActionChunk)
    pub chunk_topic: String,
    /// Number of actions per chunk
    pub chunk_len: u32,
    /// Seconds between actions in the chunk
    pub dt: f64,
    /// frame_id written into the chunk header
    pub frame_id: String,
}

impl NodeParams for EchoParams {
    // Read for every image.
    const LIVE: &'static [&'static str] = &["chunk_len", "dt", "frame_id"];

    fn validate(&self) -> Result<(), String> {
        if self.chunk_len == 0 {
            return Err("`chunk_len` is 0: it must be ≥ 1".into());
        }
        if !(self.dt.is_finite() && self.dt > 0.0) {
            return Err(format!("`dt` is {}: it must be > 0", self.dt));
        }
        Ok(())
    }
}

pub async fn run(h: NodeHandle<EchoParams>) -> anyhow::Result<()> {
    let p = h.params();
    let (mut images, mut cmds, chunks) = {
        let mut node = h.node();
        (
            node.subscribe::<Image>(&p.image_topic, image_qos())?,
            node.subscribe::<Twist>(&p.cmd_topic, command_qos())?,
            node.create_publisher::<ActionChunk>(&p.chunk_topic, command_qos())?,
        )
    };
    info!(
        "echo_node: {} + {} -> {}",
        p.image_topic, p.cmd_topic, p.chunk_topic
    );
    let mut last_cmd = [0.0f32; 3];
    loop {
        tokio::select! {
            _ = h.shutdown() => break,
            Some(t) = cmds.next() => last_cmd = twist_to_action(&t),
            Some(img) = images.next() => {
                if let Err(e) = decode_image(&img) {
                    warn!("dropping image stamped {}.{:09}: {e}", img.header.stamp.sec, img.header.stamp.nanosec);
                    continue;
                }
                let p = h.params();
                let mut header = img.header;
                header.frame_id = p.frame_id.clone();
                let chunk = ActionChunk {
                    header,
                    actions: vec![action_to_twist(last_cmd); p.chunk_len as usize],
                    dt: p.dt as f32,
                };
                chunks.publish(&chunk)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_defaults_parse() {
        let p: super::EchoParams =
            crate::ros::params::from_yaml(super::DEFAULTS, "config/echo_node.yaml", super::NAME)
                .unwrap();
        assert_eq!(p.image_topic, "image");
        assert!(p.chunk_len > 0 && p.dt > 0.0);
    }
}
