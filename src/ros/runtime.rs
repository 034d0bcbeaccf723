//! The node runtime every mobile_vla node runs in.
//!
//! One thread spins the rcl node; node logic runs as async tasks on a small tokio
//! runtime and talks to r2r through streams. Shutdown (SIGINT, SIGTERM or the node
//! asking for it) follows the order that keeps rcl/Fast DDS from crashing at exit:
//! stop the spin thread, join it, drop every r2r handle, then return from `main`.

use super::params::{self, lock, Checked, NodeParams, ParamsError};
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error("ROS: {0}")]
    Ros(#[from] r2r::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
}

/// What node code gets: the node (to create handles), its typed parameters and
/// the shutdown signal. Cheap to clone into tasks.
pub struct NodeHandle<P> {
    node: Arc<Mutex<r2r::Node>>,
    /// The node's ROS clock (sim time when `use_sim_time`), held apart from the node: reading it
    /// must not wait for the spin thread, which holds the node lock while it waits for work.
    clock: Arc<Mutex<r2r::Clock>>,
    params: Arc<Mutex<P>>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    shutdown_rx: watch::Receiver<bool>,
}

impl<P> Clone for NodeHandle<P> {
    fn clone(&self) -> Self {
        Self {
            node: self.node.clone(),
            clock: self.clock.clone(),
            params: self.params.clone(),
            shutdown_tx: self.shutdown_tx.clone(),
            shutdown_rx: self.shutdown_rx.clone(),
        }
    }
}

impl<P: Clone> NodeHandle<P> {
    /// Locks the node to create publishers, subscriptions, services. Keep the guard short:
    /// the spin thread needs the same lock.
    pub fn node(&self) -> MutexGuard<'_, r2r::Node> {
        lock(&self.node)
    }

    /// A snapshot of the current parameter values (the [`NodeParams::LIVE`] ones change with
    /// `ros2 param set`).
    pub fn params(&self) -> P {
        lock(&self.params).clone()
    }

    /// Resolves once shutdown has been requested.
    pub async fn shutdown(&self) {
        let mut rx = self.shutdown_rx.clone();
        // An error means the sender is gone, which only happens at teardown.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    pub fn is_shutdown(&self) -> bool {
        *self.shutdown_rx.borrow()
    }

    /// Asks the node to stop (e.g. after a fatal error in a task).
    pub fn request_shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// The ROS clock's current time as a message stamp.
    pub fn now(&self) -> r2r::builtin_interfaces::msg::Time {
        match lock(&self.clock).get_now() {
            Ok(d) => r2r::Clock::to_builtin_time(&d),
            Err(_) => r2r::builtin_interfaces::msg::Time { sec: 0, nanosec: 0 },
        }
    }
}

/// Runs a node: parameters from `default_yaml` (the node's `config/<name>.yaml`) and the
/// command line, validated (a bad value stops the node, naming the parameter), a spin thread,
/// signal handling, and `body` until it returns. Returns the process exit code; call it as the
/// whole of a node binary's `main`.
pub fn run_node<P, F, Fut>(name: &str, default_yaml: &str, yaml_name: &str, body: F) -> ExitCode
where
    P: NodeParams,
    F: FnOnce(NodeHandle<P>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::logging::init();
    match run_node_inner(name, default_yaml, yaml_name, body) {
        Ok(()) => {
            info!("{name}: stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{name}: {}", crate::logging::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run_node_inner<P, F, Fut>(
    name: &str,
    default_yaml: &str,
    yaml_name: &str,
    body: F,
) -> anyhow::Result<()>
where
    P: NodeParams,
    F: FnOnce(NodeHandle<P>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let defaults: P = params::from_yaml(default_yaml, yaml_name, name)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)?;
    let stop_spin = Arc::new(AtomicBool::new(false));
    let (result, spinner) = rt.block_on(async {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shutdown_tx = Arc::new(shutdown_tx);
        watch_signals(shutdown_tx.clone())?;

        let ctx = r2r::Context::create().map_err(NodeError::Ros)?;
        let mut node = r2r::Node::create(ctx, name, "").map_err(NodeError::Ros)?;
        let params = Arc::new(Mutex::new(defaults));
        // Applies --ros-args overrides to `params` and serves `ros2 param get/set/list`.
        let checked = Arc::new(Mutex::new(Checked {
            values: params.clone(),
        }));
        let (param_server, param_events) = node
            .make_derived_parameter_handler(checked)
            .map_err(NodeError::Ros)?;
        tokio::spawn(param_server);
        tokio::spawn(futures::StreamExt::for_each(
            param_events,
            |(param, value)| async move { info!("parameter {param} set to {value:?}") },
        ));
        info!("{name}: parameters {:?}", lock(&params));
        lock(&params)
            .validate()
            .map_err(NodeError::InvalidParameter)?;

        let clock = node.get_ros_clock();
        let node = Arc::new(Mutex::new(node));
        let spinner = spawn_spinner(node.clone(), stop_spin.clone());
        let handle = NodeHandle {
            node,
            clock,
            params,
            shutdown_tx,
            shutdown_rx,
        };
        let result = body(handle).await;
        anyhow::Ok((result, spinner))
    })?;
    stop_spin.store(true, Ordering::Relaxed);
    if spinner.join().is_err() {
        error!("{name}: spin thread panicked");
    }
    // Dropping the runtime drops the remaining tasks and with them the last node handles,
    // now that nothing spins.
    drop(rt);
    result
}

fn watch_signals(tx: Arc<watch::Sender<bool>>) -> Result<(), NodeError> {
    let mut int = signal(SignalKind::interrupt()).map_err(NodeError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(NodeError::Signals)?;
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        info!("{which} received: shutting down");
        let _ = tx.send(true);
    });
    Ok(())
}

fn spawn_spinner(
    node: Arc<Mutex<r2r::Node>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            lock(&node).spin_once(Duration::from_millis(20));
            // spin_once returns at once when there is nothing to wait on; don't busy-loop.
            // Otherwise still pause briefly with the lock released: a std Mutex is not fair, and
            // relocking at once starved the node's task of it (seconds to create its endpoints).
            let pause = if start.elapsed() < Duration::from_millis(1) {
                Duration::from_millis(5)
            } else {
                Duration::from_micros(200)
            };
            std::thread::sleep(pause);
        }
    })
}
