//! Typed node parameters with defaults from the package's YAML files in `config/`.
//!
//! Each node has a `#[derive(RosParams, Deserialize)]` struct. Its defaults are the
//! node's section of `config/<node>.yaml` (embedded at compile time, so a binary always
//! has them); `--ros-args -p k:=v` / `--params-file` override them through rcl, and
//! the values are then visible with `ros2 param`. A node's [`NodeParams`] impl says which of
//! them `ros2 param set` may change while it runs; a change is validated first, and a rejected
//! one is answered with the reason.

use r2r::{Parameter, ParameterValue, RosParams};
use serde::de::DeserializeOwned;
use std::sync::{Arc, Mutex, MutexGuard};

/// A node's typed parameters.
pub trait NodeParams:
    RosParams + DeserializeOwned + Clone + std::fmt::Debug + Send + 'static
{
    /// Parameters `ros2 param set` may change while the node runs; any other is rejected.
    const LIVE: &'static [&'static str] = &[];

    /// Checks the values; the message names the parameter and what it must be.
    fn validate(&self) -> Result<(), String>;
}

/// What r2r's parameter services hold: sets of [`NodeParams::LIVE`] parameters are validated on a
/// copy before they replace `values`; every other set is refused. Command-line overrides are
/// applied at registration and validated by the runtime at start.
pub(crate) struct Checked<P> {
    pub values: Arc<Mutex<P>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn every later lock into a second panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn refused(name: &str, msg: String) -> r2r::Error {
    r2r::Error::ParameterValueConv {
        name: name.to_string(),
        msg,
    }
}

impl<P: NodeParams> RosParams for Checked<P> {
    fn register_parameters(
        &mut self,
        prefix: &str,
        param: Option<Parameter>,
        params: &mut r2r::indexmap::IndexMap<String, Parameter>,
    ) -> r2r::Result<()> {
        lock(&self.values).register_parameters(prefix, param, params)
    }

    fn get_parameter(&mut self, name: &str) -> r2r::Result<ParameterValue> {
        lock(&self.values).get_parameter(name)
    }

    fn set_parameter(&mut self, name: &str, value: &ParameterValue) -> r2r::Result<()> {
        if !P::LIVE.contains(&name) {
            let live = if P::LIVE.is_empty() {
                "none can".to_string()
            } else {
                format!("only {} can", P::LIVE.join(", "))
            };
            return Err(refused(
                name,
                format!("read at start only ({live} change while running): restart the node with -p {name}:=<value>"),
            ));
        }
        let mut values = lock(&self.values);
        let mut next = values.clone();
        next.set_parameter(name, value)?;
        next.validate().map_err(|msg| refused(name, msg))?;
        *values = next;
        Ok(())
    }

    fn check_parameter(&self, name: &str, value: &ParameterValue) -> r2r::Result<()> {
        lock(&self.values).check_parameter(name, value)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("{source_name}: not valid YAML: {error}")]
    Yaml {
        source_name: String,
        error: serde_yaml::Error,
    },
    #[error("{source_name}: no `{node}: ros__parameters:` (or `/**: ros__parameters:`) section")]
    MissingSection { source_name: String, node: String },
    #[error("{source_name}: parameters of `{node}`: {error} (fix the key or value in that file)")]
    Invalid {
        source_name: String,
        node: String,
        error: serde_yaml::Error,
    },
}

/// Parses a ROS 2 parameter file and deserialises the section of `node` into `P`.
/// `source_name` names the file in errors.
pub fn from_yaml<P: DeserializeOwned>(
    yaml: &str,
    source_name: &str,
    node: &str,
) -> Result<P, ParamsError> {
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|error| ParamsError::Yaml {
        source_name: source_name.to_string(),
        error,
    })?;
    let section = [node, &format!("/{node}"), "/**"]
        .iter()
        .find_map(|key| doc.get(*key).and_then(|s| s.get("ros__parameters")))
        .ok_or_else(|| ParamsError::MissingSection {
            source_name: source_name.to_string(),
            node: node.to_string(),
        })?;
    serde_yaml::from_value(section.clone()).map_err(|error| ParamsError::Invalid {
        source_name: source_name.to_string(),
        node: node.to_string(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct P {
        rate_hz: f64,
        topic: String,
    }

    #[test]
    fn reads_the_node_section() {
        let y = "other:\n  ros__parameters: {rate_hz: 1.0}\nmy_node:\n  ros__parameters:\n    rate_hz: 30.0\n    topic: image\n";
        let p: P = from_yaml(y, "x.yaml", "my_node").unwrap();
        assert_eq!(
            p,
            P {
                rate_hz: 30.0,
                topic: "image".into()
            }
        );
        let wildcard = "/**:\n  ros__parameters: {rate_hz: 2.0, topic: t}\n";
        assert_eq!(
            from_yaml::<P>(wildcard, "w.yaml", "n").unwrap().rate_hz,
            2.0
        );
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = from_yaml::<P>("a:\n  ros__parameters: {}\n", "cfg.yaml", "my_node").unwrap_err();
        assert!(e.to_string().contains("cfg.yaml") && e.to_string().contains("my_node"));
        let y = "my_node:\n  ros__parameters: {rate_hz: 1.0, topic: t, rate: 3}\n";
        let e = from_yaml::<P>(y, "cfg.yaml", "my_node")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cfg.yaml") && e.contains("rate"), "{e}");
        let y = "my_node:\n  ros__parameters: {topic: t}\n";
        let e = from_yaml::<P>(y, "cfg.yaml", "my_node")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rate_hz"), "{e}");
        assert!(from_yaml::<P>(": : :", "bad.yaml", "n").is_err());
    }
}
